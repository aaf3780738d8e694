package broker

import (
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

const aclDenied = "lockergate_mqtt_acl_denied_total"

// TestDeviceACL is the topic half of the attack suite for a device session.
func TestDeviceACL(t *testing.T) {
	h := newHarness(t, nil, nil)
	seen := h.subscribe(t, "lockers/#")
	seenProv := h.subscribe(t, "provision/#")
	a := h.mustDialDevice(t, "A")

	t.Run("ForbiddenSubscribe", func(t *testing.T) {
		filters := []string{
			"#", "+/#", "lockers/#", "lockers/v1/+/cmd", "lockers/v1/+/creds",
			"lockers/v1/B/cmd", "lockers/v1/B/creds", "lockers/v1/B/events",
			"lockers/v1/A/+/+/+", "lockers/v1/A/nope/#",
			"lockers/v1/A/nope", "$SYS/#", "$SYS/broker/clients/connected",
			"$share/g/lockers/v1/A/cmd", "provision/#", "provision/v1/SN1/response",
		}
		for _, f := range filters {
			if got := a.subscribeResult(t, f, 1); got != 0x80 {
				t.Errorf("subscribe %q: SUBACK %#x, want 0x80 (refused)", f, got)
			}
		}
		if got := h.metric(t, aclDenied, "action", "subscribe"); got != float64(len(filters)) {
			t.Errorf("acl_denied{subscribe} = %v, want %d", got, len(filters))
		}
	})

	t.Run("AllowedSubscribe", func(t *testing.T) {
		// Its own topics in the other direction and wildcards are allowed
		// too (TestOwnUplinkEcho); this session keeps to its inbound ones.
		for _, f := range []string{"lockers/v1/A/cmd", "lockers/v1/A/creds", "lockers/v1/A/config", "lockers/v1/A/fw/job"} {
			if got := a.subscribeResult(t, f, 1); got != 1 {
				t.Errorf("subscribe %q: SUBACK %#x, want 1", f, got)
			}
		}
	})

	t.Run("ForbiddenPublish", func(t *testing.T) {
		before := h.metric(t, aclDenied, "action", "publish")
		topics := []string{
			"lockers/v1/B/events", "lockers/v1/B/cmd/result", "lockers/v1/B/presence", "lockers/v1/B/health",
			"lockers/v1/A/cmd", "lockers/v1/A/creds", "lockers/v1/A/config", "lockers/v1/A/fw/job",
			"lockers/v1/A/nope", "lockers/v1/A", "lockers/v1/A/events/x",
			"provision/v1/SN1/request", "provision/v1/SN1/response", "anything",
		}
		for _, topic := range topics {
			a.mustPublish(t, topic, 0, []byte(`{"forged":true}`))
		}
		// The client's packets are handled in order: once the marker arrives,
		// every forbidden publish before it has been judged.
		a.mustPublish(t, "lockers/v1/A/events", 0, []byte(`{"marker":true}`))
		waitFor(t, "marker", func() bool { return len(seen.get()) == 1 })
		if got := seen.topics(); len(got) != 1 || got[0] != "lockers/v1/A/events" {
			t.Errorf("inline subscriber saw %v, want only the marker", got)
		}
		if got := seenProv.topics(); len(got) != 0 {
			t.Errorf("provisioning topics saw %v, want nothing", got)
		}
		if got := h.metric(t, aclDenied, "action", "publish") - before; got != float64(len(topics)) {
			t.Errorf("acl_denied{publish} rose by %v, want %d", got, len(topics))
		}
	})

	t.Run("OwnCommandsDelivered", func(t *testing.T) {
		if err := h.b.Publish(t.Context(), "lockers/v1/B/cmd", []byte(`{"id":"c-b"}`), 1, false); err != nil {
			t.Fatal(err)
		}
		if err := h.b.Publish(t.Context(), "lockers/v1/A/cmd", []byte(`{"id":"c-a"}`), 1, false); err != nil {
			t.Fatal(err)
		}
		m := a.nextMessage(t)
		if m.Topic() != "lockers/v1/A/cmd" || string(m.Payload()) != `{"id":"c-a"}` {
			t.Errorf("device A got %s %s, want its own command", m.Topic(), m.Payload())
		}
	})
}

// TestOwnUplinkEcho: a device may subscribe to its own topics in either
// direction and with wildcards under its own root (protocol v1: "its own
// topics"). It then gets its own messages back, as MQTT delivers them to
// every matching subscription, and the gateway still gets each once.
func TestOwnUplinkEcho(t *testing.T) {
	h := newHarness(t, nil, nil)
	seen := h.subscribe(t, "lockers/v1/+/health")
	a, b := h.mustDialDevice(t, "A"), h.mustDialDevice(t, "B")
	for _, f := range []string{"lockers/v1/A/events", "lockers/v1/A/cmd/result", "lockers/v1/A/+", "lockers/v1/A/fw/+", "lockers/v1/A/#"} {
		if got := a.subscribeResult(t, f, 1); got != 1 {
			t.Errorf("subscribe %q: SUBACK %#x, want 1", f, got)
		}
	}
	a.mustPublish(t, "lockers/v1/A/health", 1, []byte(`{"from":"A"}`))
	if m := a.nextMessage(t); m.Topic() != "lockers/v1/A/health" || string(m.Payload()) != `{"from":"A"}` {
		t.Errorf("A got %s %s, want its own health back", m.Topic(), m.Payload())
	}
	b.mustPublish(t, "lockers/v1/B/health", 1, []byte(`{"from":"B"}`)) // the direct path
	waitFor(t, "both healths", func() bool { return len(seen.get()) >= 2 })
	if got := seen.topics(); len(got) != 2 || got[0] != "lockers/v1/A/health" || got[1] != "lockers/v1/B/health" {
		t.Errorf("the gateway's handler saw %v, want each health once", got)
	}
	if err := h.b.Publish(t.Context(), "lockers/v1/A/cmd", []byte(`{"id":"c-a"}`), 1, false); err != nil {
		t.Fatal(err)
	}
	if m := a.nextMessage(t); m.Topic() != "lockers/v1/A/cmd" {
		t.Errorf("A got %s, want its command through the wildcard", m.Topic())
	}
	if got := h.b.echoes.Load(); got != 1 {
		t.Errorf("sessions echoed = %d, want 1 (A)", got)
	}
	a.Disconnect(50)
	waitFor(t, "A's echo forgotten", func() bool { return h.b.echoes.Load() == 0 })
}

// TestRefusedPublishAcknowledged: MQTT 3.1.1 has no negative
// acknowledgement, so a refused QoS 1 or 2 publish is acknowledged as usual
// and dropped, and the session goes on. Hung up on instead, a locker with a
// persistent session would send the unacknowledged publish again after every
// reconnect and never get back into service. A publish to $SYS is refused the
// same way.
func TestRefusedPublishAcknowledged(t *testing.T) {
	h := newHarness(t, nil, nil)
	seen := h.subscribe(t, "#")
	before := h.metric(t, aclDenied, "action", "publish")
	r := dialRaw(t, h.addr, 4)
	if ack := r.connect("A", "A", "secret-A", 30, nil); ack.ReasonCode != 0 {
		t.Fatalf("CONNACK %#x", ack.ReasonCode)
	}
	for _, topic := range []string{"lockers/v1/B/events", "lockers/v1/A/cmd", "$SYS/broker/x"} {
		id := r.publish(topic, 1, []byte(`{"forged":true}`))
		if ack := r.mustRead(packets.Puback); ack.PacketID != id {
			t.Errorf("%s: PUBACK id %d, want %d", topic, ack.PacketID, id)
		}
	}
	// QoS 2: PUBREC, then the PUBCOMP that answers the PUBREL.
	id := r.publish("lockers/v1/B/events", 2, []byte(`{"forged":true}`))
	if rec := r.mustRead(packets.Pubrec); rec.PacketID != id {
		t.Errorf("PUBREC id %d, want %d", rec.PacketID, id)
	}
	r.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pubrel, Qos: 1}, PacketID: id})
	if comp := r.mustRead(packets.Pubcomp); comp.PacketID != id {
		t.Errorf("PUBCOMP id %d, want %d", comp.PacketID, id)
	}
	// Still connected, and nothing forged went anywhere.
	id = r.publish("lockers/v1/A/events", 1, []byte(`{"marker":true}`))
	if ack := r.mustRead(packets.Puback); ack.PacketID != id {
		t.Errorf("marker PUBACK id %d, want %d", ack.PacketID, id)
	}
	waitFor(t, "marker", func() bool { return len(seen.get()) > 0 })
	if got := seen.topics(); len(got) != 1 || got[0] != "lockers/v1/A/events" {
		t.Errorf("subscriber saw %v, want only the marker", got)
	}
	if got := h.metric(t, aclDenied, "action", "publish") - before; got != 4 {
		t.Errorf("acl_denied{publish} rose by %v, want 4", got)
	}
	if got := h.metric(t, "lockergate_mqtt_disconnects_total", "reason", ReasonNotAuthorized); got != 0 {
		t.Errorf("disconnects{not_authorized} = %v, want 0", got)
	}
}

