package gateway_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/lockergate/lockergate/fleet"
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

// TestClockSkewAlert: a birth whose ts is further from the gateway's clock
// than fleet.DefaultMaxClockSkew opens one clock_skew alert (the locker
// judges code and command expiry by that clock); the locker's offset shows
// in the API; a birth within the bound clears the alert, and one without a
// ts tells nothing.
func TestClockSkewAlert(t *testing.T) {
	ctx := context.Background()
	tg := MustStart(t)
	claim := tg.MustSiteAndClaim(t, "s1", 1)
	id := MustProvision(t, tg, claim, "SN-CLK-1")
	dev := MustConnect(t, tg.MQTTAddr(), id.DeviceID, id.DeviceID, id.Password)
	birth := func(payload string) {
		t.Helper()
		if tk := dev.Publish(protocol.Topic(id.DeviceID, protocol.ChanPresence), 1, true, payload); !tk.WaitTimeout(5*time.Second) || tk.Error() != nil {
			t.Fatalf("publish birth: %v", tk.Error())
		}
	}
	offset := func(want func(*int64) error) {
		t.Helper()
		Eventually(t, 10*time.Second, "the locker's clock offset", func() error {
			var l fleet.Locker
			if err := tg.Admin.Get(ctx, "/v1/lockers/"+id.DeviceID, nil, &l); err != nil {
				return err
			}
			return want(l.ClockOffsetMS)
		})
	}
	near := func(want time.Duration) func(*int64) error {
		return func(got *int64) error {
			if got == nil || (time.Duration(*got)*time.Millisecond-want).Abs() > 5*time.Second {
				return fmt.Errorf("clock_offset_ms %v, want about %d", got, want.Milliseconds())
			}
			return nil
		}
	}
	openAlerts := func() []string {
		t.Helper()
		rows, err := tg.DB().Pool().Query(ctx, `SELECT detail FROM alerts WHERE device_id = $1 AND kind = 'clock_skew' AND cleared_at IS NULL`, id.DeviceID)
		if err != nil {
			t.Fatal(err)
		}
		details, err := pgx.CollectRows(rows, pgx.RowTo[string])
		if err != nil {
			t.Fatal(err)
		}
		return details
	}
	// The alert is raised right after the offset is stored.
	waitOpen := func(saying string) {
		t.Helper()
		Eventually(t, 10*time.Second, "one open clock_skew alert saying "+saying, func() error {
			if d := openAlerts(); len(d) != 1 || !strings.Contains(d[0], saying) {
				return fmt.Errorf("open: %q", d)
			}
			return nil
		})
	}

	behind := -10 * time.Minute
	birth(fmt.Sprintf(`{"online":true,"ts":"%s","fw":"1.4.2"}`, protocol.FormatTime(time.Now().Add(behind))))
	offset(near(behind))
	waitOpen(" behind the gateway")
	// Still off at the next birth: the same alert stays open, counted once.
	birth(fmt.Sprintf(`{"online":true,"ts":"%s","fw":"1.4.2"}`, protocol.FormatTime(time.Now().Add(behind+time.Minute))))
	offset(near(behind + time.Minute))
	if d := openAlerts(); len(d) != 1 {
		t.Fatalf("%d open clock_skew alerts after a second skewed birth, want 1", len(d))
	}
	if v, err := tg.Metric(`lockergate_alerts_raised_total{kind="clock_skew"}`); err != nil || v != 1 {
		t.Fatalf("clock_skew alerts raised: %v (%v), want 1", v, err)
	}
	// A birth without ts: offset unknown, the alert left as it is.
	birth(`{"online":true,"fw":"1.4.2"}`)
	offset(func(got *int64) error {
		if got != nil {
			return fmt.Errorf("clock_offset_ms %d after a birth without ts, want none", *got)
		}
		return nil
	})
	if d := openAlerts(); len(d) != 1 {
		t.Fatalf("%d open clock_skew alerts after a birth without ts, want 1", len(d))
	}
	// Set right: cleared.
	birth(fmt.Sprintf(`{"online":true,"ts":"%s","fw":"1.4.2"}`, protocol.FormatTime(time.Now())))
	offset(near(0))
	if d := openAlerts(); len(d) != 0 {
		t.Fatalf("open clock_skew alerts %q after a birth on time, want none", d)
	}
	// Ahead is as wrong as behind.
	birth(fmt.Sprintf(`{"online":true,"ts":"%s","fw":"1.4.2"}`, protocol.FormatTime(time.Now().Add(2*time.Minute))))
	offset(near(2 * time.Minute))
	waitOpen(" ahead of the gateway")
}
