package broker

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/protocol"
)

const dropped = "lockergate_mqtt_messages_dropped_total"

func TestPayloadSize(t *testing.T) {
	h := newHarness(t, nil, nil)
	seen := h.subscribe(t, "lockers/v1/A/events")
	a := h.mustDialDevice(t, "A")

	full := bytes.Repeat([]byte("x"), protocol.MaxPayload)
	a.mustPublish(t, "lockers/v1/A/events", 1, full)
	waitFor(t, "16 KiB payload delivered", func() bool { return len(seen.get()) == 1 })
	if got := seen.get()[0].Payload; len(got) != protocol.MaxPayload {
		t.Fatalf("delivered %d bytes, want %d", len(got), protocol.MaxPayload)
	}

	t.Run("OverMaxPayloadAckedAndDropped", func(t *testing.T) {
		// Acknowledged (the QoS 1 flow completes, so the device does not
		// resend a message that can never be processed), but not forwarded.
		a.mustPublish(t, "lockers/v1/A/events", 1, append(full, 'x'))
		a.mustPublish(t, "lockers/v1/A/events", 1, []byte(`{"marker":true}`))
		waitFor(t, "marker", func() bool { return len(seen.get()) == 2 })
		if got := string(seen.get()[1].Payload); got != `{"marker":true}` {
			t.Errorf("second delivery %.40q, want the marker", got)
		}
		if got := h.metric(t, dropped, "reason", dropTooLarge); got != 1 {
			t.Errorf("dropped{too_large} = %v, want 1", got)
		}
	})

	t.Run("64KiBPayloadAckedAndDropped", func(t *testing.T) {
		// Over the payload limit, within the packet limit: the session
		// goes on, and the next message is delivered.
		a.mustPublish(t, "lockers/v1/A/events", 1, bytes.Repeat([]byte("x"), 64*1024))
		a.mustPublish(t, "lockers/v1/A/events", 1, []byte(`{"marker":2}`))
		waitFor(t, "second marker", func() bool { return len(seen.get()) == 3 })
		if got := h.metric(t, dropped, "reason", dropTooLarge); got != 2 {
			t.Errorf("dropped{too_large} = %v, want 2", got)
		}
	})

	t.Run("PacketOverLimitRefused", func(t *testing.T) {
		a.Publish("lockers/v1/A/events", 0, false, bytes.Repeat([]byte("x"), MaxPacketSize+1))
		a.waitLost(t)
		h.waitMetric(t, dropped, "reason", dropTooLarge, 3)
		h.waitMetric(t, "lockergate_mqtt_disconnects_total", "reason", ReasonPacketTooLarge, 1)
		if got := len(seen.get()); got != 3 {
			t.Errorf("deliveries = %d, want 3", got)
		}
	})
}

func TestPayloadSizeMQTT5(t *testing.T) {
	h := newHarness(t, nil, nil)
	r := dialRaw(t, h.addr, 5)
	ack := r.connect("A", "A", "secret-A", 30, nil)
	if ack.ReasonCode != 0 {
		t.Fatalf("CONNACK %#x", ack.ReasonCode)
	}
	if got := ack.Properties.MaximumPacketSize; got != MaxPacketSize {
		t.Errorf("CONNACK Maximum Packet Size = %d, want %d", got, MaxPacketSize)
	}
	id := r.publish("lockers/v1/A/events", 1, bytes.Repeat([]byte("x"), protocol.MaxPayload+1))
	puback := r.mustRead(packets.Puback)
	if puback.PacketID != id || puback.ReasonCode != errPayloadTooLarge.Code {
		t.Errorf("PUBACK id %d code %#x, want id %d code %#x", puback.PacketID, puback.ReasonCode, id, errPayloadTooLarge.Code)
	}
	if got := puback.Properties.ReasonString; got != errPayloadTooLarge.Reason {
		t.Errorf("PUBACK reason string %q, want %q", got, errPayloadTooLarge.Reason)
	}
	if got := h.metric(t, dropped, "reason", dropTooLarge); got != 1 {
		t.Errorf("dropped{too_large} = %v, want 1", got)
	}
}

