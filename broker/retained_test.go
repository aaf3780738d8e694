package broker

import (
	"testing"

	"github.com/mochi-mqtt/server/v2/packets"
)

// TestRetainedExpiry covers the patched sweep of expired retained messages
// (third_party/mochi-mqtt-server/PATCHES.md): it skips the sweep while no
// retained message has an expiry, and still removes one that has, once it
// is due, while a retained message without one stays.
func TestRetainedExpiry(t *testing.T) {
	h := newHarness(t, nil, nil)
	retained := h.b.server.Topics.Retained
	lasting := dialRaw(t, h.addr, 4)
	if ack := lasting.connect("A", "A", "secret-A", 30, nil); ack.ReasonCode != 0 {
		t.Fatalf("connect A: %#x", ack.ReasonCode)
	}
	lasting.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Retain: true},
		TopicName: "lockers/v1/A/presence", Payload: []byte(`{"online":true}`)})
	waitFor(t, "A's birth retained", func() bool { _, ok := retained.Get("lockers/v1/A/presence"); return ok })
	if n := retained.Expiring(); n != 0 {
		t.Fatalf("Expiring = %d with no expiry set, want 0", n)
	}

	short := dialRaw(t, h.addr, 5)
	if ack := short.connect("B", "B", "secret-B", 30, nil); ack.ReasonCode != 0 {
		t.Fatalf("connect B: %#x", ack.ReasonCode)
	}
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Retain: true},
		TopicName: "lockers/v1/B/presence", Payload: []byte(`{"online":true}`)}
	pk.Properties.MessageExpiryInterval = 1
	short.send(pk)
	waitFor(t, "B's birth retained with an expiry", func() bool { return retained.Expiring() == 1 })
	// The sweep runs every second; waitFor's deadline is far longer.
	waitFor(t, "B's expired birth swept", func() bool { _, ok := retained.Get("lockers/v1/B/presence"); return !ok })
	if n := retained.Expiring(); n != 0 {
		t.Errorf("Expiring = %d after the sweep, want 0", n)
	}
	if _, ok := retained.Get("lockers/v1/A/presence"); !ok {
		t.Error("A's birth, which has no expiry, was swept too")
	}
}
