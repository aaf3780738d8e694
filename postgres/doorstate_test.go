package postgres_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/internal/testtool"
	"github.com/lockergate/lockergate/postgres"
	"github.com/lockergate/lockergate/protocol"
)

// openByClock opens a database as a gateway behind an external broker
// does (postgres.Options.DoorEventsByClock).
func openByClock(t *testing.T) *postgres.DB {
	t.Helper()
	return mustOpenWith(t, postgres.Options{DoorEventsByClock: true})
}

// doorEvents makes door events of compartment comp of locker id, the
// locker's clock reading t0+at, with their alert changes as the fleet
// manager makes them.
type doorEvents struct {
	t   *testing.T
	id  string
	t0  time.Time
	seq int
}

func (d *doorEvents) ev(typ string, comp int, at time.Duration, occupied bool) fleet.EventRecord {
	d.seq++
	received := time.Now().UTC().Truncate(time.Microsecond)
	e := protocol.Event{ID: fmt.Sprintf("e-%d", d.seq), TS: protocol.T(d.t0.Add(at)), Type: typ, Compartment: comp}
	var change *fleet.AlertChange
	switch typ {
	case protocol.EventDoorClosed:
		e.Occupied = &occupied
		change = &fleet.AlertChange{ClearKind: fleet.AlertDoorAjar, ClearAt: comp}
	case protocol.EventDoorAjar:
		change = &fleet.AlertChange{Raise: &fleet.Alert{DeviceID: d.id, Kind: fleet.AlertDoorAjar, Compartment: comp, RaisedAt: received}}
	}
	body, err := json.Marshal(e)
	if err != nil {
		d.t.Fatal(err)
	}
	return fleet.EventRecord{DeviceID: d.id, EventID: e.ID, ReceivedAt: received, TS: e.TS.Time, Type: typ,
		Compartment: comp, Body: body, Alert: change}
}

// insertEvents stores evs in one transaction, as one event batch of one
// gateway instance; each must be new.
func insertEvents(t *testing.T, db *postgres.DB, evs ...fleet.EventRecord) {
	t.Helper()
	if fresh, err := db.InsertEvents(context.Background(), evs); err != nil || len(fresh) != len(evs) {
		t.Fatalf("insert events: %d fresh of %d, %v", len(fresh), len(evs), err)
	}
}

