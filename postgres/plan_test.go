package postgres_test

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/lockergate/lockergate/pickup"
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
	// The health writer sends its update unnamed, planned for its
	// parameters every time; the others are cached statements, which get
	// a generic plan after five runs.
	eachPlanMode(t, db, "devices", func(conn *pgx.Conn, mode string) { checkBatchPlans(t, conn, mode, lockers) })
}

// eachPlanMode analyzes table and calls check with one connection set to
// plan statements for their values (auto) and then as a cached statement's
// generic plan (force_generic_plan).
func eachPlanMode(t *testing.T, db *postgres.DB, table string, check func(conn *pgx.Conn, mode string)) {
	ctx := context.Background()
	if _, err := db.Pool().Exec(ctx, "ANALYZE "+table); err != nil {
		t.Fatal(err)
	}
	conn, err := db.Pool().Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Release()
	for _, mode := range []string{"auto", "force_generic_plan"} {
		if _, err := conn.Exec(ctx, "SET plan_cache_mode = "+mode); err != nil {
			t.Fatal(err)
		}
		check(conn.Conn(), mode)
	}
	if _, err := conn.Exec(ctx, "RESET plan_cache_mode"); err != nil {
		t.Fatal(err)
	}
}

func checkBatchPlans(t *testing.T, conn *pgx.Conn, mode string, lockers int) {
	ctx := context.Background()
	// One locker is a nested loop over the key even without the clause;
	// 300 is where the plan without it scanned the fleet. A generic plan
	// is the same whatever the values.
	sizes := []int{1, 300}
	if mode == "force_generic_plan" {
		sizes = []int{300}
	}
	for _, n := range sizes {
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
			{"recordBirthsSQL", postgres.RecordBirthsSQL, []any{ids, texts, texts, texts, ats, nums, flags, ats}},
			{"ackCredsManySQL", postgres.AckCredsManySQL, []any{ids, nums}},
			{"touchLockersSQL", postgres.TouchLockersSQL, []any{ids, ats}},
		} {
			q, args := "EXPLAIN (COSTS OFF) "+s.sql, s.args
			if mode == "force_generic_plan" {
				// EXPLAIN plans its statement for the parameters given;
				// a prepared statement's EXECUTE takes the plan the cache
				// would.
				if _, err := conn.Exec(ctx, "PREPARE batch AS "+s.sql); err != nil {
					t.Fatalf("%s: %v", s.name, err)
				}
				q, args = "EXPLAIN (COSTS OFF) EXECUTE batch("+strings.Repeat("NULL, ", len(s.args)-1)+"NULL)", nil
			}
			rows, err := conn.Query(ctx, q, append([]any{pgx.QueryExecModeExec}, args...)...)
			if err != nil {
				t.Fatalf("%s: %v", s.name, err)
			}
			plan, err := pgx.CollectRows(rows, pgx.RowTo[string])
			if err != nil {
				t.Fatalf("%s: %v", s.name, err)
			}
			if mode == "force_generic_plan" {
				if _, err := conn.Exec(ctx, "DEALLOCATE batch"); err != nil {
					t.Fatal(err)
				}
			}
			for i, line := range plan {
				plan[i], _, _ = strings.Cut(line, "'{") // without the arrays
			}
			if err := checkBatchPlan(plan); err != nil {
				t.Errorf("%s, %d lockers, %s: %v:\n%s", s.name, n, mode, err, strings.Join(plan, "\n"))
			}
		}
	}
}

// checkBatchPlan checks the plan of a statement that updates a batch of
// lockers: every scan of devices has an index condition (not a sequential
// scan, nor a whole index), and the rows are locked (LockRows) as they
// come out of a sort by id or of an index scan of devices_pkey.
func checkBatchPlan(plan []string) error {
	locked := false
	for i, line := range plan {
		node := strings.TrimLeft(strings.TrimSpace(line), "->")
		node = strings.TrimSpace(node)
		sub := subtree(plan, i)
		switch {
		case strings.HasPrefix(node, "Seq Scan on devices"):
			return fmt.Errorf("a sequential scan of devices: keep d.id = ANY($1) in the statement")
		case strings.Contains(node, " on devices") && !strings.HasPrefix(node, "Update on") && !strings.Contains(sub, "Index Cond:"):
			return fmt.Errorf("%q has no index condition: keep d.id = ANY($1) in the statement", node)
		case node == "LockRows":
			first := ""
			for _, l := range plan[i+1:] {
				if t := strings.TrimSpace(l); strings.HasPrefix(t, "->") {
					first = strings.TrimSpace(strings.TrimPrefix(t, "->"))
					break
				}
			}
			if !strings.Contains(sub, "Sort Key: devices.id") && !strings.HasPrefix(first, "Index Scan using devices_pkey on devices") {
				return fmt.Errorf("the rows are locked in no fixed order (lockDevicesCTE: ORDER BY id)")
			}
			locked = true
		}
	}
	if !locked {
		return fmt.Errorf("no LockRows: the rows are not locked in order first (lockDevicesCTE)")
	}
	return nil
}

