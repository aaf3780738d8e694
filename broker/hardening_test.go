package broker

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/lockergate/lockergate/internal/testtool"
)

// otherClaimToken is a second valid claim, as another batch's lockers (or
// anyone who holds one of their tokens) have.
const otherClaimToken = "claim-token-of-another-batch-9876543210"

func (h *harness) addClaim(token string) {
	h.auth.mu.Lock()
	defer h.auth.mu.Unlock()
	h.auth.claims[token] = true
}

// pingExpectingNo sends a PINGREQ and reads up to its PINGRESP, failing on
// a packet of type typ before it: one the broker wrote before it read the
// PINGREQ arrives first. (Whatever a kept session had in flight is written
// right after the CONNACK, so the PINGRESP marks the end of that window.)
func (r *raw) pingExpectingNo(typ byte, what string) {
	r.t.Helper()
	if _, err := r.conn.Write([]byte{packets.Pingreq << 4, 0}); err != nil {
		r.t.Fatalf("raw: write PINGREQ: %v", err)
	}
	for {
		pk, err := r.read()
		if err != nil {
			r.t.Fatalf("raw: read: %v", err)
		}
		switch pk.FixedHeader.Type {
		case packets.Pingresp:
			return
		case typ:
			r.t.Fatalf("%s: got a %s (%s %q, id %d)", what, packets.PacketNames[typ], pk.TopicName, pk.Payload, pk.PacketID)
		}
	}
}

// TestClaimSessionNeverKept: a claim session is clean and ends with its
// connection, whatever its CONNECT asks for, so the provisioning answer it
// holds in flight (the device secret) cannot be inherited by the next
// CONNECT as prov-{serial}, which any claim token allows; while it is
// connected another claim cannot take it over at all.
func TestClaimSessionNeverKept(t *testing.T) {
	const id, serial = "prov-SN-7", "SN-7"
	reqTopic, respTopic := "provision/v1/"+serial+"/request", "provision/v1/"+serial+"/response"
	for _, tc := range []struct {
		name    string
		version byte
		persist func(pk *packets.Packet) // a CONNECT asking for a kept session
		live    bool                     // B connects while A is still connected
	}{
		{name: "MQTT311CleanSessionOff", version: 4, persist: func(pk *packets.Packet) { pk.Connect.Clean = false }},
		{name: "MQTT5SessionExpiry", version: 5, persist: func(pk *packets.Packet) {
			pk.Connect.Clean = false
			pk.Properties.SessionExpiryInterval, pk.Properties.SessionExpiryIntervalFlag = 3600, true
		}},
		{name: "MQTT311LiveTakeover", version: 4, live: true, persist: func(pk *packets.Packet) { pk.Connect.Clean = false }},
		{name: "MQTT5LiveTakeover", version: 5, live: true, persist: func(pk *packets.Packet) {
			pk.Connect.Clean = false
			pk.Properties.SessionExpiryInterval, pk.Properties.SessionExpiryIntervalFlag = 3600, true
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, nil, nil)
			h.addClaim(otherClaimToken)

			// A: the locker. It gets its answer and does not acknowledge it.
			a := dialRaw(t, h.addr, tc.version)
			ack := a.connect(id, "claim", claimToken, 30, tc.persist)
			if ack.ReasonCode != 0 || ack.SessionPresent {
				t.Fatalf("A: CONNACK %#x, session present %v", ack.ReasonCode, ack.SessionPresent)
			}
			if tc.version == 5 && (!ack.Properties.SessionExpiryIntervalFlag || ack.Properties.SessionExpiryInterval != 0) {
				t.Errorf("A: CONNACK session expiry %v (flag %v), want 0: the client must learn its session is not kept",
					ack.Properties.SessionExpiryInterval, ack.Properties.SessionExpiryIntervalFlag)
			}
			if sa := a.subscribe(respTopic, 1); sa.ReasonCodes[0] != 1 {
				t.Fatalf("A: SUBACK %v", sa.ReasonCodes)
			}
			a.publish(reqTopic, 1, []byte(provReqRaw))
			a.mustRead(packets.Puback)
			answer := a.mustRead(packets.Publish)
			if !strings.Contains(string(answer.Payload), h.prov.answer.Password) {
				t.Fatalf("A: answer %s", answer.Payload)
			}
			if !tc.live {
				_ = a.conn.Close()
				h.waitMetric(t, disconnects, "reason", ReasonConnectionLost, 1)
			}

			// B: anyone with another claim token, same client id, asking
			// for A's session back. While A is connected it may not even
			// take it over: A's answer is A's (claim_session_live, "not now").
			b := dialRaw(t, h.addr, tc.version)
			ack = b.connect(id, "claim", otherClaimToken, 30, tc.persist)
			if tc.live {
				if ack.ReasonCode != 0x03 && ack.ReasonCode != packets.ErrServerUnavailable.Code && ack.ReasonCode != packets.ErrServerBusy.Code { // 0x03: MQTT 3.1.1's server unavailable
					t.Fatalf("B, A still connected: CONNACK %#x, want server unavailable or busy", ack.ReasonCode)
				}
				if got := h.metric(t, failures, "reason", refuseClaimInUse); got != 1 {
					t.Errorf("claim_session_live refusals = %v, want 1", got)
				}
				a.pingExpectingNo(packets.Disconnect, "A, after B was refused")
				return
			}
			if ack.ReasonCode != 0 {
				t.Fatalf("B: CONNACK %#x", ack.ReasonCode)
			}
			if ack.SessionPresent {
				t.Error("B: CONNACK says a session was present")
			}
			b.pingExpectingNo(packets.Publish, "B")
			if got := h.prov.callCount(); got != 1 {
				t.Errorf("Provision calls = %d, want 1 (B asked nothing)", got)
			}
		})
	}
}

