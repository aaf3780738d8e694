package broker

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"syscall"
	"testing"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/mochi-mqtt/server/v2/packets"
)

const disconnects = "lockergate_mqtt_disconnects_total"

// checkAlternating fails unless events for id alternate +id, -id:..., starting
// with a connect, and end connected when wantOnline.
func checkAlternating(t *testing.T, events []string, id string, wantOnline bool) {
	t.Helper()
	online := false
	for i, e := range events {
		switch {
		case e == "+"+id && !online:
			online = true
		case strings.HasPrefix(e, "-"+id+":") && online:
			online = false
		default:
			t.Fatalf("event %d %q out of order: %v", i, e, events)
		}
	}
	if online != wantOnline {
		t.Fatalf("ends online=%v, want %v: %v", online, wantOnline, events)
	}
}

func TestTakeover(t *testing.T) {
	h := newHarness(t, nil, nil)
	presence := h.subscribe(t, "lockers/v1/A/presence")
	will := func(o *paho.ClientOptions) { o.SetWill("lockers/v1/A/presence", `{"online":false}`, 1, true) }

	first := h.mustDial(t, "A", "A", "secret-A", will)
	waitFor(t, "first announced", func() bool { return h.b.ConnectedDevices() == 1 })
	second := h.mustDial(t, "A", "A", "secret-A", will)
	first.waitLost(t)
	h.waitMetric(t, disconnects, "reason", ReasonTakeover, 1)
	waitFor(t, "observer settled", func() bool { return len(h.obs.get()) == 3 })

	if got, want := h.obs.get(), []string{"+A", "-A:takeover", "+A"}; !equal(got, want) {
		t.Errorf("observer = %v, want %v", got, want)
	}
	if got := h.b.ConnectedDevices(); got != 1 {
		t.Errorf("ConnectedDevices = %d, want 1", got)
	}
	if got := presence.get(); len(got) != 0 {
		t.Errorf("the replaced session's Last Will was published: %s", got[0].Payload)
	}

	second.Disconnect(50)
	waitFor(t, "device offline", func() bool { return h.b.ConnectedDevices() == 0 })
	checkAlternating(t, h.obs.get(), "A", false)
	if got := h.metric(t, "lockergate_mqtt_connections", "kind", "device"); got != 0 {
		t.Errorf("connections{device} = %v, want 0", got)
	}
}

// TestResumedSessionKeepsEachSubscription: a locker that resumes its
// session (clean session 0) without subscribing again, twice, still gets
// each of its topics at the QoS it subscribed with. mochi patch 23's first
// version gave every inherited filter one shared subscription, so one of
// these two came at the other's QoS, and the second resume lost a filter.
func TestResumedSessionKeepsEachSubscription(t *testing.T) {
	h := newHarness(t, nil, nil)
	kept := func(o *paho.ClientOptions) { o.SetCleanSession(false) }
	a := h.mustDial(t, "A", "A", "secret-A", kept)
	want := map[string]byte{"lockers/v1/A/cmd": 1, "lockers/v1/A/config": 0}
	for filter, qos := range want {
		if got := a.subscribeResult(t, filter, qos); got != qos {
			t.Fatalf("subscribe %s: SUBACK %#x, want %d", filter, got, qos)
		}
	}
	for resume := 1; resume <= 2; resume++ {
		cl, ok := h.b.server.Clients.Get("A")
		if !ok {
			t.Fatal("A not connected")
		}
		// The last round's QoS 1 message must be acknowledged first: one
		// whose PUBACK the close overtakes is in flight in the kept session
		// and comes again, first, after the resume, as MQTT requires.
		waitFor(t, "A's messages acknowledged", func() bool { return cl.State.Inflight.Len() == 0 })
		_ = cl.Net.Conn.Close() // the connection lost; the session is kept
		a.waitLost(t)
		waitFor(t, "A offline", func() bool { return h.b.ConnectedDevices() == 0 })
		a = h.mustDial(t, "A", "A", "secret-A", kept)
		seen := map[string]uint16{} // topic → packet id received this round
		for topic, qos := range want {
			if err := h.b.Publish(t.Context(), topic, []byte("x"), 1, false); err != nil {
				t.Fatal(err)
			}
			m := a.nextMessage(t)
			// QoS 1 is at least once: mochi resends a resumed session's
			// in-flight messages after its CONNACK, and one published to
			// the session just before that goes out twice, the resend
			// (marked DUP) first or second. A repeat of a message already
			// received, same topic and packet id, is skipped.
			for {
				id, ok := seen[m.Topic()]
				if !ok || m.Qos() == 0 || m.MessageID() != id {
					break
				}
				m = a.nextMessage(t)
			}
			seen[m.Topic()] = m.MessageID()
			if m.Topic() != topic || m.Qos() != qos {
				t.Fatalf("resume %d: got %s at QoS %d (dup %v, id %d), want %s at QoS %d", resume, m.Topic(), m.Qos(), m.Duplicate(), m.MessageID(), topic, qos)
			}
		}
	}
}

