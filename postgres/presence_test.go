package postgres_test

import (
	"context"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/protocol"
)

// TestPresenceHistory: a locker's presence changes in a range, oldest
// first, with the last one before it (none kept: nil).
func TestPresenceHistory(t *testing.T) {
	ctx := context.Background()
	db := MustOpen(t)
	id := MustDevice(t, db, "s1", "P", 1)
	t0 := time.Now().UTC().Truncate(time.Microsecond)
	if before, changes, err := db.PresenceHistory(ctx, id, t0.Add(-time.Hour), t0); err != nil || before != nil || len(changes) != 0 {
		t.Fatalf("no history: %+v %+v %v", before, changes, err)
	}
	for i, at := range []time.Duration{0, time.Minute, 2 * time.Minute, 3 * time.Minute} {
		var err error
		if i%2 == 0 {
			err = db.MarkOnline(ctx, id, t0.Add(at))
		} else {
			err = db.MarkOfflineMany(ctx, []fleet.SessionEnd{{ID: id, Reason: "connection_lost", At: t0.Add(at)}})
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	before, changes, err := db.PresenceHistory(ctx, id, t0.Add(90*time.Second), t0.Add(3*time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	want := fleet.PresenceChange{At: t0.Add(time.Minute), Reason: "connection_lost"}
	if before == nil || !before.At.Equal(want.At) || before.Online || before.Reason != want.Reason {
		t.Fatalf("before the range: %+v, want %+v", before, want)
	}
	if len(changes) != 1 || !changes[0].At.Equal(t0.Add(2*time.Minute)) || !changes[0].Online {
		t.Fatalf("in the range: %+v, want the session started at +2m (the end at +3m is the range's end)", changes)
	}
}

// TestSessionFromBirthOnce: a birth behind an external broker starts a
// session and is recorded in one statement, once: the same birth applied
// by two instances at once (retained to one, live to the other) starts one
// session; a later birth (a reconnect) another; one that waited at the
// broker (NoOffset) records its ts but no clock offset.
func TestSessionFromBirthOnce(t *testing.T) {
	ctx := context.Background()
	db := MustOpen(t)
	id := MustDevice(t, db, "s1", "SB", 1)
	t0 := time.Now().UTC().Truncate(time.Millisecond)
	rec := func(ts, at time.Time, noOffset bool) fleet.BirthRecord {
		return fleet.BirthRecord{ID: id, At: at, NoOffset: noOffset,
			Presence: &protocol.Presence{Online: true, FW: "1.4.2", BootID: "b-1", TS: protocol.T(ts)}}
	}
	session := func() (connects, starts int, l *fleet.Locker) {
		t.Helper()
		if err := db.Pool().QueryRow(ctx, `SELECT connect_count, (SELECT count(*) FROM presence_log WHERE device_id = $1 AND online)
			FROM devices WHERE id = $1`, id).Scan(&connects, &starts); err != nil {
			t.Fatal(err)
		}
		l, err := db.GetLocker(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		return connects, starts, l
	}
	var started atomic.Int32
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Go(func() {
			ok, err := db.StartSessionWithBirth(ctx, rec(t0, t0.Add(time.Duration(i)*time.Millisecond), false))
			if err != nil {
				t.Error(err)
			}
			if ok {
				started.Add(1)
			}
		})
	}
	wg.Wait()
	if n := started.Load(); n != 1 {
		t.Fatalf("one birth applied 8 times at once started %d sessions, want 1", n)
	}
	if c, s, l := session(); c != 1 || s != 1 || !l.Online || l.BirthTS == nil || !l.BirthTS.Equal(t0) || l.ClockOffsetMS == nil {
		t.Fatalf("after the birth: %d connects, %d starts, locker %+v", c, s, l)
	}
	// A reconnect: a new birth of the same boot, sent later.
	later := t0.Add(time.Minute)
	if ok, err := db.StartSessionWithBirth(ctx, rec(later, later, false)); err != nil || !ok {
		t.Fatalf("a later birth: %v %v, want a session started", ok, err)
	}
	// One that waited at the broker: no offset from its late arrival.
	last := t0.Add(2 * time.Minute)
	if ok, err := db.StartSessionWithBirth(ctx, rec(last, last.Add(10*time.Minute), true)); err != nil || !ok {
		t.Fatalf("a late birth: %v %v, want a session started", ok, err)
	}
	if c, s, l := session(); c != 3 || s != 3 || l.ClockOffsetMS != nil || !l.BirthTS.Equal(last) {
		t.Fatalf("after three births: %d connects, %d starts, offset %v, birth ts %v", c, s, l.ClockOffsetMS, l.BirthTS)
	}
	// A ts on one side only is no match (NULL must not read as "recorded"):
	// a birth without one after one with, and one with after one without.
	bare := func(retained bool) fleet.BirthRecord {
		return fleet.BirthRecord{ID: id, At: time.Now(), Retained: retained, Presence: &protocol.Presence{Online: true, BootID: "b-1"}}
	}
	for i, b := range []fleet.BirthRecord{bare(false), rec(t0.Add(3*time.Minute), time.Now(), false)} {
		if ok, err := db.StartSessionWithBirth(ctx, b); err != nil || !ok {
			t.Fatalf("birth %d, a ts on one side only: %v %v, want a session started", i+1, ok, err)
		}
		if i == 0 {
			// Without a ts on either side: a live one may be a reconnect,
			// a retained copy is the birth on record.
			if ok, err := db.StartSessionWithBirth(ctx, bare(false)); err != nil || !ok {
				t.Fatalf("a live birth without a ts after one: %v %v, want a session started", ok, err)
			}
			if ok, err := db.StartSessionWithBirth(ctx, bare(true)); err != nil || ok {
				t.Fatalf("a retained birth without a ts after one: %v %v, want the one on record", ok, err)
			}
		}
	}
	if c, _, _ := session(); c != 6 {
		t.Fatalf("%d connects after six births and one retained copy, want 6", c)
	}
}

// TestMigrationBackfillsBirths: migration 025, on lockers from before it,
// takes a locker with a session as born at its start, with the birth's ts
// its start plus the offset it gave (to the millisecond), and leaves one
// that never connected without either.
func TestMigrationBackfillsBirths(t *testing.T) {
	ctx := context.Background()
	sql, err := os.ReadFile("migrations/025_birth_at.sql")
	if err != nil {
		t.Fatal(err)
	}
	db := MustOpen(t)
	seen, never := MustDevice(t, db, "s1", "MB-1", 1), MustDevice(t, db, "s1", "MB-2", 1)
	start := time.Date(2026, 12, 7, 4, 0, 0, 123456000, time.UTC)
	if _, err := db.Pool().Exec(ctx, `UPDATE devices SET born_at = NULL, birth_ts = NULL,
		connected_at = CASE WHEN id = $1 THEN $2::timestamptz END, clock_offset_ms = CASE WHEN id = $1 THEN -1500 END`, seen, start); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Pool().Exec(ctx, string(sql)); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		id             string
		bornAt, birthT *time.Time
	}{
		{seen, &start, new(time.Date(2026, 12, 7, 3, 59, 58, 623000000, time.UTC))},
		{never, nil, nil},
	} {
		var born, ts *time.Time
		if err := db.Pool().QueryRow(ctx, `SELECT born_at, birth_ts FROM devices WHERE id = $1`, c.id).Scan(&born, &ts); err != nil {
			t.Fatal(err)
		}
		same := func(a, b *time.Time) bool { return a == nil && b == nil || a != nil && b != nil && a.Equal(*b) }
		if !same(born, c.bornAt) || !same(ts, c.birthT) {
			t.Errorf("%s: born_at %v, birth_ts %v; want %v, %v", c.id, born, ts, c.bornAt, c.birthT)
		}
	}
}
