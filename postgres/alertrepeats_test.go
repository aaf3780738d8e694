package postgres_test

import (
	"context"
	"os"
	"testing"
	"time"

	"github.com/lockergate/lockergate/fleet"
)

// TestMigrationFoldsOpenTampers: migration 023, on a database from before
// it (several open tamper alerts of a locker's compartment), clears all but
// the newest with cleared_by "migration", and from then on a tamper raised
// while one is open adds to it.
func TestMigrationFoldsOpenTampers(t *testing.T) {
	ctx := context.Background()
	sql, err := os.ReadFile("migrations/023_alert_repeats.sql")
	if err != nil {
		t.Fatal(err)
	}
	db := MustOpen(t)
	id := MustDevice(t, db, "s1", "TMP", 2)
	exec := func(sql string, args ...any) {
		t.Helper()
		if _, err := db.Pool().Exec(ctx, sql, args...); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}
	// The index as migration 014 left it.
	exec(`DROP INDEX alerts_open`)
	exec(`CREATE UNIQUE INDEX alerts_open ON alerts (device_id, kind, coalesce(compartment, 0))
		WHERE cleared_at IS NULL AND kind IN ('door_ajar', 'on_battery', 'door_fault', 'clock_skew')`)
	exec(`INSERT INTO alerts (device_id, kind, detail) VALUES ($1, 'tamper', 'old'), ($1, 'tamper', 'new')`, id)
	exec(`INSERT INTO alerts (device_id, kind, compartment, detail) VALUES ($1, 'tamper', 2, 'other compartment')`, id)
	exec(string(sql))
	open := func() map[string]string {
		t.Helper()
		rows, err := db.Pool().Query(ctx, `SELECT detail, cleared_by FROM alerts WHERE device_id = $1 AND kind = 'tamper'`, id)
		if err != nil {
			t.Fatal(err)
		}
		defer rows.Close()
		out := map[string]string{}
		for rows.Next() {
			var detail, by string
			if err := rows.Scan(&detail, &by); err != nil {
				t.Fatal(err)
			}
			out[detail] = by
		}
		return out
	}
	if got := open(); len(got) != 3 || got["old"] != "migration" || got["new"] != "" || got["other compartment"] != "" {
		t.Fatalf("after the migration: %v, want old cleared by migration, the others open", got)
	}
	var folded int
	if err := db.Pool().QueryRow(ctx, `SELECT repeats FROM alerts WHERE device_id = $1 AND detail = 'new'`, id).Scan(&folded); err != nil || folded != 1 {
		t.Fatalf("the newest counts %d repeats (%v), want 1: the one folded into it", folded, err)
	}
	// The migrations after it that change the index, as a database goes on
	// to them.
	later, err := os.ReadFile("migrations/027_creds_not_applied.sql")
	if err != nil {
		t.Fatal(err)
	}
	exec(string(later))
	at := time.Now()
	if raised, err := db.RaiseAlert(ctx, fleet.Alert{DeviceID: id, Kind: fleet.AlertTamper, Detail: "again", RaisedAt: at}); err != nil || raised {
		t.Fatalf("a tamper while one is open: raised %t (%v), want added to the open one", raised, err)
	}
	var repeats int
	var detail string
	if err := db.Pool().QueryRow(ctx, `SELECT repeats, detail FROM alerts WHERE device_id = $1 AND kind = 'tamper' AND compartment IS NULL
		AND cleared_at IS NULL`, id).Scan(&repeats, &detail); err != nil || repeats != 2 || detail != "again" {
		t.Fatalf("the open tamper: repeats %d, detail %q (%v); want 2 (the folded one and this), again", repeats, detail, err)
	}
	// The same report again (a replay), or one older than the latest: not counted.
	for _, when := range []time.Time{at, at.Add(-time.Second)} {
		if raised, err := db.RaiseAlert(ctx, fleet.Alert{DeviceID: id, Kind: fleet.AlertTamper, Detail: "late", RaisedAt: when}); err != nil || raised {
			t.Fatalf("raised %t (%v)", raised, err)
		}
	}
	if err := db.Pool().QueryRow(ctx, `SELECT repeats, detail FROM alerts WHERE device_id = $1 AND kind = 'tamper' AND compartment IS NULL
		AND cleared_at IS NULL`, id).Scan(&repeats, &detail); err != nil || repeats != 2 || detail != "again" {
		t.Fatalf("after a replay and a late report: repeats %d, detail %q (%v); want 2, again", repeats, detail, err)
	}
	// Cleared by staff, the repeat's report replayed opens nothing.
	if _, err := db.Pool().Exec(ctx, `UPDATE alerts SET cleared_at = now() WHERE device_id = $1 AND kind = 'tamper'`, id); err != nil {
		t.Fatal(err)
	}
	if raised, err := db.RaiseAlert(ctx, fleet.Alert{DeviceID: id, Kind: fleet.AlertTamper, Detail: "again", RaisedAt: at}); err != nil || raised {
		t.Fatalf("a repeat's report replayed after the clear: raised %t (%v), want nothing", raised, err)
	}
}
