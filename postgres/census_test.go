package postgres_test

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/lockergate/lockergate/fleet"
)

// TestCensus counts what the fleet-wide gauges show: enabled lockers, those
// online, online but silent, reconnecting often, and open stateful alerts.
func TestCensus(t *testing.T) {
	ctx := context.Background()
	db := MustOpen(t)
	now := time.Now()
	quiet, chatty, flapper, disabled := MustDevice(t, db, "s1", "Q", 1), MustDevice(t, db, "s1", "C", 1),
		MustDevice(t, db, "s1", "F", 1), MustDevice(t, db, "s1", "D", 1)
	MustDevice(t, db, "s1", "O", 1) // registered, never online
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(db.MarkOnline(ctx, quiet, now.Add(-time.Hour)))
	must(db.MarkOnline(ctx, chatty, now.Add(-time.Second)))
	for i := range fleet.FlappingConnects {
		at := now.Add(-time.Duration(fleet.FlappingConnects-i)*time.Minute + 30*time.Second)
		must(db.MarkOnline(ctx, flapper, at))
		if i < fleet.FlappingConnects-1 {
			must(markOffline(db, flapper, "keepalive", at.Add(time.Second)))
		}
	}
	must(db.MarkOnline(ctx, disabled, now))
	yes := true
	if _, err := db.UpdateLocker(ctx, disabled, &yes, nil); err != nil {
		t.Fatal(err)
	}
	for _, a := range []fleet.Alert{
		{DeviceID: chatty, Kind: fleet.AlertDoorAjar, Compartment: 1, RaisedAt: now},
		{DeviceID: quiet, Kind: fleet.AlertDoorAjar, Compartment: 1, RaisedAt: now},
		{DeviceID: quiet, Kind: fleet.AlertOnBattery, RaisedAt: now},
		{DeviceID: quiet, Kind: fleet.AlertTamper, RaisedAt: now},
	} {
		if _, err := db.RaiseAlert(ctx, a); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := db.ClearAlerts(ctx, chatty, fleet.AlertDoorAjar, nil, now); err != nil {
		t.Fatal(err)
	}

	c, err := db.Census(ctx, now.Add(-time.Minute), now.Add(-10*time.Minute), fleet.StatefulAlerts)
	if err != nil {
		t.Fatal(err)
	}
	// The disabled locker counts nowhere, though it is online.
	if c.Registered != 4 || c.Connected != 3 || c.Stale != 1 || c.Flapping != 1 {
		t.Fatalf("registered %d, connected %d, stale %d, flapping %d; want 4, 3, 1 (quiet), 1 (flapper)",
			c.Registered, c.Connected, c.Stale, c.Flapping)
	}
	if got, want := c.OpenAlerts, map[string]int{fleet.AlertDoorAjar: 1, fleet.AlertOnBattery: 1}; len(got) != len(want) ||
		got[fleet.AlertDoorAjar] != 1 || got[fleet.AlertOnBattery] != 1 {
		t.Fatalf("open alerts %v, want %v (tamper is not asked for, chatty's door_ajar cleared)", got, want)
	}
}

// TestCredsAckedIsTheLatest: a locker that acknowledges an older set after
// a newer one (it applied them in that order: two instances published
// them out of order) holds the older set, so it is behind and gets the
// current set again.
func TestCredsAckedIsTheLatest(t *testing.T) {
	ctx := context.Background()
	db := MustOpen(t)
	id := MustDevice(t, db, "s1", "ACK", 1)
	if err := db.MarkOnline(ctx, id, time.Now()); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Pool().Exec(ctx, `UPDATE devices SET creds_version = 6 WHERE id = $1`, id); err != nil {
		t.Fatal(err)
	}
	behind := func() bool {
		t.Helper()
		ls, err := db.CredsBehind(ctx, 100, nil)
		if err != nil {
			t.Fatal(err)
		}
		for _, l := range ls {
			if l.DeviceID == id {
				return true
			}
		}
		return false
	}
	// ack records one acknowledgement and reports whether it went back
	// (AckCredsMany's answer, which the fleet publishes the set again on).
	ack := func(v int64) (wentBack bool) {
		t.Helper()
		back, err := db.AckCredsMany(ctx, []fleet.CredsAck{{ID: id, Version: v}})
		if err != nil || len(back) > 1 || len(back) == 1 && back[0] != (fleet.CredsLag{DeviceID: id, Version: 6}) {
			t.Fatalf("ack %d: %v went back (%v)", v, back, err)
		}
		return len(back) == 1
	}
	acked := func() (v int64) {
		t.Helper()
		if err := db.Pool().QueryRow(ctx, `SELECT creds_acked FROM devices WHERE id = $1`, id).Scan(&v); err != nil {
			t.Fatal(err)
		}
		return v
	}
	if ack(6) || behind() {
		t.Fatalf("after ack 6: behind %v or went back, want current", behind())
	}
	if !ack(5) || !behind() {
		t.Fatalf("after ack 5 (an older set applied last): behind %v, want behind and gone back", behind())
	}
	if ack(5) {
		t.Fatal("ack 5 repeated (QoS 1) said it went back: it was 5 already")
	}
	// An ack ahead of the current set (7: never published) is answered as
	// such and not recorded: the locker stays where it was, behind.
	for _, v := range []int64{7, 1 << 40} {
		back, err := db.AckCredsMany(ctx, []fleet.CredsAck{{ID: id, Version: v}})
		if err != nil || len(back) != 1 || back[0] != (fleet.CredsLag{DeviceID: id, Version: 6, Ahead: v}) {
			t.Fatalf("ack %d of a set never published: answered %v (%v), want it ahead of 6", v, back, err)
		}
		if got := acked(); got != 5 || !behind() {
			t.Fatalf("after ack %d: creds_acked %d (want 5, not recorded), behind %v (want behind)", v, got, behind())
		}
	}
	if ack(6) {
		t.Fatal("an ack of the current set said the locker was left behind")
	}
	if !ack(4) {
		t.Fatal("ack 4 after 6 did not go back")
	}
	if ack(6) || behind() {
		t.Fatalf("ack of the current set: behind %v or went back, want current", behind())
	}
	if !ack(5) {
		t.Fatal("ack 5 after 6 did not go back")
	}
	// Left out when the caller gave up on it at its current version only.
	for _, c := range []struct {
		skip []fleet.CredsLag
		want bool
	}{{[]fleet.CredsLag{{DeviceID: id, Version: 6}}, false}, {[]fleet.CredsLag{{DeviceID: id, Version: 5}}, true}} {
		ls, err := db.CredsBehind(ctx, 100, c.skip)
		if err != nil {
			t.Fatal(err)
		}
		if got := slices.ContainsFunc(ls, func(l fleet.CredsLag) bool { return l.DeviceID == id }); got != c.want {
			t.Errorf("skipping %+v: listed %v, want %v", c.skip, got, c.want)
		}
	}
}
