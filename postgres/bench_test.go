package postgres_test

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lockergate/lockergate/fleet"
)

// BenchmarkInsertHealth measures the store's half of health ingest: batches
// of 2,000 health rows over 10,000 lockers (each batch touches 2,000
// lockers' latest health), written by 1, 2 or 4 writers at once as the
// fleet manager's health writers do. rows/s is the figure to compare; the
// one-writer case is the baseline of the same run.
//
//	go test -run '^$' -bench InsertHealth -benchtime 20x ./postgres/
func BenchmarkInsertHealth(b *testing.B) {
	const lockers, batch = 10000, 2000
	ctx := context.Background()
	db := MustOpen(b)
	if err := db.CreateSite(ctx, &fleet.Site{ID: "s1", Name: "s1", Timezone: "UTC"}); err != nil {
		b.Fatal(err)
	}
	// Lockers straight into the table: provisioning is not measured here.
	if _, err := db.Pool().Exec(ctx, `INSERT INTO devices (id, serial, site, model, fw, secret_hash)
		SELECT 'lk-' || i, 'SN-' || i, 's1', 'LX', '1.0.0', '\x00' FROM generate_series(1, $1) AS i`, lockers); err != nil {
		b.Fatal(err)
	}
	body := []byte(`{"v":1,"ts":"2026-12-02T10:00:00Z","seq":1,"fw":"1.0.0","uptime_s":3600,"temp_c":21.5,"power":"mains","rssi_dbm":-61,"free_compartments":7,"door_faults":[]}`)
	var seq atomic.Int64
	mkBatch := func(w int) []fleet.HealthRecord {
		recs := make([]fleet.HealthRecord, batch)
		s := seq.Add(1)
		now := time.Now()
		for i := range recs {
			// Writer w owns the lockers ≡ w (mod writers), as the manager shards them.
			n := (int(s)*batch + i) % lockers
			recs[i] = fleet.HealthRecord{DeviceID: fmt.Sprintf("lk-%d", n+1), ReceivedAt: now, TS: now, Seq: s, Body: body}
		}
		return recs
	}
	for _, writers := range []int{1, 2, 4} {
		b.Run(fmt.Sprintf("writers=%d", writers), func(b *testing.B) {
			var next atomic.Int64
			var wg sync.WaitGroup
			start := time.Now()
			for w := range writers {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for next.Add(1) <= int64(b.N) {
						recs := mkBatch(w)
						if err := db.InsertHealth(ctx, recs, fleet.LatestOf(recs)); err != nil {
							b.Error(err)
							return
						}
					}
				}()
			}
			wg.Wait()
			b.ReportMetric(float64(b.N*batch)/time.Since(start).Seconds(), "rows/s")
		})
	}
}
