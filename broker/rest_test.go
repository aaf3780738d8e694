package broker

import (
	"bytes"
	"slices"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
)

// The harness rests readers after 20 ms without a packet (Options.ReaderRest),
// so these tests see many hand-offs to a new goroutine in a few round trips.

// rests returns lockergate_mqtt_reader_rests_total.
func (h *harness) rests(t *testing.T) float64 {
	t.Helper()
	return h.metric(t, "lockergate_mqtt_reader_rests_total", "", "")
}

// waitRests waits until the readers have rested n times in all. The tests
// count from the harness's start, not from before each wait: a rest can come
// before the test looks, and a resumed reader rests again only after it
// has handled a packet, so waiting for "one more" could wait forever.
func (h *harness) waitRests(t *testing.T, n float64) {
	t.Helper()
	waitFor(t, "the reader to rest", func() bool { return h.rests(t) >= n })
}

// TestReaderRestServesOn: a connection whose reader has rested goes on
// being served by the new one, rest after rest: its messages are
// acknowledged, a command reaches it, and its session neither ends nor
// starts again.
func TestReaderRestServesOn(t *testing.T) {
	h := newHarness(t, nil, nil)
	r := dialRaw(t, h.addr, 4)
	if ack := r.connect("A", "A", "secret-A", 60, nil); ack.ReasonCode != 0 {
		t.Fatalf("CONNACK %#x", ack.ReasonCode)
	}
	r.subscribe("lockers/v1/A/cmd", 1)
	for i := range 3 {
		h.waitRests(t, float64(i+1)) // after the SUBSCRIBE, then each PUBLISH
		id := r.publish("lockers/v1/A/health", 1, []byte(`{"seq":1}`))
		if ack := r.mustRead(packets.Puback); ack.PacketID != id {
			t.Fatalf("cycle %d: PUBACK for %d, want %d", i, ack.PacketID, id)
		}
	}
	h.waitRests(t, 4)
	if err := h.b.Publish(t.Context(), "lockers/v1/A/cmd", []byte(`{"id":"c1"}`), 1, false); err != nil {
		t.Fatalf("Publish: %v", err)
	}
	cmd := r.mustRead(packets.Publish)
	if string(cmd.Payload) != `{"id":"c1"}` {
		t.Fatalf("command %q", cmd.Payload)
	}
	r.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Puback}, PacketID: cmd.PacketID})
	if got := h.obs.get(); !slices.Equal(got, []string{"+A"}) {
		t.Fatalf("presence events %v, want one connect and no disconnect", got)
	}
	if n := h.b.ConnectedDevices(); n != 1 {
		t.Fatalf("%d connected devices, want 1", n)
	}
}

// TestReaderRestKeepsKeepalive: resting does not extend the keep-alive. A
// locker with a 1 s keep-alive that goes silent after a message is
// disconnected for it (1.5 s later) although its reader rested meanwhile,
// and a rested reader ends the session as the first one would have.
func TestReaderRestKeepsKeepalive(t *testing.T) {
	h := newHarness(t, nil, nil)
	r := dialRaw(t, h.addr, 4)
	before := h.rests(t)
	if ack := r.connect("A", "A", "secret-A", 1, nil); ack.ReasonCode != 0 {
		t.Fatalf("CONNACK %#x", ack.ReasonCode)
	}
	id := r.publish("lockers/v1/A/health", 1, []byte(`{"seq":1}`))
	if ack := r.mustRead(packets.Puback); ack.PacketID != id {
		t.Fatalf("PUBACK for %d, want %d", ack.PacketID, id)
	}
	r.waitClosed()
	if h.rests(t) <= before {
		t.Fatal("the reader never rested before the keep-alive ran out")
	}
	waitFor(t, "the disconnect", func() bool { return len(h.obs.get()) == 2 })
	if got := h.obs.get(); !slices.Equal(got, []string{"+A", "-A:" + ReasonKeepalive}) {
		t.Fatalf("presence events %v, want a connect and a keep-alive disconnect", got)
	}
}