// TestDeviceWill: protocol v1's Last Will is the device's own presence,
// published when its connection ends and not later; a kicked session
// (disabled or replaced device) leaves no will at all.
func TestDeviceWill(t *testing.T) {
	const presenceTopic = "lockers/v1/A/presence"
	willOn := func(topic string, payload string, delay uint32) func(*packets.Packet) {
		return func(pk *packets.Packet) {
			pk.Connect.WillFlag = true
			pk.Connect.WillTopic = topic
			pk.Connect.WillPayload = []byte(payload)
			pk.Connect.WillQos = 1
			pk.Connect.WillRetain = topic == presenceTopic
			pk.Connect.WillProperties.WillDelayInterval = delay
			// The session outlives the will delay, as MQTT 5 requires for
			// the delay to count.
			pk.Properties.SessionExpiryInterval, pk.Properties.SessionExpiryIntervalFlag = 3600, true
		}
	}
	t.Run("OnEventsTopicRefused", func(t *testing.T) {
		h := newHarness(t, nil, nil)
		events := h.subscribe(t, "lockers/v1/A/events")
		r := dialRaw(t, h.addr, 5)
		event := `{"id":"e-will","ts":"2026-11-24T21:30:00.123Z","type":"door_opened","compartment":1,"by":"manual"}`
		if ack := r.connect("A", "A", "secret-A", 30, willOn("lockers/v1/A/events", event, 60)); ack.ReasonCode < packets.ErrUnspecifiedError.Code {
			_ = r.conn.Close()
			h.waitMetric(t, disconnects, "reason", ReasonConnectionLost, 1)
			t.Fatalf("CONNACK %#x: a device with a will on its events topic was admitted (events now %v)", ack.ReasonCode, events.topics())
		}
		if got := h.metric(t, failures, "reason", refuseWillDenied); got != 1 {
			t.Errorf("%s{will_denied} = %v, want 1", failures, got)
		}
	})
	t.Run("OnCmdResultTopicRefused", func(t *testing.T) {
		h := newHarness(t, nil, nil)
		if _, err := h.dial(t, "A", "A", "secret-A", func(o *paho.ClientOptions) {
			o.SetWill("lockers/v1/A/cmd/result", `{"id":"c-1","status":"ok","ts":"2026-11-24T21:30:00.123Z"}`, 1, false)
		}); err == nil {
			t.Fatal("a device with a will on its cmd/result topic was admitted")
		}
		if got := h.metric(t, failures, "reason", refuseWillDenied); got != 1 {
			t.Errorf("%s{will_denied} = %v, want 1", failures, got)
		}
	})
	t.Run("DelayIgnored", func(t *testing.T) {
		// A protocol will with a delay is admitted, and goes out when the
		// connection ends, not an hour later.
		h := newHarness(t, nil, nil)
		presence := h.subscribe(t, presenceTopic)
		r := dialRaw(t, h.addr, 5)
		if ack := r.connect("A", "A", "secret-A", 30, willOn(presenceTopic, `{"online":false}`, 3600)); ack.ReasonCode != 0 {
			t.Fatalf("CONNACK %#x", ack.ReasonCode)
		}
		_ = r.conn.Close()
		waitFor(t, "the will, at once", func() bool { return len(presence.get()) == 1 })
		if m := presence.get()[0]; string(m.Payload) != `{"online":false}` || !m.Retain {
			t.Errorf("will %+v", m)
		}
	})
	t.Run("DisconnectWithWill", func(t *testing.T) {
		// MQTT 5's DISCONNECT with reason 0x04 ends the session and asks
		// for the will to be published (MQTT 5 3.14.2.1).
		h := newHarness(t, nil, nil)
		presence := h.subscribe(t, presenceTopic)
		r := dialRaw(t, h.addr, 5)
		if ack := r.connect("A", "A", "secret-A", 30, willOn(presenceTopic, `{"online":false}`, 0)); ack.ReasonCode != 0 {
			t.Fatalf("CONNACK %#x", ack.ReasonCode)
		}
		r.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Disconnect}, ReasonCode: packets.CodeDisconnectWillMessage.Code})
		waitFor(t, "the will", func() bool { return len(presence.get()) == 1 })
		if m := presence.get()[0]; string(m.Payload) != `{"online":false}` || !m.Retain {
			t.Errorf("will %+v", m)
		}
		h.waitMetric(t, disconnects, "reason", ReasonClientDisconnect, 1)
	})
	for _, v := range []byte{4, 5} {
		name := map[byte]string{4: "KickedMQTT311", 5: "KickedMQTT5"}[v]
		t.Run(name, func(t *testing.T) {
			h := newHarness(t, nil, nil)
			presence := h.subscribe(t, presenceTopic)
			r := dialRaw(t, h.addr, v)
			mod := willOn(presenceTopic, `{"online":false}`, 0)
			if v == 4 {
				mod = func(pk *packets.Packet) {
					willOn(presenceTopic, `{"online":false}`, 0)(pk)
					pk.Properties = packets.Properties{}
				}
			}
			if ack := r.connect("A", "A", "secret-A", 30, mod); ack.ReasonCode != 0 {
				t.Fatalf("CONNACK %#x", ack.ReasonCode)
			}
			waitFor(t, "A online", func() bool { return h.b.ConnectedDevices() == 1 })
			h.b.Kick("A")
			r.waitClosed()
			// mochi publishes a will before the session's end is counted.
			h.waitMetric(t, disconnects, "reason", ReasonKicked, 1)
			if got := presence.get(); len(got) != 0 {
				t.Errorf("the kicked session's will was published: %s", got[0].Payload)
			}
			if _, ok := h.b.server.Topics.Retained.Get(presenceTopic); ok {
				t.Error("the kicked session's will was retained")
			}
		})
	}
}

