package gateway_test

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/protocol"
)

// MustConnect connects a raw MQTT client or fails the test.
func MustConnect(tb testing.TB, addr, clientID, user, pass string) paho.Client {
	tb.Helper()
	c, err := Connect(addr, clientID, user, pass)
	if err != nil {
		tb.Fatalf("connect %s: %v", clientID, err)
	}
	tb.Cleanup(func() { c.Disconnect(50) })
	return c
}

// Connect connects a raw MQTT 3.1.1 client.
func Connect(addr, clientID, user, pass string) (paho.Client, error) {
	o := paho.NewClientOptions().AddBroker("tcp://" + addr).SetClientID(clientID).SetUsername(user).SetPassword(pass).
		SetAutoReconnect(false).SetConnectRetry(false).SetConnectTimeout(5 * time.Second).SetOrderMatters(false)
	c := paho.NewClient(o)
	t := c.Connect()
	if !t.WaitTimeout(10 * time.Second) {
		return nil, fmt.Errorf("connect timed out")
	}
	return c, t.Error()
}

// MustPublish publishes payload (a string or []byte) from c at QoS 1 and
// waits for the broker's acknowledgement.
func MustPublish(tb testing.TB, c paho.Client, topic string, retained bool, payload any) {
	tb.Helper()
	if tk := c.Publish(topic, 1, retained, payload); !tk.WaitTimeout(5*time.Second) || tk.Error() != nil {
		tb.Fatalf("publish %s: %v", topic, tk.Error())
	}
}

// MustLockerEvents provisions a locker by hand with claim, connects it as a
// raw MQTT client and publishes events, each a format whose one %s is the
// time; it returns the locker's id.
func MustLockerEvents(tb testing.TB, tg *TestGateway, claim, serial string, events ...string) string {
	tb.Helper()
	id := MustProvision(tb, tg, claim, serial)
	dev := MustConnect(tb, tg.MQTTAddr(), id.DeviceID, id.DeviceID, id.Password)
	for _, ev := range events {
		MustPublish(tb, dev, protocol.Topic(id.DeviceID, protocol.ChanEvents), false, fmt.Sprintf(ev, protocol.FormatTime(time.Now())))
	}
	return id.DeviceID
}

// MustProvision provisions a locker by hand, as a vendor's firmware would,
// and returns its identity.
func MustProvision(tb testing.TB, tg *TestGateway, claim, serial string) protocol.ProvisionResponse {
	tb.Helper()
	return provisionWithin(tb, tg, claim, serial, 15*time.Second)
}

// provisionWithin is MustProvision with the wait for the answer bounded
// by d.
func provisionWithin(tb testing.TB, tg *TestGateway, claim, serial string, d time.Duration) protocol.ProvisionResponse {
	tb.Helper()
	c := MustConnect(tb, tg.MQTTAddr(), "prov-"+serial, "claim", claim)
	got := make(chan []byte, 1)
	if t := c.Subscribe(protocol.ProvisionResponseTopic(serial), 1, func(_ paho.Client, m paho.Message) { got <- m.Payload() }); !t.WaitTimeout(5*time.Second) || t.Error() != nil {
		tb.Fatalf("subscribe response: %v", t.Error())
	}
	req := protocol.ProvisionRequest{Serial: serial, Model: "LX-4", FW: "1.0.0", Compartments: []protocol.CompartmentSpec{
		{N: 1, Size: "S", Zone: "ambient"}, {N: 2, Size: "M", Zone: "ambient"}, {N: 3, Size: "L", Zone: "chilled"}, {N: 4, Size: "XL", Zone: "heated"}}}
	MustPublish(tb, c, protocol.ProvisionRequestTopic(serial), false, protocol.Encode(req))
	select {
	case b := <-got:
		var r protocol.ProvisionResponse
		if err := json.Unmarshal(b, &r); err != nil || r.Status != "ok" {
			tb.Fatalf("provisioning answer %s (%v)", b, err)
		}
		return r
	case <-time.After(d):
		tb.Fatalf("no provisioning answer within %v", d)
	}
	panic("unreachable")
}

