package postgres_test

import (
	"context"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/lockergate/lockergate/postgres"
)

// The latest-health update of a batch must find its lockers through the
// primary key, not by scanning the whole fleet: with the join condition
// alone, PostgreSQL hashed all 10,000 devices rows for every batch of a
// few hundred lockers, a cost that grows with the fleet.
func TestUpdateLatestPlan(t *testing.T) {
	const lockers = 10000
	ctx := context.Background()
	db := MustOpen(t)
	seedFleet(t, db, lockers)
	// Every locker with its latest health, as in a running fleet: the
	// rows' width decides what a sequential scan costs.
	body, err := os.ReadFile("../protocol/testdata/health.json")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := db.Pool().Exec(ctx, `UPDATE devices SET health = $1::json, health_at = now()`, string(body)); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Pool().Exec(ctx, "ANALYZE devices"); err != nil {
		t.Fatal(err)
	}
	// One locker is a nested loop over the key even without the clause;
	// 300 is where the plan without it scanned the fleet.
	for _, n := range []int{1, 300} {
		ids, bodies, ats, seqs := make([]string, n), make([]string, n), make([]time.Time, n), make([]int64, n)
		for i := range n {
			ids[i], bodies[i], ats[i], seqs[i] = fmt.Sprintf("lk-%d", i*lockers/n+1), "{}", time.Now(), 1
		}
		// The unnamed statement, as the gateway sends it: planned for its
		// parameters every time (a cached statement would get a generic
		// plan after five runs).
		rows, err := db.Pool().Query(ctx, "EXPLAIN "+postgres.UpdateLatestSQL, pgx.QueryExecModeExec, ids, bodies, ats, seqs, seqs, seqs)
		if err != nil {
			t.Fatal(err)
		}
		plan, err := pgx.CollectRows(rows, pgx.RowTo[string])
		if err != nil {
			t.Fatal(err)
		}
		for i, line := range plan {
			plan[i], _, _ = strings.Cut(line, "(") // the node, without its costs and array
		}
		text := strings.Join(plan, "\n")
		if strings.Contains(text, "Seq Scan on devices") || !strings.Contains(text, "devices_pkey") {
			t.Errorf("%d lockers: the update does not find its lockers through devices_pkey (keep d.id = ANY($1) in updateLatestSQL):\n%s", n, text)
		}
	}
}