// TestClaimWrongTokensDoNotLockTheSerial: wrong claim tokens with a
// locker's client id (its serial is printed on it) do not keep the locker
// from provisioning with its own token; the address limit still holds.
func TestClaimWrongTokensDoNotLockTheSerial(t *testing.T) {
	t.Run("ClientID", func(t *testing.T) {
		h := newHarness(t, nil, nil)
		for i := 0; i < 10; i++ {
			if _, err := h.dial(t, "prov-SN-X", "claim", "lgc_wrong-guess"); err == nil {
				t.Fatal("wrong claim token accepted")
			}
		}
		c, err := h.dial(t, "prov-SN-X", "claim", claimToken)
		if err != nil {
			t.Fatalf("the locker's own claim refused after others' wrong tokens: %v", err)
		}
		c.Disconnect(50)
		if got := h.metric(t, failures, "reason", refuseRateLimited); got != 0 {
			t.Errorf("%s{rate_limited} = %v, want 0", failures, got)
		}
	})
	t.Run("AddressStillLimited", func(t *testing.T) {
		h := newHarness(t, nil, func(b *Broker) { b.limiter.ipLimit, b.limiter.limitLocalhost = 3, true })
		for i := 0; i < 3; i++ {
			if _, err := h.dial(t, "prov-SN-X", "claim", "lgc_wrong-guess"); err == nil {
				t.Fatal("wrong claim token accepted")
			}
		}
		if _, err := h.dial(t, "prov-SN-Y", "claim", claimToken); err == nil {
			t.Fatal("claim accepted from an address blocked after wrong tokens")
		}
		if got := h.metric(t, failures, "reason", refuseRateLimited); got != 1 {
			t.Errorf("%s{rate_limited} = %v, want 1", failures, got)
		}
	})
}