func TestBus(t *testing.T) {
	h := newHarness(t, nil, nil)
	ctx := t.Context()

	t.Run("SubscribeReportsPublisher", func(t *testing.T) {
		seen := h.subscribe(t, "lockers/v1/+/events")
		a := h.mustDialDevice(t, "A")
		a.mustPublish(t, "lockers/v1/A/events", 1, []byte(`{"id":"e-1"}`))
		waitFor(t, "event", func() bool { return len(seen.get()) == 1 })
		got := seen.get()[0]
		want := fleet.Message{Topic: "lockers/v1/A/events", Payload: []byte(`{"id":"e-1"}`), QoS: 1, ClientID: "A"}
		if got.Topic != want.Topic || string(got.Payload) != string(want.Payload) || got.QoS != want.QoS ||
			got.Retain != want.Retain || got.ClientID != want.ClientID {
			t.Errorf("got %+v, want %+v", got, want)
		}
	})

	t.Run("RetainedReachDeviceOnSubscribe", func(t *testing.T) {
		if err := h.b.Publish(ctx, "lockers/v1/B/config", []byte(`{"version":7}`), 1, true); err != nil {
			t.Fatal(err)
		}
		b := h.mustDialDevice(t, "B")
		b.subscribeResult(t, "lockers/v1/B/config", 1)
		if m := b.nextMessage(t); string(m.Payload()) != `{"version":7}` || !m.Retained() {
			t.Errorf("got %s retained=%v, want the retained config", m.Payload(), m.Retained())
		}
		// An empty retained payload clears it.
		if err := h.b.Publish(ctx, "lockers/v1/B/config", nil, 1, true); err != nil {
			t.Fatal(err)
		}
		seen := h.subscribe(t, "lockers/v1/B/config")
		if got := seen.get(); len(got) != 0 {
			t.Errorf("retained config still there: %v", got)
		}
	})

	t.Run("InlineOrigin", func(t *testing.T) {
		seen := h.subscribe(t, "lockers/v1/C/cmd")
		if err := h.b.Publish(ctx, "lockers/v1/C/cmd", []byte(`{}`), 1, false); err != nil {
			t.Fatal(err)
		}
		if got := seen.get(); len(got) != 1 || got[0].ClientID != "inline" {
			t.Errorf("got %+v, want one message from the inline client", got)
		}
	})

	t.Run("PublishErrors", func(t *testing.T) {
		if err := h.b.Publish(ctx, "lockers/v1/A/cmd", make([]byte, protocol.MaxPayload+1), 1, false); !errors.Is(err, protocol.ErrTooLarge) {
			t.Errorf("oversize: err = %v, want protocol.ErrTooLarge", err)
		}
		for _, topic := range []string{"", "lockers/+/cmd", "lockers/#", "$SYS/x"} {
			if err := h.b.Publish(ctx, topic, []byte(`{}`), 1, false); err == nil {
				t.Errorf("topic %q accepted", topic)
			}
		}
		if err := h.b.Publish(ctx, "a", nil, 3, false); err == nil {
			t.Error("qos 3 accepted")
		}
		cctx, cancel := context.WithCancel(ctx)
		cancel()
		if err := h.b.Publish(cctx, "a", nil, 0, false); !errors.Is(err, context.Canceled) {
			t.Errorf("cancelled: err = %v", err)
		}
	})

	t.Run("SubscribeErrors", func(t *testing.T) {
		if err := h.b.Subscribe("a/#/b", func(fleet.Message) {}); err == nil {
			t.Error("invalid filter accepted")
		}
		if err := h.b.Subscribe("a", nil); err == nil {
			t.Error("nil handler accepted")
		}
	})
}