// TestMQTT5ACL checks the negative acknowledgements MQTT 5 clients get.
func TestMQTT5ACL(t *testing.T) {
	h := newHarness(t, nil, nil)
	r := dialRaw(t, h.addr, 5)
	if ack := r.connect("A", "A", "secret-A", 30, nil); ack.ReasonCode != 0 {
		t.Fatalf("CONNACK %#x", ack.ReasonCode)
	}
	for _, topic := range []string{"lockers/v1/B/events", "$SYS/broker/x"} {
		id := r.publish(topic, 1, []byte(`{}`))
		ack := r.mustRead(packets.Puback)
		if ack.PacketID != id || ack.ReasonCode != packets.ErrNotAuthorized.Code {
			t.Errorf("%s: PUBACK id %d code %#x, want id %d code %#x", topic, ack.PacketID, ack.ReasonCode, id, packets.ErrNotAuthorized.Code)
		}
	}
	id := r.publish("lockers/v1/B/events", 2, []byte(`{}`))
	if rec := r.mustRead(packets.Pubrec); rec.PacketID != id || rec.ReasonCode != packets.ErrNotAuthorized.Code {
		t.Errorf("PUBREC id %d code %#x, want id %d code %#x", rec.PacketID, rec.ReasonCode, id, packets.ErrNotAuthorized.Code)
	}
	sub := r.subscribe("lockers/v1/B/cmd", 1)
	if len(sub.ReasonCodes) != 1 || sub.ReasonCodes[0] != packets.ErrNotAuthorized.Code {
		t.Errorf("SUBACK codes %v, want [%#x]", sub.ReasonCodes, packets.ErrNotAuthorized.Code)
	}
	// Still connected: an allowed publish is acknowledged.
	id = r.publish("lockers/v1/A/events", 1, []byte(`{}`))
	if ack := r.mustRead(packets.Puback); ack.PacketID != id || ack.ReasonCode != 0 {
		t.Errorf("PUBACK id %d code %#x, want id %d code 0", ack.PacketID, ack.ReasonCode, id)
	}
}