// TestRefusalLogHidesSecretUsernames: a firmware that swaps username and
// password sends its secret (or a claim token) as the username; a refusal
// logs a username only when it is one a locker sends (its client id, or
// "claim"), else its length.
func TestRefusalLogHidesSecretUsernames(t *testing.T) {
	const token = "lgc_secret0123456789abcdefghijklmnopqrstuvwxyzABCD"
	h := newHarness(t, nil, nil)
	for _, c := range []struct{ id, user, pass string }{
		{"prov-SN1", token, "claim"},     // a claim session, fields swapped
		{"A", "secret-A", "A"},           // a device, fields swapped
		{"A", token, "secret-A"},         // a token where the username goes
		{"lockers/v1/+", token, "x"},     // malformed id, refused first
		{"prov-SN1", "claim", "lgc_bad"}, // logged as is: "claim"
	} {
		if _, err := h.dial(t, c.id, c.user, c.pass); err == nil {
			t.Fatalf("%s/%s accepted", c.id, c.user)
		}
	}
	// The external broker's auth hook logs its refusals the same way.
	if v, _ := h.b.CheckExternal("A", token, []byte("secret-A"), "10.0.0.9:4000"); v != Deny {
		t.Fatalf("CheckExternal: %v, want deny", v)
	}
	logs := h.logs.String()
	for _, secret := range []string{token, token[:40], "secret-A"} {
		if strings.Contains(logs, secret) {
			t.Errorf("the log holds %q:\n%s", secret, logs)
		}
	}
	if n := strings.Count(logs, "username_len="); n != 5 {
		t.Errorf("%d refusals logged with the username's length, want 5:\n%s", n, logs)
	}
	if !strings.Contains(logs, "username=claim") {
		t.Errorf("the claim username is not logged:\n%s", logs)
	}
}

// TestClaimAnswerOnlyToItsSession: a provisioning answer reaches only the
// session that asked. mochi delivers to whichever client holds the
// subscriber's client id when it publishes, so a CONNECT that replaced the
// locker's session (any claim token does) and subscribed again just before
// the answer went out would get it; this is that moment, made on purpose.
func TestClaimAnswerOnlyToItsSession(t *testing.T) {
	const serial = "SN-7"
	topic := "provision/v1/" + serial + "/response"
	h := newHarness(t, nil, nil)
	h.addClaim(otherClaimToken)
	b := dialRaw(t, h.addr, 4)
	if ack := b.connect("prov-"+serial, "claim", otherClaimToken, 30, nil); ack.ReasonCode != 0 {
		t.Fatalf("CONNACK %#x", ack.ReasonCode)
	}
	if sa := b.subscribe(topic, 1); sa.ReasonCodes[0] != 1 {
		t.Fatalf("SUBACK %v", sa.ReasonCodes)
	}
	answer := func(to *session, payload string) {
		t.Helper()
		h.b.answering.Store(serial, to)
		defer h.b.answering.CompareAndDelete(serial, to)
		if err := h.b.server.Publish(topic, []byte(payload), false, 1); err != nil {
			t.Fatal(err)
		}
	}
	cl, ok := h.b.server.Clients.Get("prov-" + serial)
	if !ok {
		t.Fatal("no client prov-" + serial)
	}
	// Both go through B's outbound queue, in order: the first PUBLISH B
	// reads is the first one let through.
	answer(&session{kind: kindProvision, id: serial, cl: new(mqtt.Client)}, `{"for":"the replaced session"}`)
	answer(h.b.sessionOf(cl), `{"for":"B"}`)
	if pk := b.mustRead(packets.Publish); string(pk.Payload) != `{"for":"B"}` {
		t.Fatalf("B got %s on %s", pk.Payload, pk.TopicName)
	}
}

