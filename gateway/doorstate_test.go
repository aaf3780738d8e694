package gateway_test

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"

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