// subtree returns plan line i with the lines below it indented further
// (its node's details and children), joined.
func subtree(plan []string, i int) string {
	indent := func(l string) int { return len(l) - len(strings.TrimLeft(l, " ")) }
	// A node's details are indented past its "->".
	base := indent(plan[i])
	out := []string{plan[i]}
	for _, l := range plan[i+1:] {
		if indent(l) <= base {
			break
		}
		out = append(out, l)
	}
	return strings.Join(out, "\n")
}

// TestPickupListPlans: a platform's list of its pickups, with or without a
// state, and a store's, are index scans of their rows, not a scan of every
// pickup (the table keeps them all), planned for their values or as the
// generic plan a cached statement gets after five runs.
func TestPickupListPlans(t *testing.T) {
	ctx := context.Background()
	db := MustOpen(t)
	dev := MustDevice(t, db, "s1", "SN-PLAN", 1)
	if _, err := db.Pool().Exec(ctx, `INSERT INTO pickups (id, site, order_ref, platform, size, zone, device_id, compartment, state,
			expires_at, created_by, created_at)
		SELECT 'p-' || g, 's1', g::text, CASE WHEN g % 100 = 0 THEN 'small' ELSE 'big' END, 'M', 'ambient', $1, 1, 'picked_up',
			now(), 'x', now()
		FROM generate_series(1, 50000) g`, dev); err != nil {
		t.Fatal(err)
	}
	eachPlanMode(t, db, "pickups", func(conn *pgx.Conn, mode string) {
		for _, c := range []struct {
			f       pickup.Filter
			indexes []string // one of them, its condition on the filters' columns, and no sort
		}{
			{pickup.Filter{Platform: "small"}, []string{"pickups_platform"}},
			{pickup.Filter{Platform: "small", State: "expired"}, []string{"pickups_platform_state", "pickups_platform"}},
			{pickup.Filter{Site: "s1", State: "expired"}, []string{"pickups_site_state"}},
		} {
			sql, args := postgres.PickupListSQL(c.f)
			q := "EXPLAIN " + sql
			if mode == "force_generic_plan" {
				// As in TestBatchUpdatePlans: EXPLAIN plans for the
				// values given; a prepared statement's EXECUTE takes the
				// plan the cache would.
				if _, err := conn.Exec(ctx, "PREPARE list AS "+sql); err != nil {
					t.Fatal(err)
				}
				q, args = "EXPLAIN EXECUTE list("+strings.Repeat("NULL, ", len(args)-1)+"NULL)", nil
			}
			rows, err := conn.Query(ctx, q, append([]any{pgx.QueryExecModeExec}, args...)...)
			if err != nil {
				t.Fatal(err)
			}
			var plan strings.Builder
			for rows.Next() {
				var line string
				if err := rows.Scan(&line); err != nil {
					t.Fatal(err)
				}
				plan.WriteString(line + "\n")
			}
			if err := rows.Err(); err != nil {
				t.Fatal(err)
			}
			if mode == "force_generic_plan" {
				if _, err := conn.Exec(ctx, "DEALLOCATE list"); err != nil {
					t.Fatal(err)
				}
			}
			p := plan.String()
			uses := slices.ContainsFunc(c.indexes, func(index string) bool { return strings.Contains(p, "using "+index+" on ") })
			if !uses || strings.Contains(p, "Seq Scan") || strings.Contains(p, "pickups_pkey") || strings.Contains(p, "Sort") {
				t.Errorf("%s: the list by %+v does not use %v alone, unsorted:\n%s", mode, c.f, c.indexes, p)
			}
		}
	})
}
