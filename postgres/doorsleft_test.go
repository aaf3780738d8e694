package postgres_test

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/lockergate/lockergate/fleet"
)

// TestRaiseDoorsLeftOpen: a door_ajar is raised for each compartment
// whose door read open since before the bound, once; not for a door opened
// since, one closed, a compartment the board no longer has, one whose
// alert is open, or one whose alert a person cleared after the opening;
// one cleared before this opening is raised again.
func TestRaiseDoorsLeftOpen(t *testing.T) {
	ctx := context.Background()
	db := MustOpen(t)
	seedFleet(t, db, 1)
	now := time.Now().UTC().Truncate(time.Millisecond)
	old, young := now.Add(-10*time.Minute), now.Add(-10*time.Second)
	for _, c := range []struct {
		n       int
		door    string
		missing bool
		at      time.Time
	}{
		{1, "open", false, old},   // raised
		{2, "open", false, young}, // opened since the bound
		{3, "closed", false, old},
		{4, "open", true, old},  // gone from the board
		{5, "open", false, old}, // its alert open
		{6, "open", false, old}, // its alert cleared by hand after the opening
		{7, "open", false, old}, // its alert cleared before the opening: raised
	} {
		// updated_at moves with in_service too (a set_service after the
		// opening): the opening's arrival is door_at.
		if _, err := db.Pool().Exec(ctx, `INSERT INTO compartments (device_id, n, size, zone, door, missing, door_at, updated_at)
			VALUES ('lk-1', $1, 'M', 'ambient', $2, $3, $4, $5)`, c.n, c.door, c.missing, c.at, now); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := db.Pool().Exec(ctx, `INSERT INTO alerts (device_id, kind, compartment, detail, raised_at, cleared_at) VALUES
		('lk-1', 'door_ajar', 5, '', $1, NULL),
		('lk-1', 'door_ajar', 6, '', $2, $2),
		('lk-1', 'door_ajar', 7, '', $3, $3)`, old.Add(time.Minute), old.Add(time.Minute), old.Add(-time.Minute)); err != nil {
		t.Fatal(err)
	}
	raised, err := db.RaiseDoorsLeftOpen(ctx, now.Add(-time.Minute), now, 100)
	if err != nil {
		t.Fatal(err)
	}
	var got []int
	for _, a := range raised {
		if a.Kind != fleet.AlertDoorAjar || a.DeviceID != "lk-1" || !a.RaisedAt.Equal(now) || a.Detail == "" {
			t.Errorf("raised %+v", a)
		}
		got = append(got, a.Compartment)
	}
	if !slices.Equal(got, []int{1, 7}) {
		t.Fatalf("raised for compartments %v, want [1 7]", got)
	}
	if again, err := db.RaiseDoorsLeftOpen(ctx, now.Add(-time.Minute), now.Add(time.Second), 100); err != nil || len(again) != 0 {
		t.Fatalf("second check raised %+v (%v), want nothing: the alerts are open", again, err)
	}
}
