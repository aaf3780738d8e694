package fleet

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/lockergate/lockergate/internal/testtool"
	"github.com/lockergate/lockergate/protocol"
)

// alertStore records alert writes, and fails them while down; open is
// what OpenAlertCompartments answers.
type alertStore struct {
	*fakeStore
	down    bool
	calls   int
	raised  []int // compartments
	cleared [][]int
	open    map[string][]int
}

func (s *alertStore) OpenAlertCompartments(context.Context, string) (map[string][]int, error) {
	if s.down {
		return nil, errors.New("database down")
	}
	return s.open, nil
}

func (s *alertStore) RaiseAlert(_ context.Context, a Alert) (bool, error) {
	s.calls++
	if s.down {
		return false, errors.New("database down")
	}
	s.raised = append(s.raised, a.Compartment)
	return true, nil
}

func (s *alertStore) ClearAlerts(_ context.Context, _, _ string, keep []int, _ time.Time) (int, error) {
	s.calls++
	if s.down {
		return 0, errors.New("database down")
	}
	s.cleared = append(s.cleared, keep)
	return 1, nil
}

// TestDoorFaultsSyncedAfterADatabaseError: a door fault (or its recovery)
// whose alert could not be written is written at the locker's next report,
// though the report says the same; once written, a repeat costs nothing.
func TestDoorFaultsSyncedAfterADatabaseError(t *testing.T) {
	st := &alertStore{fakeStore: newFakeStore()}
	m, err := New(Options{Store: st, Bus: &fakeBus{}, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	ctx, at := context.Background(), time.Now()

	st.down = true
	m.syncDoorFaults(ctx, "lk-1", []int{2}, at) // door 2 fails: not written
	st.down = false
	m.syncDoorFaults(ctx, "lk-1", []int{2}, at)
	if !slices.Equal(st.raised, []int{2}) {
		t.Fatalf("raised %v after the database came back, want [2]", st.raised)
	}
	calls := st.calls
	m.syncDoorFaults(ctx, "lk-1", []int{2}, at)
	if st.calls != calls {
		t.Fatalf("%d writes for an unchanged report, want none", st.calls-calls)
	}

	st.down = true
	m.syncDoorFaults(ctx, "lk-1", nil, at) // door 2 recovers: not written
	st.down = false
	cleared := len(st.cleared)
	m.syncDoorFaults(ctx, "lk-1", nil, at)
	if len(st.cleared) != cleared+1 || len(st.cleared[cleared]) != 0 {
		t.Fatalf("clears %v after the database came back, want one clearing every door", st.cleared[cleared:])
	}
}

// TestDoorFaultsRaisedOnce: a change of a locker's fault list raises the
// doors newly listed only; one still listed is not raised again (its
// alert's repeats are not other doors' changes).
func TestDoorFaultsRaisedOnce(t *testing.T) {
	st := &alertStore{fakeStore: newFakeStore()}
	m, err := New(Options{Store: st, Bus: &fakeBus{}, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	ctx, at := context.Background(), time.Now()
	m.loadDoorFaults(ctx) // none open
	for _, faults := range [][]int{{1}, {1, 4}, {4}, {4, 1}} {
		m.syncDoorFaults(ctx, "lk-1", faults, at)
	}
	if !slices.Equal(st.raised, []int{1, 4, 1}) {
		t.Fatalf("raised %v, want 1, then 4, then 1 again after it had recovered", st.raised)
	}
	if got := fmt.Sprint(st.cleared); got != "[[1] [1 4] [4] [4 1]]" {
		t.Fatalf("cleared all but %s", got)
	}
}

// TestDoorFaultsRecoveredWhileDown: a door_fault alert open when the
// gateway starts is cleared by its locker's first report without the fault
// (the door recovered while the gateway was down); a locker with none open
// costs nothing for reporting none, nor does one still reporting its open
// faults. Without the open alerts read at start, nothing is cleared.
func TestDoorFaultsRecoveredWhileDown(t *testing.T) {
	for _, down := range []bool{false, true} {
		st := &alertStore{fakeStore: newFakeStore(), open: map[string][]int{"lk-1": {4}, "lk-2": {1, 3}}, down: down}
		m, err := New(Options{Store: st, Bus: &fakeBus{}, Logger: slog.New(slog.DiscardHandler)})
		if err != nil {
			t.Fatal(err)
		}
		ctx, at := context.Background(), time.Now()
		m.loadDoorFaults(ctx)
		st.down = false
		m.syncDoorFaults(ctx, "lk-1", nil, at)
		m.syncDoorFaults(ctx, "lk-2", []int{1, 3}, at)
		m.syncDoorFaults(ctx, "lk-3", nil, at)
		wantCleared, wantRaised := "[[]]", "[]"
		if down {
			// Not read: lk-1's alert stays, and lk-2's faults are written
			// again (no-ops at the store).
			wantCleared, wantRaised = "[[1 3]]", "[1 3]"
		}
		if got, raised := fmt.Sprint(st.cleared), fmt.Sprint(st.raised); got != wantCleared || raised != wantRaised {
			t.Fatalf("read at start failed %t: cleared %s, raised %s; want %s, %s", down, got, raised, wantCleared, wantRaised)
		}
	}
}

// TestEventAlert: what each event does to its locker's alerts, applied by
// the store with the event.
func TestEventAlert(t *testing.T) {
	at := time.Now()
	occupied := false
	for _, c := range []struct {
		ev        protocol.Event
		lockout   protocol.Lockout // DefaultLockout when zero
		raise     string
		counted   *RejectedCodes // the raise's condition
		clearKind string
		clearAt   int
	}{
		{ev: protocol.Event{Type: protocol.EventDoorAjar, Compartment: 3, OpenS: 90}, raise: AlertDoorAjar},
		{ev: protocol.Event{Type: protocol.EventDoorClosed, Compartment: 3, Occupied: &occupied}, clearKind: AlertDoorAjar, clearAt: 3},
		{ev: protocol.Event{Type: protocol.EventDoorClosed, Compartment: 1001, Occupied: &occupied}, clearKind: AlertDoorAjar, clearAt: 1001},
		{ev: protocol.Event{Type: protocol.EventTamper, Detail: "shock"}, raise: AlertTamper},
		{ev: protocol.Event{Type: protocol.EventPower, Source: protocol.PowerBattery}, raise: AlertOnBattery},
		{ev: protocol.Event{Type: protocol.EventPower, Source: protocol.PowerMains}, clearKind: AlertOnBattery},
		{ev: protocol.Event{Type: protocol.EventCodeRejected, Reason: protocol.RejectLockedOut}, raise: AlertCodeLockout},
		// Other rejections raise it when the locker's within the window
		// reach the policy's failures (the store counts them).
		{ev: protocol.Event{Type: protocol.EventCodeRejected, Reason: "unknown"}, raise: AlertCodeLockout,
			counted: &RejectedCodes{Window: 5 * time.Minute, Min: 5}},
		{ev: protocol.Event{Type: protocol.EventCodeRejected, Reason: "expired"}, lockout: protocol.Lockout{MaxFailures: 3, WindowS: 60},
			raise: AlertCodeLockout, counted: &RejectedCodes{Window: time.Minute, Min: 3}},
		{ev: protocol.Event{Type: protocol.EventDoorOpened, Compartment: 3}},
	} {
		lockout := c.lockout
		if lockout == (protocol.Lockout{}) {
			lockout = protocol.DefaultLockout
		}
		got := eventAlert("lk-1", at, &c.ev, lockout)
		if c.raise == "" && c.clearKind == "" {
			if got != nil {
				t.Errorf("%s %s: %+v, want nothing", c.ev.Type, c.ev.Reason, got)
			}
			continue
		}
		switch {
		case got == nil:
			t.Errorf("%s: nothing, want raise %q clear %q", c.ev.Type, c.raise, c.clearKind)
		case c.raise != "" && (got.Raise == nil || got.Raise.Kind != c.raise || got.Raise.DeviceID != "lk-1" ||
			got.Raise.Compartment != c.ev.Compartment || !got.Raise.RaisedAt.Equal(at)):
			t.Errorf("%s: raise %+v, want %s", c.ev.Type, got.Raise, c.raise)
		case c.raise == "" && got.Raise != nil:
			t.Errorf("%s: raise %+v, want none", c.ev.Type, got.Raise)
		case (got.IfRejected == nil) != (c.counted == nil) || c.counted != nil && *got.IfRejected != *c.counted:
			t.Errorf("%s %s: raised if %+v, want if %+v", c.ev.Type, c.ev.Reason, got.IfRejected, c.counted)
		case got.ClearKind != c.clearKind || got.ClearAt != c.clearAt:
			t.Errorf("%s: clear %q at %d, want %q at %d", c.ev.Type, got.ClearKind, got.ClearAt, c.clearKind, c.clearAt)
		}
	}
}

// refusingStore fails every InsertEvents batch that holds event "bad" as
// ErrInvalid, as PostgreSQL does a value it cannot store, and records the
// events it stores.
type refusingStore struct {
	*fakeStore
	stored []string
}

func (s *refusingStore) InsertEvents(_ context.Context, batch []EventRecord) ([]EventRecord, error) {
	for _, e := range batch {
		if e.EventID == "bad" {
			return nil, fmt.Errorf("%w: invalid byte sequence", ErrInvalid)
		}
	}
	for _, e := range batch {
		s.stored = append(s.stored, e.EventID)
	}
	return batch, nil
}

// TestEventTheStoreRefusesDropped: one event the store cannot take fails
// its batch every time; the others of the batch are stored one by one,
// it alone is dropped, and every message is acknowledged (before, the
// batch was retried for ever and every locker's events waited behind it).
func TestEventTheStoreRefusesDropped(t *testing.T) {
	st := &refusingStore{fakeStore: newFakeStore()}
	m, err := New(Options{Store: st, Bus: &fakeBus{}, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	acks := 0
	var batch []inbound
	for i, id := range []string{"e-1", "bad", "e-2"} {
		batch = append(batch, inbound{id: fmt.Sprintf("lk-%d", i), at: time.Now(), ack: func() { acks++ },
			payload: fmt.Appendf(nil, `{"id":%q,"ts":"2026-12-04T12:00:00Z","type":"reboot"}`, id)})
	}
	m.writeEvents(context.Background(), batch)
	if !slices.Equal(st.stored, []string{"e-1", "e-2"}) || acks != 3 {
		t.Fatalf("stored %v with %d acknowledgements, want [e-1 e-2] and 3", st.stored, acks)
	}
}

// retainedStore fails Retained fails times, then answers config version 1.
type retainedStore struct {
	*fakeStore
	fails, calls int
}

func (s *retainedStore) Retained(context.Context, string) (*Retained, error) {
	s.calls++
	if s.calls <= s.fails {
		return nil, errors.New("database down")
	}
	return &Retained{Config: protocol.Config{Version: 1}}, nil
}

// TestRetainedStateOutlastsDatabaseErrors: what a locker must hold after a
// (re)connect (creds, config, firmware job) is published once the store
// answers again, not given up after one failure; and the configuration
// goes out under the gateway's version when that is newer than the
// locker's (changed across a restart).
func TestRetainedStateOutlastsDatabaseErrors(t *testing.T) {
	st := &retainedStore{fakeStore: newFakeStore(), fails: 2}
	bus := &fakeBus{}
	var config []byte
	bus.answer = func(topic string, payload []byte) {
		if strings.HasSuffix(topic, "/config") {
			config = payload
		}
	}
	cfg := DefaultConfig
	cfg.Version = 7
	m, err := New(Options{Store: st, Bus: bus, Config: cfg, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	m.syncDevice(context.Background(), "lk-1")
	if st.calls != 3 || bus.count() != 3 {
		t.Fatalf("%d reads, %d publishes; want 3 reads (two failed) and creds, config, fw/job published", st.calls, bus.count())
	}
	c, err := protocol.Decode[protocol.Config](config)
	if err != nil || c.Version != 7 {
		t.Fatalf("config %s (%v), want version 7", config, err)
	}
}

// goneBus answers every publish as a closed broker does.
type goneBus struct {
	fakeBus
	calls int
}

func (b *goneBus) Publish(context.Context, string, []byte, byte, bool) error {
	b.calls++
	return fmt.Errorf("broker closed (%w)", ErrBusGone)
}

// TestPublishToClosedBusNotRetried: once the bus is closed for good
// (ErrBusGone), a locker's retained state is not retried (a stop waited
// out its drain timeout retrying such publishes, logging each at ERROR),
// and it says so at INFO.
func TestPublishToClosedBusNotRetried(t *testing.T) {
	st := &retainedStore{fakeStore: newFakeStore()}
	bus := &goneBus{}
	logs := &testtool.LockedBuffer{}
	m, err := New(Options{Store: st, Bus: bus, Logger: slog.New(slog.NewTextHandler(logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second) // retried: it ends there
	defer cancel()
	m.syncDevice(ctx, "lk-1")
	if bus.calls != 1 || st.calls != 1 {
		t.Fatalf("%d publishes, %d reads; want one of each", bus.calls, st.calls)
	}
	if out := logs.String(); strings.Contains(out, "level=ERROR") || !strings.Contains(out, "retained state not published: the broker has closed") {
		t.Fatalf("log:\n%s", out)
	}
}

// lagStore has lockers "a" and "b" behind on credential set 2 for ever,
// and a window of one: CredsBehind returns the first by id not skipped,
// as a full window of 500 lockers that never acknowledge would.
type lagStore struct {
	*fakeStore
	raised []Alert
}

func (s *lagStore) RaiseAlert(_ context.Context, a Alert) (bool, error) {
	s.raised = append(s.raised, a)
	return true, nil
}

func (s *lagStore) CredsBehind(_ context.Context, _ int, skip []CredsLag) ([]CredsLag, error) {
	for _, id := range []string{"a", "b"} {
		if !slices.Contains(skip, CredsLag{DeviceID: id, Version: 2}) {
			return []CredsLag{{DeviceID: id, Version: 2}}, nil
		}
	}
	return nil, nil
}

func (s *lagStore) Retained(context.Context, string) (*Retained, error) {
	return &Retained{Creds: protocol.CredSet{Version: 2}}, nil
}

// TestCredsReconcilerNotStarvedByLockersThatNeverAck: lockers the census
// gave up on (no ack after credsRepublishTries) no longer fill the window
// of lockers behind, so one after them still gets its set again.
func TestCredsReconcilerNotStarvedByLockersThatNeverAck(t *testing.T) {
	bus := &fakeBus{}
	st := &lagStore{fakeStore: newFakeStore()}
	m, err := New(Options{Store: st, Bus: bus, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	for range credsRepublishTries + 3 {
		m.reconcileCreds(context.Background())
	}
	// Given up on, a is an alert for staff: once, when the tries ran out.
	if len(st.raised) != 1 || st.raised[0].DeviceID != "a" || st.raised[0].Kind != AlertCredsNotApplied {
		t.Errorf("alerts raised %+v, want one creds_not_applied for a", st.raised)
	}
	bus.mu.Lock()
	defer bus.mu.Unlock()
	toA, toB := 0, 0
	for _, topic := range bus.published {
		switch topic {
		case protocol.Topic("a", protocol.ChanCreds):
			toA++
		case protocol.Topic("b", protocol.ChanCreds):
			toB++
		}
	}
	if toA != credsRepublishTries || toB == 0 {
		t.Fatalf("republished to a %d times, to b %d; want a %d times, then b", toA, toB, credsRepublishTries)
	}
}

// TestAlertWakesWebhooks: an alert opened wakes the webhook dispatcher (its
// alert.raised deliveries are queued with it); one not written does not.
func TestAlertWakesWebhooks(t *testing.T) {
	st := &alertStore{fakeStore: newFakeStore()}
	wakes := 0
	m, err := New(Options{Store: st, Bus: &fakeBus{}, Logger: slog.New(slog.DiscardHandler), AlertRaised: func() { wakes++ }})
	if err != nil {
		t.Fatal(err)
	}
	a := Alert{DeviceID: "lk-1", Kind: AlertTamper, RaisedAt: time.Now()}
	st.down = true
	m.alert(context.Background(), a)
	if wakes != 0 {
		t.Fatalf("%d wakes for an alert not written, want 0", wakes)
	}
	st.down = false
	m.alert(context.Background(), a)
	if wakes != 1 {
		t.Fatalf("%d wakes for an alert opened, want 1", wakes)
	}
}

// TestQueueDepthCountsHeldBatches: the queue depth counts what waits in a
// queue and what its writers hold unstored (a batch retried through a
// database outage), when scraped.
func TestQueueDepthCountsHeldBatches(t *testing.T) {
	reg := prometheus.NewRegistry()
	m, err := New(Options{Store: newFakeStore(), Bus: &fakeBus{}, Registerer: reg, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	depth := func(queue string) float64 {
		t.Helper()
		mfs, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		for _, mf := range mfs {
			if mf.GetName() != "lockergate_ingest_queue_depth" {
				continue
			}
			for _, mt := range mf.GetMetric() {
				if mt.GetLabel()[0].GetValue() == queue {
					return mt.GetGauge().GetValue()
				}
			}
		}
		t.Fatalf("no lockergate_ingest_queue_depth{queue=%q}", queue)
		return 0
	}
	for range 3 {
		m.events <- inbound{id: "lk-1", at: time.Now()}
	}
	m.held[slices.Index(metricQueues, "events")].Store(200) // a batch being retried
	if got := depth("events"); got != 203 {
		t.Fatalf("events depth %v, want 203 (3 queued, 200 held)", got)
	}
	if got := depth("health"); got != 0 {
		t.Fatalf("health depth %v, want 0", got)
	}
}

// stuckStore's sweep does not return until its context ends: a database
// that stopped answering (SIGSTOP, a network partition), not one that is
// down.
type stuckStore struct {
	*fakeStore
	entered chan struct{}
	once    sync.Once
}

func (s *stuckStore) ExpireCommands(ctx context.Context, _ time.Time, _ time.Duration) ([]Command, error) {
	s.once.Do(func() { close(s.entered) })
	<-ctx.Done()
	return nil, ctx.Err()
}

// TestDrainBoundedWhileASweepIsStuck: the drain's bound starts when Run's
// context ends, also while its loop is inside a database call that does
// not answer (it held a stop for as long as PostgreSQL was frozen).
func TestDrainBoundedWhileASweepIsStuck(t *testing.T) {
	st := &stuckStore{fakeStore: newFakeStore(), entered: make(chan struct{})}
	m, err := New(Options{Store: st, Bus: &fakeBus{}, SweepInterval: 5 * time.Millisecond, DrainTimeout: 50 * time.Millisecond,
		Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- m.Run(ctx) }()
	select {
	case <-st.entered:
	case <-time.After(10 * time.Second):
		t.Fatal("no sweep ran")
	}
	cancel()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return: the stuck sweep held the drain off")
	}
}

// doorsStore records RaiseDoorsLeftOpen calls and answers with raised, or
// fails while down.
type doorsStore struct {
	*fakeStore
	down   bool
	bounds []time.Time // openBefore of each call
	raised []Alert
}

func (s *doorsStore) RaiseDoorsLeftOpen(_ context.Context, openBefore, _ time.Time, _ int) ([]Alert, error) {
	s.bounds = append(s.bounds, openBefore)
	if s.down {
		return nil, errors.New("database down")
	}
	return s.raised, nil
}

// TestDoorsLeftOpenWaitsAfterStart: the gateway's own door_ajar check
// asks for doors open longer than door_ajar_s and its grace (door_ajar_s,
// at most 30 s), not in a run's first such span; what it raised is counted
// and logged, a failure counted as a database error.
func TestDoorsLeftOpenWaitsAfterStart(t *testing.T) {
	var logs strings.Builder
	st := &doorsStore{fakeStore: newFakeStore(), raised: []Alert{{DeviceID: "lk-1", Kind: AlertDoorAjar, Compartment: 3}}}
	cfg := DefaultConfig
	cfg.DoorAjarS = 60 // grace 30 s: 90 s in all
	m, err := New(Options{Store: st, Bus: &fakeBus{}, Config: cfg, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	t0 := time.Date(2026, 12, 7, 9, 0, 0, 0, time.UTC)
	m.started = t0
	m.doorsLeftOpen(context.Background(), t0.Add(89*time.Second))
	if len(st.bounds) != 0 {
		t.Fatalf("checked %d times within the first 90 s of the run", len(st.bounds))
	}
	now := t0.Add(91 * time.Second)
	m.doorsLeftOpen(context.Background(), now)
	if len(st.bounds) != 1 || !st.bounds[0].Equal(now.Add(-90*time.Second)) {
		t.Fatalf("bounds %v, want one, 90 s before the check", st.bounds)
	}
	var c dto.Metric
	if err := m.m.alerts.WithLabelValues(AlertDoorAjar).Write(&c); err != nil || c.GetCounter().GetValue() != 1 {
		t.Errorf("alerts_raised{door_ajar} = %v (%v), want 1", c.GetCounter().GetValue(), err)
	}
	if !strings.Contains(logs.String(), "kind=door_ajar compartment=3") {
		t.Errorf("the raised alert not logged:\n%s", logs.String())
	}
	st.down = true
	m.doorsLeftOpen(context.Background(), now.Add(15*time.Second))
	if err := m.m.dbErrors.WithLabelValues("doors_left_open").Write(&c); err != nil || c.GetCounter().GetValue() != 1 {
		t.Errorf("db_errors{doors_left_open} = %v (%v), want 1", c.GetCounter().GetValue(), err)
	}
}
