package gateway_test

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"

	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/gateway"
	"github.com/lockergate/lockergate/protocol"
)

// closeThenOpenLate has locker id, connected as dev, report compartment 1
// closed (occupied) and then, once that is stored, opened a second before
// the closing by its own clock, as a late delivery would; it returns the
// compartment's door and occupancy once both are stored. The events are
// stamped a minute in the past, as a locker's queued events are.
func closeThenOpenLate(t *testing.T, tg *TestGateway, dev mqtt.Client, id string) (door string, occupied bool) {
	t.Helper()
	topic := protocol.Topic(id, protocol.ChanEvents)
	at := time.Now().UTC().Add(-time.Minute)
	publish := func(eid, body string) {
		t.Helper()
		MustPublish(t, dev, topic, false, body)
		Eventually(t, 10*time.Second, "event "+eid+" stored", func() error {
			if tg.Count(t, `SELECT count(*) FROM events WHERE device_id = $1 AND event_id = $2`, id, eid) != 1 {
				return errors.New("not yet")
			}
			return nil
		})
	}
	publish("e-closed", fmt.Sprintf(`{"id":"e-closed","ts":"%s","type":"door_closed","compartment":1,"occupied":true}`,
		protocol.FormatTime(at.Add(2*time.Second))))
	publish("e-opened", fmt.Sprintf(`{"id":"e-opened","ts":"%s","type":"door_opened","compartment":1,"by":"manual"}`,
		protocol.FormatTime(at.Add(time.Second))))
	if err := tg.DB().Pool().QueryRow(context.Background(), `SELECT door, occupied FROM compartments WHERE device_id = $1 AND n = 1`,
		id).Scan(&door, &occupied); err != nil {
		t.Fatal(err)
	}
	return door, occupied
}

// TestDoorStateInArrivalOrder: with the embedded broker a locker's events
// arrive over its one connection in the order it sent them, and are applied
// in that order, whatever their ts say (TestExternalDoorStateByClock is the
// other mode).
func TestDoorStateInArrivalOrder(t *testing.T) {
	tg := MustStart(t)
	id := MustProvision(t, tg, tg.MustSiteAndClaim(t, "s1", 1), "SN-DOOR-ARRIVAL")
	dev := MustConnect(t, tg.MQTTAddr(), id.DeviceID, id.DeviceID, id.Password)
	if door, occupied := closeThenOpenLate(t, tg, dev, id.DeviceID); door != "open" || !occupied {
		t.Fatalf("compartment 1: door %q occupied %v, want open and occupied (the last event applied)", door, occupied)
	}
}

// TestDoorLeftOpenRaisedByTheGateway: a door the locker reported open and
// then said nothing more of (firmware that sends no door_ajar, a locker
// gone silent) raises door_ajar from the gateway once door_ajar_s and its
// grace have passed; the closing clears it; one cleared by hand is not
// raised again while the door stays open.
func TestDoorLeftOpenRaisedByTheGateway(t *testing.T) {
	ctx := context.Background()
	tg := MustStart(t, func(o *gateway.Options) {
		o.Config.DoorAjarS = 1 // the gateway's own raise at 2 s
		o.CensusInterval = 100 * time.Millisecond
	})
	r, dev := rawLocker(t, tg, "SN-DOOR-LEFT")
	publishBirth(t, tg, dev, r.DeviceID)
	seq := 0
	door := func(kind string, n int) {
		t.Helper()
		seq++
		extra := `,"by":"manual"`
		if kind == "door_closed" {
			extra = `,"occupied":false`
		}
		MustPublish(t, dev, protocol.Topic(r.DeviceID, protocol.ChanEvents), false,
			fmt.Sprintf(`{"id":"e-%d","ts":"%s","type":"%s","compartment":%d%s}`, seq, protocol.FormatTime(time.Now()), kind, n, extra))
	}
	openAjar := func(n int) []fleet.Alert {
		t.Helper()
		var p alertPage
		if err := tg.Admin.Get(ctx, "/v1/alerts", url.Values{"locker": {r.DeviceID}, "kind": {"door_ajar"}, "open": {"true"}}, &p); err != nil {
			t.Fatal(err)
		}
		var out []fleet.Alert
		for _, a := range p.Items {
			if a.Compartment == n {
				out = append(out, a)
			}
		}
		return out
	}
	waitAjar := func(n int) fleet.Alert {
		t.Helper()
		var a fleet.Alert
		Eventually(t, 20*time.Second, fmt.Sprintf("door_ajar for compartment %d", n), func() error {
			got := openAjar(n)
			if len(got) != 1 {
				return fmt.Errorf("%d open", len(got))
			}
			a = got[0]
			return nil
		})
		return a
	}

	door("door_opened", 1)
	a := waitAjar(1)
	if !strings.Contains(a.Detail, "by the gateway's count") {
		t.Errorf("detail %q does not say the gateway raised it", a.Detail)
	}
	door("door_closed", 1)
	Eventually(t, 10*time.Second, "door_ajar cleared by the closing", func() error {
		if got := openAjar(1); len(got) != 0 {
			return fmt.Errorf("%d open", len(got))
		}
		return nil
	})

	door("door_opened", 1)
	a = waitAjar(1)
	if err := tg.Admin.Post(ctx, fmt.Sprintf("/v1/alerts/%d/clear", a.ID), nil, nil); err != nil {
		t.Fatal(err)
	}
	// Compartment 2's alert comes from a census that would have raised
	// compartment 1's again.
	door("door_opened", 2)
	waitAjar(2)
	if got := openAjar(1); len(got) != 0 {
		t.Fatalf("door_ajar raised again after it was cleared by hand, the door still open: %+v", got)
	}
	if n := tg.Count(t, `SELECT count(*) FROM alerts WHERE device_id = $1 AND kind = 'door_ajar'`, r.DeviceID); n != 3 {
		t.Fatalf("%d door_ajar alerts in all, want 3 (one per opening and compartment)", n)
	}
}