// TestTakeoverStorm reconnects one device many times without closing the old
// connections; however the goroutines interleave, the device must end up
// connected and the observer's calls must alternate.
func TestTakeoverStorm(t *testing.T) {
	h := newHarness(t, nil, nil)
	const n = 20
	var last *client
	for i := 0; i < n; i++ {
		last = h.mustDialDevice(t, "A")
	}
	h.waitMetric(t, disconnects, "reason", ReasonTakeover, n-1)
	// A connection can be taken over before mochi reports it established;
	// such a session is never announced, so the number of calls varies.
	waitFor(t, "newest session announced", func() bool {
		cur, ok := h.b.server.Clients.Get("A")
		h.b.presMu.Lock()
		defer h.b.presMu.Unlock()
		s := h.b.presence["A"]
		return ok && s != nil && s.cl == cur
	})
	checkAlternating(t, h.obs.get(), "A", true)
	if got := h.b.ConnectedDevices(); got != 1 {
		t.Errorf("ConnectedDevices = %d, want 1", got)
	}
	if got := h.metric(t, "lockergate_mqtt_connections", "kind", "device"); got != 1 {
		t.Errorf("connections{device} = %v, want 1", got)
	}
	if !last.IsConnectionOpen() {
		t.Error("the newest connection was closed")
	}
}

// connectWithWill connects locker A over MQTT 3.1.1 with its protocol Last
// Will (retained {"online":false} on its presence topic).
func connectWithWill(t *testing.T, h *harness) *raw {
	t.Helper()
	r := dialRaw(t, h.addr, 4)
	ack := r.connect("A", "A", "secret-A", 30, func(pk *packets.Packet) {
		pk.Connect.WillFlag = true
		pk.Connect.WillTopic = "lockers/v1/A/presence"
		pk.Connect.WillPayload = []byte(`{"online":false}`)
		pk.Connect.WillQos = 1
		pk.Connect.WillRetain = true
	})
	if ack.ReasonCode != 0 {
		t.Fatalf("CONNACK %#x", ack.ReasonCode)
	}
	return r
}

func TestWillOnConnectionLoss(t *testing.T) {
	h := newHarness(t, nil, nil)
	presence := h.subscribe(t, "lockers/v1/A/presence")
	r := connectWithWill(t, h)
	_ = r.conn.Close()
	waitFor(t, "will", func() bool { return len(presence.get()) == 1 })
	if m := presence.get()[0]; string(m.Payload) != `{"online":false}` || m.ClientID != "A" {
		t.Errorf("will %+v", m)
	}
	h.waitMetric(t, disconnects, "reason", ReasonConnectionLost, 1)
	// The metric is counted before the observer is told.
	waitFor(t, "offline", func() bool { return len(h.obs.get()) == 2 })
	if got, want := h.obs.get(), []string{"+A", "-A:" + ReasonConnectionLost}; !equal(got, want) {
		t.Errorf("observer = %v, want %v", got, want)
	}
}

// A broker that closes publishes no Last Will: its sessions end with it, and
// so do its subscribers. The session end itself is still reported.
func TestNoWillOnClose(t *testing.T) {
	h := newHarness(t, nil, nil)
	presence := h.subscribe(t, "lockers/v1/A/presence")
	connectWithWill(t, h)
	waitFor(t, "A online", func() bool { return len(h.obs.get()) == 1 })
	if err := h.b.Close(); err != nil {
		t.Fatal(err)
	}
	// Close returns after every session's goroutine ended, so a will would
	// have been delivered (inline) by now.
	if got := presence.get(); len(got) != 0 {
		t.Errorf("Last Will published at close: %s", got[0].Payload)
	}
	if _, ok := h.b.server.Topics.Retained.Get("lockers/v1/A/presence"); ok {
		t.Error("Last Will retained at close")
	}
	if got := h.obs.get(); len(got) != 2 || got[1][:3] != "-A:" {
		t.Errorf("observer = %v, want the session's start and end", got)
	}
}

