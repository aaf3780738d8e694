package gateway_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/lockergate/lockergate/protocol"
)

// TestAlerts: events and health raise alerts once while the condition lasts,
// and clear them when it ends.
func TestAlerts(t *testing.T) {
	ctx := context.Background()
	tg := MustStart(t)
	claim := tg.MustSiteAndClaim(t, "s1", 1)
	id := MustProvision(t, tg, claim, "SN-AL-1")
	dev := MustConnect(t, tg.MQTTAddr(), id.DeviceID, id.DeviceID, id.Password)
	n := 0
	pub := func(ch protocol.Channel, payload string) {
		t.Helper()
		n++
		payload = fmt.Sprintf(payload, n, protocol.FormatTime(time.Now()))
		if tk := dev.Publish(protocol.Topic(id.DeviceID, ch), 1, false, payload); !tk.WaitTimeout(5*time.Second) || tk.Error() != nil {
			t.Fatalf("publish: %v", tk.Error())
		}
	}
	open := func(kind string) func() (int, error) {
		return func() (int, error) {
			var c int
			err := tg.DB().Pool().QueryRow(ctx, `SELECT count(*) FROM alerts WHERE device_id = $1 AND kind = $2 AND cleared_at IS NULL`, id.DeviceID, kind).Scan(&c)
			return c, err
		}
	}
	wait := func(what string, f func() (int, error), want int) {
		t.Helper()
		Eventually(t, 10*time.Second, what, func() error {
			got, err := f()
			if err == nil && got != want {
				err = fmt.Errorf("got %d, want %d", got, want)
			}
			return err
		})
	}
	// Door ajar twice on one compartment, once on another: two open alerts.
	pub(protocol.ChanEvents, `{"id":"e-%d","ts":"%s","type":"door_ajar","compartment":2,"open_s":130}`)
	pub(protocol.ChanEvents, `{"id":"e-%d","ts":"%s","type":"door_ajar","compartment":2,"open_s":190}`)
	pub(protocol.ChanEvents, `{"id":"e-%d","ts":"%s","type":"door_ajar","compartment":3,"open_s":130}`)
	wait("door_ajar open", open("door_ajar"), 2)
	pub(protocol.ChanEvents, `{"id":"e-%d","ts":"%s","type":"door_closed","compartment":2,"occupied":false}`)
	wait("door_ajar 2 cleared", open("door_ajar"), 1)

	pub(protocol.ChanEvents, `{"id":"e-%d","ts":"%s","type":"power","source":"battery"}`)
	wait("on_battery", open("on_battery"), 1)
	pub(protocol.ChanEvents, `{"id":"e-%d","ts":"%s","type":"power","source":"mains"}`)
	wait("on_battery cleared", open("on_battery"), 0)

	pub(protocol.ChanHealth, `{"seq":%d,"ts":"%s","uptime_s":5,"door_faults":[1,4]}`)
	pub(protocol.ChanHealth, `{"seq":%d,"ts":"%s","uptime_s":6,"door_faults":[1,4]}`)
	wait("door faults", open("door_fault"), 2)
	pub(protocol.ChanHealth, `{"seq":%d,"ts":"%s","uptime_s":7,"door_faults":[4]}`)
	wait("door fault 1 cleared", open("door_fault"), 1)

	if v, err := tg.Metric(`lockergate_alerts_raised_total{kind="door_fault"}`); err != nil || v != 2 {
		t.Fatalf("door_fault alerts raised: %v (%v), want 2", v, err)
	}
	if v, err := tg.Metric(`lockergate_alerts_raised_total{kind="door_ajar"}`); err != nil || v != 2 {
		t.Fatalf("door_ajar alerts raised: %v (%v), want 2", v, err)
	}
}
