package postgres_test

import (
	"context"
	"encoding/json"
	"fmt"
	"testing"
	"time"

	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/protocol"
)

// TestRejectedCodesCounted: a code_rejected event whose alert change has
// IfRejected raises code_lockout only when the locker's rejected codes
// within the window by its clock, itself included, reach the minimum;
// locked_out rejections and other lockers' do not count, codes rejected
// in one batch count each other, and one past the minimum while the alert
// is open adds to it.
func TestRejectedCodesCounted(t *testing.T) {
	ctx := context.Background()
	db := MustOpen(t)
	rule := &fleet.RejectedCodes{Window: 5 * time.Minute, Min: 3}
	base := time.Now().Truncate(time.Millisecond)
	n := 0
	// rejected is locker id's code_rejected with reason, at base+ts by its
	// clock, received now.
	rejected := func(id, reason string, ts time.Duration) fleet.EventRecord {
		n++
		eid := fmt.Sprintf("rj-%d", n)
		at := base.Add(time.Duration(n) * time.Millisecond)
		body, _ := json.Marshal(protocol.Event{ID: eid, TS: protocol.T(base.Add(ts)), Type: protocol.EventCodeRejected, Reason: reason})
		e := fleet.EventRecord{DeviceID: id, EventID: eid, ReceivedAt: at, TS: base.Add(ts), Type: protocol.EventCodeRejected, Body: body}
		if reason != protocol.RejectLockedOut {
			e.Alert = &fleet.AlertChange{IfRejected: rule,
				Raise: &fleet.Alert{DeviceID: id, Kind: fleet.AlertCodeLockout, Detail: "counted", RaisedAt: at}}
		}
		return e
	}
	// insert stores es in one batch and returns which raised an alert.
	insert := func(es ...fleet.EventRecord) []bool {
		t.Helper()
		fresh, err := db.InsertEvents(ctx, es)
		if err != nil || len(fresh) != len(es) {
			t.Fatalf("insert: %d of %d fresh, %v", len(fresh), len(es), err)
		}
		raised := make([]bool, len(fresh))
		for i, e := range fresh {
			raised[i] = e.Alert != nil && e.Alert.Raised
		}
		return raised
	}
	lockout := func(id string) (open bool, repeats int) {
		t.Helper()
		err := db.Pool().QueryRow(ctx, `SELECT count(*) > 0, coalesce(max(repeats), 0) FROM alerts
			WHERE device_id = $1 AND kind = 'code_lockout' AND cleared_at IS NULL`, id).Scan(&open, &repeats)
		if err != nil {
			t.Fatal(err)
		}
		return open, repeats
	}

	id, other := MustDevice(t, db, "s1", "SN-REJ-1", 2), MustDevice(t, db, "s1", "SN-REJ-2", 2)
	for i, e := range []fleet.EventRecord{
		rejected(id, "unknown", 0),
		rejected(id, "expired", time.Minute),
		rejected(other, "unknown", 2*time.Minute),             // another locker's
		rejected(id, "used", 6*time.Minute),                   // the first two have left the window
		rejected(id, protocol.RejectLockedOut, 7*time.Minute), // the lockout's own: not counted
		rejected(id, "unknown", 8*time.Minute),
	} {
		if raised := insert(e); raised[0] {
			t.Fatalf("rejection %d (%s of %s at %s) raised code_lockout; want fewer than 3 in the window", i+1, e.EventID, e.DeviceID, e.TS.Sub(base))
		}
	}
	if open, _ := lockout(id); open {
		t.Fatal("code_lockout open before 3 rejections within 5 min")
	}
	// The third within 5 min of the locker's clock (6, 8, 10 min).
	if raised := insert(rejected(id, "unknown", 10*time.Minute)); !raised[0] {
		t.Fatal("the third rejection within the window raised nothing")
	}
	// One more while the alert is open adds to it.
	if raised := insert(rejected(id, "unknown", 11*time.Minute)); raised[0] {
		t.Fatal("a rejection while code_lockout is open raised a second alert")
	}
	if open, repeats := lockout(id); !open || repeats != 1 {
		t.Fatalf("code_lockout open %v with %d repeats, want open with 1", open, repeats)
	}
	if open, _ := lockout(other); open {
		t.Fatal("another locker's code_lockout opened")
	}
	// Queued offline and delivered in one batch: each counts those before
	// it by the locker's clock, so the third raises.
	burst := MustDevice(t, db, "s1", "SN-REJ-3", 2)
	got := insert(rejected(burst, "unknown", 0), rejected(burst, "unknown", time.Second), rejected(burst, "unknown", 2*time.Second))
	if got[0] || got[1] || !got[2] {
		t.Fatalf("a batch of three raised %v, want only the third", got)
	}
	// Spread over an hour by the locker's clock, delivered together: none.
	spread := MustDevice(t, db, "s1", "SN-REJ-4", 2)
	got = insert(rejected(spread, "unknown", 0), rejected(spread, "unknown", 20*time.Minute), rejected(spread, "unknown", 40*time.Minute))
	if got[0] || got[1] || got[2] {
		t.Fatalf("three rejections 20 min apart raised %v, want none", got)
	}
}