func TestKeepalive(t *testing.T) {
	h := newHarness(t, nil, nil)
	r := dialRaw(t, h.addr, 4)
	if ack := r.connect("A", "A", "secret-A", 1, nil); ack.ReasonCode != 0 {
		t.Fatalf("CONNACK %#x", ack.ReasonCode)
	}
	// Silent for 1.5 keep-alives: the broker drops the connection.
	r.waitClosed()
	h.waitMetric(t, disconnects, "reason", ReasonKeepalive, 1)
	waitFor(t, "offline", func() bool { return len(h.obs.get()) == 2 })
	if got, want := h.obs.get(), []string{"+A", "-A:" + ReasonKeepalive}; !equal(got, want) {
		t.Errorf("observer = %v, want %v", got, want)
	}
}

func TestServerKeepalive(t *testing.T) {
	h := newHarness(t, nil, nil)
	r := dialRaw(t, h.addr, 5)
	ack := r.connect("A", "A", "secret-A", 0, nil)
	if ack.ReasonCode != 0 {
		t.Fatalf("CONNACK %#x", ack.ReasonCode)
	}
	if !ack.Properties.ServerKeepAliveFlag || ack.Properties.ServerKeepAlive != maxKeepalive {
		t.Errorf("server keep-alive %v %d, want %d", ack.Properties.ServerKeepAliveFlag, ack.Properties.ServerKeepAlive, maxKeepalive)
	}
}

func TestCloseEndsSessions(t *testing.T) {
	h := newHarness(t, nil, nil)
	a := h.mustDialDevice(t, "A")
	p := h.mustDial(t, "prov-SN1", "claim", claimToken)
	idle := dialRaw(t, h.addr, 4) // connected, never sends CONNECT
	waitFor(t, "connected", func() bool { return h.b.ConnectedDevices() == 1 })

	if err := h.b.Close(); err != nil {
		t.Fatal(err)
	}
	if err := h.b.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	a.waitLost(t)
	p.waitLost(t)
	idle.waitClosed()
	if got, want := h.obs.get(), []string{"+A", "-A:" + ReasonShutdown}; !equal(got, want) {
		t.Errorf("observer = %v, want %v", got, want)
	}
	if err := h.b.Publish(t.Context(), "a", nil, 0, false); !errors.Is(err, ErrClosed) {
		t.Errorf("Publish after Close: %v, want ErrClosed", err)
	}
	if err := h.b.Start(); !errors.Is(err, ErrClosed) {
		t.Errorf("Start after Close: %v, want ErrClosed", err)
	}
	if _, err := h.dial(t, "A", "A", "secret-A"); err == nil {
		t.Error("connected after Close")
	}
}

func TestDisconnectReason(t *testing.T) {
	timeout := &net.OpError{Op: "read", Net: "tcp", Err: os.ErrDeadlineExceeded}
	tests := []struct {
		err  error
		want string
	}{
		{nil, ReasonError},
		{packets.CodeDisconnect, ReasonClientDisconnect},
		{packets.CodeDisconnectWillMessage, ReasonClientDisconnect},
		{packets.ErrSessionTakenOver, ReasonTakeover},
		{packets.ErrAdministrativeAction, ReasonKicked},
		{packets.ErrServerShuttingDown, ReasonShutdown},
		{packets.ErrPacketTooLarge, ReasonPacketTooLarge},
		{packets.ErrNotAuthorized, ReasonNotAuthorized},
		{timeout, ReasonKeepalive},
		{fmt.Errorf("read: %w", timeout), ReasonKeepalive},
		{io.EOF, ReasonConnectionLost},
		{&net.OpError{Op: "read", Err: syscall.ECONNRESET}, ReasonConnectionLost},
		{net.ErrClosed, ReasonConnectionLost},
		{packets.ErrMalformedPacket, ReasonProtocolError},
		{packets.ErrProtocolViolationSecondConnect, ReasonProtocolError},
		{errors.New("boom"), ReasonError},
	}
	for _, tc := range tests {
		if got := disconnectReason(tc.err); got != tc.want {
			t.Errorf("disconnectReason(%v) = %q, want %q", tc.err, got, tc.want)
		}
	}
}

