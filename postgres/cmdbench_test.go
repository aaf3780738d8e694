package postgres_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/lockergate/lockergate/fleet"
)

// BenchmarkCommandPath measures each store call of an unlock, one at a time
// (the latency the API waits for), on 1,000 lockers of 8 compartments.
//
//	go test -run '^$' -bench CommandPath ./postgres/
func BenchmarkCommandPath(b *testing.B) {
	const lockers = 1000
	ctx := context.Background()
	db := MustOpen(b)
	if err := db.CreateSite(ctx, &fleet.Site{ID: "s1", Name: "s1", Timezone: "UTC"}); err != nil {
		b.Fatal(err)
	}
	if _, err := db.Pool().Exec(ctx, `INSERT INTO devices (id, serial, site, model, fw, secret_hash)
		SELECT 'lk-' || i, 'SN-' || i, 's1', 'LX', '1.0.0', '\x00' FROM generate_series(1, $1) AS i`, lockers); err != nil {
		b.Fatal(err)
	}
	if _, err := db.Pool().Exec(ctx, `INSERT INTO compartments (device_id, n, size, zone)
		SELECT 'lk-' || i, n, 'M', 'ambient' FROM generate_series(1, $1) AS i, generate_series(1, 8) AS n`, lockers); err != nil {
		b.Fatal(err)
	}
	locker := func(i int) string { return fmt.Sprintf("lk-%d", i%lockers+1) }
	newCmd := func(i int) (*fleet.Command, *fleet.AuditEntry) {
		now := time.Now().UTC()
		c := &fleet.Command{ID: fleet.NewID("c"), DeviceID: locker(i), Type: "unlock", Compartment: 1 + i%8,
			Reason: "remote", Status: fleet.CmdPending, Actor: "bench", CreatedAt: now, ExpiresAt: now.Add(30 * time.Second)}
		a := &fleet.AuditEntry{Actor: "bench", Action: "unlock", Locker: c.DeviceID, Site: "s1",
			Detail: map[string]any{"command": c.ID, "compartment": c.Compartment, "reason": c.Reason, "expires_at": c.ExpiresAt}}
		return c, a
	}
	b.Run("GetLocker", func(b *testing.B) {
		for i := range b.N {
			if _, err := db.GetLocker(ctx, locker(i)); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("CreateCommand", func(b *testing.B) {
		for i := range b.N {
			c, a := newCmd(i)
			createCommand(b, db, c, a)
		}
	})
	b.Run("Create+Sent+Complete", func(b *testing.B) {
		for i := range b.N {
			c, a := newCmd(i)
			createCommand(b, db, c, a)
			if _, err := db.MarkCommandSent(ctx, c.ID, time.Now()); err != nil {
				b.Fatal(err)
			}
			if _, err := db.CompleteCommand(ctx, c.DeviceID, c.ID, "ok", "", time.Now()); err != nil {
				b.Fatal(err)
			}
		}
	})
}