// TestMQTTNearMissPayloads: what common JSON libraries write for the
// protocol's types (a UTC time without an offset or with a space, a whole
// number as 7.0) is stored from a real device over MQTT, not dropped; the
// stored bodies hold integers and RFC 3339 UTC times, and the door event
// moves the compartment.
func TestMQTTNearMissPayloads(t *testing.T) {
	tg := MustStart(t)
	claim := tg.MustSiteAndClaim(t, "s1", 1)
	id := MustProvision(t, tg, claim, "SN-NEAR-1")
	dev := MustConnect(t, tg.MQTTAddr(), id.DeviceID, id.DeviceID, id.Password)
	at := time.Now().UTC().Truncate(time.Millisecond)
	naive := at.Format("2006-01-02T15:04:05.000000")        // Python: datetime.utcnow().isoformat()
	spaced := at.Format("2006-01-02 15:04:05.000000+00:00") // str() of an aware datetime
	MustPublish(t, dev, protocol.Topic(id.DeviceID, protocol.ChanHealth), false,
		`{"ts":"`+naive+`","seq":7.0,"uptime_s":8.64e4,"battery_pct":100.0}`)
	MustPublish(t, dev, protocol.Topic(id.DeviceID, protocol.ChanEvents), false,
		`{"id":"e-near","ts":"`+spaced+`","type":"door_opened","compartment":2.0,"by":"manual"}`)
	Eventually(t, 10*time.Second, "the health and the event stored", func() error {
		if n := tg.Count(t, `SELECT count(*) FROM health WHERE device_id = $1 AND seq = 7 AND ts = $2`, id.DeviceID, at); n != 1 {
			return fmt.Errorf("%d health rows", n)
		}
		if n := tg.Count(t, `SELECT count(*) FROM events WHERE device_id = $1 AND event_id = 'e-near' AND compartment = 2 AND ts = $2`,
			id.DeviceID, at); n != 1 {
			return fmt.Errorf("%d events", n)
		}
		if n := tg.Count(t, `SELECT count(*) FROM compartments WHERE device_id = $1 AND n = 2 AND door = 'open'`, id.DeviceID); n != 1 {
			return fmt.Errorf("compartment 2 not open")
		}
		return nil
	})
	if n := tg.Count(t, `SELECT count(*) FROM events WHERE device_id = $1 AND body->>'compartment' = '2'`, id.DeviceID); n != 1 {
		t.Fatal("the event's body is not stored with its compartment as an integer")
	}
	if n := tg.Count(t, `SELECT count(*) FROM health WHERE device_id = $1 AND body::text LIKE '%"seq":7,%'`, id.DeviceID); n != 1 {
		t.Fatal("the health body is not stored with its seq as an integer")
	}
	// And their ts as RFC 3339 UTC, what the API and webhooks then show.
	want := `"ts":"` + protocol.FormatTime(at) + `"`
	if n := tg.Count(t, `SELECT count(*) FROM health WHERE device_id = $1 AND position($2 in body::text) > 0`, id.DeviceID, want); n != 1 {
		t.Fatalf("the health body's ts is not stored as %s", want)
	}
	if n := tg.Count(t, `SELECT count(*) FROM events WHERE device_id = $1 AND body->>'ts' = $2`, id.DeviceID, protocol.FormatTime(at)); n != 1 {
		t.Fatalf("the event body's ts is not stored as %s", want)
	}
}

