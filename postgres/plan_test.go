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

// Every statement that updates a batch of lockers' rows must find them
// through the primary key, not by scanning the whole fleet: with the join
// condition alone, PostgreSQL hashed all 10,000 devices rows for every
// batch of a few hundred lockers, a cost that grows with the fleet. And
// each must lock its rows in id order first (lockDevicesCTE; the
// behaviour is TestBatchUpdatesDoNotDeadlock's).
func TestBatchUpdatePlans(t *testing.T) {
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
	conn, err := db.Pool().Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Release()
	// The health writer sends its update unnamed, planned for its
	// parameters every time; the others are cached statements, which get
	// a generic plan after five runs.
	for _, mode := range []string{"auto", "force_generic_plan"} {
		if _, err := conn.Exec(ctx, "SET plan_cache_mode = "+mode); err != nil {
			t.Fatal(err)
		}
		checkBatchPlans(t, conn.Conn(), mode, lockers)
	}
}

func checkBatchPlans(t *testing.T, conn *pgx.Conn, mode string, lockers int) {
	ctx := context.Background()
	// One locker is a nested loop over the key even without the clause;
	// 300 is where the plan without it scanned the fleet.
	for _, n := range []int{1, 300} {
		ids, texts, ats, nums, flags := make([]string, n), make([]string, n), make([]time.Time, n), make([]int64, n), make([]bool, n)
		for i := range n {
			ids[i], texts[i], ats[i], nums[i] = fmt.Sprintf("lk-%d", i*lockers/n+1), "{}", time.Now(), 1
		}
		for _, s := range []struct {
			name, sql string
			args      []any
		}{
			{"updateLatestSQL", postgres.UpdateLatestSQL, []any{ids, texts, ats, nums, nums, nums}},
			{"markOnlineManySQL", postgres.MarkOnlineManySQL, []any{ids, ats}},
			{"markOfflineManySQL", postgres.MarkOfflineManySQL, []any{ids, texts, ats}},
			{"recordBirthsSQL", postgres.RecordBirthsSQL, []any{ids, texts, texts, texts, ats, nums, flags}},
			{"ackCredsManySQL", postgres.AckCredsManySQL, []any{ids, nums}},
		} {
			q := "EXPLAIN " + s.sql
			if mode == "force_generic_plan" {
				// EXPLAIN plans its statement for the parameters given;
				// a prepared statement's EXECUTE takes the plan the cache
				// would.
				if _, err := conn.Exec(ctx, "DEALLOCATE ALL"); err != nil {
					t.Fatal(err)
				}
				if _, err := conn.Exec(ctx, "PREPARE batch AS "+s.sql); err != nil {
					t.Fatalf("%s: %v", s.name, err)
				}
				// A generic plan is the same whatever the values.
				q = "EXPLAIN EXECUTE batch(" + strings.Repeat("NULL, ", len(s.args)-1) + "NULL)"
			}
			args := s.args
			if mode == "force_generic_plan" {
				args = nil
			}
			rows, err := conn.Query(ctx, q, append([]any{pgx.QueryExecModeExec}, args...)...)
			if err != nil {
				t.Fatalf("%s: %v", s.name, err)
			}
			plan, err := pgx.CollectRows(rows, pgx.RowTo[string])
			if err != nil {
				t.Fatalf("%s: %v", s.name, err)
			}
			for i, line := range plan {
				plan[i], _, _ = strings.Cut(line, "(") // the node, without its costs and array
			}
			text := strings.Join(plan, "\n")
			if strings.Contains(text, "Seq Scan on devices") || !strings.Contains(text, "devices_pkey") {
				t.Errorf("%s, %d lockers, %s: the update does not find its lockers through devices_pkey (keep d.id = ANY($1) in it):\n%s", s.name, n, mode, text)
			}
			if !strings.Contains(text, "LockRows") {
				t.Errorf("%s, %d lockers, %s: no LockRows: the rows are not locked in order first (lockDevicesCTE):\n%s", s.name, n, mode, text)
			}
		}
	}
}