// TestWildcardPublishClosesTheConnection: a topic name with + or # in a
// PUBLISH is a protocol error (MQTT-3.3.2-2), not a refused publish: the
// connection is closed, over 3.1.1 and 5 alike, and counted.
func TestWildcardPublishClosesTheConnection(t *testing.T) {
	h := newHarness(t, nil, nil)
	seen := h.subscribe(t, "lockers/#")
	for i, v := range []byte{4, 5} {
		r := dialRaw(t, h.addr, v)
		if ack := r.connect("A", "A", "secret-A", 30, nil); ack.ReasonCode != 0 {
			t.Fatalf("MQTT %d: CONNACK %#x", v, ack.ReasonCode)
		}
		r.publish([]string{"lockers/v1/+/events", "lockers/v1/A/#"}[i], 1, []byte(`{}`))
		if v == 5 {
			if pk := r.mustRead(packets.Disconnect); pk.ReasonCode != packets.ErrProtocolViolationSurplusWildcard.Code {
				t.Errorf("MQTT 5: DISCONNECT %#x, want %#x", pk.ReasonCode, packets.ErrProtocolViolationSurplusWildcard.Code)
			}
		}
		r.waitClosed()
		h.waitMetric(t, "lockergate_mqtt_disconnects_total", "reason", ReasonProtocolError, float64(i+1))
	}
	if got := seen.topics(); len(got) != 0 {
		t.Errorf("the gateway saw %v, want nothing", got)
	}
}