// TestMQTTNamesAreCaseSensitive: a member whose name differs from a field's
// only in letter case is an unknown field, ignored (protocol-v1: unknown
// fields are ignored), not read for the field: a failed result with
// "Status":"ok" beside it stays failed, an ack's "Version" does not count,
// and events that carry such members are stored and applied by their
// real fields, the members kept in the stored body.
func TestMQTTNamesAreCaseSensitive(t *testing.T) {
	ctx := context.Background()
	tg := MustStart(t)
	r, c, _, cmd := rawLockerUnlocked(t, tg, "SN-CASE-1", 60)
	now := protocol.FormatTime(time.Now())
	// The ack first: a locker's control messages are handled in order, so
	// once the result is, the ack was too.
	MustPublish(t, c, protocol.Topic(r.DeviceID, protocol.ChanCredsAck), false, `{"version":0,"Version":7}`)
	MustPublish(t, c, protocol.Topic(r.DeviceID, protocol.ChanCmdResult), false,
		`{"id":"`+cmd.ID+`","status":"failed","error":"door_jammed","ts":"`+now+`","Status":"ok"}`)
	waitCommandStatus(t, tg, r.DeviceID, cmd.ID, fleet.CmdFailed, "the result read by its status")
	events := protocol.Topic(r.DeviceID, protocol.ChanEvents)
	MustPublish(t, c, events, false, `{"id":"e-case-1","ts":"`+now+`","type":"door_closed","compartment":1,"occupied":true,"Compartment":2}`)
	MustPublish(t, c, events, false, `{"id":"e-case-2","ts":"`+now+`","type":"tamper","detail":"lid","Type":"vendor-subtype","ID":17,"TS":"07/12/2026 09:00"}`)
	Eventually(t, 10*time.Second, "both events stored", func() error {
		if n := tg.Count(t, `SELECT count(*) FROM events WHERE device_id = $1 AND event_id IN ('e-case-1', 'e-case-2')`, r.DeviceID); n != 2 {
			return fmt.Errorf("%d stored", n)
		}
		return nil
	})
	if n := tg.Count(t, `SELECT count(*) FROM events WHERE event_id = 'e-case-1' AND compartment = 1 AND body->>'Compartment' = '2'`); n != 1 {
		t.Fatal("the closing not stored for compartment 1 with its other member as sent")
	}
	Eventually(t, 10*time.Second, "compartment 1 closed and occupied, 2 untouched", func() error {
		if n := tg.Count(t, `SELECT count(*) FROM compartments WHERE device_id = $1 AND n = 1 AND door = 'closed' AND occupied`, r.DeviceID); n != 1 {
			return fmt.Errorf("compartment 1 not closed and occupied")
		}
		return nil
	})
	if n := tg.Count(t, `SELECT count(*) FROM events WHERE event_id = 'e-case-2' AND type = 'tamper'`); n != 1 {
		t.Fatal("the tamper event not stored as a tamper")
	}
	var l fleet.Locker
	if err := tg.Admin.Get(ctx, "/v1/lockers/"+r.DeviceID, nil, &l); err != nil || l.CredsAcked != 0 {
		t.Fatalf("creds_acked %d (%v), want 0: Version is not version", l.CredsAcked, err)
	}
	for _, ch := range []string{"events", "cmd/result", "creds/ack"} {
		if n, err := tg.Metric(`lockergate_ingest_messages_dropped_total{channel="` + ch + `",reason="invalid"}`); err == nil && n != 0 {
			t.Fatalf("%v %s messages dropped as invalid, want none", n, ch)
		}
	}
}

