package postgres_test

import (
	"context"
	"encoding/json"
	"fmt"
	"testing"
	"time"

	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/protocol"
)

// TestDoorStateFollowsLockersClock applies a locker's door events out of
// the locker's order, each batch in its own transaction as two gateway
// instances behind an external broker would: the compartment ends in the
// state of the locker's latest event by its own clock, and a reboot starts
// afresh, since the new boot's clock may be behind the old one's.
func TestDoorStateFollowsLockersClock(t *testing.T) {
	ctx := context.Background()
	db := MustOpen(t)
	id := MustDevice(t, db, "s1", "SN-DOORORDER", 2)
	t0 := time.Now().UTC().Truncate(time.Millisecond)
	seq := 0
	// ev is a door event of compartment 1 the locker stamped at ts;
	// occupied is for door_closed only.
	ev := func(typ string, ts time.Time, occupied bool) fleet.EventRecord {
		seq++
		e := protocol.Event{ID: fmt.Sprintf("e-%d", seq), TS: protocol.T(ts), Type: typ, Compartment: 1}
		if typ == protocol.EventDoorClosed {
			e.Occupied = &occupied
		}
		body, err := json.Marshal(e)
		if err != nil {
			t.Fatal(err)
		}
		return fleet.EventRecord{DeviceID: id, EventID: e.ID, ReceivedAt: time.Now(), TS: ts, Type: typ, Compartment: 1, Body: body}
	}
	insert := func(evs ...fleet.EventRecord) {
		t.Helper()
		fresh, err := db.InsertEvents(ctx, evs)
		if err != nil || len(fresh) != len(evs) {
			t.Fatalf("insert events: %d fresh of %d, %v", len(fresh), len(evs), err)
		}
	}
	want := func(door string, occupied bool) {
		t.Helper()
		l, err := db.GetLocker(ctx, id)
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
	birth := func(boot string) {
		t.Helper()
		if err := db.RecordBirth(ctx, id, &protocol.Presence{Online: true, BootID: boot}, time.Now(), false); err != nil {
			t.Fatal(err)
		}
	}
	birth("boot-1")

	// Staff load an order: opened at t0+1s, closed occupied at t0+2s. The
	// closing arrives first; the opening, later, changes nothing.
	insert(ev(protocol.EventDoorClosed, t0.Add(2*time.Second), true))
	insert(ev(protocol.EventDoorOpened, t0.Add(time.Second), false))
	want("closed", true)

	// Within one batch too, and whatever the events' order in it.
	insert(ev(protocol.EventDoorClosed, t0.Add(4*time.Second), false), ev(protocol.EventDoorOpened, t0.Add(3*time.Second), false))
	want("closed", false)

	// A closing from before all of these, delivered late (held in a
	// crashed instance's session), does not empty or fill the compartment.
	insert(ev(protocol.EventDoorClosed, t0.Add(500*time.Millisecond), true))
	want("closed", false)

	// Later events still apply, an ajar and a closing at the same
	// millisecond as the state's included (the later arrival wins, as before).
	insert(ev(protocol.EventDoorAjar, t0.Add(5*time.Second), false))
	want("ajar", false)
	insert(ev(protocol.EventDoorClosed, t0.Add(5*time.Second), true))
	want("closed", true)

	// The locker reboots with its clock an hour behind: its events apply
	// from the new boot's first one on, in the new clock's order.
	birth("boot-2")
	behind := t0.Add(-time.Hour)
	insert(ev(protocol.EventDoorOpened, behind, false))
	want("open", true)
	insert(ev(protocol.EventDoorClosed, behind.Add(2*time.Second), false))
	insert(ev(protocol.EventDoorOpened, behind.Add(time.Second), false))
	want("closed", false)

	// A locker whose births carry no boot id: each session start is taken
	// for a boot, the only time its clock can have been reset unseen.
	birth("")
	start := func() {
		t.Helper()
		if err := db.MarkOnlineMany(ctx, []fleet.SessionStart{{ID: id, At: time.Now()}}); err != nil {
			t.Fatal(err)
		}
	}
	start()
	further := behind.Add(-time.Hour)
	insert(ev(protocol.EventDoorOpened, further, false))
	want("open", false)
	insert(ev(protocol.EventDoorClosed, further.Add(-time.Second), true)) // older, same session
	want("open", false)
	start()
	insert(ev(protocol.EventDoorClosed, further.Add(-time.Minute), true))
	want("closed", true)
}