// TestDevicePacketIDsAreItsOwn: a locker assigns its packet ids apart from
// the broker's (MQTT 3.1.1 2.3.1, MQTT 5 2.2.1), so it may use the id of a
// command it has not yet acknowledged. Its SUBSCRIBE with that id is
// granted (mochi refused it as "in use", and a locker without its
// subscription hears nothing there), and its QoS 1 PUBLISH with that id
// leaves the command in flight: a resumed session gets it again (mochi
// dropped it from the session). Mochi patch 21.
func TestDevicePacketIDsAreItsOwn(t *testing.T) {
	for _, v := range []byte{4, 5} {
		t.Run(fmt.Sprintf("v%d", v), func(t *testing.T) {
			h := newHarness(t, nil, nil)
			keep := func(pk *packets.Packet) {
				pk.Connect.Clean = false
				if v == 5 {
					pk.Properties.SessionExpiryInterval, pk.Properties.SessionExpiryIntervalFlag = 3600, true
				}
			}
			a := dialRaw(t, h.addr, v)
			if ack := a.connect("A", "A", "secret-A", 30, keep); ack.ReasonCode != 0 {
				t.Fatalf("CONNACK %#x", ack.ReasonCode)
			}
			if sa := a.subscribe("lockers/v1/A/cmd", 1); sa.ReasonCodes[0] != 1 {
				t.Fatalf("SUBACK %#x", sa.ReasonCodes)
			}
			if err := h.b.Publish(t.Context(), "lockers/v1/A/cmd", []byte(`{"id":"c-1"}`), 1, false); err != nil {
				t.Fatal(err)
			}
			cmd := a.mustRead(packets.Publish) // not acknowledged
			a.next = cmd.PacketID - 1
			if sa := a.subscribe("lockers/v1/A/config", 1); sa.PacketID != cmd.PacketID || len(sa.ReasonCodes) != 1 || sa.ReasonCodes[0] != 1 {
				t.Fatalf("SUBSCRIBE %d: SUBACK %d %#x, want QoS 1 granted", cmd.PacketID, sa.PacketID, sa.ReasonCodes)
			}
			a.next = cmd.PacketID - 1
			a.publish("lockers/v1/A/events", 1, []byte(`{}`))
			if ack := a.mustRead(packets.Puback); ack.PacketID != cmd.PacketID {
				t.Fatalf("PUBACK %d, want %d", ack.PacketID, cmd.PacketID)
			}
			_ = a.conn.Close()
			h.waitMetric(t, disconnects, "reason", ReasonConnectionLost, 1)

			b := dialRaw(t, h.addr, v)
			if ack := b.connect("A", "A", "secret-A", 30, keep); ack.ReasonCode != 0 || !ack.SessionPresent {
				t.Fatalf("CONNACK %#x, session present %v; want the session kept", ack.ReasonCode, ack.SessionPresent)
			}
			again := b.mustRead(packets.Publish)
			if again.TopicName != "lockers/v1/A/cmd" || string(again.Payload) != `{"id":"c-1"}` || again.PacketID != cmd.PacketID {
				t.Fatalf("resumed session got %s %q (id %d), want the command again (id %d)", again.TopicName, again.Payload, again.PacketID, cmd.PacketID)
			}
		})
	}
}

