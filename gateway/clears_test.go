package gateway_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/lockergate/lockergate/devicesim"
	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/pickup"
	"github.com/lockergate/lockergate/protocol"
)

// TestCompartmentWaitsForTheSetWithoutItsLastCode: a locker validates
// codes by the last credential set it applied. While it has not applied the
// set that revoked a cancelled order's code, that code still opens the
// compartment, so the compartment gets no new order (the next goes to
// another); once the locker acknowledges the set, it does.
func TestCompartmentWaitsForTheSetWithoutItsLastCode(t *testing.T) {
	ctx := context.Background()
	// Staff close doors by hand.
	e := newPickupEnv(t, 1, 0, func(o *devicesim.Options) { o.DoorCloseDelay = -1 })
	l := e.sim.Lockers()[0]
	first := e.create(t, "CLR-1", "S", time.Hour)
	e.stage(t, l, first)
	first = e.waitState(t, first.ID, pickup.Ready)

	l.HoldCreds() // the set revoking CLR-1's code is late
	if err := e.platform.Post(ctx, "/v1/pickups/"+first.ID+"/cancel", nil, nil); err != nil {
		t.Fatalf("cancel: %v", err)
	}
	// Staff open the compartment, take the order out and close it.
	var cmd fleet.Command
	if err := e.tg.Admin.Post(ctx, "/v1/lockers/"+first.Locker+"/commands",
		map[string]any{"type": "unlock", "compartment": first.Compartment, "wait_s": 10}, &cmd); err != nil || cmd.Status != fleet.CmdOK {
		t.Fatalf("staff unlock: %+v %v", cmd, err)
	}
	l.SetOccupied(first.Compartment, false)
	l.CloseDoor(first.Compartment)
	Eventually(t, 10*time.Second, "the compartment emptied and closed", func() error {
		if n := e.tg.Count(t, `SELECT count(*) FROM compartments WHERE device_id = $1 AND n = $2 AND NOT occupied AND door = 'closed'`,
			first.Locker, first.Compartment); n != 1 {
			return fmt.Errorf("not yet")
		}
		return nil
	})
	if !l.HasCredential(first.Credential.ID) {
		t.Fatalf("the locker no longer holds CLR-1's code: the test's premise (a late set) is gone")
	}
	// The locker (a raw client in its place) acknowledges a set never
	// published: not recorded, so it does not release the compartment.
	id, _ := l.Identity()
	l.Disconnect()
	acked := e.tg.Count(t, `SELECT creds_acked FROM devices WHERE id = $1`, first.Locker)
	current := e.tg.Count(t, `SELECT creds_version FROM devices WHERE id = $1`, first.Locker)
	dev := MustConnect(t, e.tg.MQTTAddr(), id.DeviceID, id.DeviceID, id.Password)
	MustPublish(t, dev, protocol.Topic(id.DeviceID, protocol.ChanCredsAck), false, fmt.Sprintf(`{"version":%d}`, current+100))
	e.tg.WaitMetric(t, 10*time.Second, `lockergate_ingest_messages_dropped_total{channel="creds/ack",reason="invalid"}`, 1)
	if got := e.tg.Count(t, `SELECT creds_acked FROM devices WHERE id = $1`, first.Locker); got != acked {
		t.Fatalf("creds_acked %d after an ack of set %d (never published), want %d: recorded", got, current+100, acked)
	}
	dev.Disconnect(250)
	rctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	if err := l.Reconnect(rctx); err != nil {
		t.Fatal(err)
	}
	next := e.create(t, "CLR-2", "S", time.Hour)
	if next.Locker == first.Locker && next.Compartment == first.Compartment {
		t.Fatalf("CLR-2 got compartment %d, which CLR-1's code still opens at the locker", next.Compartment)
	}

	if w := e.awaits(t, first); w == 0 {
		t.Fatalf("compartment %d shows no set awaited", first.Compartment)
	}

	l.ReleaseCreds()
	e.waitCreds(t, first.Locker)
	if w := e.awaits(t, first); w != 0 {
		t.Fatalf("compartment %d awaits set %d after the locker applied the current one", first.Compartment, w)
	}
	if l.HasCredential(first.Credential.ID) {
		t.Fatalf("the locker holds CLR-1's code after applying the current set")
	}
	if third := e.create(t, "CLR-3", "S", time.Hour); third.Compartment != first.Compartment {
		t.Fatalf("CLR-3 got compartment %d, want %d (the smallest, its last order's code gone from the locker)",
			third.Compartment, first.Compartment)
	}
}

// awaits reads the credential-set version pickup p's compartment awaits
// (GET /v1/lockers/{id}: awaits_creds).
func (e *pickupEnv) awaits(t *testing.T, p pickup.Pickup) int64 {
	t.Helper()
	var l fleet.Locker
	if err := e.tg.Admin.Get(context.Background(), "/v1/lockers/"+p.Locker, nil, &l); err != nil {
		t.Fatal(err)
	}
	for _, c := range l.Compartments {
		if c.N == p.Compartment {
			return c.AwaitsCreds
		}
	}
	t.Fatalf("locker %s has no compartment %d", p.Locker, p.Compartment)
	return 0
}
