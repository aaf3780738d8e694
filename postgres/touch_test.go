package postgres_test

import (
	"context"
	"testing"
	"time"
)

// TestTouchLockers: last_seen moves forward to the time given, never back;
// a locker never seen gets one; an id that is no locker is ignored.
func TestTouchLockers(t *testing.T) {
	ctx := context.Background()
	db := MustOpen(t)
	now := time.Now().UTC().Truncate(time.Millisecond)
	seen, never := MustDevice(t, db, "s1", "T", 1), MustDevice(t, db, "s1", "N", 1)
	if err := db.MarkOnline(ctx, seen, now); err != nil {
		t.Fatal(err)
	}
	if err := db.TouchLockers(ctx, []string{seen, never, "lk-none"},
		[]time.Time{now.Add(-time.Minute), now.Add(-time.Second), now}); err != nil {
		t.Fatal(err)
	}
	lastSeen := func(id string) time.Time {
		t.Helper()
		l, err := db.GetLocker(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		if l.LastSeen == nil {
			t.Fatalf("%s: last_seen null", id)
		}
		return l.LastSeen.UTC()
	}
	if got := lastSeen(seen); !got.Equal(now) {
		t.Errorf("last_seen of %s moved back to %v, want %v", seen, got, now)
	}
	if got := lastSeen(never); !got.Equal(now.Add(-time.Second)) {
		t.Errorf("last_seen of a locker never seen: %v, want %v", got, now.Add(-time.Second))
	}
	if err := db.TouchLockers(ctx, []string{seen}, []time.Time{now.Add(time.Minute)}); err != nil {
		t.Fatal(err)
	}
	if got := lastSeen(seen); !got.Equal(now.Add(time.Minute)) {
		t.Errorf("last_seen of %s: %v, want %v", seen, got, now.Add(time.Minute))
	}
}