// TestClaimACL is the topic half of the attack suite for a claim session.
func TestClaimACL(t *testing.T) {
	h := newHarness(t, nil, nil)
	seen := h.subscribe(t, "#")
	p := h.mustDial(t, "prov-SN1", "claim", claimToken)

	filters := []string{"#", "provision/#", "provision/v1/+/response", "provision/v1/SN2/response",
		"provision/v1/SN1/request", "lockers/v1/A/cmd", "lockers/v1/SN1/cmd", "lockers/v1/+/creds", "$SYS/#"}
	for _, f := range filters {
		if got := p.subscribeResult(t, f, 1); got != 0x80 {
			t.Errorf("subscribe %q: SUBACK %#x, want 0x80", f, got)
		}
	}
	if got := p.subscribeResult(t, "provision/v1/SN1/response", 1); got != 1 {
		t.Errorf("own response topic: SUBACK %#x, want 1", got)
	}

	topics := []string{"lockers/v1/A/events", "lockers/v1/SN1/presence", "provision/v1/SN2/request",
		"provision/v1/SN1/response", "provision/v1/SN1/request/x"}
	for _, topic := range topics {
		p.mustPublish(t, topic, 0, []byte(`{"forged":true}`))
	}
	h.waitMetric(t, aclDenied, "action", "publish", float64(len(topics)))
	for _, m := range seen.get() {
		if m.ClientID == "prov-SN1" {
			t.Errorf("claim session's publish reached a subscriber: %s", m.Topic)
		}
	}
	if got := h.metric(t, aclDenied, "action", "subscribe"); got != float64(len(filters)) {
		t.Errorf("acl_denied{subscribe} = %v, want %d", got, len(filters))
	}
	if h.prov.callCount() != 0 {
		t.Error("forbidden publishes reached the provisioner")
	}
}

func TestIdentify(t *testing.T) {
	tests := []struct {
		id, user string
		kind     kind
		subject  string
	}{
		{"A", "A", kindDevice, "A"},
		{"A", "B", kindNone, ""},
		{"prov-SN1", "claim", kindProvision, "SN1"},
		{"prov-SN1", "prov-SN1", kindNone, ""},
		{"claim", "claim", kindDevice, "claim"},
		{"inline", "inline", kindNone, ""},
		{"a/b", "a/b", kindNone, ""},
		{"", "", kindNone, ""},
	}
	for _, tc := range tests {
		cl := &mqtt.Client{ID: tc.id}
		cl.Properties.Username = []byte(tc.user)
		k, s := identify(cl)
		if k != tc.kind || s != tc.subject {
			t.Errorf("identify(%q, %q) = %v %q, want %v %q", tc.id, tc.user, k, s, tc.kind, tc.subject)
		}
	}
}

