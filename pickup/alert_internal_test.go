package pickup

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/protocol"
)

var errDown = errors.New("database down")

// notLiveStore answers a code use as not live (the code was revoked), and
// fails the reads and alerts of codeNotLive as scripted.
type notLiveStore struct {
	Store
	stateFails, raiseFails int // failures left
	onRaiseFail            func()
	raised                 []fleet.Alert
	audited                []fleet.AuditEntry
}

func (s *notLiveStore) UseCredential(context.Context, string, string, time.Time, []int) ([]Pickup, error) {
	return nil, fleet.ErrNotFound
}

func (s *notLiveStore) UseCredentialByDoor(context.Context, string, string, time.Time, time.Time, int) ([]Pickup, error) {
	return nil, fleet.ErrNotFound
}

func (s *notLiveStore) ReportDoorUse(context.Context, string, string, time.Time) (*DoorUse, error) {
	return nil, nil
}

func (s *notLiveStore) UseExpiredCredential(context.Context, string, string, time.Time, time.Time, []int) ([]Pickup, error) {
	return nil, fleet.ErrNotFound
}

func (s *notLiveStore) SpentFor(context.Context, string, string, time.Time) ([]int, error) {
	return nil, nil
}

func (s *notLiveStore) CredentialState(context.Context, string, string) (string, error) {
	if s.stateFails > 0 {
		s.stateFails--
		return "", errDown
	}
	return "revoked", nil
}

func (s *notLiveStore) RaiseAlert(_ context.Context, a fleet.Alert) (bool, error) {
	if s.raiseFails > 0 {
		s.raiseFails--
		if s.onRaiseFail != nil {
			s.onRaiseFail()
		}
		return false, errDown
	}
	for _, r := range s.raised {
		if r.Kind == a.Kind && r.Compartment == a.Compartment && r.RaisedAt.Equal(a.RaisedAt) {
			return false, nil // raised already: its audit entry too (postgres.RaiseAlert)
		}
	}
	s.raised = append(s.raised, a)
	if a.Audit != nil {
		s.audited = append(s.audited, *a.Audit)
	}
	return true, nil
}

type countingFleet struct {
	Fleet
	publishes int
}

func (f *countingFleet) PublishCreds(context.Context, string) error {
	f.publishes++
	return nil
}