// TestClaimSessionTakeover: a live claim session may be taken over only by
// a CONNECT with its own claim, and only before its request is taken: one
// with another claim (a batch's token, another site's), or any while the
// request is being served (its answer, committed, is that session's: lost,
// a second request with the claim would be given the identity again), is
// refused "not now" (claim_session_live), and the locker gets its answer.
func TestClaimSessionTakeover(t *testing.T) {
	const serial = "SN-9"
	id, reqTopic, respTopic := "prov-"+serial, "provision/v1/"+serial+"/request", "provision/v1/"+serial+"/response"
	h := newHarness(t, nil, nil)
	h.addClaim(otherClaimToken)
	refused := func(token, what string, want float64) {
		t.Helper()
		b := dialRaw(t, h.addr, 5)
		if ack := b.connect(id, "claim", token, 30, nil); ack.ReasonCode != packets.ErrServerUnavailable.Code && ack.ReasonCode != packets.ErrServerBusy.Code {
			t.Fatalf("%s: CONNACK %#x, want server unavailable or busy", what, ack.ReasonCode)
		}
		if got := h.metric(t, failures, "reason", refuseClaimInUse); got != want {
			t.Fatalf("%s: claim_session_live refusals = %v, want %v", what, got, want)
		}
	}

	a := dialRaw(t, h.addr, 5)
	if ack := a.connect(id, "claim", claimToken, 30, nil); ack.ReasonCode != 0 {
		t.Fatalf("A: CONNACK %#x", ack.ReasonCode)
	}
	refused(otherClaimToken, "another claim, A connected", 1)
	// The same claim before A asked: the locker again, after its first
	// connection died unnoticed. It takes the session over.
	a2 := dialRaw(t, h.addr, 5)
	if ack := a2.connect(id, "claim", claimToken, 30, nil); ack.ReasonCode != 0 {
		t.Fatalf("the same claim before a request: CONNACK %#x, want the session taken over", ack.ReasonCode)
	}
	a.mustRead(packets.Disconnect) // taken over (MQTT 5)

	release := make(chan struct{})
	h.prov.mu.Lock()
	h.prov.release = release
	h.prov.mu.Unlock()
	if sa := a2.subscribe(respTopic, 1); sa.ReasonCodes[0] != 1 {
		t.Fatalf("SUBACK %v", sa.ReasonCodes)
	}
	a2.publish(reqTopic, 1, []byte(provReqRaw))
	a2.mustRead(packets.Puback)
	testtool.Eventually(t, 10*time.Second, "the request being served", func() error {
		if h.prov.callCount() != 1 {
			return errors.New("not yet")
		}
		return nil
	})
	refused(claimToken, "the same claim while the request is served", 2)
	close(release)
	if answer := a2.mustRead(packets.Publish); !strings.Contains(string(answer.Payload), h.prov.answer.Password) {
		t.Fatalf("the locker's answer: %s", answer.Payload)
	}
}

// TestClaimTakeoverClosesTheOldSessionsRequest: once a CONNECT with the
// session's own claim has been let take a live claim session over, the old
// session takes no request before the takeover completes: answered there,
// the answer would go to a session about to end.
func TestClaimTakeoverClosesTheOldSessionsRequest(t *testing.T) {
	const serial = "SN-10"
	id, reqTopic, respTopic := "prov-"+serial, "provision/v1/"+serial+"/request", "provision/v1/"+serial+"/response"
	h := newHarness(t, nil, nil)
	a := dialRaw(t, h.addr, 5)
	if ack := a.connect(id, "claim", claimToken, 30, nil); ack.ReasonCode != 0 {
		t.Fatalf("A: CONNACK %#x", ack.ReasonCode)
	}
	if sa := a.subscribe(respTopic, 1); sa.ReasonCodes[0] != 1 {
		t.Fatalf("SUBACK %v", sa.ReasonCodes)
	}
	// A second connection's check passed (its attach is still to come).
	if h.b.claimSessionHeld(id, claimToken) {
		t.Fatal("the session's own claim, before a request: held")
	}
	a.publish(reqTopic, 1, []byte(provReqRaw))
	a.mustRead(packets.Puback)
	a.pingExpectingNo(packets.Publish, "A, whose request came after the takeover was let through")
	// The request was taken or not on A's goroutine before the PINGRESP;
	// one taken is served on a goroutine of its own: wait for it.
	h.b.provWG.Wait()
	if n := h.prov.callCount(); n != 0 {
		t.Fatalf("%d Provision calls, want 0 (the old session takes no request)", n)
	}
}

