package postgres_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/protocol"
)

// A health batch and a control shard's batch of overlapping lockers, run
// at the same time, must not deadlock. Each locked its rows in its plan's
// order before lockDevicesCTE: a version of this test that did not stop at
// the first then counted 71 deadlocks in its 300 statements (each a 1 s
// wait for PostgreSQL's deadlock_timeout).
func TestBatchUpdatesDoNotDeadlock(t *testing.T) {
	const lockers, batch, rounds = 400, 200, 150
	ctx := context.Background()
	db := MustOpen(t)
	seedFleet(t, db, lockers)
	pick := func(r *rand.Rand) []string {
		ids := make([]string, batch)
		for i, n := range r.Perm(lockers)[:batch] {
			ids[i] = fmt.Sprintf("lk-%d", n+1)
		}
		return ids
	}
	// The first deadlock ends the test: each takes a second to detect.
	var failed atomic.Bool
	check := func(what string, err error) {
		if err == nil {
			return
		}
		failed.Store(true)
		var pe *pgconn.PgError
		if errors.As(err, &pe) && pe.Code == "40P01" {
			t.Errorf("%s deadlocked with the other batch: lock the rows in order first (lockDevicesCTE): %v", what, err)
		} else {
			t.Errorf("%s: %v", what, err)
		}
	}
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		r := rand.New(rand.NewPCG(1, 2)) // the health writer

		for k := 0; k < rounds && !failed.Load(); k++ {
			now := time.Now()
			ids := pick(r)
			var recs []fleet.HealthRecord
			for _, id := range ids {
				recs = append(recs, fleet.HealthRecord{DeviceID: id, ReceivedAt: now, TS: now, Seq: int64(k + 1), Body: []byte(`{}`)})
			}
			check("health", db.InsertHealth(ctx, recs, fleet.LatestOf(recs)))
		}
	}()
	go func() {
		defer wg.Done()
		r := rand.New(rand.NewPCG(3, 4)) // a control shard: starts, births, acks, ends, last seen

		for k := 0; k < rounds && !failed.Load(); k++ {
			now := time.Now()
			ids := pick(r)
			switch k % 5 {
			case 0:
				s := make([]fleet.SessionStart, len(ids))
				for i, id := range ids {
					s[i] = fleet.SessionStart{ID: id, At: now}
				}
				check("starts", db.MarkOnlineMany(ctx, s))
			case 1:
				s := make([]fleet.BirthRecord, len(ids))
				for i, id := range ids {
					s[i] = fleet.BirthRecord{ID: id, At: now, Presence: &protocol.Presence{FW: "1.0.1"}}
				}
				check("births", db.RecordBirths(ctx, s))
			case 2:
				s := make([]fleet.CredsAck, len(ids))
				for i, id := range ids {
					s[i] = fleet.CredsAck{ID: id, Version: 1}
				}
				_, err := db.AckCredsMany(ctx, s)
				check("acks", err)
			case 3:
				s := make([]fleet.SessionEnd, len(ids))
				for i, id := range ids {
					s[i] = fleet.SessionEnd{ID: id, At: now, Reason: "x"}
				}
				check("ends", db.MarkOfflineMany(ctx, s))
			case 4:
				ats := make([]time.Time, len(ids))
				for i := range ats {
					ats[i] = now
				}
				check("last seen", db.TouchLockers(ctx, ids, ats))
			}
		}
	}()
	wg.Wait()
}
