package gateway_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/lockergate/lockergate/client"
	"github.com/lockergate/lockergate/devicesim"
	"github.com/lockergate/lockergate/pickup"
)

// TestCancelRaisesAlert: a pickup cancelled after its compartment was
// opened for it leaves staff an order to take out, whoever cancelled it: a
// ready pickup's (its order inside) and a staging one's (maybe put in)
// raise pickup_cancelled, naming who cancelled, listed with the alerts and
// counted; its order's compartment goes to no other order while occupied.
func TestCancelRaisesAlert(t *testing.T) {
	ctx := context.Background()
	// Staff close doors by hand: a pickup can be held in staging.
	e := newPickupEnv(t, 1, 0, func(o *devicesim.Options) { o.DoorCloseDelay = -1 })
	l := e.sim.Lockers()[0]
	ready := e.create(t, "CXL-1", "S", time.Hour)
	e.stage(t, l, ready)
	ready = e.waitState(t, ready.ID, pickup.Ready)
	staging := e.create(t, "CXL-2", "S", time.Hour)

	cancel := func(c *client.Client, p pickup.Pickup) {
		t.Helper()
		if err := c.Post(ctx, "/v1/pickups/"+p.ID+"/cancel", nil, nil); err != nil {
			t.Fatalf("cancel %s: %v", p.OrderRef, err)
		}
	}
	cancel(e.platform, ready)
	cancel(e.store, staging)
	for _, c := range []struct {
		p      pickup.Pickup
		detail string
	}{
		{ready, "cancelled by platform:speedy: retrieve the order"},
		{staging, "cancelled by store:front-desk while its compartment was open for loading"},
	} {
		var detail string
		if err := e.tg.DB().Pool().QueryRow(ctx, `SELECT detail FROM alerts WHERE kind = 'pickup_cancelled' AND device_id = $1
			AND compartment = $2 AND cleared_at IS NULL`, c.p.Locker, c.p.Compartment).Scan(&detail); err != nil {
			t.Fatalf("%s: no open pickup_cancelled alert: %v", c.p.OrderRef, err)
		}
		if !strings.Contains(detail, c.p.ID) || !strings.Contains(detail, c.detail) {
			t.Errorf("%s: alert detail %q, want the pickup and %q", c.p.OrderRef, detail, c.detail)
		}
	}
	var page struct{ Items []struct{ Kind string } }
	if err := e.store.Get(ctx, "/v1/alerts", map[string][]string{"kind": {pickup.AlertCancelled}, "open": {"true"}}, &page); err != nil || len(page.Items) != 2 {
		t.Fatalf("GET /v1/alerts?kind=pickup_cancelled: %+v %v, want the two", page, err)
	}
	if n, err := e.tg.Metric(`lockergate_pickup_alerts_total{kind="pickup_cancelled"}`); err != nil || n != 2 {
		t.Fatalf("pickup_cancelled alerts counted: %v (%v), want 2", n, err)
	}
	// The ready order's compartment holds it: no new order goes there.
	next := e.create(t, "CXL-3", "S", time.Hour)
	if next.Compartment == ready.Compartment {
		t.Fatalf("a new order was given compartment %d, which holds the cancelled order", ready.Compartment)
	}
}
