package pickup

import (
	"fmt"
	"math"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/protocol"
)

// TestMaxLivePerLocker: the largest credential set of MaxLivePerLocker
// pickups fits one creds message and one more pickup's would not; the API
// doc states the same number.
func TestMaxLivePerLocker(t *testing.T) {
	if MaxLivePerLocker < 24 || maxLiveFor(protocol.MaxPayload+400) <= MaxLivePerLocker {
		t.Fatalf("MaxLivePerLocker = %d: want room for a 24-compartment locker, and the bound to grow with the limit", MaxLivePerLocker)
	}
	if got := maxLiveFor(1000); got < 1 || got > 3 {
		t.Errorf("maxLiveFor(1000) = %d, want 1-3 (a pickup takes ~330 bytes)", got)
	}
	doc, err := os.ReadFile("../docs/api.md")
	if err != nil {
		t.Fatal(err)
	}
	if want := fmt.Sprintf("fewer than %d live", MaxLivePerLocker); !strings.Contains(strings.Join(strings.Fields(string(doc)), " "), want) {
		t.Errorf("docs/api.md does not say %q", want)
	}
}

// TestWireCredentialsGroups: a code's PIN and QR entries share a group
// number, one per credential within the set; a credential with one form has
// none.
func TestWireCredentialsGroups(t *testing.T) {
	at := time.Date(2026, 12, 5, 12, 0, 0, 0, time.UTC)
	got := WireCredentials([]Credential{
		{ID: "k-a", PINMAC: "pa", QRMAC: "qa", Compartments: []int{1}, NotAfter: at},
		{ID: "k-b", PINMAC: "pb", Compartments: []int{2, 3}, NotAfter: at},
		{ID: "k-c", PINMAC: "pc", QRMAC: "qc", Compartments: []int{4}, NotAfter: at},
	})
	want := []struct {
		id    string
		group int
	}{{"k-a.p", 1}, {"k-a.q", 1}, {"k-b.p", 0}, {"k-c.p", 2}, {"k-c.q", 2}}
	if len(got) != len(want) {
		t.Fatalf("got %d entries, want %d: %+v", len(got), len(want), got)
	}
	for i, w := range want {
		if got[i].ID != w.id || got[i].Group != w.group {
			t.Errorf("entry %d: %s group %d, want %s group %d", i, got[i].ID, got[i].Group, w.id, w.group)
		}
	}
}

// TestFitSet: a set within the bound keeps its groups; one past the
// protocol's limit without them (a set left from before the groups took
// room) loses them, and then fits.
func TestFitSet(t *testing.T) {
	at := time.Date(2026, 12, 31, 23, 59, 59, 999e6, time.UTC)
	mac := protocol.CredMAC(make([]byte, 32), "")
	build := func(n int) protocol.CredSet {
		var cs []Credential
		for range n {
			cs = append(cs, Credential{ID: fleet.NewID("k"), PINMAC: mac, QRMAC: mac, Compartments: []int{math.MaxInt}, NotAfter: at})
		}
		return protocol.CredSet{Version: math.MaxInt64, TS: protocol.T(at), Creds: WireCredentials(cs)}
	}
	within := build(MaxLivePerLocker)
	FitSet(&within)
	if within.Creds[0].Group == 0 || len(protocol.Encode(within)) > protocol.MaxPayload {
		t.Fatalf("a set of %d pickups: group %d, %d bytes; want its groups, within %d", MaxLivePerLocker, within.Creds[0].Group, len(protocol.Encode(within)), protocol.MaxPayload)
	}
	over := build(MaxLivePerLocker + 1)
	if len(protocol.Encode(over)) <= protocol.MaxPayload {
		t.Fatal("the bound is not tight: one more pickup's set fits")
	}
	FitSet(&over)
	for _, c := range over.Creds {
		if c.Group != 0 {
			t.Fatalf("entry %s kept group %d in a set past the limit", c.ID, c.Group)
		}
	}
	if n := len(protocol.Encode(over)); n > protocol.MaxPayload {
		t.Fatalf("without groups the set is still %d bytes", n)
	}
}
