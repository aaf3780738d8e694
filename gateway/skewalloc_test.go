package gateway_test

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/lockergate/lockergate/client"
	"github.com/lockergate/lockergate/pickup"
	"github.com/lockergate/lockergate/protocol"
)

// TestAllocationAvoidsSkewedClocks: a locker whose clock is off (an open
// clock_skew alert) would refuse the staging unlock (ahead) or take a code
// after it ends (behind): new pickups go to a locker with a right clock
// while it has room, and only then to the skewed one, saying so.
func TestAllocationAvoidsSkewedClocks(t *testing.T) {
	tg := MustStart(t)
	claim := tg.MustSiteAndClaim(t, "s1", 2)
	birth := func(serial string, ahead time.Duration) string {
		t.Helper()
		r := MustProvision(t, tg, claim, serial)
		c := MustConnect(t, tg.MQTTAddr(), r.DeviceID, r.DeviceID, r.Password)
		MustPublish(t, c, protocol.Topic(r.DeviceID, protocol.ChanPresence), true,
			fmt.Sprintf(`{"online":true,"ts":"%s","fw":"1.0.0","model":"LX-4","boot_id":"b-1"}`, protocol.FormatTime(time.Now().Add(ahead))))
		waitOnline(t, tg, r.DeviceID, true)
		return r.DeviceID
	}
	skewed, right := birth("SN-SKEW-1", 3*time.Hour), birth("SN-SKEW-2", 0)
	Eventually(t, 10*time.Second, "the clock_skew alert", func() error {
		if n := tg.Count(t, `SELECT count(*) FROM alerts WHERE kind = 'clock_skew' AND device_id = $1 AND cleared_at IS NULL`, skewed); n != 1 {
			return fmt.Errorf("%d open", n)
		}
		return nil
	})
	store := MustPickupToken(t, tg, "store", "s1", "front-desk")
	create := func(ref string) pickup.Pickup { return customerPickup(t, store, "s1", ref) }
	// Each LX-4 has two ambient compartments (S and M): the right clock's
	// both go first, though the skewed one's S is smaller than its M.
	for _, ref := range []string{"SK-1", "SK-2"} {
		if p := create(ref); p.Locker != right || p.LockerClockSkewed {
			t.Fatalf("%s went to %s (clock skewed: %v), want %s, whose clock is right", ref, p.Locker, p.LockerClockSkewed, right)
		}
	}
	if p := create("SK-3"); p.Locker != skewed || !p.LockerClockSkewed {
		t.Fatalf("SK-3 went to %s (clock skewed: %v), want %s, the one left, said to be skewed", p.Locker, p.LockerClockSkewed, skewed)
	}
}

// siteWithALocker starts a gateway with site s1 and one locker, serial,
// provisioned, connected and born.
func siteWithALocker(t *testing.T, serial string) (*TestGateway, protocol.ProvisionResponse, paho.Client) {
	t.Helper()
	tg := MustStart(t)
	claim := tg.MustSiteAndClaim(t, "s1", 1)
	r := MustProvision(t, tg, claim, serial)
	c := MustConnect(t, tg.MQTTAddr(), r.DeviceID, r.DeviceID, r.Password)
	publishBirth(t, tg, c, r.DeviceID)
	return tg, r, c
}

// customerPickup creates a customer's size S ambient pickup ref at site
// with c.
func customerPickup(t *testing.T, c *client.Client, site, ref string) pickup.Pickup {
	t.Helper()
	var p pickup.Pickup
	if err := c.Post(context.Background(), "/v1/pickups", map[string]any{"site": site, "order_ref": ref, "size": "S", "zone": "ambient",
		"recipient": map[string]string{"kind": "customer"}}, &p); err != nil {
		t.Fatalf("create %s: %v", ref, err)
	}
	return p
}

// TestAllocationSkipsFaultyDoors: a compartment whose door the locker
// reports failing (health door_faults: an open door_fault alert) gets no
// new order, though it is the smallest that fits; once the locker reports
// it working again (the alert clears), it does.
func TestAllocationSkipsFaultyDoors(t *testing.T) {
	tg, r, c := siteWithALocker(t, "SN-FAULT-1")
	health := func(seq int, faults string) {
		t.Helper()
		MustPublish(t, c, protocol.Topic(r.DeviceID, protocol.ChanHealth), false,
			fmt.Sprintf(`{"ts":"%s","seq":%d,"door_faults":[%s]}`, protocol.FormatTime(time.Now()), seq, faults))
	}
	openFaults := func(want int) {
		t.Helper()
		Eventually(t, 10*time.Second, fmt.Sprintf("%d door_fault alerts open", want), func() error {
			if n := tg.Count(t, `SELECT count(*) FROM alerts WHERE kind = 'door_fault' AND device_id = $1 AND cleared_at IS NULL`, r.DeviceID); n != want {
				return fmt.Errorf("%d open", n)
			}
			return nil
		})
	}
	health(1, "1") // compartment 1 (S, ambient: the smallest that fits)
	openFaults(1)
	store := MustPickupToken(t, tg, "store", "s1", "front-desk")
	if p := customerPickup(t, store, "s1", "FAULT-1"); p.Compartment == 1 {
		t.Fatalf("FAULT-1 went to compartment 1, whose door fails")
	}
	health(2, "")
	openFaults(0)
	if p := customerPickup(t, store, "s1", "FAULT-2"); p.Compartment != 1 {
		t.Fatalf("FAULT-2 went to compartment %d, want 1, its door working again", p.Compartment)
	}
}

// TestAllocationSkipsLockersNotApplyingCredentials: a locker that does not
// apply its credential sets (an open creds_not_applied alert) gets no new
// order: it would not know the order's code, and would still take the code
// of an order that ended in that compartment since the set it holds. Once
// the alert clears, it does.
func TestAllocationSkipsLockersNotApplyingCredentials(t *testing.T) {
	tg, r, _ := siteWithALocker(t, "SN-CREDS-1")
	ctx := context.Background()
	var alert int64
	if err := tg.DB().Pool().QueryRow(ctx, `INSERT INTO alerts (device_id, kind, detail) VALUES ($1, 'creds_not_applied', 'test') RETURNING id`,
		r.DeviceID).Scan(&alert); err != nil {
		t.Fatal(err)
	}
	store := MustPickupToken(t, tg, "store", "s1", "front-desk")
	var pe *client.Error
	err := store.Post(ctx, "/v1/pickups", map[string]any{"site": "s1", "order_ref": "CREDS-1", "size": "S", "zone": "ambient",
		"recipient": map[string]string{"kind": "customer"}}, nil)
	if !errors.As(err, &pe) || pe.Status != 422 {
		t.Fatalf("a pickup at the only locker, which does not apply its credentials: %v, want 422 (no compartment)", err)
	}
	if _, err := tg.DB().Pool().Exec(ctx, `UPDATE alerts SET cleared_at = now() WHERE id = $1`, alert); err != nil {
		t.Fatal(err)
	}
	if p := customerPickup(t, store, "s1", "CREDS-2"); p.Locker != r.DeviceID {
		t.Fatalf("CREDS-2 went to %q, want %s once its alert cleared", p.Locker, r.DeviceID)
	}
}
