package pickup

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/protocol"
)

// orderStore holds one ready pickup at lk-1, compartment 3, whose code cr-1
// the locker used; closing is its door's closing after that use, stored.
type orderStore struct {
	Store
	p                           Pickup
	closing                     fleet.EventRecord
	used                        bool
	reads, transitions, removed int
	withdrawn                   []fleet.Alert
	// closingsFails, withdrawFails, useExpiredFails and judgeFails:
	// failures left, as of a database that is down; onFail is called at
	// each.
	closingsFails, withdrawFails, useExpiredFails, judgeFails int
	onFail                                                    func()
	// lateUsed: the locker's time of a late-reported use of the expired
	// pickup's code (LateCollectionAt), until judged.
	lateUsed *time.Time
	judged   int
}

func (s *orderStore) fail(left *int) bool {
	if *left == 0 {
		return false
	}
	*left--
	if s.onFail != nil {
		s.onFail()
	}
	return true
}

func (s *orderStore) UseCredential(context.Context, string, string, time.Time, []int) ([]Pickup, error) {
	if s.p.State == Expired {
		return nil, fleet.ErrNotFound // no longer live
	}
	s.used = true
	return []Pickup{s.p}, nil
}

// UseCredentialByDoor: a door's opening spends the code as its
// code_accepted does (UseCredential).
func (s *orderStore) UseCredentialByDoor(ctx context.Context, deviceID, credID string, at, _ time.Time, _ int) ([]Pickup, error) {
	return s.UseCredential(ctx, deviceID, credID, at, nil)
}

func (s *orderStore) ReportDoorUse(context.Context, string, string, time.Time) (*DoorUse, error) {
	return nil, nil // the tests here send a code_accepted or a door's opening, not both
}

// UseExpiredCredential marks the expired pickup collected when its code
// was used before it expired.
func (s *orderStore) UseExpiredCredential(_ context.Context, _, _ string, used, _ time.Time, _ []int) ([]Pickup, error) {
	if s.fail(&s.useExpiredFails) {
		return nil, errDown
	}
	if s.p.State != Expired || s.p.DoneAt == nil || !used.Before(*s.p.DoneAt) {
		return nil, fleet.ErrNotFound
	}
	s.lateUsed = &used
	return []Pickup{s.p}, nil
}

func (s *orderStore) DoorClosingsAfter(_ context.Context, _ string, n int, _, after time.Time) ([]fleet.EventRecord, error) {
	if s.fail(&s.closingsFails) {
		return nil, errDown
	}
	if n != s.p.Compartment || s.closing.TS.Before(after) {
		return nil, nil
	}
	return []fleet.EventRecord{s.closing}, nil
}

func (s *orderStore) LivePickupAt(context.Context, string, int) (*Pickup, error) {
	s.reads++
	if s.p.State != Ready {
		return nil, fleet.ErrNotFound
	}
	p := s.p
	return &p, nil
}

func (s *orderStore) LateCollectionAt(_ context.Context, deviceID string, n int, at time.Time) (*Pickup, time.Time, error) {
	if s.lateUsed == nil || s.p.State != Expired || deviceID != s.p.Locker || n != s.p.Compartment || s.p.CreatedAt.After(at) {
		return nil, time.Time{}, fleet.ErrNotFound
	}
	p := s.p
	return &p, *s.lateUsed, nil
}

func (s *orderStore) LateCollectionOf(ctx context.Context, id string) (*Pickup, time.Time, error) {
	if id != s.p.ID {
		return nil, time.Time{}, fleet.ErrNotFound
	}
	return s.LateCollectionAt(ctx, s.p.Locker, s.p.Compartment, s.p.CreatedAt)
}

func (s *orderStore) JudgeLateCollection(context.Context, string) error {
	if s.fail(&s.judgeFails) {
		return errDown
	}
	s.judged++
	s.lateUsed = nil
	return nil
}

// SpentFor: the code was live for its pickup's compartment when spent.
func (s *orderStore) SpentFor(context.Context, string, string, time.Time) ([]int, error) {
	if s.used {
		return []int{s.p.Compartment}, nil
	}
	return nil, nil
}