// TestMQTTBadInput publishes every kind of bad payload from a real device and
// checks each is dropped and counted while valid messages still land.
func TestMQTTBadInput(t *testing.T) {
	ctx := context.Background()
	tg := MustStart(t)
	claim := tg.MustSiteAndClaim(t, "s1", 2)
	id := MustProvision(t, tg, claim, "SN-BAD-1")
	dev := MustConnect(t, tg.MQTTAddr(), id.DeviceID, id.DeviceID, id.Password)
	pub := func(ch protocol.Channel, payload string) {
		t.Helper()
		MustPublish(t, dev, protocol.Topic(id.DeviceID, ch), false, payload)
	}
	now := protocol.FormatTime(time.Now())
	bad := []struct {
		ch      protocol.Channel
		payload string
		reason  string
	}{
		{protocol.ChanHealth, `{"ts":`, "malformed"},
		{protocol.ChanHealth, `[1,2]`, "malformed"},
		{protocol.ChanHealth, `{"ts":"` + now + `","seq":"seven"}`, "invalid"},
		{protocol.ChanHealth, `{"seq":1}`, "invalid"},
		{protocol.ChanEvents, `{"id":"e-1","ts":"` + now + `","type":"door_closed","compartment":1}`, "invalid"}, // no occupied
		{protocol.ChanEvents, `{"id":"` + strings.Repeat("e", 129) + `","ts":"` + now + `","type":"tamper"}`, "invalid"},
		{protocol.ChanEvents, `not json`, "malformed"},
		{protocol.ChanCmdResult, `{"id":"c-1","status":"maybe"}`, "invalid"},
		{protocol.ChanCredsAck, `{"version":"x"}`, "invalid"},
		{protocol.ChanCredsAck, `{}`, "invalid"}, // read as 0 it marked the locker behind
		// Valid JSON PostgreSQL cannot store: each one held up every
		// locker's events (or a control shard), retried for ever.
		{protocol.ChanEvents, `{"id":"e-nul","ts":"` + now + `","type":"tamper","vendor":"a\u0000b"}`, "invalid"},
		{protocol.ChanEvents, `{"id":"e-sur","ts":"` + now + `","type":"tamper","detail":"\ud800"}`, "invalid"},
		{protocol.ChanEvents, `{"id":"e-big","ts":"` + now + `","type":"door_opened","compartment":3000000000}`, "invalid"},
		{protocol.ChanPresence, `{"online":true,"fw":"1.0\u0000"}`, "invalid"},
		{protocol.ChanCmdResult, `{"id":"c-1","status":"failed","error":"jam\u0000"}`, "invalid"},
	}
	for _, b := range bad {
		pub(b.ch, b.payload)
	}
	// A valid message after the bad ones still lands, its unknown fields
	// ignored: a tamper's compartment or occupied (fields of other event
	// types) too, whatever they hold.
	pub(protocol.ChanEvents, `{"id":"e-good","ts":"`+now+`","type":"tamper","detail":"lid","extra_field":{"ignored":true},"compartment":"left","occupied":"maybe"}`)
	Eventually(t, 10*time.Second, "valid event stored", func() error {
		n := tg.Count(t, `SELECT count(*) FROM events WHERE device_id = $1 AND event_id = 'e-good'`, id.DeviceID)
		if n != 1 {
			return fmt.Errorf("%d rows", n)
		}
		return nil
	})
	want := map[string]float64{}
	for _, b := range bad {
		want[fmt.Sprintf(`lockergate_ingest_messages_dropped_total{channel="%s",reason="%s"}`, b.ch, b.reason)]++
	}
	for series, n := range want {
		tg.WaitMetric(t, 5*time.Second, series, n)
	}
	n := tg.Count(t, `SELECT count(*) FROM events WHERE device_id = $1`, id.DeviceID)
	if n != 1 {
		t.Fatalf("%d events stored, want only the valid one", n)
	}
	// Alerts are raised after the events' batch commits.
	Eventually(t, 5*time.Second, "the tamper alert", func() error {
		if n := tg.Count(t, `SELECT count(*) FROM alerts WHERE device_id = $1 AND kind = 'tamper'`, id.DeviceID); n == 0 {
			return fmt.Errorf("no tamper alert")
		}
		return nil
	})
	alerts := tg.Count(t, `SELECT count(*) FROM alerts WHERE device_id = $1 AND kind = 'tamper'`, id.DeviceID)
	if alerts != 1 {
		t.Fatalf("tamper alerts: %d, want 1", alerts)
	}

	t.Run("DuplicateEventsOnce", func(t *testing.T) {
		ev := `{"id":"e-dup","ts":"` + now + `","type":"door_opened","compartment":2,"by":"manual"}`
		for i := 0; i < 3; i++ {
			pub(protocol.ChanEvents, ev)
		}
		pub(protocol.ChanEvents, `{"id":"e-dup-end","ts":"`+now+`","type":"reboot"}`)
		Eventually(t, 10*time.Second, "events after duplicates", func() error {
			n := tg.Count(t, `SELECT count(*) FROM events WHERE device_id = $1 AND event_id = 'e-dup-end'`, id.DeviceID)
			if n != 1 {
				return fmt.Errorf("%d rows", n)
			}
			return nil
		})
		n := tg.Count(t, `SELECT count(*) FROM events WHERE device_id = $1 AND event_id = 'e-dup'`, id.DeviceID)
		if n != 1 {
			t.Fatalf("duplicate event stored %d times", n)
		}
		var l fleet.Locker
		tg.Admin.Get(ctx, "/v1/lockers/"+id.DeviceID, nil, &l)
		if l.Compartments[1].Door != "open" {
			t.Fatalf("compartment 2 door %q, want open", l.Compartments[1].Door)
		}
	})
	t.Run("Oversized", func(t *testing.T) {
		big := `{"id":"e-big","ts":"` + now + `","type":"tamper","detail":"` + strings.Repeat("x", 17*1024) + `"}`
		dev.Publish(protocol.Topic(id.DeviceID, protocol.ChanEvents), 1, false, big).WaitTimeout(2 * time.Second)
		// A valid event published afterwards on a fresh connection lands; the big one never does.
		dev2, err := Connect(tg.MQTTAddr(), id.DeviceID, id.DeviceID, id.Password)
		if err != nil {
			t.Fatal(err)
		}
		defer dev2.Disconnect(50)
		dev2.Publish(protocol.Topic(id.DeviceID, protocol.ChanEvents), 1, false, `{"id":"e-after","ts":"`+now+`","type":"reboot"}`).WaitTimeout(5 * time.Second)
		Eventually(t, 10*time.Second, "event after oversized", func() error {
			n := tg.Count(t, `SELECT count(*) FROM events WHERE device_id = $1 AND event_id = 'e-after'`, id.DeviceID)
			if n != 1 {
				return fmt.Errorf("%d rows", n)
			}
			return nil
		})
		big_ := tg.Count(t, `SELECT count(*) FROM events WHERE event_id = 'e-big'`)
		if big_ != 0 {
			t.Fatal("oversized event was stored")
		}
	})

}