// TestUplinkDelivery covers deliverUplink: a device's messages reach every
// matching Subscribe once, without mochi's routing, before their PUBACK, in
// buffers of their own; retained ones and the gateway's own still go through
// mochi.
func TestUplinkDelivery(t *testing.T) {
	h := newHarness(t, nil, nil)
	ctx := t.Context()
	plus := h.subscribe(t, "lockers/v1/+/health")
	hash := h.subscribe(t, "lockers/v1/#")
	exact := h.subscribe(t, "lockers/v1/A/health")
	other := h.subscribe(t, "lockers/v1/+/events")
	a := h.mustDialDevice(t, "A")

	a.mustPublish(t, "lockers/v1/A/health", 0, []byte(`{"seq":1}`))
	a.mustPublish(t, "lockers/v1/A/health", 1, []byte(`{"seq":2}`))
	tok := a.Publish("lockers/v1/A/presence", 1, true, []byte(`{"online":true,"fw":"1"}`))
	if !tok.WaitTimeout(waitTimeout) || tok.Error() != nil {
		t.Fatalf("publish presence: %v", tok.Error())
	}
	// One client's messages are delivered in order, on its goroutine: once
	// the last is in, nothing earlier is still on its way.
	a.mustPublish(t, "lockers/v1/A/events", 1, []byte(`{"last":true}`))
	waitFor(t, "last message", func() bool { return len(other.get()) == 1 })

	for name, in := range map[string]*inbox{"+": plus, "exact": exact} {
		got := in.get()
		if len(got) != 2 || string(got[0].Payload) != `{"seq":1}` || string(got[1].Payload) != `{"seq":2}` ||
			got[0].QoS != 0 || got[1].QoS != 1 || got[1].ClientID != "A" || got[1].Topic != "lockers/v1/A/health" {
			t.Errorf("filter %s: got %+v, want the two health messages once each", name, got)
		}
	}
	if got := hash.get(); len(got) != 4 || !got[2].Retain || string(got[2].Payload) != `{"online":true,"fw":"1"}` {
		t.Errorf("lockers/v1/#: got %+v, want health twice, the retained presence, the event", got)
	}
	// The retained presence went through mochi, which keeps it.
	if got := h.subscribe(t, "lockers/v1/A/presence").get(); len(got) != 1 || !got[0].Retain {
		t.Errorf("retained presence on a new subscription: %+v", got)
	}
	// Inline publishes to an uplink topic take mochi's path as before.
	if err := h.b.Publish(ctx, "lockers/v1/B/health", []byte(`{"seq":9}`), 1, false); err != nil {
		t.Fatal(err)
	}
	if got := plus.get(); len(got) != 3 || got[2].ClientID != "inline" {
		t.Errorf("inline publish: got %+v", got)
	}

	t.Run("PayloadsNotShared", func(t *testing.T) {
		first := plus.get()[0].Payload
		a.mustPublish(t, "lockers/v1/A/health", 1, []byte(`{"seq":3}`))
		waitFor(t, "seq 3", func() bool { return len(plus.get()) == 4 })
		if string(first) != `{"seq":1}` {
			t.Errorf("a kept payload changed to %q", first)
		}
	})

	t.Run("HandlerBeforePUBACK", func(t *testing.T) {
		entered, release := make(chan struct{}), make(chan struct{})
		var once sync.Once
		free := func() { once.Do(func() { close(release) }) }
		t.Cleanup(free) // else a failure leaves the client stuck and Close waiting
		if err := h.b.Subscribe("lockers/v1/+/fw/status", func(fleet.Message) {
			close(entered)
			<-release
		}); err != nil {
			t.Fatal(err)
		}
		r := dialRaw(t, h.addr, 4)
		if ack := r.connect("B", "B", "secret-B", 30, nil); ack.ReasonCode != 0 {
			t.Fatalf("CONNACK %#x", ack.ReasonCode)
		}
		id := r.publish("lockers/v1/B/fw/status", 1, []byte(`{}`))
		select {
		case <-entered:
		case <-time.After(waitTimeout):
			t.Fatal("handler not called")
		}
		// A PUBACK written before the handler ran would be here at once.
		_ = r.conn.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		if _, err := r.r.Peek(1); err == nil {
			t.Fatal("PUBACK sent while the handler still holds the message")
		}
		free()
		if ack := r.mustRead(packets.Puback); ack.PacketID != id {
			t.Errorf("PUBACK for %d, want %d", ack.PacketID, id)
		}
	})
}

// TestUplinkDeliveryDollarFilter: a $ filter beside the device filters
// gets no device message, and the device filter gets each once.
func TestUplinkDeliveryDollarFilter(t *testing.T) {
	h := newHarness(t, nil, nil)
	sys := h.subscribe(t, "$SYS/#")
	health := h.subscribe(t, "lockers/v1/+/health")
	a := h.mustDialDevice(t, "A")
	for _, p := range []string{`{"seq":1}`, `{"seq":2}`, `{"seq":3}`} {
		a.mustPublish(t, "lockers/v1/A/health", 1, []byte(p))
	}
	// Both paths deliver in the client's reader, one message after the
	// other: once the third has arrived, every copy of the first two has.
	waitFor(t, "the third health message", func() bool {
		got := health.get()
		return len(got) > 0 && string(got[len(got)-1].Payload) == `{"seq":3}`
	})
	var seqs []string
	for _, m := range health.get() {
		seqs = append(seqs, string(m.Payload))
	}
	if want := []string{`{"seq":1}`, `{"seq":2}`, `{"seq":3}`}; !slices.Equal(seqs, want) {
		t.Errorf("got %v, want each message once, in order: %v", seqs, want)
	}
	for _, m := range sys.get() {
		if strings.HasPrefix(m.Topic, "lockers/") {
			t.Errorf("the $SYS/# handler got device message %s", m.Topic)
		}
	}
}

// TestUnauthenticatedPacketLimit: until its CONNECT is admitted a
// connection may send no packet over MaxPacketSizeUnauthenticated, so it
// cannot make the reader allocate a device session's larger limit: a fixed
// header that announces more ends the connection at once, before any of
// the body is sent (mochi patch 17). Without the per-session limit the
// reader waited for the 64 KiB body until the CONNECT deadline (10 s).
func TestUnauthenticatedPacketLimit(t *testing.T) {
	h := newHarness(t, nil, nil)
	c, err := net.DialTimeout("tcp", h.addr, waitTimeout)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// CONNECT, remaining length 64 KiB (variable-length integer).
	header := []byte{0x10, 0x80, 0x80, 0x04}
	if _, err := c.Write(header); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(connectTimeout / 2))
	if _, err := c.Read(make([]byte, 16)); !errors.Is(err, io.EOF) && !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("after a CONNECT header announcing 64 KiB: %v, want the connection closed before the body", err)
	}
}
