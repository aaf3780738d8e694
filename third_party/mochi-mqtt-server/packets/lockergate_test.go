// Lockergate's tests of its patches to this package (PATCHES.md); run by
// ../upstream-test with upstream's own.

package packets

import (
	"reflect"
	"testing"
)

// TestPacketsKeepWhatWasAdded: patch 9 keeps packets in a compact form when
// it can; every packet must come back exactly as it was added.
func TestPacketsKeepWhatWasAdded(t *testing.T) {
	plain := Packet{
		FixedHeader: FixedHeader{Type: Publish, Qos: 1, Retain: true, Remaining: 42},
		TopicName:   "lockers/v1/A/presence", Payload: []byte(`{"online":true}`),
		Origin: "A", Created: 1700000000, PacketID: 7, ProtocolVersion: 4,
		Mods: Mods{MaxSize: 1024},
	}
	withProps := plain
	withProps.ProtocolVersion = 5
	withProps.Properties = Properties{
		ContentType: "application/json", MessageExpiryInterval: 60,
		User: []UserProperty{{Key: "k", Val: "v"}}, CorrelationData: []byte{1, 2},
	}
	withProps.Expiry = 1700000060
	withConnect := plain
	withConnect.Connect = ConnectParams{ClientIdentifier: "A", Keepalive: 30}
	withFilters := plain
	withFilters.Filters = Subscriptions{{Filter: "a/#"}}
	withReasons := plain
	withReasons.ReasonCodes = []byte{0x80}

	p := NewPackets()
	cases := map[string]Packet{"plain": plain, "props": withProps, "connect": withConnect,
		"filters": withFilters, "reasons": withReasons}
	for id, pk := range cases {
		p.Add(id, pk)
	}
	for id, want := range cases {
		got, ok := p.Get(id)
		if !ok || !reflect.DeepEqual(got, want) {
			t.Errorf("%s: Get = %+v, %v; want %+v", id, got, ok, want)
		}
	}
	all := p.GetAll()
	if !reflect.DeepEqual(all, cases) {
		t.Errorf("GetAll = %+v, want %+v", all, cases)
	}
	if n := p.Expiring(); n != 1 {
		t.Errorf("Expiring = %d, want 1", n)
	}
	if ids := p.Matching(func(pk *Packet) bool { return pk.Properties.ContentType != "" }); len(ids) != 1 || ids[0] != "props" {
		t.Errorf("Matching = %v, want [props]", ids)
	}
	p.Delete("props")
	if n := p.Expiring(); n != 0 {
		t.Errorf("Expiring after Delete = %d, want 0", n)
	}
	if _, ok := p.Get("props"); ok {
		t.Error("deleted packet still there")
	}
}