func (s *orderStore) CredentialState(context.Context, string, string) (string, error) {
	if s.used {
		return "used", nil
	}
	return "active", nil
}

func (s *orderStore) Transition(_ context.Context, _ string, from []string, to, _, _ string, _ time.Time, _ *Event) (*Pickup, error) {
	if !slices.Contains(from, s.p.State) {
		return nil, fleet.ErrConflict
	}
	s.transitions++
	s.p.State = to
	p := s.p
	return &p, nil
}

func (s *orderStore) RaiseAlert(_ context.Context, a fleet.Alert) (bool, error) {
	if a.Kind == AlertRemoved {
		s.removed++
	}
	return true, nil
}

func (s *orderStore) WithdrawAlert(_ context.Context, a fleet.Alert, _, _ string, _ time.Time) (bool, error) {
	if s.fail(&s.withdrawFails) {
		return false, errDown
	}
	s.withdrawn = append(s.withdrawn, a)
	return true, nil
}

func newOrderStore(t *testing.T) (*orderStore, fleet.EventRecord) {
	t.Helper()
	used := codeAcceptedEvent(t)
	return &orderStore{
		p:       Pickup{ID: "p-1", Locker: "lk-1", Compartment: 3, State: Ready, CredentialID: "cr-1", CreatedAt: used.TS.Add(-time.Hour)},
		closing: closingEvent(t, "e-2", used.TS.Add(3*time.Second), false),
	}, used
}

// closingEvent is compartment 3's door closing at lk-1, at at by the
// locker's clock and received then.
func closingEvent(t *testing.T, id string, at time.Time, occupied bool) fleet.EventRecord {
	t.Helper()
	body, err := json.Marshal(protocol.Event{ID: id, TS: protocol.T(at), Type: protocol.EventDoorClosed, Compartment: 3, Occupied: &occupied})
	if err != nil {
		t.Fatal(err)
	}
	return fleet.EventRecord{DeviceID: "lk-1", EventID: id, ReceivedAt: at, TS: at, Type: protocol.EventDoorClosed, Compartment: 3, Body: body}
}

// TestClosingAppliedBeforeItsCode: a code use applied after the closing
// that followed it judges that closing again: the pickup is picked up and
// the pickup_removed alert the closing raised without the code withdrawn.
func TestClosingAppliedBeforeItsCode(t *testing.T) {
	st, used := newOrderStore(t)
	s := notLiveService(t, nil, &countingFleet{})
	s.o.Store = st
	if n := s.DeviceEvents(context.Background(), []fleet.EventRecord{st.closing}); n != 1 || st.removed != 1 || st.transitions != 0 {
		t.Fatalf("the closing alone: applied %d, %d pickup_removed, %d transitions; want 1, 1, 0", n, st.removed, st.transitions)
	}
	if n := s.DeviceEvents(context.Background(), []fleet.EventRecord{used}); n != 1 || st.transitions != 1 || st.p.State != PickedUp {
		t.Fatalf("the code after it: applied %d, %d transitions, state %s; want picked up", n, st.transitions, st.p.State)
	}
	if len(st.withdrawn) != 1 || st.withdrawn[0].Kind != AlertRemoved || !st.withdrawn[0].RaisedAt.Equal(st.closing.ReceivedAt) || st.withdrawn[0].Compartment != 3 {
		t.Fatalf("withdrawn %+v, want the closing's pickup_removed", st.withdrawn)
	}
}