// TestReaderRestDisabled: a negative ReaderRest never rests.
func TestReaderRestDisabled(t *testing.T) {
	h := newHarness(t, func(o *Options) { o.ReaderRest = -1 }, nil)
	r := dialRaw(t, h.addr, 4)
	if ack := r.connect("A", "A", "secret-A", 1, nil); ack.ReasonCode != 0 {
		t.Fatalf("CONNACK %#x", ack.ReasonCode)
	}
	r.publish("lockers/v1/A/health", 1, []byte(`{"seq":1}`))
	r.mustRead(packets.Puback)
	r.waitClosed() // 1.5 s of silence: far past the harness's 20 ms rest
	if n := h.rests(t); n != 0 {
		t.Fatalf("%v rests with ReaderRest < 0", n)
	}
}

// TestReaderRestTLS: a reader resting on a TLS connection waits for the
// next record with a deadline that expires; the connection must stay
// usable after it (crypto/tls keeps a timed-out read's partial record).
func TestReaderRestTLS(t *testing.T) {
	h, dial := newTLSHarness(t)
	c, err := dial("A", "secret-A")
	if err != nil {
		t.Fatalf("connect over TLS: %v", err)
	}
	for i := range 3 {
		h.waitRests(t, float64(i+1)) // after the SUBSCRIBEs, then each PUBLISH
		c.mustPublish(t, "lockers/v1/A/health", 1, []byte(`{"seq":1}`))
	}
	if n := h.b.ConnectedDevices(); n != 1 {
		t.Fatalf("%d connected devices, want 1", n)
	}
	select {
	case err := <-c.lost:
		t.Fatalf("connection lost: %v", err)
	default:
	}
}

// TestReaderRestSlowPacket: the first byte of a packet ends a reader's
// wait with the rest's short deadline; the rest of the packet is read
// under the keep-alive deadline, so a locker on a slow link whose packet
// trickles in over longer than ReaderRest is served, not cut off.
func TestReaderRestSlowPacket(t *testing.T) {
	h := newHarness(t, nil, nil) // ReaderRest: 20 ms
	r := dialRaw(t, h.addr, 4)
	if ack := r.connect("A", "A", "secret-A", 60, nil); ack.ReasonCode != 0 {
		t.Fatalf("CONNACK %#x", ack.ReasonCode)
	}
	for i := range 3 {
		pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1},
			ProtocolVersion: 4, TopicName: "lockers/v1/A/health", Payload: []byte(`{"seq":1}`), PacketID: uint16(i + 1)}
		var buf bytes.Buffer
		if err := pk.PublishEncode(&buf); err != nil {
			t.Fatal(err)
		}
		b := buf.Bytes()
		for _, part := range [][]byte{b[:1], b[1:5], b[5:]} {
			if _, err := r.conn.Write(part); err != nil {
				t.Fatalf("write: %v", err)
			}
			// A slow link: each part comes several rest periods after the
			// last (the wait is the scenario, not synchronisation).
			time.Sleep(60 * time.Millisecond)
		}
		if ack := r.mustRead(packets.Puback); ack.PacketID != pk.PacketID {
			t.Fatalf("PUBACK for %d, want %d", ack.PacketID, pk.PacketID)
		}
	}
	if got := h.obs.get(); !slices.Equal(got, []string{"+A"}) {
		t.Fatalf("presence events %v, want one connect and no disconnect", got)
	}
}

// TestReaderRestShortKeepalive: with a keep-alive shorter than ReaderRest,
// a locker that sends more often than it must is never cut off. The write
// deadline is refreshed lazily, and it must lag late, never early: a
// PUBACK written after the deadline set at an earlier packet failed with
// "i/o timeout" and ended the session (review of patch 13).
func TestReaderRestShortKeepalive(t *testing.T) {
	h := newHarness(t, func(o *Options) { o.ReaderRest = 2 * time.Second }, nil)
	r := dialRaw(t, h.addr, 4)
	if ack := r.connect("A", "A", "secret-A", 1, nil); ack.ReasonCode != 0 { // read deadline 1 s after each packet
		t.Fatalf("CONNACK %#x", ack.ReasonCode)
	}
	for i := range 6 {
		// The locker's own schedule, inside its keep-alive: the wait is
		// the scenario, not synchronisation.
		time.Sleep(600 * time.Millisecond)
		id := r.publish("lockers/v1/A/health", 1, []byte(`{"seq":1}`))
		if ack := r.mustRead(packets.Puback); ack.PacketID != id {
			t.Fatalf("publish %d: PUBACK for %d, want %d", i, ack.PacketID, id)
		}
	}
	if got := h.obs.get(); !slices.Equal(got, []string{"+A"}) {
		t.Fatalf("presence events %v, want one connect and no disconnect", got)
	}
}
