package postgres_test

import (
	"context"
	"encoding/json"
	"errors"
	"testing"
	"time"

	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/internal/testtool"
	"github.com/lockergate/lockergate/protocol"
)

// TestEventRetryWaitsForTheEarlierTrysCommit: a try of InsertEvents whose
// connection broke while its COMMIT was still going (a slow disk, a
// synchronous standby) and the retry that follows it: the retry's insert
// waits for that commit, and then returns the event as stored (not as a
// locker's repeat, which would never be handed on).
func TestEventRetryWaitsForTheEarlierTrysCommit(t *testing.T) {
	ctx := context.Background()
	db := MustOpen(t)
	id := MustDevice(t, db, "s1", "SN-RETRY", 1)
	at := time.Now().UTC().Truncate(time.Microsecond)
	body, _ := json.Marshal(protocol.Event{ID: "r-1", TS: protocol.T(at), Type: "tamper"})
	e := fleet.EventRecord{DeviceID: id, EventID: "r-1", ReceivedAt: at, TS: at, Type: "tamper", Body: body}

	first, err := db.Pool().Begin(ctx) // the first try, its commit not done yet
	if err != nil {
		t.Fatal(err)
	}
	defer first.Rollback(ctx)
	if _, err := first.Exec(ctx, `INSERT INTO event_ids (device_id, event_id, received_at) VALUES ($1, $2, $3)`, id, e.EventID, at); err != nil {
		t.Fatal(err)
	}
	type answer struct {
		fresh []fleet.EventRecord
		err   error
	}
	retry := make(chan answer, 1)
	go func() {
		fresh, err := db.InsertEvents(ctx, []fleet.EventRecord{e})
		retry <- answer{fresh, err}
	}()
	// The retry waits on the first try's row lock until it commits.
	testtool.Eventually(t, 10*time.Second, "the retry waiting for the first try", func() error {
		if countOf(t, db, `SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'
			AND query LIKE '%INSERT INTO event_ids%'`) == 0 {
			return errors.New("not waiting")
		}
		return nil
	})
	if err := first.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case a := <-retry:
		if a.err != nil || len(a.fresh) != 1 || a.fresh[0].EventID != "r-1" {
			t.Fatalf("the retry: %+v %v, want r-1 returned as stored", a.fresh, a.err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the retry did not return")
	}
}