// TestClosingAppliedBeforeItsDoorOpening: a locker that reports a code's
// use with the door's opening (no code_accepted) has it judge the closing
// that followed it, applied first, as a code_accepted does.
func TestClosingAppliedBeforeItsDoorOpening(t *testing.T) {
	st, used := newOrderStore(t)
	s := notLiveService(t, nil, &countingFleet{})
	s.o.Store = st
	body, err := json.Marshal(protocol.Event{ID: "e-1", TS: protocol.T(used.TS), Type: protocol.EventDoorOpened, Compartment: 3,
		By: protocol.ByCredential, Credential: "cr-1" + pinSuffix})
	if err != nil {
		t.Fatal(err)
	}
	opened := fleet.EventRecord{DeviceID: "lk-1", EventID: "e-1", ReceivedAt: used.ReceivedAt, TS: used.TS,
		Type: protocol.EventDoorOpened, Compartment: 3, Body: body}
	if n := s.DeviceEvents(context.Background(), []fleet.EventRecord{st.closing}); n != 1 || st.removed != 1 || st.transitions != 0 {
		t.Fatalf("the closing alone: applied %d, %d pickup_removed, %d transitions; want 1, 1, 0", n, st.removed, st.transitions)
	}
	if n := s.DeviceEvents(context.Background(), []fleet.EventRecord{opened}); n != 1 || !st.used || st.transitions != 1 || st.p.State != PickedUp {
		t.Fatalf("the opening after it: applied %d, code used %t, %d transitions, state %s; want picked up", n, st.used, st.transitions, st.p.State)
	}
	if len(st.withdrawn) != 1 || st.withdrawn[0].Kind != AlertRemoved {
		t.Fatalf("withdrawn %+v, want the closing's pickup_removed", st.withdrawn)
	}
}

// TestEventsWithEffectsWanted: the events DeviceEvents applies are wanted
// (a door opened by a code, not by a command or by hand):
// kept in the outbox until applied (offered again after a stop) and,
// behind an external broker, applied under the locker's effects lock.
func TestEventsWithEffectsWanted(t *testing.T) {
	var s Service
	for _, c := range []struct {
		e    protocol.Event
		want bool
	}{
		{protocol.Event{Type: protocol.EventCodeAccepted, Credential: "k-1.p"}, true},
		{protocol.Event{Type: protocol.EventDoorClosed, Compartment: 3}, true},
		{protocol.Event{Type: protocol.EventDoorOpened, Compartment: 3, By: protocol.ByCredential, Credential: "k-1.p"}, true},
		{protocol.Event{Type: protocol.EventDoorOpened, Compartment: 3, By: protocol.ByCommand, Command: "c-1"}, false},
		{protocol.Event{Type: protocol.EventDoorOpened, Compartment: 3, By: protocol.ByManual}, false},
		{protocol.Event{Type: protocol.EventDoorAjar, Compartment: 3}, false},
		{protocol.Event{Type: protocol.EventTamper}, false},
	} {
		if got := s.Wants(&c.e); got != c.want {
			t.Errorf("Wants(%+v) = %t, want %t", c.e, got, c.want)
		}
	}
}

// TestClosingAfterItsCodeInOneBatch: a closing that comes after the code in
// the same batch is applied in its turn, not judged a second time by the
// code's step.
func TestClosingAfterItsCodeInOneBatch(t *testing.T) {
	st, used := newOrderStore(t)
	s := notLiveService(t, nil, &countingFleet{})
	s.o.Store = st
	if n := s.DeviceEvents(context.Background(), []fleet.EventRecord{used, st.closing}); n != 2 {
		t.Fatalf("applied %d, want 2", n)
	}
	if st.reads != 1 || st.transitions != 1 || len(st.withdrawn) != 0 || st.removed != 0 {
		t.Fatalf("%d live-pickup reads, %d transitions, %d withdrawn, %d pickup_removed; want the closing judged once, no alert",
			st.reads, st.transitions, len(st.withdrawn), st.removed)
	}
}

// TestClosingJudgedAgainOutlastsDatabaseErrors: the reads and the
// withdrawal of judging a closing again are tried again while the database
// fails, and the code's event counts as applied only once they passed; a
// stop in the middle leaves it to be offered again.
func TestClosingJudgedAgainOutlastsDatabaseErrors(t *testing.T) {
	st, used := newOrderStore(t)
	s := notLiveService(t, nil, &countingFleet{})
	s.o.Store = st
	s.DeviceEvents(context.Background(), []fleet.EventRecord{st.closing}) // pickup_removed, without the code
	st.closingsFails, st.withdrawFails = 1, 1
	if n := s.DeviceEvents(context.Background(), []fleet.EventRecord{used}); n != 1 || st.p.State != PickedUp || len(st.withdrawn) != 1 {
		t.Fatalf("applied %d, state %s, %d withdrawn; want 1, picked up, 1", n, st.p.State, len(st.withdrawn))
	}

	st, used = newOrderStore(t)
	s.o.Store = st
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	st.closingsFails, st.onFail = 1<<30, cancel
	if n := s.DeviceEvents(ctx, []fleet.EventRecord{used}); n != 0 || st.transitions != 0 {
		t.Fatalf("stopped while the closings could not be read: applied %d, %d transitions; want 0, 0", n, st.transitions)
	}
}