func notLiveService(t *testing.T, st *notLiveStore, f *countingFleet) *Service {
	t.Helper()
	s, err := New(Options{Store: st, Fleet: f, MasterKey: bytes.Repeat([]byte{7}, 32), Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func codeAcceptedEvent(t *testing.T) fleet.EventRecord {
	t.Helper()
	at := time.Date(2026, 12, 4, 12, 0, 0, 0, time.UTC)
	body, err := json.Marshal(protocol.Event{ID: "e-1", TS: protocol.T(at), Type: protocol.EventCodeAccepted,
		Credential: "cr-1" + pinSuffix, Compartments: []int{3}})
	if err != nil {
		t.Fatal(err)
	}
	return fleet.EventRecord{DeviceID: "lk-1", EventID: "e-1", ReceivedAt: at, TS: at, Type: protocol.EventCodeAccepted, Body: body}
}

// TestAlertOutlastsDatabaseErrors: a step's alert (here code_not_live,
// with its audit entry) and the read it needs are tried again while the
// database fails, not lost after one failure, and the locker gets its set
// once the alert is in.
func TestAlertOutlastsDatabaseErrors(t *testing.T) {
	st, f := &notLiveStore{stateFails: 2, raiseFails: 2}, &countingFleet{}
	s := notLiveService(t, st, f)
	if n := s.DeviceEvents(context.Background(), []fleet.EventRecord{codeAcceptedEvent(t)}); n != 1 {
		t.Fatalf("applied %d events, want 1", n)
	}
	if len(st.raised) != 1 {
		t.Fatalf("%d alerts raised, want 1", len(st.raised))
	}
	a := st.raised[0]
	if a.Kind != AlertCodeNotLive || a.Compartment != 3 || !strings.Contains(a.Detail, "cr-1 (revoked") {
		t.Fatalf("alert %+v", a)
	}
	if f.publishes != 1 {
		t.Fatalf("%d publishes, want 1", f.publishes)
	}
	if len(st.audited) != 1 || st.audited[0].Action != "credential.use" || st.audited[0].Detail["state"] != "revoked" {
		t.Fatalf("audited %+v, want the use with the credential's state", st.audited)
	}
}

// TestNotLiveUseAuditedOnce: the use of a code not live, offered again
// (an outbox replay), is audited once: with its alert, which the replay
// does not raise again.
func TestNotLiveUseAuditedOnce(t *testing.T) {
	st, f := &notLiveStore{}, &countingFleet{}
	s := notLiveService(t, st, f)
	ev := codeAcceptedEvent(t)
	for i := range 2 {
		if n := s.DeviceEvents(context.Background(), []fleet.EventRecord{ev}); n != 1 {
			t.Fatalf("offer %d: applied %d events, want 1", i+1, n)
		}
	}
	if len(st.raised) != 1 || len(st.audited) != 1 {
		t.Fatalf("%d alerts, %d audit entries after a replay; want 1 each", len(st.raised), len(st.audited))
	}
}

// TestStepWithoutItsAlertIsNotApplied: when the step stops (ctx ends)
// before its alert could be raised, its event does not count as applied,
// so it stays in the outbox and is offered again.
func TestStepWithoutItsAlertIsNotApplied(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	st, f := &notLiveStore{raiseFails: 1 << 30, onRaiseFail: cancel}, &countingFleet{}
	s := notLiveService(t, st, f)
	if n := s.DeviceEvents(ctx, []fleet.EventRecord{codeAcceptedEvent(t)}); n != 0 {
		t.Fatalf("applied %d events, want 0", n)
	}
	if len(st.raised) != 0 || f.publishes != 0 {
		t.Fatalf("%d alerts, %d publishes; want none", len(st.raised), f.publishes)
	}
}

// dueStore has four ready pickups past expires_at, three at lk-1 and one
// at lk-2, each with a credential; every transition succeeds.
type dueStore struct {
	Store
	due []Pickup
}

func (s *dueStore) DuePickups(context.Context, time.Time, int) ([]Pickup, error) { return s.due, nil }

func (s *dueStore) GetPickup(_ context.Context, id string) (*Pickup, error) {
	for _, p := range s.due {
		if p.ID == id {
			return &p, nil
		}
	}
	return nil, fleet.ErrNotFound
}

func (s *dueStore) Transition(_ context.Context, id string, _ []string, to, _, _ string, _ time.Time, _ *Event) (*Pickup, error) {
	p, err := s.GetPickup(context.Background(), id)
	if err == nil {
		p.State = to
	}
	return p, err
}

func (s *dueStore) RaiseAlert(context.Context, fleet.Alert) (bool, error) { return true, nil }

type publishCounter struct {
	Fleet
	by map[string]int
}

func (f *publishCounter) PublishCreds(_ context.Context, id string) error {
	f.by[id]++
	return nil
}

// TestExpirySweepPublishesOncePerLocker: a sweep that ends several pickups
// of one locker publishes its set once, after ending them (each publish
// waits up to 10 s on a broker that is down: one per pickup made a pass of
// 500 take very long).
func TestExpirySweepPublishesOncePerLocker(t *testing.T) {
	st := &dueStore{}
	for i, locker := range []string{"lk-1", "lk-1", "lk-2", "lk-1"} {
		st.due = append(st.due, Pickup{ID: "p-" + strconv.Itoa(i), Locker: locker, State: Ready, CredentialID: "k-" + strconv.Itoa(i)})
	}
	f := &publishCounter{by: map[string]int{}}
	s, err := New(Options{Store: st, Fleet: f, MasterKey: bytes.Repeat([]byte{7}, 32), Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	s.expire(context.Background())
	if f.by["lk-1"] != 1 || f.by["lk-2"] != 1 || len(f.by) != 2 {
		t.Fatalf("publishes by locker %v, want one each for lk-1 and lk-2", f.by)
	}
}

// TestAlertWakesWebhooks: an alert the workflow opened wakes the webhook
// dispatcher, as its transitions do.
func TestAlertWakesWebhooks(t *testing.T) {
	st, f := &notLiveStore{}, &countingFleet{}
	s := notLiveService(t, st, f)
	wakes := 0
	s.o.Wake = func() { wakes++ }
	if n := s.DeviceEvents(context.Background(), []fleet.EventRecord{codeAcceptedEvent(t)}); n != 1 || len(st.raised) != 1 {
		t.Fatalf("applied %d, raised %d; want 1, 1", n, len(st.raised))
	}
	if wakes != 1 {
		t.Fatalf("%d wakes, want 1", wakes)
	}
}

// TestExpiredAlertSaysWhatToDo: a pickup that expired ready has its order
// in the locker to retrieve; one that expired staging was never loaded.
func TestExpiredAlertSaysWhatToDo(t *testing.T) {
	done, ready := time.Date(2026, 12, 7, 3, 0, 0, 0, time.UTC), time.Date(2026, 12, 7, 2, 0, 0, 0, time.UTC)
	p := Pickup{ID: "p-1", OrderRef: "A-1", Locker: "lk-1", Compartment: 3, DoneAt: &done, ReadyAt: &ready}
	if a := ExpiredAlert(&p); !strings.Contains(a.Detail, "retrieve the order") || !a.RaisedAt.Equal(done) || a.Compartment != 3 {
		t.Fatalf("expired ready: %+v", a)
	}
	p.ReadyAt = nil
	if a := ExpiredAlert(&p); strings.Contains(a.Detail, "retrieve") || !strings.Contains(a.Detail, "before it was loaded") {
		t.Fatalf("expired staging: %+v", a)
	}
}
