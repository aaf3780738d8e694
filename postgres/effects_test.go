package postgres_test

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/lockergate/lockergate/internal/pgtest"
	"github.com/lockergate/lockergate/internal/testtool"
	"github.com/lockergate/lockergate/postgres"
)

// advisoryLocks counts the advisory locks in the test's database, granted
// or waited for.
func advisoryLocks(t *testing.T, db *postgres.DB, granted bool) int {
	t.Helper()
	var n int
	if err := db.Pool().QueryRow(context.Background(), pgtest.AdvisoryLocksSQL, granted).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// waitLocks waits until the test's database has n advisory locks waited
// for and held.
func waitLocks(t *testing.T, db *postgres.DB, what string, waiting, held int) {
	t.Helper()
	testtool.Eventually(t, 10*time.Second, what, func() error {
		if w, h := advisoryLocks(t, db, false), advisoryLocks(t, db, true); w != waiting || h != held {
			return fmt.Errorf("%d waiting, %d held", w, h)
		}
		return nil
	})
}

// TestLockEffects: a locker's effects lock is held by one caller at a
// time (a second waits in PostgreSQL until the first releases it); another
// locker's is not held up; a wait cut short by its context leaves no lock
// behind, nor does a release.
func TestLockEffects(t *testing.T) {
	ctx := context.Background()
	db := MustOpen(t)
	asked := time.Now()
	until, release, err := db.LockEffects(ctx, "lk-1")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(release)
	// Sure for three quarters of the 2 min idle bound, counted from the grant.
	if want := asked.Add(90 * time.Second); until.Before(want) || until.After(time.Now().Add(90*time.Second)) {
		t.Errorf("lock sure until %v after the ask, want 90 s after the grant", until.Sub(asked))
	}
	_, other, err := db.LockEffects(ctx, "lk-2")
	if err != nil {
		t.Fatalf("another locker's lock: %v", err)
	}
	other()
	waitLocks(t, db, "one lock held", 0, 1)

	// A wait given up: its session goes, and the wait with it.
	cctx, cancel := context.WithCancel(ctx)
	gaveUp := make(chan error, 1)
	go func() {
		_, _, err := db.LockEffects(cctx, "lk-1")
		gaveUp <- err
	}()
	waitLocks(t, db, "the second caller waiting", 1, 1)
	cancel()
	select {
	case err := <-gaveUp:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("a wait cancelled: %v, want context.Canceled", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("a cancelled wait did not return within 10 s")
	}
	waitLocks(t, db, "the cancelled wait gone", 0, 1)

	second := make(chan func(), 1)
	go func() {
		_, r, err := db.LockEffects(ctx, "lk-1")
		if err != nil {
			t.Error(err)
		}
		second <- r
	}()
	waitLocks(t, db, "the third caller waiting", 1, 1)
	release()
	select {
	case r := <-second:
		if r == nil {
			t.FailNow()
		}
		r()
	case <-time.After(10 * time.Second):
		t.Fatal("the lock was not granted within 10 s of its release")
	}
	waitLocks(t, db, "no lock left", 0, 0)
}

// TestLockEffectsIdleHolder: a holder that leaves its lock idle past the
// bound (a hung instance) loses it, to PostgreSQL ending its session, but
// not before the time its grant said it was sure until; the next holder,
// which waited that long, is still given its whole time; the first's
// release afterwards is harmless.
func TestLockEffectsIdleHolder(t *testing.T) {
	postgres.SetEffectsLockIdle(t, 2*time.Second)
	ctx := context.Background()
	db := MustOpen(t)
	until, hung, err := db.LockEffects(ctx, "lk-1")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(hung) // before the pool closes, whatever happens
	wctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	nextUntil, next, err := db.LockEffects(wctx, "lk-1")
	if err != nil {
		t.Fatalf("the lock of an idle holder: %v, want it granted once PostgreSQL ends the holder's session", err)
	}
	granted := time.Now()
	if granted.Before(until) {
		t.Errorf("granted to the next holder %v before the first's grant ran out", until.Sub(granted))
	}
	if !nextUntil.After(granted) {
		t.Errorf("the next holder, which waited 2 s, was given a lock sure until %v before its grant: its steps would be cut at once", granted.Sub(nextUntil))
	}
	hung()
	next()
	waitLocks(t, db, "no lock left", 0, 0)
}