// TestLateClosingJudgedOnce: the first closing after a late-reported use
// of an expired pickup's code decides, once: empty and within
// CollectGrace of the use, picked up; with the order inside, or past the
// grace (a door left open: the closing says nothing of who took what),
// the pickup stays expired, and that verdict is recorded so that no later
// closing is taken for its driver's.
func TestLateClosingJudgedOnce(t *testing.T) {
	for _, tc := range []struct {
		name     string
		after    time.Duration
		occupied bool
		want     string
	}{
		{"empty in time", 3 * time.Second, false, PickedUp},
		{"order inside", 3 * time.Second, true, Expired},
		{"past the grace", CollectGrace + time.Minute, false, Expired},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st, used := newOrderStore(t)
			expiry := used.TS.Add(-time.Second)
			st.p.State, st.p.DoneAt, st.lateUsed = Expired, &expiry, &used.TS
			st.closing = closingEvent(t, "e-2", used.TS.Add(tc.after), tc.occupied)
			s := notLiveService(t, nil, &countingFleet{})
			s.o.Store = st
			if n := s.DeviceEvents(context.Background(), []fleet.EventRecord{st.closing}); n != 1 {
				t.Fatalf("applied %d, want 1", n)
			}
			if judged := st.judged == 1; st.p.State != tc.want || judged != (tc.want == Expired) {
				t.Fatalf("state %s, judged %d times; want %s, judged once unless picked up", st.p.State, st.judged, tc.want)
			}
			// The pickup_expired alert (raised at the expiry) is withdrawn
			// exactly when the pickup is picked up.
			withdrawn := len(st.withdrawn) == 1 && st.withdrawn[0].Kind == fleet.AlertPickupExpired && st.withdrawn[0].RaisedAt.Equal(expiry)
			if withdrawn != (tc.want == PickedUp) || len(st.withdrawn) > 1 {
				t.Fatalf("withdrawn %+v", st.withdrawn)
			}
		})
	}
}

// TestLateClosingWithdrawsFirst: a late collection withdraws the
// pickup_expired alert before it ends the pickup, so a stop while the
// withdrawal fails leaves the pickup expired and its closing not applied;
// offered again, the closing finishes it.
func TestLateClosingWithdrawsFirst(t *testing.T) {
	st, used := newOrderStore(t)
	expiry := used.TS.Add(-time.Second)
	st.p.State, st.p.DoneAt, st.lateUsed = Expired, &expiry, &used.TS
	s := notLiveService(t, nil, &countingFleet{})
	s.o.Store = st
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	st.withdrawFails, st.onFail = 1<<30, cancel
	if n := s.DeviceEvents(ctx, []fleet.EventRecord{st.closing}); n != 0 || st.p.State != Expired || st.transitions != 0 {
		t.Fatalf("stopped while the alert could not be withdrawn: applied %d, state %s, %d transitions; want 0, expired, 0",
			n, st.p.State, st.transitions)
	}
	st.withdrawFails, st.onFail = 0, nil
	if n := s.DeviceEvents(context.Background(), []fleet.EventRecord{st.closing}); n != 1 || st.p.State != PickedUp || len(st.withdrawn) != 1 {
		t.Fatalf("offered again: applied %d, state %s, %d withdrawn; want 1, picked up, 1", n, st.p.State, len(st.withdrawn))
	}
}