// TestReconnectAsOldConnectionEnds: a locker that reconnects as its old
// connection is being torn down (the broker reading the old one's EOF while
// the new CONNECT arrives) keeps its new session: it stays connected and
// gets what is published to it. mochi's teardown used to remove the client
// id's entry and subscriptions after a takeover it had not seen yet (mochi
// patch 18); the gateway then ended the new session as taken over, or
// routed nothing to it.
func TestReconnectAsOldConnectionEnds(t *testing.T) {
	h := newHarness(t, nil, nil)
	const rounds = 300
	for i := range rounds {
		old := dialRaw(t, h.addr, 4)
		if ack := old.connect("A", "A", "secret-A", 30, nil); ack.ReasonCode != 0 {
			t.Fatalf("round %d: CONNACK %#x", i, ack.ReasonCode)
		}
		old.subscribe("lockers/v1/A/cmd", 1)
		// The old connection ends without a DISCONNECT, and at once the
		// locker is back.
		_ = old.conn.Close()
		cur := dialRaw(t, h.addr, 4)
		if ack := cur.connect("A", "A", "secret-A", 30, nil); ack.ReasonCode != 0 {
			t.Fatalf("round %d: CONNACK %#x", i, ack.ReasonCode)
		}
		if sub := cur.subscribe("lockers/v1/A/cmd", 1); len(sub.ReasonCodes) != 1 || sub.ReasonCodes[0] > 1 {
			t.Fatalf("round %d: SUBACK %v", i, sub.ReasonCodes)
		}
		payload := []byte(fmt.Sprintf(`{"round":%d}`, i))
		if err := h.b.Publish(t.Context(), "lockers/v1/A/cmd", payload, 1, false); err != nil {
			t.Fatal(err)
		}
		for {
			pk, err := cur.read()
			if err != nil {
				t.Fatalf("round %d: the new session ended or got nothing: %v", i, err)
			}
			if pk.FixedHeader.Type == packets.Publish && string(pk.Payload) == string(payload) {
				break
			}
		}
		cur.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Disconnect}})
		cur.waitClosed()
		_ = cur.conn.Close()
		waitFor(t, "locker offline", func() bool { return h.b.ConnectedDevices() == 0 })
	}
}

// TestKickDiscardsTheKeptSession: a locker whose session is kept while it
// is away (clean session 0) and that is kicked (disabled, or replaced)
// comes back to a clean session: the unlock queued for it before the kick
// is not delivered, and its old subscriptions are gone. Kicked while
// connected, its kept session goes with the connection.
func TestKickDiscardsTheKeptSession(t *testing.T) {
	h := newHarness(t, nil, nil)
	kept := func(o *paho.ClientOptions) { o.SetCleanSession(false) }
	for _, connected := range []bool{false, true} {
		a := h.mustDial(t, "A", "A", "secret-A", kept)
		if got := a.subscribeResult(t, "lockers/v1/A/cmd", 1); got != 1 {
			t.Fatalf("subscribe: SUBACK %#x", got)
		}
		if !connected {
			a.Disconnect(50) // away; the session is kept
			waitFor(t, "A offline", func() bool { return h.b.ConnectedDevices() == 0 })
		}
		// An unlock queued for A (published to a connected A, it may be
		// in flight when the kick comes).
		if err := h.b.Publish(t.Context(), "lockers/v1/A/cmd", []byte(`{"id":"c-queued"}`), 1, false); err != nil {
			t.Fatal(err)
		}
		if connected {
			a.nextMessage(t) // delivered; a kept session holds none now
		}
		h.b.Kick("A")
		if connected {
			a.waitLost(t)
		}
		waitFor(t, "A offline", func() bool { return h.b.ConnectedDevices() == 0 })
		if _, ok := h.b.server.Clients.Get("A"); ok {
			t.Fatalf("connected %v: the kicked client's session is still kept", connected)
		}
		back := h.mustDial(t, "A", "A", "secret-A", kept)
		cl, ok := h.b.server.Clients.Get("A")
		if !ok || cl.State.Subscriptions.Len() != 0 {
			t.Fatalf("connected %v: the locker came back to its old subscriptions", connected)
		}
		// Nothing queued comes: a queued message would be sent right after
		// the CONNACK, before the answer to a new subscription's marker.
		if got := back.subscribeResult(t, "lockers/v1/A/config", 1); got != 1 {
			t.Fatalf("subscribe: SUBACK %#x", got)
		}
		if err := h.b.Publish(t.Context(), "lockers/v1/A/config", []byte("marker"), 1, false); err != nil {
			t.Fatal(err)
		}
		if m := back.nextMessage(t); string(m.Payload()) != "marker" {
			t.Fatalf("connected %v: after the kick the locker got %s %s", connected, m.Topic(), m.Payload())
		}
		back.Disconnect(50)
		waitFor(t, "A offline", func() bool { return h.b.ConnectedDevices() == 0 })
		h.b.Kick("A") // the next round starts without a kept session
	}
}
