package gateway_test

import (
	"context"
	"net/http"
	"testing"
	"time"

	"github.com/lockergate/lockergate/client"
	"github.com/lockergate/lockergate/pickup"
	"github.com/lockergate/lockergate/postgres"
)

// TestIdempotentPickupRerunAfterItsGatewayDied: a pickup request whose
// answer was lost with its gateway (the Idempotency-Key claimed, never
// finished) is run again once the claim is taken over: the run finds the
// pickup the first made (its id derives from the key) and answers it,
// rather than a 409 for its order_ref. No second compartment, staging
// unlock or audit entry.
func TestIdempotentPickupRerunAfterItsGatewayDied(t *testing.T) {
	ctx := context.Background()
	e := newPickupEnv(t, 1, 0)
	create := func() (pickup.Pickup, int) {
		t.Helper()
		var p pickup.Pickup
		status, err := e.store.Do(ctx, client.Request{Method: "POST", Path: "/v1/pickups",
			Body: map[string]any{"site": "store-042", "order_ref": "RERUN-1", "size": "S", "zone": "ambient",
				"recipient": map[string]string{"kind": "driver", "platform": "speedy"}},
			Header: http.Header{"Idempotency-Key": {"pickup-once"}}}, &p)
		if err != nil {
			t.Fatalf("create: %d %v", status, err)
		}
		return p, status
	}
	first, _ := create()
	e.waitState(t, first.ID, pickup.Ready)
	if _, err := e.tg.DB().Pool().Exec(ctx, `UPDATE idempotency SET status = 0, response = '', created_at = now() - make_interval(secs => $1)
		WHERE key = 'pickup-once'`, (postgres.IdempotencyAbandoned + time.Minute).Seconds()); err != nil {
		t.Fatal(err)
	}
	again, status := create()
	if status != http.StatusCreated || again.ID != first.ID || again.State != pickup.Ready || again.Compartment != first.Compartment {
		t.Fatalf("the pickup run again answered %d %s %s at %d, want 201 and the first pickup %s, ready, at %d",
			status, again.ID, again.State, again.Compartment, first.ID, first.Compartment)
	}
	for what, n := range map[string]int{
		"pickups":             e.tg.Count(t, `SELECT count(*) FROM pickups`),
		"staging unlocks":     e.tg.Count(t, `SELECT count(*) FROM commands WHERE reason = 'staging'`),
		"pickup.create audit": e.tg.Count(t, `SELECT count(*) FROM audit WHERE action = 'pickup.create' AND detail->>'pickup' = $1`, first.ID),
	} {
		if n != 1 {
			t.Errorf("%d %s, want 1", n, what)
		}
	}
	if replay, status := create(); status != http.StatusCreated || replay.ID != first.ID {
		t.Fatalf("the repeat answered %d %s, want the first pickup", status, replay.ID)
	}
}