// expiredBeforeItsUseArrived makes the store's pickup one that expired 5 s
// after its code's use (by the locker's clock) and returns that use as the
// locker reported it, 10 minutes later; the door's closing 3 s after the
// use arrived before it.
func expiredBeforeItsUseArrived(t *testing.T, occupied bool) (*orderStore, fleet.EventRecord) {
	t.Helper()
	st, used := newOrderStore(t)
	expiry := used.TS.Add(5 * time.Second)
	st.p.State, st.p.DoneAt = Expired, &expiry
	st.closing = closingEvent(t, "e-2", used.TS.Add(3*time.Second), occupied)
	st.closing.ReceivedAt = used.TS.Add(9 * time.Minute)
	used.ReceivedAt = used.TS.Add(10 * time.Minute)
	return st, used
}

// TestLateUseJudgesItsClosing: a code use reported after its pickup
// expired, whose door's closing was applied before it, judges that
// closing (usedBeforeExpiry's loop): closed empty, the pickup is picked
// up after all and its pickup_expired alert withdrawn. The store's marking
// of the use is tried again while the database fails; a stop meanwhile
// leaves the use to be offered again.
func TestLateUseJudgesItsClosing(t *testing.T) {
	st, used := expiredBeforeItsUseArrived(t, false)
	s := notLiveService(t, nil, &countingFleet{})
	s.o.Store = st
	if n := s.DeviceEvents(context.Background(), []fleet.EventRecord{st.closing}); n != 1 || st.p.State != Expired {
		t.Fatalf("the closing alone: applied %d, state %s; want 1, expired", n, st.p.State)
	}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	st.useExpiredFails, st.onFail = 1<<30, cancel
	if n := s.DeviceEvents(ctx, []fleet.EventRecord{used}); n != 0 || st.p.State != Expired || st.lateUsed != nil {
		t.Fatalf("stopped while the use could not be recorded: applied %d, state %s; want 0, expired", n, st.p.State)
	}

	st.useExpiredFails, st.onFail = 1, nil
	if n := s.DeviceEvents(context.Background(), []fleet.EventRecord{used}); n != 1 || st.p.State != PickedUp || st.transitions != 1 {
		t.Fatalf("offered again: applied %d, state %s, %d transitions; want 1, picked up, 1", n, st.p.State, st.transitions)
	}
	if len(st.withdrawn) != 1 || st.withdrawn[0].Kind != fleet.AlertPickupExpired {
		t.Fatalf("withdrawn %+v, want the pickup_expired alert", st.withdrawn)
	}
}

// TestLateClosingVerdictOutlastsDatabaseErrors: a late use's closing with
// the order inside records its verdict (JudgeLateCollection), tried again
// while the database fails; a stop meanwhile leaves the closing to be
// offered again, and it is judged then.
func TestLateClosingVerdictOutlastsDatabaseErrors(t *testing.T) {
	st, used := newOrderStore(t)
	expiry := used.TS.Add(-time.Second)
	st.p.State, st.p.DoneAt, st.lateUsed = Expired, &expiry, &used.TS
	st.closing = closingEvent(t, "e-2", used.TS.Add(3*time.Second), true)
	s := notLiveService(t, nil, &countingFleet{})
	s.o.Store = st

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	st.judgeFails, st.onFail = 1<<30, cancel
	if n := s.DeviceEvents(ctx, []fleet.EventRecord{st.closing}); n != 0 || st.judged != 0 {
		t.Fatalf("stopped while the verdict could not be recorded: applied %d, judged %d; want 0, 0", n, st.judged)
	}
	st.judgeFails, st.onFail = 1, nil
	if n := s.DeviceEvents(context.Background(), []fleet.EventRecord{st.closing}); n != 1 || st.judged != 1 || st.p.State != Expired {
		t.Fatalf("offered again: applied %d, judged %d, state %s; want 1, 1, expired", n, st.judged, st.p.State)
	}
	if len(st.withdrawn) != 0 {
		t.Fatalf("withdrawn %+v: the order was left inside", st.withdrawn)
	}
}

// jamStore is orderStore whose code the locker reports used with
// compartment 4 opened, not the pickup's 3 (its door jammed); its mints
// fail, ending the step's context, while failMint.
type jamStore struct {
	*orderStore
	failMint bool
	cancel   func()
	minted   int
	alerts   []fleet.Alert
}

