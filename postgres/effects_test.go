package postgres_test

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/lockergate/lockergate/internal/testtool"
)

// thisDB keeps to the locks taken in the test's own database (the cluster
// is shared with other tests).
const thisDB = `database = (SELECT oid FROM pg_database WHERE datname = current_database())`

// TestLockEffects: a locker's effects lock is held by one caller at a
// time (a second waits in PostgreSQL until the first releases it); another
// locker's is not held up; a wait cut short by its context leaves no lock
// behind, nor does a release.
func TestLockEffects(t *testing.T) {
	ctx := context.Background()
	db := MustOpen(t)
	waiting := func() int {
		var n int
		if err := db.Pool().QueryRow(ctx, `SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND `+thisDB).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	release, err := db.LockEffects(ctx, "lk-1")
	if err != nil {
		t.Fatal(err)
	}
	other, err := db.LockEffects(ctx, "lk-2")
	if err != nil {
		t.Fatalf("another locker's lock: %v", err)
	}
	other()

	// A wait given up: its session goes, and the lock with it.
	cctx, cancel := context.WithCancel(ctx)
	gaveUp := make(chan error, 1)
	go func() {
		_, err := db.LockEffects(cctx, "lk-1")
		gaveUp <- err
	}()
	testtool.Eventually(t, 10*time.Second, "the second caller waiting", func() error {
		if n := waiting(); n != 1 {
			return fmt.Errorf("%d waiting", n)
		}
		return nil
	})
	cancel()
	if err := <-gaveUp; !errors.Is(err, context.Canceled) {
		t.Fatalf("a wait cancelled: %v, want context.Canceled", err)
	}

	second := make(chan func(), 1)
	go func() {
		r, err := db.LockEffects(ctx, "lk-1")
		if err != nil {
			t.Error(err)
		}
		second <- r
	}()
	testtool.Eventually(t, 10*time.Second, "the third caller waiting", func() error {
		if n := waiting(); n != 1 {
			return fmt.Errorf("%d waiting", n)
		}
		return nil
	})
	select {
	case <-second:
		t.Fatal("the lock was granted twice")
	default:
	}
	release()
	r := <-second
	if r == nil {
		t.FailNow()
	}
	r()
	var held int
	if err := db.Pool().QueryRow(ctx, `SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND `+thisDB).Scan(&held); err != nil || held != 0 {
		t.Fatalf("%d advisory locks left (%v), want none", held, err)
	}
}
