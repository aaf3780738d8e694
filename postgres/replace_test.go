package postgres_test

import (
	"context"
	"errors"
	"reflect"
	"slices"
	"testing"
	"time"

	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/pickup"
	"github.com/lockergate/lockergate/protocol"
	"github.com/lockergate/lockergate/provisioning"
)

// TestReplacementKeepsCompartments: a replaced board keeps what is known of
// the compartments it reports (an order inside, a door out of service), with
// its own size and zone, and their doors taken as closed; one it no longer
// reports goes, unless a live pickup is in it: that one stays, marked
// missing, nothing new is put there, and it goes when the pickup ends.
func TestReplacementKeepsCompartments(t *testing.T) {
	ctx := context.Background()
	e := newCredEnv(t, "SN-RC", 5) // online
	db, id, exec := e.db, e.id, e.exec
	exec(`UPDATE compartments SET occupied = true WHERE device_id = $1 AND n = 1`, id)
	exec(`UPDATE compartments SET in_service = false WHERE device_id = $1 AND n = 2`, id)
	exec(`UPDATE compartments SET door = 'ajar' WHERE device_id = $1 AND n = 3`, id)
	allocate := e.allocate
	exec(`UPDATE compartments SET door = 'closed' WHERE device_id = $1 AND n = 3`, id)
	for _, c := range []struct {
		ref  string
		want int
	}{{"A-3", 3}, {"A-4", 4}} { // in order: each takes the smallest free compartment
		if p, err := allocate(c.ref); err != nil || p.Compartment != c.want {
			t.Fatalf("pickup %s in compartment %d (%v), want %d", c.ref, p.Compartment, err, c.want)
		}
	}

	// The new board reports 1, 2, 3 (now L), and a new 6; not 4 (a live
	// pickup) or 5 (empty).
	replace := func(ns ...int) *provisioning.Registered {
		t.Helper()
		if _, err := db.UpdateLocker(ctx, id, nil, new(true)); err != nil {
			t.Fatal(err)
		}
		req := &protocol.ProvisionRequest{Serial: "SN-RC", Model: "LX", FW: "1.1.0"}
		for _, n := range ns {
			size := "M"
			if n == 3 {
				size = "L"
			}
			req.Compartments = append(req.Compartments, protocol.CompartmentSpec{N: n, Size: size, Zone: "ambient"})
		}
		return mustReregister(t, db, id, req)
	}
	exec(`UPDATE compartments SET door = 'open' WHERE device_id = $1 AND n IN (3, 4)`, id) // the old board's last report
	exec(`INSERT INTO alerts (device_id, kind, compartment, detail, raised_at) VALUES ($1, 'door_ajar', 3, '', now())`, id)
	if r := replace(1, 2, 3, 6); !slices.Equal(r.Missing, []int{4}) {
		t.Fatalf("missing compartments %v, want [4]", r.Missing)
	}
	// Its doors read closed: the old board's door_ajar ends with it.
	if n := countOf(t, db, `SELECT count(*) FROM alerts WHERE device_id = $1 AND kind = 'door_ajar' AND cleared_at IS NOT NULL
		AND cleared_by = 'gateway'`, id); n != 1 {
		t.Fatalf("%d door_ajar alerts cleared by the gateway at the replacement, want 1", n)
	}
	l, err := db.GetLocker(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	want := []fleet.Compartment{
		{N: 1, Size: "M", Zone: "ambient", InService: true, Occupied: true, Door: "closed"},
		{N: 2, Size: "M", Zone: "ambient", InService: false, Door: "closed"},
		{N: 3, Size: "L", Zone: "ambient", InService: true, Door: "closed", Pickup: new("p-A-3")},
		{N: 4, Size: "M", Zone: "ambient", InService: true, Door: "open", Pickup: new("p-A-4"), Missing: true},
		{N: 6, Size: "M", Zone: "ambient", InService: true, Door: "closed"},
	}
	if !reflect.DeepEqual(l.Compartments, want) {
		t.Fatalf("compartments after the replacement:\n got %+v\nwant %+v", l.Compartments, want)
	}
	var detail string
	if err := db.Pool().QueryRow(ctx, `SELECT detail->>'missing_compartments' FROM audit
		WHERE locker = $1 AND action = 'provision.replace'`, id).Scan(&detail); err != nil || detail != "[4]" {
		t.Fatalf("audit of the replacement: missing_compartments %q (%v), want [4]", detail, err)
	}

	occ, err := db.Occupancy(ctx)
	if err != nil || occ["s1"][0] != 4 {
		t.Fatalf("occupancy %v (%v): want 4 compartments at s1, the missing one not counted", occ, err)
	}
	// A command to the missing compartment is refused like one to none.
	cmd := &fleet.Command{ID: "c-miss", DeviceID: id, Type: "unlock", Compartment: 4, Status: fleet.CmdPending,
		Actor: "test", CreatedAt: time.Now(), ExpiresAt: time.Now().Add(time.Minute)}
	if target, _, err := db.CreateCommand(ctx, cmd, nil, ""); err != nil || target.HasCompartment {
		t.Fatalf("unlock of the missing compartment: %+v, %v; want no such compartment", target, err)
	}
	// Its pickup ends: the compartment goes, and new pickups go into 6.
	if _, err := db.Transition(ctx, "p-A-4", []string{"staging", "ready"}, "cancelled", "test", "", time.Now(), nil); err != nil {
		t.Fatal(err)
	}
	if l, err = db.GetLocker(ctx, id); err != nil || len(l.Compartments) != 4 || l.Compartments[3].N != 6 {
		t.Fatalf("compartments after the missing one's pickup ended: %+v (%v); want 1, 2, 3, 6", l.Compartments, err)
	}
	if p, err := allocate("B-1"); err != nil || p.Compartment != 6 {
		t.Fatalf("next pickup in compartment %d (%v), want 6", p.Compartment, err)
	}
	if _, err := allocate("B-2"); !errors.Is(err, pickup.ErrNoCompartment) {
		t.Fatalf("a pickup with no compartment free: %v, want ErrNoCompartment", err)
	}

	// A board that reports it again brings it back.
	if r := replace(1, 2, 3, 4, 6); len(r.Missing) != 0 {
		t.Fatalf("missing compartments %v, want none", r.Missing)
	}
	if l, err = db.GetLocker(ctx, id); err != nil || len(l.Compartments) != 5 || l.Compartments[3].Missing {
		t.Fatalf("compartments after the second replacement: %+v (%v)", l.Compartments, err)
	}
}
