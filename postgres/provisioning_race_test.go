package postgres_test

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/internal/testtool"
	"github.com/lockergate/lockergate/protocol"
	"github.com/lockergate/lockergate/provisioning"
)

// TestRegisterSameNewSerialConcurrently: two claims register the same new
// serial at once. Both find no device with it; the one that inserts second
// must get serial_taken (recorded as such), the answer it would get a
// moment later, not a unique-index error that the provisioning service can
// only answer "invalid".
func TestRegisterSameNewSerialConcurrently(t *testing.T) {
	ctx := context.Background()
	db := MustOpen(t)
	if err := db.CreateSite(ctx, &fleet.Site{ID: "s1", Name: "S1", Timezone: "UTC"}); err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	claims := [][]byte{provisioning.HashSecret("claim-a"), provisioning.HashSecret("claim-b")}
	for i, h := range claims {
		c := &provisioning.Claim{ID: fmt.Sprintf("cl-%d", i), Site: "s1", MaxUses: 5, ExpiresAt: now.Add(time.Hour), CreatedAt: now}
		if err := db.CreateClaim(ctx, c, h); err != nil {
			t.Fatal(err)
		}
	}

	// Both registrations get past their look for the serial before either
	// commits: the site's row is locked, and a new device's reference to it
	// waits for that lock once the device row and its index entries are in.
	blocker, err := db.Pool().Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer blocker.Rollback(ctx)
	if _, err := blocker.Exec(ctx, `SELECT 1 FROM sites WHERE id = 's1' FOR UPDATE`); err != nil {
		t.Fatal(err)
	}
	type result struct {
		r   *provisioning.Registered
		err error
	}
	results := make(chan result, len(claims))
	for i, h := range claims {
		go func() {
			req := &protocol.ProvisionRequest{Serial: "SN-RACE", Model: "LX", FW: "1.0",
				Compartments: []protocol.CompartmentSpec{{N: 1, Size: "M", Zone: "ambient"}}}
			r, err := db.Register(ctx, h, provisioning.Registration{DeviceID: fmt.Sprintf("lk-race-%d", i),
				SecretHash: provisioning.HashSecret(fmt.Sprint("s", i)), Request: req, At: time.Now()})
			results <- result{r, err}
		}()
	}
	testtool.Eventually(t, 10*time.Second, "both registrations waiting on a lock", func() error {
		var n int
		if err := db.Pool().QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity
			WHERE datname = current_database() AND wait_event_type = 'Lock'`).Scan(&n); err != nil {
			return err
		}
		if n < 2 {
			return fmt.Errorf("%d waiting", n)
		}
		return nil
	})
	if err := blocker.Rollback(ctx); err != nil {
		t.Fatal(err)
	}

	var won, taken int
	for range claims {
		select {
		case res := <-results:
			switch {
			case res.err == nil && res.r != nil && !res.r.Replaced && !res.r.Retried:
				won++
			case errors.Is(res.err, provisioning.ErrSerialTaken):
				taken++
			default:
				t.Errorf("registration: %+v, %v; want one registered and one ErrSerialTaken", res.r, res.err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("a registration did not return")
		}
	}
	if won != 1 || taken != 1 {
		t.Fatalf("%d registered, %d serial_taken; want 1 and 1", won, taken)
	}
	var outcomes []string
	rows, err := db.Pool().Query(ctx, `SELECT outcome FROM claim_uses WHERE serial = 'SN-RACE' ORDER BY outcome`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	for rows.Next() {
		var o string
		if err := rows.Scan(&o); err != nil {
			t.Fatal(err)
		}
		outcomes = append(outcomes, o)
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(outcomes) != "[provision serial_taken]" {
		t.Errorf("claim uses %v, want [provision serial_taken]", outcomes)
	}
}
