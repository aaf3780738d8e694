package postgres_test

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lockergate/lockergate/bench"
	"github.com/lockergate/lockergate/fleet"
)

// BenchmarkInsertHealth measures the store's half of health ingest: batches
// of 2,000 health rows over 10,000 lockers, written by 1, 2 or 4 writers at
// once as the fleet manager's health writers do. rows/s is throughput;
// pg-µs/row is the PostgreSQL server's CPU per row (all its processes),
// the figure that decides how much of a shared machine ingest leaves to
// the broker.
//
// Two workloads side by side: "latest=each" updates every row's locker's
// latest health with its batch (lockers reporting at most once a second:
// every report is written through); "latest=none" stores the rows alone
// (lockers reporting faster, whose latest health is held and written once
// a second: fleet.Options.LatestHealthEvery).
//
//	go test -run '^$' -bench InsertHealth -benchtime 20x ./postgres/
func BenchmarkInsertHealth(b *testing.B) {
	const lockers, batch = 10000, 2000
	ctx := context.Background()
	db := MustOpen(b)
	seedFleet(b, db, lockers)
	var dataDir string
	if err := db.Pool().QueryRow(ctx, "SHOW data_directory").Scan(&dataDir); err != nil {
		b.Fatal(err)
	}
	body := []byte(`{"v":1,"ts":"2026-12-02T10:00:00Z","seq":1,"fw":"1.0.0","uptime_s":3600,"temp_c":21.5,"power":"mains","rssi_dbm":-61,"free_compartments":7,"door_faults":[]}`)
	var seq atomic.Int64
	mkBatch := func() []fleet.HealthRecord {
		recs := make([]fleet.HealthRecord, batch)
		s := seq.Add(1)
		now := time.Now()
		for i := range recs {
			n := (int(s)*batch + i) % lockers
			recs[i] = fleet.HealthRecord{DeviceID: fmt.Sprintf("lk-%d", n+1), ReceivedAt: now, TS: now, Seq: s, Body: body}
		}
		return recs
	}
	for _, latest := range []string{"each", "none"} {
		for _, writers := range []int{1, 2, 4} {
			b.Run(fmt.Sprintf("latest=%s/writers=%d", latest, writers), func(b *testing.B) {
				var next atomic.Int64
				var wg sync.WaitGroup
				cpu0, err := bench.PostgresCPU(dataDir)
				if err != nil {
					b.Fatalf("PostgreSQL CPU of %s: %v", dataDir, err)
				}
				start := time.Now()
				for range writers {
					wg.Add(1)
					go func() {
						defer wg.Done()
						for next.Add(1) <= int64(b.N) {
							recs := mkBatch()
							var l []fleet.LatestHealth
							if latest == "each" {
								l = fleet.LatestOf(recs)
							}
							if err := db.InsertHealth(ctx, recs, l); err != nil {
								b.Error(err)
								return
							}
						}
					}()
				}
				wg.Wait()
				rows := float64(b.N * batch)
				b.ReportMetric(rows/time.Since(start).Seconds(), "rows/s")
				cpu, err := bench.PostgresCPU(dataDir)
				if err != nil {
					b.Fatalf("PostgreSQL CPU of %s: %v", dataDir, err)
				}
				b.ReportMetric(float64(cpu-cpu0)/rows*1e6, "pg-µs/row")
			})
		}
	}
}