// TestLateCmdSubscription: protocol v1 has the birth "right after
// connecting", so a device may subscribe to its cmd topic after it; the
// observer then hears of it, to send the open commands again. A device
// that subscribes first, a subscription to another topic, and one refused
// are not reported.
func TestLateCmdSubscription(t *testing.T) {
	h := newHarness(t, nil, nil)
	seen := h.subscribe(t, "lockers/v1/+/presence")
	a, b := h.mustDialDevice(t, "A"), h.mustDialDevice(t, "B")
	if got := b.subscribeResult(t, "lockers/v1/B/cmd", 1); got != 1 {
		t.Fatalf("B: SUBACK %#x", got)
	}
	for id, c := range map[string]*client{"A": a, "B": b} {
		if tok := c.Publish("lockers/v1/"+id+"/presence", 1, true, []byte(`{"online":true}`)); !tok.WaitTimeout(waitTimeout) || tok.Error() != nil {
			t.Fatalf("%s birth: %v", id, tok.Error())
		}
	}
	waitFor(t, "both births", func() bool { return len(seen.get()) == 2 })
	for _, f := range []string{"lockers/v1/A/config", "lockers/v1/B/cmd"} {
		a.subscribeResult(t, f, 1) // not its cmd; refused
	}
	if got := h.obs.lateSubscribed(); len(got) != 0 {
		t.Fatalf("reported %v before A subscribed to its cmd", got)
	}
	if got := a.subscribeResult(t, "lockers/v1/A/#", 1); got != 1 {
		t.Fatalf("A: SUBACK %#x", got)
	}
	if got := h.obs.lateSubscribed(); len(got) != 1 || got[0] != "A" {
		t.Fatalf("late subscriptions reported: %v, want [A]", got)
	}
	// Once per session: subscribing again asks for nothing more.
	a.subscribeResult(t, "lockers/v1/A/cmd", 1)
	if got := h.obs.lateSubscribed(); len(got) != 1 {
		t.Fatalf("late subscriptions reported: %v, want one", got)
	}
}

// TestEchoEndsWithTheSession: the echo mark of a session goes when it
// ends, and stays gone while messages go to its kept session afterwards
// (its own Last Will, here). Only a SUBSCRIBE (or a resumed session)
// marks; a mark from mochi's delivery-time ACL check, which also runs for
// kept sessions, would stay forever after the session's end (an MQTT 5
// will delay is such a path; this MQTT 3.1.1 case does not reach it).
func TestEchoEndsWithTheSession(t *testing.T) {
	h := newHarness(t, nil, nil)
	presence := h.subscribe(t, "lockers/v1/A/presence")
	a := h.mustDial(t, "A", "A", "secret-A", func(o *paho.ClientOptions) {
		o.SetCleanSession(false).SetWill("lockers/v1/A/presence", `{"online":false}`, 1, true)
	})
	if got := a.subscribeResult(t, "lockers/v1/A/#", 1); got != 1 {
		t.Fatalf("SUBACK %#x", got)
	}
	if got := h.b.echoes.Load(); got != 1 {
		t.Fatalf("echoes = %d after the subscription, want 1", got)
	}
	// An unclean end (the connection lost): the will goes out, to A's kept
	// session too. (A kicked session's will is dropped.)
	cl, ok := h.b.server.Clients.Get("A")
	if !ok {
		t.Fatal("A not connected")
	}
	_ = cl.Net.Conn.Close()
	waitFor(t, "the will", func() bool { return len(presence.get()) == 1 })
	waitFor(t, "A offline", func() bool { return h.b.ConnectedDevices() == 0 })
	// One more message to A's kept session, after the session ended.
	b := h.mustDialDevice(t, "B")
	b.mustPublish(t, "lockers/v1/B/health", 1, []byte(`{}`))
	if got := h.b.echoes.Load(); got != 0 {
		t.Errorf("echoes = %d after the session ended, want 0", got)
	}
	// Resumed, the session inherits its subscriptions without a SUBSCRIBE,
	// and its own messages come back again.
	a = h.mustDial(t, "A", "A", "secret-A", func(o *paho.ClientOptions) { o.SetCleanSession(false) })
	waitFor(t, "the resumed session's echo", func() bool { return h.b.echoes.Load() == 1 })
	a.mustPublish(t, "lockers/v1/A/health", 1, []byte(`{"again":true}`))
	for {
		m := a.nextMessage(t)
		if m.Topic() == "lockers/v1/A/health" {
			break
		}
	}
}

// nextNoJob fails unless c's next message is the empty fw/job of device A
// that says it has no firmware job.
func (c *client) nextNoJob(t *testing.T) {
	t.Helper()
	if m := c.nextMessage(t); m.Topic() != "lockers/v1/A/fw/job" || len(m.Payload()) != 0 || m.Retained() {
		t.Fatalf("got %s %q (retained %v), want an empty fw/job", m.Topic(), m.Payload(), m.Retained())
	}
}

