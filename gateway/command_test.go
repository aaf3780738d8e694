package gateway_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/lockergate/lockergate/fleet"
)

// TestCommandWaitsForReconnect: an unlock to a locker that is offline for
// less than its ttl is delivered when it comes back, and runs once.
func TestCommandWaitsForReconnect(t *testing.T) {
	ctx := context.Background()
	tg := MustStart(t)
	claim := tg.MustSiteAndClaim(t, "s1", 1)
	sim := MustFleet(t, tg, claim, 1)
	l := sim.Lockers()[0]
	id := l.DeviceID()
	l.Disconnect()
	// Offline after having been online: a locker not yet marked online at
	// all (its connect still queued) would read as offline too.
	Eventually(t, 10*time.Second, "locker offline", func() error {
		var got fleet.Locker
		if err := tg.Admin.Get(ctx, "/v1/lockers/"+id, nil, &got); err != nil {
			return err
		}
		if got.Online || got.DisconnectedAt == nil {
			return fmt.Errorf("online %v, disconnected at %v", got.Online, got.DisconnectedAt)
		}
		return nil
	})
	var cmd fleet.Command
	if err := tg.Admin.Post(ctx, "/v1/lockers/"+id+"/commands", map[string]any{"type": "unlock", "compartment": 2, "ttl_s": 60}, &cmd); err != nil {
		t.Fatal(err)
	}
	if cmd.Status != fleet.CmdPending {
		t.Fatalf("status %q, want pending while offline", cmd.Status)
	}
	rctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	if err := l.Reconnect(rctx); err != nil {
		t.Fatal(err)
	}
	Eventually(t, 10*time.Second, "command answered after reconnect", func() error {
		var got fleet.Command
		if err := tg.Admin.Get(ctx, "/v1/lockers/"+id+"/commands/"+cmd.ID, nil, &got); err != nil {
			return err
		}
		if got.Status != fleet.CmdOK {
			return fmt.Errorf("status %s", got.Status)
		}
		return nil
	})
	if n := l.CommandsRun(cmd.ID); n != 1 {
		t.Fatalf("ran %d times, want 1", n)
	}
}