func (s *jamStore) KeyGen(context.Context, string) (int, error) { return 1, nil }

func (s *jamStore) MintCredential(_ context.Context, c *Credential, ids []string, replaceUsed bool, _ func(*Pickup, *Credential) *Event) error {
	if s.failMint {
		s.cancel() // the database down until the step gives up
		return errDown
	}
	if !replaceUsed || !slices.Equal(ids, []string{s.p.ID}) {
		return fmt.Errorf("mint for %v (replaceUsed %t), want %s's fresh code replacing the used one", ids, replaceUsed, s.p.ID)
	}
	s.minted++
	return nil
}

func (s *jamStore) RaiseAlert(_ context.Context, a fleet.Alert) (bool, error) {
	s.alerts = append(s.alerts, a)
	return true, nil
}

// kinds lists the kinds of the alerts raised.
func (s *jamStore) kinds() []string {
	var out []string
	for _, a := range s.alerts {
		out = append(out, a.Kind)
	}
	return out
}

// usedWith is a code_accepted of credential cred (its PIN form) that
// opened compartment 4 alone, at at.
func usedWith(t *testing.T, cred string, at time.Time) fleet.EventRecord {
	t.Helper()
	body, err := json.Marshal(protocol.Event{ID: "e-1", TS: protocol.T(at), Type: protocol.EventCodeAccepted,
		Credential: cred + pinSuffix, Compartments: []int{4}})
	if err != nil {
		t.Fatal(err)
	}
	return fleet.EventRecord{DeviceID: "lk-1", EventID: "e-1", ReceivedAt: at, TS: at, Type: protocol.EventCodeAccepted, Body: body}
}

// TestNotOpenedAlertsBeforeItsFreshCode: a code used without opening a
// ready pickup's compartment raises pickup_not_opened before the pickup's
// fresh code is minted, so a step cut short in between (the mint failing
// until the step ends, a crash) still told staff; the event is left
// unapplied, and offered again it mints, raising the same alert (same
// key: one alert in the store).
func TestNotOpenedAlertsBeforeItsFreshCode(t *testing.T) {
	st, _ := newOrderStore(t)
	st.closing = closingEvent(t, "e-2", st.p.CreatedAt.Add(-time.Hour), false) // none after the use
	js := &jamStore{orderStore: st, failMint: true}
	s := notLiveService(t, nil, &countingFleet{})
	s.o.Store = js
	used := usedWith(t, "cr-1", time.Date(2026, 12, 4, 12, 0, 0, 0, time.UTC))
	ctx, cancel := context.WithCancel(context.Background())
	js.cancel = cancel
	if n := s.DeviceEvents(ctx, []fleet.EventRecord{used}); n != 0 || js.minted != 0 || !slices.Equal(js.kinds(), []string{AlertNotOpened}) {
		t.Fatalf("mint failing: applied %d, minted %d, alerts %v; want 0, 0, [%s]", n, js.minted, js.kinds(), AlertNotOpened)
	}
	js.failMint = false
	// Compartment 4, which the code was not live for, is code_not_live.
	if n := s.DeviceEvents(context.Background(), []fleet.EventRecord{used}); n != 1 || js.minted != 1 ||
		!slices.Equal(js.kinds(), []string{AlertNotOpened, AlertNotOpened, AlertCodeNotLive}) || js.alerts[2].Compartment != 4 {
		t.Fatalf("offered again: applied %d, minted %d, alerts %+v; want 1, 1, the alert again and code_not_live at 4", n, js.minted, js.alerts)
	}
	if a, b := js.alerts[0], js.alerts[1]; a.Kind != b.Kind || a.Compartment != b.Compartment || !a.RaisedAt.Equal(b.RaisedAt) || a.Compartment != 3 {
		t.Fatalf("alerts %+v and %+v: want one key (compartment 3, the use's arrival), so the store keeps one", a, b)
	}
	if st.p.State != Ready {
		t.Fatalf("pickup %s, want ready", st.p.State)
	}
}

