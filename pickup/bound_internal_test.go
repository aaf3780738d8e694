package pickup

import (
	"fmt"
	"os"
	"strings"
	"testing"

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
