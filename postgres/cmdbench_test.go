package postgres_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/lockergate/lockergate/fleet"
)

// BenchmarkCommandPath measures the store's part of an unlock, one at a time
// (the latency the API waits for), on 1,000 lockers of 8 compartments, half
// of them online. "before" is the store calls the unlock path made until 2
// December 2026 (read the whole locker, insert the command pending, mark it
// sent, record the result); "now" is what it makes since (insert the command
// with the locker check, stored as sent to an online locker; record the
// result). Compare the two in the same run.
//
//	go test -run '^$' -bench CommandPath -benchtime 3000x ./postgres/
func BenchmarkCommandPath(b *testing.B) {
	const lockers = 1000
	ctx := context.Background()
	db := MustOpen(b)
	seedFleet(b, db, lockers)
	if _, err := db.Pool().Exec(ctx, `UPDATE devices SET online = split_part(id, '-', 2)::int % 2 = 0`); err != nil {
		b.Fatal(err)
	}
	if _, err := db.Pool().Exec(ctx, `INSERT INTO compartments (device_id, n, size, zone)
		SELECT 'lk-' || i, n, 'M', 'ambient' FROM generate_series(1, $1) AS i, generate_series(1, 8) AS n`, lockers); err != nil {
		b.Fatal(err)
	}
	// online(i) is an online locker, offline(i) an offline one.
	online := func(i int) string { return fmt.Sprintf("lk-%d", 2*(i%(lockers/2))+2) }
	offline := func(i int) string { return fmt.Sprintf("lk-%d", 2*(i%(lockers/2))+1) }
	newCmd := func(i int, locker string) (*fleet.Command, *fleet.AuditEntry) {
		now := time.Now().UTC()
		c := &fleet.Command{ID: fleet.NewID("c"), DeviceID: locker, Type: "unlock", Compartment: 1 + i%8,
			Reason: "remote", Status: fleet.CmdPending, Actor: "bench", CreatedAt: now, ExpiresAt: now.Add(30 * time.Second)}
		a := &fleet.AuditEntry{Actor: "bench", Action: "unlock", Locker: c.DeviceID,
			Detail: map[string]any{"command": c.ID, "compartment": c.Compartment, "reason": c.Reason, "expires_at": c.ExpiresAt}}
		return c, a
	}
	complete := func(c *fleet.Command) {
		if _, err := db.CompleteCommand(ctx, c.DeviceID, c.ID, "ok", "", time.Now()); err != nil {
			b.Fatal(err)
		}
	}
	b.Run("before", func(b *testing.B) {
		for i := range b.N {
			// The pending insert of an offline locker stands in for the old
			// insert (same statement shape); then the old separate "sent".
			c, a := newCmd(i, offline(i))
			if _, err := db.GetLocker(ctx, c.DeviceID); err != nil {
				b.Fatal(err)
			}
			createCommand(b, db, c, a)
			if ok, err := db.MarkCommandSent(ctx, c.ID, time.Now()); err != nil || !ok {
				b.Fatalf("mark sent: %v %v", ok, err)
			}
			complete(c)
		}
	})
	b.Run("now", func(b *testing.B) {
		for i := range b.N {
			c, a := newCmd(i, online(i))
			createCommand(b, db, c, a)
			complete(c)
		}
	})
}