// TestExpiredCommandNotRedelivered: a command (PublishExpiring) sent to a
// locker whose session is kept, and not acknowledged before the connection
// died, is dropped from the session once it expired: the locker's next
// connection does not get it again, for MQTT 3.1.1 and 5 alike; one that
// has not expired is sent again. An MQTT 5 locker is sent the interval.
func TestExpiredCommandNotRedelivered(t *testing.T) {
	const topic = "lockers/v1/A/cmd"
	for _, tc := range []struct {
		name    string
		version byte
		persist func(pk *packets.Packet)
	}{
		{"MQTT311", 4, func(pk *packets.Packet) { pk.Connect.Clean = false }},
		{"MQTT5", 5, func(pk *packets.Packet) {
			pk.Connect.Clean = false
			pk.Properties.SessionExpiryInterval, pk.Properties.SessionExpiryIntervalFlag = 3600, true
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, nil, nil)
			ctx := context.Background()
			inflight := func() int {
				cl, ok := h.b.server.Clients.Get("A")
				if !ok {
					return -1
				}
				return cl.State.Inflight.Len()
			}
			send := func(payload string, expires time.Time) *raw {
				c := dialRaw(t, h.addr, tc.version)
				if ack := c.connect("A", "A", "secret-A", 30, tc.persist); ack.ReasonCode != 0 {
					t.Fatalf("CONNACK %#x", ack.ReasonCode)
				}
				c.subscribe(topic, 1)
				if err := h.b.PublishExpiring(ctx, topic, []byte(payload), 1, expires); err != nil {
					t.Fatal(err)
				}
				pk := c.mustRead(packets.Publish) // not acknowledged
				if tc.version == 5 && (pk.Properties.MessageExpiryInterval == 0 || pk.Properties.MessageExpiryInterval > 3600) {
					t.Fatalf("MQTT 5 command with message expiry %d s, want its interval", pk.Properties.MessageExpiryInterval)
				}
				_ = c.conn.Close()
				return c
			}

			// Expires in a second: gone from the kept session once expired.
			send(`{"id":"c-1"}`, time.Now().Add(time.Second))
			testtool.Eventually(t, 10*time.Second, "the expired command dropped from the kept session", func() error {
				if n := inflight(); n != 0 {
					return fmt.Errorf("%d in flight", n)
				}
				return nil
			})
			back := dialRaw(t, h.addr, tc.version)
			if ack := back.connect("A", "A", "secret-A", 30, tc.persist); ack.ReasonCode != 0 || !ack.SessionPresent {
				t.Fatalf("reconnect: CONNACK %#x, session present %v", ack.ReasonCode, ack.SessionPresent)
			}
			back.pingExpectingNo(packets.Publish, "the expired command")
			_ = back.conn.Close()

			// Expires in an hour: sent again on the next connection.
			send(`{"id":"c-2"}`, time.Now().Add(time.Hour))
			again := dialRaw(t, h.addr, tc.version)
			if ack := again.connect("A", "A", "secret-A", 30, tc.persist); ack.ReasonCode != 0 || !ack.SessionPresent {
				t.Fatalf("reconnect: CONNACK %#x, session present %v", ack.ReasonCode, ack.SessionPresent)
			}
			if pk := again.mustRead(packets.Publish); string(pk.Payload) != `{"id":"c-2"}` {
				t.Fatalf("sent again: %s, want c-2", pk.Payload)
			}
		})
	}
}