// wantDoor fails unless compartment 1 of locker id is in that state and
// compartment 2 untouched.
func wantDoor(t *testing.T, db *postgres.DB, id, door string, occupied bool) {
	t.Helper()
	l, err := db.GetLocker(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	if c := l.Compartments[0]; c.Door != door || c.Occupied != occupied {
		t.Fatalf("compartment 1: door %q occupied %v, want %q %v", c.Door, c.Occupied, door, occupied)
	}
	if c := l.Compartments[1]; c.Door != "closed" || c.Occupied {
		t.Fatalf("compartment 2 changed: %+v", c)
	}
}

// TestDoorStateFollowsLockersClock applies a locker's door events out of
// the locker's order, each batch in its own transaction as two gateway
// instances behind an external broker would: the compartment ends in the
// state of the locker's latest event by its own clock, unless the clock
// was set back by more than DoorClockWindow.
func TestDoorStateFollowsLockersClock(t *testing.T) {
	db := openByClock(t)
	id := MustDevice(t, db, "s1", "SN-DOORORDER", 2)
	d := &doorEvents{t: t, id: id, t0: time.Now().UTC().Add(-time.Hour).Truncate(time.Millisecond)}
	const closed, opened, ajar = protocol.EventDoorClosed, protocol.EventDoorOpened, protocol.EventDoorAjar

	// Staff load an order: opened at t0+1s, closed occupied at t0+2s. The
	// closing arrives first; the opening, later, changes nothing.
	insertEvents(t, db, d.ev(closed, 1, 2*time.Second, true))
	insertEvents(t, db, d.ev(opened, 1, time.Second, false))
	wantDoor(t, db, id, "closed", true)

	// Within one batch too.
	insertEvents(t, db, d.ev(closed, 1, 4*time.Second, false), d.ev(opened, 1, 3*time.Second, false))
	wantDoor(t, db, id, "closed", false)

	// A closing from before all of these, delivered late (held in a
	// crashed instance's session), neither fills nor empties it.
	insertEvents(t, db, d.ev(closed, 1, 500*time.Millisecond, true))
	wantDoor(t, db, id, "closed", false)

	// Later events apply, one at the same millisecond as the state's
	// included (the later arrival wins, as before).
	insertEvents(t, db, d.ev(ajar, 1, 5*time.Second, false))
	wantDoor(t, db, id, "ajar", false)
	insertEvents(t, db, d.ev(closed, 1, 5*time.Second, true))
	wantDoor(t, db, id, "closed", true)

	// The locker's clock is set back by more than the window (a reboot
	// with its clock reset): its events apply, in the new clock's order.
	back := -postgres.DoorClockWindow - time.Minute
	insertEvents(t, db, d.ev(opened, 1, back, false))
	wantDoor(t, db, id, "open", true)
	insertEvents(t, db, d.ev(closed, 1, back+2*time.Second, false))
	insertEvents(t, db, d.ev(opened, 1, back+time.Second, false))
	wantDoor(t, db, id, "closed", false)

	// A clock that reads ahead of the gateway's, then is set back: the
	// state it set does not hold the corrected clock's events back, by
	// seconds (the clock_skew alert's bound is 30 s) or by hours.
	for i, ahead := range []time.Duration{20 * time.Second, 2 * time.Hour} {
		d.t0 = time.Now().UTC().Truncate(time.Millisecond)
		insertEvents(t, db, d.ev(opened, 1, ahead, false))
		wantDoor(t, db, id, "open", i == 1) // occupied as the last closing left it
		insertEvents(t, db, d.ev(closed, 1, 0, i == 0))
		wantDoor(t, db, id, "closed", i == 0)
	}

	// A replaced board's compartments start from no event: the new board's
	// clock, 5 minutes behind the old one's, is not held against it.
	replaceBoard(t, db, id, "SN-DOORORDER", 2)
	insertEvents(t, db, d.ev(opened, 1, -5*time.Minute, false))
	wantDoor(t, db, id, "open", false)
}

// replaceBoard provisions a new board of n compartments in place of locker
// id's (serial), as staff do after marking it replaceable.
func replaceBoard(t *testing.T, db *postgres.DB, id, serial string, n int) {
	t.Helper()
	if _, err := db.UpdateLocker(context.Background(), id, nil, new(true)); err != nil {
		t.Fatal(err)
	}
	req := &protocol.ProvisionRequest{Serial: serial, Model: "LX", FW: "1.1.0"}
	for i := 1; i <= n; i++ {
		req.Compartments = append(req.Compartments, protocol.CompartmentSpec{N: i, Size: "M", Zone: "ambient"})
	}
	mustReregister(t, db, id, req)
}

// TestDoorStateRacingInstances: two instances apply door events of one
// compartment at the same time. The one that waits for the other's row
// lock judges its event against the state the other committed, not the one
// it found before: an opening older than the other's closing changes
// nothing.
func TestDoorStateRacingInstances(t *testing.T) {
	ctx := context.Background()
	db := openByClock(t)
	id := MustDevice(t, db, "s1", "SN-DOORRACE", 2)
	d := &doorEvents{t: t, id: id, t0: time.Now().UTC().Add(-time.Hour).Truncate(time.Millisecond)}
	insertEvents(t, db, d.ev(protocol.EventDoorOpened, 1, time.Second, false))

	// The other instance: its closing (t0+3s) applied, not yet committed.
	other, err := db.Pool().Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Rollback(ctx)
	if _, err := other.Exec(ctx, `UPDATE compartments SET door = 'closed', occupied = true, door_ts = $2
		WHERE device_id = $1 AND n = 1`, id, d.t0.Add(3*time.Second)); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	late := d.ev(protocol.EventDoorOpened, 1, 2*time.Second, false)
	go func() {
		_, err := db.InsertEvents(ctx, []fleet.EventRecord{late})
		done <- err
	}()
	testtool.Eventually(t, 10*time.Second, "the opening waiting for the row lock", func() error {
		var n int
		if err := db.Pool().QueryRow(ctx, `SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
			WHERE l.locktype = 'transactionid' AND NOT l.granted AND a.datname = current_database()`).Scan(&n); err != nil {
			return err
		}
		if n == 0 {
			return errors.New("not waiting")
		}
		return nil
	})
	if err := other.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	wantDoor(t, db, id, "closed", true)
}

// TestDoorStateInArrivalOrder: with the embedded broker (no
// DoorEventsByClock) a locker's events arrive in its order, and the last
// one applied sets the state, whatever its clock says.
func TestDoorStateInArrivalOrder(t *testing.T) {
	db := MustOpen(t)
	id := MustDevice(t, db, "s1", "SN-DOORARRIVAL", 2)
	d := &doorEvents{t: t, id: id, t0: time.Now().UTC().Add(-time.Hour).Truncate(time.Millisecond)}
	insertEvents(t, db, d.ev(protocol.EventDoorClosed, 1, 2*time.Second, true))
	insertEvents(t, db, d.ev(protocol.EventDoorOpened, 1, time.Second, false))
	wantDoor(t, db, id, "open", true)
	insertEvents(t, db, d.ev(protocol.EventDoorClosed, 1, -time.Second, false))
	wantDoor(t, db, id, "closed", false)
}

// TestDoorEventUnreadableBodyLogged: a stored door event whose body does
// not read as an event (ingest validates bodies, so only a bug makes one)
// is stored and changes no state, and says so in the log.
func TestDoorEventUnreadableBodyLogged(t *testing.T) {
	var logs bytes.Buffer
	db := mustOpenWith(t, postgres.Options{Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	id := MustDevice(t, db, "s1", "SN-DOORBODY", 2)
	d := &doorEvents{t: t, id: id, t0: time.Now().UTC().Truncate(time.Millisecond)}
	bad := d.ev(protocol.EventDoorOpened, 1, 0, false)
	bad.Body = []byte(`{"id":"e-1","type":"door_opened","compartment":"1","ts":"2026-12-06T10:00:00.000Z"}`)
	insertEvents(t, db, bad)
	wantDoor(t, db, id, "closed", false)
	if got := logs.String(); !strings.Contains(got, "stored event no longer reads as an event") || !strings.Contains(got, "event=e-1") {
		t.Fatalf("no error naming the event in the log:\n%s", got)
	}
}

// TestDoorAjarAlertFollowsDoorState: with DoorEventsByClock a door-ajar
// alert is raised and cleared only by door events the compartment's state
// takes, so events applied out of the locker's order neither leave an
// alert open on a closed door nor clear the alert of a door left ajar.
func TestDoorAjarAlertFollowsDoorState(t *testing.T) {
	db := openByClock(t)
	id := MustDevice(t, db, "s1", "SN-AJARORDER", 2)
	d := &doorEvents{t: t, id: id, t0: time.Now().UTC().Add(-time.Hour).Truncate(time.Millisecond)}
	const closed, opened, ajar = protocol.EventDoorClosed, protocol.EventDoorOpened, protocol.EventDoorAjar
	wantOpen := func(want ...string) {
		t.Helper()
		if got := openAlerts(t, db, id); !slices.Equal(got, want) {
			t.Fatalf("open alerts %v, want %v", got, want)
		}
	}

	// Opened, left ajar, closed: applied backwards, one transaction each.
	insertEvents(t, db, d.ev(closed, 1, 3*time.Second, false))
	insertEvents(t, db, d.ev(ajar, 1, 2*time.Second, false))
	insertEvents(t, db, d.ev(opened, 1, time.Second, false))
	wantOpen()

	// Opened and left ajar again; a closing from before, delivered late,
	// does not clear the alert.
	insertEvents(t, db, d.ev(opened, 1, 4*time.Second, false), d.ev(ajar, 1, 5*time.Second, false))
	wantOpen("door_ajar/1")
	insertEvents(t, db, d.ev(closed, 1, 3500*time.Millisecond, false))
	wantOpen("door_ajar/1")

	// An ajar report for a compartment the gateway does not know is still
	// raised: there is no state for it to be stale against.
	insertEvents(t, db, d.ev(ajar, 9, 5*time.Second, false))
	wantOpen("door_ajar/1", "door_ajar/9")

	// The door's real closing clears its alert.
	insertEvents(t, db, d.ev(closed, 1, 6*time.Second, false))
	wantOpen("door_ajar/9")
}