// TestNoJobToNewSubscriber: a device that subscribes to its fw/job after
// the gateway published "none" (an empty retained payload, which the broker
// does not keep) in its session hears "none" from the broker, to it alone
// (the gateway's own subscriptions hear nothing); one that subscribed
// before hears the gateway's; with a job retained it gets the job and no
// "none".
func TestNoJobToNewSubscriber(t *testing.T) {
	h := newHarness(t, nil, nil)
	seen := h.subscribe(t, "lockers/#")
	a := h.mustDialDevice(t, "A")
	publish := func(topic, payload string, retain bool) {
		t.Helper()
		if err := h.b.Publish(t.Context(), topic, []byte(payload), 1, retain); err != nil {
			t.Fatal(err)
		}
	}
	subscribe := func(filter string) {
		t.Helper()
		if got := a.subscribeResult(t, filter, 1); got != 1 {
			t.Fatalf("subscribe %s: SUBACK %#x, want 1", filter, got)
		}
	}
	subscribe("lockers/v1/A/cmd")
	// Subscribed before the gateway's "none": that one reaches it, and
	// the command after it comes next (no second "none").
	subscribe("lockers/v1/A/fw/job")
	publish("lockers/v1/A/fw/job", "", true)
	a.nextNoJob(t)
	publish("lockers/v1/A/cmd", `{"id":"c-1"}`, false)
	if m := a.nextMessage(t); m.Topic() != "lockers/v1/A/cmd" {
		t.Fatalf("got %s %q, want the command", m.Topic(), m.Payload())
	}
	// Subscribed after it (again, or a locker whose SUBSCRIBE came late):
	// the broker's "none".
	subscribe("lockers/v1/A/fw/job")
	a.nextNoJob(t)
	// mochi looks up a subscription's retained messages after its SUBACK:
	// the SUBACK of a SUBSCRIBE after it says that was done (else the job
	// published next could come twice, as retained for that subscription
	// too).
	subscribe("lockers/v1/A/cmd")
	// A job retained: the job, and on a new subscription the job again,
	// then the command published after it, no "none".
	publish("lockers/v1/A/fw/job", `{"job":"j-1"}`, true)
	if m := a.nextMessage(t); string(m.Payload()) != `{"job":"j-1"}` {
		t.Fatalf("got %s %q, want the job", m.Topic(), m.Payload())
	}
	subscribe("lockers/v1/A/fw/job")
	if m := a.nextMessage(t); string(m.Payload()) != `{"job":"j-1"}` || !m.Retained() {
		t.Fatalf("got %s %q (retained %v), want the retained job", m.Topic(), m.Payload(), m.Retained())
	}
	publish("lockers/v1/A/cmd", `{"id":"c-2"}`, false)
	if m := a.nextMessage(t); m.Topic() != "lockers/v1/A/cmd" {
		t.Fatalf("got %s %q, want the command", m.Topic(), m.Payload())
	}
	for _, m := range seen.get() {
		if m.Topic == "lockers/v1/A/fw/job" && len(m.Payload) == 0 && !m.Retain {
			t.Fatalf("the gateway's subscription heard the broker's 'none': %v", seen.get())
		}
	}
	if got := len(seen.get()); got != 4 {
		t.Fatalf("the gateway's subscription saw %v, want its own four publishes", seen.get())
	}
	// The session's mark goes with it: it would keep the ended client.
	publish("lockers/v1/A/fw/job", "", true)
	if n := h.b.noJobMarks(); n != 1 {
		t.Fatalf("%d no-job marks after the gateway's 'none', want 1", n)
	}
	a.Disconnect(50)
	waitFor(t, "A's no-job mark dropped with its session", func() bool { return h.b.noJobMarks() == 0 })
}

// noJobMarks counts the sessions marked as having heard the gateway's "none".
func (b *Broker) noJobMarks() int {
	n := 0
	for i := range b.fwJobMu {
		b.fwJobMu[i].Lock()
		n += len(b.noJobOut[i])
		b.fwJobMu[i].Unlock()
	}
	return n
}

