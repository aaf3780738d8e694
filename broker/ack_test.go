package broker

import (
	"fmt"
	"testing"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/lockergate/lockergate/fleet"
)

// TestAckWhenStored: with Options.AckWhenStored a locker's QoS 1 event gets
// its PUBACK when the handler calls Message.Ack, not before; health is
// acknowledged on receipt, with no Ack to call. An Ack after the
// connection is gone sends nothing and the session goes on for the next
// connection. An event two handlers take, and every event without the
// option, is acknowledged on receipt.
func TestAckWhenStored(t *testing.T) {
	for _, v := range []byte{4, 5} {
		t.Run(fmt.Sprintf("v%d", v), func(t *testing.T) {
			h := newHarness(t, func(o *Options) { o.AckWhenStored = true }, nil)
			events := h.subscribe(t, "lockers/v1/+/events")
			health := h.subscribe(t, "lockers/v1/+/health")
			// A handler that acknowledges before it returns, as a fast one may.
			if err := h.b.Subscribe("lockers/v1/+/fw/status", func(m fleet.Message) { m.Ack() }); err != nil {
				t.Fatal(err)
			}
			took := func(in *inbox, n int) fleet.Message {
				t.Helper()
				waitFor(t, fmt.Sprintf("message %d delivered", n), func() bool { return len(in.get()) >= n })
				return in.get()[n-1]
			}

			a := dialRaw(t, h.addr, v)
			if ack := a.connect("A", "A", "secret-A", 30, nil); ack.ReasonCode != 0 {
				t.Fatalf("CONNACK %#x", ack.ReasonCode)
			}
			id := a.publish("lockers/v1/A/events", 1, []byte(`{"id":"e-1"}`))
			ev := took(events, 1)
			if ev.Ack == nil {
				t.Fatal("the event came without an Ack: it was acknowledged on receipt")
			}
			a.pingExpectingNo(packets.Puback, "event not yet acknowledged by its handler")
			ev.Ack()
			if ack := a.mustRead(packets.Puback); ack.PacketID != id || ack.ReasonCode != 0 {
				t.Fatalf("after Ack: PUBACK %d %#x, want %d success", ack.PacketID, ack.ReasonCode, id)
			}
			// The locker may use the id again at once; a second Ack of the
			// first message must not acknowledge the new one.
			a.next = id - 1
			a.publish("lockers/v1/A/events", 1, []byte(`{"id":"e-1b"}`))
			reused := took(events, 2)
			ev.Ack()
			a.pingExpectingNo(packets.Puback, "a second Ack of the message before")
			reused.Ack()
			if ack := a.mustRead(packets.Puback); ack.PacketID != id {
				t.Fatalf("PUBACK %d, want %d", ack.PacketID, id)
			}

			id = a.publish("lockers/v1/A/fw/status", 1, []byte(`{}`))
			if ack := a.mustRead(packets.Puback); ack.PacketID != id {
				t.Fatalf("acknowledged within its handler: PUBACK %d, want %d", ack.PacketID, id)
			}

			id = a.publish("lockers/v1/A/health", 1, []byte(`{"seq":1}`))
			if ack := a.mustRead(packets.Puback); ack.PacketID != id {
				t.Fatalf("health: PUBACK %d, want %d on receipt", ack.PacketID, id)
			}
			if hm := took(health, 1); hm.Ack != nil {
				t.Fatal("health came with an Ack to call")
			}

			// Acknowledged after its connection ended: nothing is sent, and
			// the next connection is served as usual.
			id = a.publish("lockers/v1/A/events", 1, []byte(`{"id":"e-2"}`))
			late := took(events, 3)
			_ = a.conn.Close()
			h.waitMetric(t, disconnects, "reason", ReasonConnectionLost, 1)
			b := dialRaw(t, h.addr, v)
			if ack := b.connect("A", "A", "secret-A", 30, nil); ack.ReasonCode != 0 {
				t.Fatalf("CONNACK %#x", ack.ReasonCode)
			}
			b.next = id - 1
			id = b.publish("lockers/v1/A/events", 1, []byte(`{"id":"e-2"}`))
			again := took(events, 4)
			late.Ack() // the first connection's: nothing for the second
			b.pingExpectingNo(packets.Puback, "the event sent again")
			again.Ack()
			if ack := b.mustRead(packets.Puback); ack.PacketID != id {
				t.Fatalf("PUBACK %d, want %d", ack.PacketID, id)
			}
		})
	}
	t.Run("two handlers", func(t *testing.T) {
		h := newHarness(t, func(o *Options) { o.AckWhenStored = true }, nil)
		events := h.subscribe(t, "lockers/v1/+/events")
		all := h.subscribe(t, "lockers/v1/A/#")
		a := dialRaw(t, h.addr, 4)
		a.connect("A", "A", "secret-A", 30, nil)
		id := a.publish("lockers/v1/A/events", 1, []byte(`{"id":"e-1"}`))
		if ack := a.mustRead(packets.Puback); ack.PacketID != id {
			t.Fatalf("PUBACK %d, want %d on receipt", ack.PacketID, id)
		}
		for _, in := range []*inbox{events, all} {
			if m := in.get(); len(m) != 1 || m[0].Ack != nil {
				t.Fatalf("a handler got %d messages (Ack set: %v), want 1 without an Ack", len(m), len(m) == 1 && m[0].Ack != nil)
			}
		}
	})
	t.Run("off", func(t *testing.T) {
		h := newHarness(t, nil, nil)
		events := h.subscribe(t, "lockers/v1/+/events")
		a := dialRaw(t, h.addr, 4)
		a.connect("A", "A", "secret-A", 30, nil)
		id := a.publish("lockers/v1/A/events", 1, []byte(`{"id":"e-1"}`))
		if ack := a.mustRead(packets.Puback); ack.PacketID != id {
			t.Fatalf("PUBACK %d, want %d on receipt", ack.PacketID, id)
		}
		if m := events.get(); len(m) != 1 || m[0].Ack != nil {
			t.Fatalf("delivered %d messages (Ack set: %v), want 1 without an Ack", len(m), len(m) == 1 && m[0].Ack != nil)
		}
	})
}