// TestNothingOpenedCollectsNothing: a code_accepted with an empty list of
// compartments opened none, so an expired pickup of its code is not taken
// as collected before its expiry (as a use that leaves the list out
// would be); staff are told of the use of a code no longer live.
func TestNothingOpenedCollectsNothing(t *testing.T) {
	for _, opened := range [][]int{{}, nil} {
		st, _ := newOrderStore(t)
		at := time.Date(2026, 12, 4, 12, 0, 0, 0, time.UTC)
		done := at.Add(time.Minute) // expired after the use
		st.p.State, st.p.DoneAt = Expired, &done
		js := &jamStore{orderStore: st}
		s := notLiveService(t, nil, &countingFleet{})
		s.o.Store = js
		body, err := json.Marshal(map[string]any{"id": "e-1", "ts": protocol.T(at), "type": protocol.EventCodeAccepted,
			"credential": "cr-1" + pinSuffix, "compartments": opened})
		if err != nil {
			t.Fatal(err)
		}
		if opened == nil { // left out
			body, _ = json.Marshal(protocol.Event{ID: "e-1", TS: protocol.T(at), Type: protocol.EventCodeAccepted, Credential: "cr-1" + pinSuffix})
		}
		used := fleet.EventRecord{DeviceID: "lk-1", EventID: "e-1", ReceivedAt: at.Add(2 * time.Minute), TS: at, Type: protocol.EventCodeAccepted, Body: body}
		if n := s.DeviceEvents(context.Background(), []fleet.EventRecord{used}); n != 1 {
			t.Fatalf("%s: applied %d, want 1", body, n)
		}
		if collected := st.lateUsed != nil; collected != (opened == nil) {
			t.Fatalf("%s: taken as collected before expiry: %t, want %t", body, collected, opened == nil)
		}
		if notLive := slices.Contains(js.kinds(), AlertCodeNotLive); notLive != (opened != nil) {
			t.Fatalf("%s: alerts %v, want code_not_live %t", body, js.kinds(), opened != nil)
		}
	}
}

// lateStore answers WithdrawStagingFailed: failing (ending the step's
// context) while fail, else withdrawn.
type lateStore struct {
	Store
	fail   bool
	cancel func()
	calls  []string
}

func (s *lateStore) WithdrawStagingFailed(_ context.Context, _ string, _ int, command, _ string, _ time.Time) (bool, error) {
	s.calls = append(s.calls, command)
	if s.fail {
		s.cancel()
		return false, errDown
	}
	return true, nil
}

// TestStagingOpenedLate: a staging unlock answered ok late withdraws its
// staging_failed alert (by the command); an ok on time, or another
// command's late ok, asks nothing; a withdrawal the database fails is
// logged.
func TestStagingOpenedLate(t *testing.T) {
	var logs strings.Builder
	st := &lateStore{}
	s, err := New(Options{Store: st, Fleet: &countingFleet{}, MasterKey: make([]byte, 32), Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	staging := func(id string, late bool) *fleet.Command {
		return &fleet.Command{ID: id, DeviceID: "lk-1", Type: protocol.CmdUnlock, Reason: protocol.ReasonStaging, Compartment: 3,
			Status: fleet.CmdOK, LateAnswer: late}
	}
	s.StagingUnlockEnded(context.Background(), staging("c-on-time", false))
	remote := staging("c-remote", true)
	remote.Reason = protocol.ReasonRemote
	s.StagingUnlockEnded(context.Background(), remote)
	s.StagingUnlockEnded(context.Background(), staging("c-late", true))
	if !slices.Equal(st.calls, []string{"c-late"}) {
		t.Fatalf("withdrawals asked for %v, want the late staging unlock's only", st.calls)
	}
	ctx, cancel := context.WithCancel(context.Background())
	st.fail, st.cancel = true, cancel
	s.StagingUnlockEnded(ctx, staging("c-late-2", true))
	if !strings.Contains(logs.String(), "was not withdrawn") || !strings.Contains(logs.String(), "command=c-late-2") {
		t.Fatalf("a failed withdrawal not logged:\n%s", logs.String())
	}
}