// blockedObserver holds the report of device block's connect, and with it
// the broker's presence lock, until released: as the fleet manager's report
// waits when the connect's control shard is full, on the goroutine that
// publishes fw/job.
type blockedObserver struct {
	*fakeObserver
	block   string
	entered chan struct{}
	release chan struct{}
}

func (o *blockedObserver) DeviceConnected(id, remote string) {
	o.fakeObserver.DeviceConnected(id, remote)
	if id == o.block {
		close(o.entered)
		<-o.release
	}
}

// TestFwJobWhileAConnectIsReported: the gateway's fw/job publishes and the
// broker's own "none" take no lock that a connect's report holds. That
// report can wait for the goroutine that publishes fw/job (a full control
// shard), so such a lock would stop connects and that shard for good (the
// deadlock 4eac7c0 took out).
func TestFwJobWhileAConnectIsReported(t *testing.T) {
	obs := &blockedObserver{fakeObserver: &fakeObserver{}, block: "B",
		entered: make(chan struct{}), release: make(chan struct{})}
	h := newHarness(t, func(o *Options) { o.Observer = obs }, nil)
	var once sync.Once
	release := func() { once.Do(func() { close(obs.release) }) }
	t.Cleanup(release) // before the broker's Close, which needs the lock
	a := h.mustDialDevice(t, "A")
	// A's report comes after its CONNACK; its reads wait for it.
	waitFor(t, "A reported connected", func() bool { return slices.Contains(obs.get(), "+A") })
	publish := func(payload string) error {
		return h.b.Publish(t.Context(), "lockers/v1/A/fw/job", []byte(payload), 1, true)
	}
	if err := publish(""); err != nil { // the gateway's "none" in A's session
		t.Fatal(err)
	}
	h.mustDialDevice(t, "B") // reported after its CONNACK
	select {
	case <-obs.entered:
	case <-time.After(waitTimeout):
		t.Fatal("B's connect was not reported")
	}
	// B's report holds the presence lock from here on.
	if got := a.subscribeResult(t, "lockers/v1/A/fw/job", 1); got != 1 {
		t.Fatalf("subscribe: SUBACK %#x, want 1", got)
	}
	a.nextNoJob(t)
	done := make(chan error, 1)
	go func() { done <- publish(`{"job":"j-1"}`) }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(waitTimeout):
		t.Fatal("publishing a fw/job waited for the report of another locker's connect")
	}
	if m := a.nextMessage(t); string(m.Payload()) != `{"job":"j-1"}` {
		t.Fatalf("got %s %q, want the job", m.Topic(), m.Payload())
	}
	release()
	if n := h.b.ConnectedDevices(); n != 2 { // takes the presence lock
		t.Fatalf("%d devices connected, want 2", n)
	}
}

// TestOnlyPresenceRetained: a locker's publish with the retain flag on any
// topic but its presence is delivered to the gateway as any other, and not
// retained (a later subscriber would be handed it), with a warning; its
// presence is retained as before.
func TestOnlyPresenceRetained(t *testing.T) {
	h := newHarness(t, nil, nil)
	got := h.subscribe(t, "lockers/v1/+/+")
	results := h.subscribe(t, "lockers/v1/+/cmd/result")
	a := h.mustDialDevice(t, "A")
	sent := map[string]byte{"lockers/v1/A/events": 1, "lockers/v1/A/health": 0, "lockers/v1/A/cmd/result": 1, "lockers/v1/A/presence": 1}
	for topic, qos := range sent {
		tok := a.Publish(topic, qos, true, []byte(`{"v":1}`))
		if !tok.WaitTimeout(waitTimeout) || tok.Error() != nil {
			t.Fatalf("publish %s: %v", topic, tok.Error())
		}
	}
	waitFor(t, "every publish delivered", func() bool { return len(got.get())+len(results.get()) == len(sent) })
	for topic := range sent {
		_, kept := h.b.server.Topics.Retained.Get(topic)
		if want := topic == "lockers/v1/A/presence"; kept != want {
			t.Errorf("%s retained %v, want %v", topic, kept, want)
		}
	}
	if logs := h.logs.String(); !strings.Contains(logs, "mqtt retain flag ignored") {
		t.Errorf("no warning about the retain flag:\n%s", logs)
	}
}
