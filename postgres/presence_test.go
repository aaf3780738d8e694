package postgres_test

import (
	"context"
	"testing"
	"time"

	"github.com/lockergate/lockergate/fleet"
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
