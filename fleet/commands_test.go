package fleet

// Unit tests of the command waiters' logic against in-memory fakes. The
// same paths run end to end over MQTT and PostgreSQL in gateway/
// (TestWalkingSkeleton, TestCommandWaitsForReconnect,
// TestGatewayRestartMidCommand).

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"

	"github.com/lockergate/lockergate/protocol"
)

// fakeStore keeps commands in memory. The embedded Store is nil: a method a
// test does not expect panics.
type fakeStore struct {
	Store
	mu      sync.Mutex
	lockers map[string]Locker
	cmds    map[string]Command
	audits  []AuditEntry
	applied []string // locker/event ids recorded by EffectsApplied
	gets    int
	locked  map[string]bool // effects locks held (LockEffects)
	locks   int             // LockEffects calls
	lockErr error           // LockEffects' answer when set
	lockFor time.Duration   // how long a lock is sure (default an hour)
	lockOut bool            // LockEffects waits for its ctx (another holder)
	// unanswered are the ids of cmds UnansweredCommands returns while
	// they are not final (the store's choice of online lockers and ages).
	unanswered []string
	// skipped is the skip list of the last UnansweredCommands.
	skipped []string
	pending []EventRecord // PendingEffects' answer
	// committed, when set, is called by CompleteCommand once its change is
	// stored, before it returns: the store's notification of the change
	// arriving before the answer.
	committed  func(id string)
	pendingAsk []pendingAsk // PendingEffects' calls
}

func (f *fakeStore) LockEffects(ctx context.Context, deviceID string) (time.Time, func(), error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.lockOut {
		f.mu.Unlock()
		<-ctx.Done()
		f.mu.Lock()
		return time.Time{}, nil, ctx.Err()
	}
	if f.lockErr != nil {
		return time.Time{}, nil, f.lockErr
	}
	if f.locked == nil {
		f.locked = map[string]bool{}
	}
	f.locks++
	f.locked[deviceID] = true
	until := time.Now().Add(time.Hour)
	if f.lockFor != 0 {
		until = time.Now().Add(f.lockFor)
	}
	return until, func() {
		f.mu.Lock()
		defer f.mu.Unlock()
		delete(f.locked, deviceID)
	}, nil
}

// TouchLockers: the fleet's last_seen flush, not recorded here.
func (s *fakeStore) TouchLockers(context.Context, []string, []time.Time) error { return nil }

// The calls of Run's loop that tests do not look at (a test that does
// overrides them).

func (f *fakeStore) Census(context.Context, time.Time, time.Time, []string) (*Census, error) {
	return &Census{}, nil
}

func (f *fakeStore) OpenAlertCompartments(context.Context, string) (map[string][]int, error) {
	return nil, nil
}

func (f *fakeStore) WatchCommands(ctx context.Context, _ func(string)) error {
	<-ctx.Done()
	return nil
}

// RaiseDoorsLeftOpen implements Store: no door is ever left open here.
func (s *fakeStore) RaiseDoorsLeftOpen(context.Context, time.Time, time.Time, int) ([]Alert, error) {
	return nil, nil
}

func newFakeStore() *fakeStore {
	return &fakeStore{lockers: map[string]Locker{testLocker.ID: *testLocker}, cmds: map[string]Command{}}
}

func (f *fakeStore) CreateCommand(_ context.Context, c *Command, a *AuditEntry, site string) (CommandTarget, bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	l, ok := f.lockers[c.DeviceID]
	if !ok {
		return CommandTarget{}, false, ErrNotFound
	}
	t := CommandTarget{Site: l.Site, HasCompartment: c.Compartment == 0}
	for _, comp := range l.Compartments {
		t.HasCompartment = t.HasCompartment || comp.N == c.Compartment
	}
	if !t.HasCompartment || (site != "" && site != l.Site) {
		return t, false, nil
	}
	if l.Online && !l.Disabled {
		sent := c.CreatedAt
		c.Status, c.SentAt = CmdSent, &sent
	}
	f.cmds[c.ID] = *c
	if a != nil {
		e := *a
		e.Site = l.Site
		f.audits = append(f.audits, e)
	}
	return t, true, nil
}

func (f *fakeStore) GetCommand(_ context.Context, deviceID, id string) (*Command, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.gets++
	c, ok := f.cmds[id]
	if !ok || c.DeviceID != deviceID {
		return nil, ErrNotFound
	}
	return &c, nil
}

func (f *fakeStore) MarkCommandSent(_ context.Context, id string, at time.Time) (bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	c := f.cmds[id]
	if c.Status != CmdPending || !at.Before(c.ExpiresAt) {
		return false, nil
	}
	c.Status, c.SentAt = CmdSent, &at
	f.cmds[id] = c
	return true, nil
}

func (f *fakeStore) CompleteCommand(_ context.Context, deviceID, id, status, errText string, at time.Time) (*Command, error) {
	f.mu.Lock()
	c, ok := f.cmds[id]
	if !ok || c.DeviceID != deviceID || Final(c.Status) {
		f.mu.Unlock()
		return nil, ErrNotFound
	}
	c.Status, c.Error, c.DoneAt = status, errText, &at
	f.cmds[id] = c
	committed := f.committed
	f.mu.Unlock()
	if committed != nil {
		committed(id)
	}
	return &c, nil
}

func (f *fakeStore) ExpireCommands(context.Context, time.Time, time.Duration) ([]Command, error) {
	return nil, nil
}

func (f *fakeStore) UnansweredCommands(_ context.Context, _, _ time.Time, _ int, skip []string) ([]Command, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.skipped = append(f.skipped[:0], skip...)
	var out []Command
	for _, id := range f.unanswered {
		if c, ok := f.cmds[id]; ok && !Final(c.Status) && !slices.Contains(skip, id) {
			out = append(out, c)
		}
	}
	return out, nil
}

type pendingAsk struct {
	before  time.Time
	limit   int
	reclaim bool
}

func (f *fakeStore) PendingEffects(_ context.Context, before time.Time, limit int, _ time.Duration, reclaim bool) ([]EventRecord, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.pendingAsk = append(f.pendingAsk, pendingAsk{before, limit, reclaim})
	out := slices.Clone(f.pending)
	for i := range out {
		out[i].Pending = true
	}
	return out, nil
}

func (f *fakeStore) CredsBehind(context.Context, int, []CredsLag) ([]CredsLag, error) {
	return nil, nil
}

func (f *fakeStore) EffectsApplied(_ context.Context, deviceID string, ids []string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, id := range ids {
		f.applied = append(f.applied, deviceID+"/"+id)
	}
	return nil
}

// set changes a stored command behind the manager's back (another instance).
func (f *fakeStore) set(id, status string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	c := f.cmds[id]
	c.Status = status
	f.cmds[id] = c
}

func (f *fakeStore) reads() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.gets
}

// fakeBus records publishes; answer, when set, runs inside Publish, before
// it returns: the fastest locker there can be.
type fakeBus struct {
	mu        sync.Mutex
	published []string
	answer    func(topic string, payload []byte)
	down      bool // every publish fails (a broker that is down)
	refused   int  // publishes refused while down
}

func (b *fakeBus) Publish(_ context.Context, topic string, payload []byte, _ byte, _ bool) error {
	b.mu.Lock()
	if b.down {
		b.refused++
		b.mu.Unlock()
		return errors.New("broker down")
	}
	b.published = append(b.published, topic)
	answer := b.answer
	b.mu.Unlock()
	if answer != nil {
		answer(topic, payload)
	}
	return nil
}

func (b *fakeBus) Subscribe(string, Handler) error { return nil }

func (b *fakeBus) count() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.published)
}

func newTestManager(t *testing.T) (*Manager, *fakeStore, *fakeBus) {
	t.Helper()
	st, bus := newFakeStore(), &fakeBus{}
	m, err := New(Options{Store: st, Bus: bus})
	if err != nil {
		t.Fatal(err)
	}
	return m, st, bus
}

var testLocker = &Locker{ID: "lk-1", Site: "s1", Online: true, Compartments: []Compartment{{N: 1}, {N: 2}}}

// answerOK makes the locker answer every command with ok, through the same
// control handling a result from MQTT gets.
func answerOK(m *Manager) func(string, []byte) {
	return func(topic string, payload []byte) {
		var cmd protocol.Command
		if err := json.Unmarshal(payload, &cmd); err != nil {
			panic(err)
		}
		res, _ := json.Marshal(map[string]any{"v": 1, "id": cmd.ID, "status": "ok", "ts": time.Now().UTC().Format(time.RFC3339Nano)})
		m.handleControl(context.Background(), control{kind: ctrlResult, id: testLocker.ID, payload: res, at: time.Now()})
	}
}

func TestSendCommandAnswerBeforeWait(t *testing.T) {
	m, st, bus := newTestManager(t)
	bus.answer = answerOK(m) // answered before Publish returns, so before any wait
	c, err := m.SendCommandWait(context.Background(), CommandRequest{DeviceID: testLocker.ID, Type: protocol.CmdUnlock, Compartment: 2, Actor: "t"}, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if c.Status != CmdOK {
		t.Fatalf("status %q, want ok", c.Status)
	}
	// The answer was handed over, not read back.
	if n := st.reads(); n != 0 {
		t.Errorf("%d GetCommand calls, want 0", n)
	}
	if len(st.audits) != 1 || st.audits[0].Action != "unlock" || st.audits[0].Locker != testLocker.ID {
		t.Errorf("audit = %+v, want one unlock entry for %s", st.audits, testLocker.ID)
	}
	if len(m.waiters) != 0 {
		t.Errorf("waiters left behind: %v", m.waiters)
	}
}

func TestSendCommandOfflineStaysPending(t *testing.T) {
	m, st, bus := newTestManager(t)
	off := *testLocker
	off.Online = false
	st.lockers[off.ID] = off
	c, err := m.SendCommandWait(context.Background(), CommandRequest{DeviceID: off.ID, Type: protocol.CmdUnlock, Compartment: 1}, 0)
	if err != nil {
		t.Fatal(err)
	}
	if c.Status != CmdPending || bus.count() != 0 {
		t.Fatalf("status %q, %d publishes; want pending and none", c.Status, bus.count())
	}
}

func TestSendCommandRefusesUnknownCompartment(t *testing.T) {
	m, st, bus := newTestManager(t)
	_, err := m.SendCommandWait(context.Background(), CommandRequest{DeviceID: testLocker.ID, Type: protocol.CmdUnlock, Compartment: 9}, time.Second)
	if !errors.Is(err, ErrUnprocessable) {
		t.Fatalf("err %v, want ErrUnprocessable", err)
	}
	if len(st.cmds) != 0 || len(st.audits) != 0 || bus.count() != 0 {
		t.Fatalf("stored %d commands, %d audits, published %d; want nothing", len(st.cmds), len(st.audits), bus.count())
	}
}

// Refusals that need the locker come back from the store's one round trip;
// nothing is stored or published for any of them.
func TestSendCommandRefusals(t *testing.T) {
	for _, tc := range []struct {
		name string
		req  CommandRequest
		want error
	}{
		{"unknown locker", CommandRequest{DeviceID: "lk-nope", Type: protocol.CmdUnlock, Compartment: 1}, ErrNotFound},
		{"another site's locker", CommandRequest{DeviceID: testLocker.ID, Type: protocol.CmdUnlock, Compartment: 1, Site: "s2"}, ErrForbidden},
		{"no compartment", CommandRequest{DeviceID: testLocker.ID, Type: protocol.CmdUnlock}, ErrInvalid},
		{"compartment 0 to set out of service", CommandRequest{DeviceID: testLocker.ID, Type: protocol.CmdSetService, InService: new(bool)}, ErrInvalid},
		{"negative compartment", CommandRequest{DeviceID: testLocker.ID, Type: protocol.CmdUnlock, Compartment: -3}, ErrInvalid},
		{"bad reason", CommandRequest{DeviceID: testLocker.ID, Type: protocol.CmdUnlock, Compartment: 1, Reason: "because"}, ErrInvalid},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m, st, bus := newTestManager(t)
			_, err := m.SendCommandWait(context.Background(), tc.req, time.Second)
			if !errors.Is(err, tc.want) {
				t.Fatalf("err %v, want %v", err, tc.want)
			}
			if len(st.cmds) != 0 || len(st.audits) != 0 || bus.count() != 0 {
				t.Fatalf("stored %d commands, %d audits, published %d; want nothing", len(st.cmds), len(st.audits), bus.count())
			}
		})
	}
	// The locker's own site is in scope.
	m, st, _ := newTestManager(t)
	if _, err := m.SendCommand(context.Background(), CommandRequest{DeviceID: testLocker.ID, Type: protocol.CmdUnlock, Compartment: 1, Site: "s1"}); err != nil {
		t.Fatal(err)
	}
	if len(st.audits) != 1 || st.audits[0].Site != "s1" {
		t.Fatalf("audits %+v, want one of site s1", st.audits)
	}
}

// unstoredStore refuses to store a command for a locker that qualifies: a
// store that breaks its contract must not make the manager send an
// unrecorded command.
type unstoredStore struct{ *fakeStore }

func (u unstoredStore) CreateCommand(_ context.Context, c *Command, _ *AuditEntry, _ string) (CommandTarget, bool, error) {
	// As the store would for an online locker: marked sent, to be published.
	sent := c.CreatedAt
	c.Status, c.SentAt = CmdSent, &sent
	return CommandTarget{Site: testLocker.Site, HasCompartment: true}, false, nil
}

func TestSendCommandNotStoredIsNotSent(t *testing.T) {
	bus := &fakeBus{}
	m, err := New(Options{Store: unstoredStore{newFakeStore()}, Bus: bus})
	if err != nil {
		t.Fatal(err)
	}
	c, err := m.SendCommandWait(context.Background(), CommandRequest{DeviceID: testLocker.ID, Type: protocol.CmdUnlock, Compartment: 1}, time.Second)
	if err == nil || c != nil {
		t.Fatalf("got %+v, %v; want an error and no command", c, err)
	}
	if bus.count() != 0 || len(m.waiters) != 0 {
		t.Fatalf("published %d, waiters %v; want nothing", bus.count(), m.waiters)
	}
}

func TestWaitCommandWokenByAnotherInstance(t *testing.T) {
	for _, c := range []struct {
		name   string
		notify func(m *Manager, id string)
	}{
		// Another instance took the answer: only the id arrives (NOTIFY).
		{"its notification", func(m *Manager, id string) { m.changed(id) }},
		// The store's listener was replaced: notifications may have been
		// missed, and every waiter reads its command again.
		{"notifications missed", func(m *Manager, _ string) { m.changed("") }},
	} {
		t.Run(c.name, func(t *testing.T) {
			m, st, _ := newTestManager(t)
			cmd, err := m.SendCommandWait(context.Background(), CommandRequest{DeviceID: testLocker.ID, Type: protocol.CmdReboot}, 0)
			if err != nil || cmd.Status != CmdSent {
				t.Fatalf("send: %+v %v", cmd, err)
			}
			done := make(chan *Command, 1)
			go func() {
				got, _ := m.WaitCommand(context.Background(), testLocker.ID, cmd.ID, time.Minute) // longer than the test waits
				done <- got
			}()
			waitUntil(t, "waiter subscribed", func() bool { m.mu.Lock(); defer m.mu.Unlock(); return len(m.waiters[cmd.ID]) == 1 })
			st.set(cmd.ID, CmdOK)
			c.notify(m, cmd.ID)
			select {
			case got := <-done:
				if got == nil || got.Status != CmdOK {
					t.Fatalf("got %+v, want ok", got)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("waiter not woken")
			}
		})
	}
}

func TestWaitCommandDeadline(t *testing.T) {
	m, _, _ := newTestManager(t)
	c, err := m.SendCommandWait(context.Background(), CommandRequest{DeviceID: testLocker.ID, Type: protocol.CmdReboot}, 0)
	if err != nil {
		t.Fatal(err)
	}
	got, err := m.WaitCommand(context.Background(), testLocker.ID, c.ID, 20*time.Millisecond)
	if err != nil || got.Status != CmdSent {
		t.Fatalf("got %+v %v, want sent after the deadline", got, err)
	}
}

// TestEndWaitsAnswersWaiters: a gateway that stops ends the waits for
// results (EndWaits): a waiting request gets the command as it is, not an
// error, and a wait that starts after it returns at once.
func TestEndWaitsAnswersWaiters(t *testing.T) {
	m, _, _ := newTestManager(t)
	type result struct {
		c   *Command
		err error
	}
	done := make(chan result, 1)
	go func() {
		c, err := m.SendCommandWait(context.Background(), CommandRequest{DeviceID: testLocker.ID, Type: protocol.CmdUnlock, Compartment: 1}, time.Hour)
		done <- result{c, err}
	}()
	waitUntil(t, "the waiter subscribed", func() bool {
		m.mu.Lock()
		defer m.mu.Unlock()
		return len(m.waiters) == 1
	})
	m.EndWaits()
	select {
	case r := <-done:
		if r.err != nil || r.c == nil || r.c.Status != CmdSent {
			t.Fatalf("the ended wait returned %+v %v, want the command, sent", r.c, r.err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the wait did not end")
	}
	c, err := m.SendCommandWait(context.Background(), CommandRequest{DeviceID: testLocker.ID, Type: protocol.CmdUnlock, Compartment: 2}, time.Hour)
	if err != nil || c.Status != CmdSent {
		t.Fatalf("a wait after EndWaits returned %+v %v, want the command, sent", c, err)
	}
}

// Two wake-ups before the waiter runs coalesce into a re-read, whatever
// their order, so the waiter never settles on an older state.
func TestWakeCoalescesToReread(t *testing.T) {
	for _, order := range []string{"answer-then-notify", "notify-then-answer"} {
		t.Run(order, func(t *testing.T) {
			m, st, _ := newTestManager(t)
			st.cmds["c1"] = Command{ID: "c1", DeviceID: testLocker.ID, Status: CmdOK}
			ch := m.subscribe("c1")
			defer m.unsubscribe("c1", ch)
			final := &Command{ID: "c1", DeviceID: testLocker.ID, Status: CmdOK}
			if order == "answer-then-notify" {
				m.wake("c1", final)
				m.notify("c1")
			} else {
				m.notify("c1")
				m.wake("c1", final)
			}
			if got := <-ch; got != nil {
				t.Fatalf("pending wake-up carries %+v, want nil (read the store)", got)
			}
			select {
			case extra := <-ch:
				t.Fatalf("second wake-up %+v queued, want one", extra)
			default:
			}
		})
	}
}

func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond) // polling a condition, with a deadline
	}
}

// presenceStore records what the control shards write.
type presenceStore struct {
	*fakeStore
	calls []string
}

func (p *presenceStore) MarkOfflineMany(_ context.Context, ends []SessionEnd) error {
	s := "offline"
	for _, e := range ends {
		s += " " + e.ID
	}
	p.calls = append(p.calls, s)
	return nil
}

func (p *presenceStore) MarkOnlineMany(_ context.Context, starts []SessionStart) error {
	s := "online"
	for _, e := range starts {
		s += " " + e.ID
	}
	p.calls = append(p.calls, s)
	return nil
}

func (p *presenceStore) AckCredsMany(_ context.Context, acks []CredsAck) ([]CredsLag, error) {
	s := "ack"
	for _, a := range acks {
		s += fmt.Sprintf(" %s:%d", a.ID, a.Version)
	}
	p.calls = append(p.calls, s)
	return nil, nil
}

// Retained and RetainedMany: every locker has the empty state, and no
// firmware job.
func (p *presenceStore) Retained(_ context.Context, id string) (*Retained, error) {
	p.calls = append(p.calls, "retained "+id)
	return &Retained{}, nil
}

func (p *presenceStore) RetainedMany(_ context.Context, ids []string) (map[string]*Retained, error) {
	p.calls = append(p.calls, "retained "+strings.Join(ids, " "))
	out := make(map[string]*Retained)
	for _, id := range ids {
		out[id] = &Retained{}
	}
	return out, nil
}

// RecordBirths refuses a batch with locker "bad" in it, as the database
// refuses a value (ErrInvalid).
func (p *presenceStore) RecordBirths(_ context.Context, births []BirthRecord) error {
	s := "birth"
	for _, b := range births {
		if b.ID == "bad" {
			p.calls = append(p.calls, "refused")
			return ErrInvalid
		}
		s += " " + b.ID
	}
	p.calls = append(p.calls, s)
	return nil
}

func (p *presenceStore) OpenCommands(_ context.Context, ids []string, _ time.Time) ([]Command, error) {
	p.calls = append(p.calls, "open "+strings.Join(ids, " "))
	return nil, nil
}

// Births queued on a shard are recorded together and their open commands
// read together; one the database refuses does not cost the others theirs.
func TestBirthsBatched(t *testing.T) {
	st := &presenceStore{fakeStore: newFakeStore()}
	m, err := New(Options{Store: st, Bus: &fakeBus{}})
	if err != nil {
		t.Fatal(err)
	}
	at := time.Now()
	presence := func(id, payload string) control {
		return control{kind: ctrlPresence, id: id, payload: []byte(payload), at: at}
	}
	const born = `{"v":1,"online":true,"fw":"1.0.0"}`
	run := func(cs ...control) {
		q := make(chan control, len(cs))
		for _, c := range cs[1:] {
			q <- c
		}
		m.handleQueued(context.Background(), q, cs[0])
		if len(q) != 0 {
			t.Fatalf("%d left in the queue", len(q))
		}
	}
	run(presence("a", born), presence("b", `{"v":1,"online":false}`), presence("c", `{"v":1,`), presence("d", born),
		presence("e", ""))
	// b's will changes nothing on the embedded broker, c's birth is
	// invalid, e's a cleared retained message.
	if want := []string{"birth a d", "open a d"}; !slices.Equal(st.calls, want) {
		t.Fatalf("calls %q, want %q", st.calls, want)
	}
	st.calls = nil
	run(presence("a", born), presence("bad", born), presence("d", born))
	if want := []string{"refused", "birth a", "refused", "birth d", "open a bad d"}; !slices.Equal(st.calls, want) {
		t.Fatalf("calls %q, want %q", st.calls, want)
	}
}

// Messages handled in batches are acknowledged to the bus once each, and
// not at all when the drain deadline has passed (as handleControl's).
func TestBatchedControlAcked(t *testing.T) {
	st := &presenceStore{fakeStore: newFakeStore()}
	m, err := New(Options{Store: st, Bus: &fakeBus{}})
	if err != nil {
		t.Fatal(err)
	}
	acks := map[string]int{}
	at := time.Now()
	msg := func(kind controlKind, id, payload string) control {
		return control{kind: kind, id: id, payload: []byte(payload), at: at, ack: func() {
			acks[id]++
			st.calls = append(st.calls, "acked "+id) // after the store call that wrote it
		}}
	}
	window := func(ctx context.Context) {
		cs := []control{
			msg(ctrlCredsAck, "a", `{"v":1,"version":1}`), msg(ctrlCredsAck, "b", `{"v":1,"version":2}`),
			msg(ctrlPresence, "c", `{"v":1,"online":true}`), msg(ctrlPresence, "d", `{"v":1,"online":true}`),
			msg(ctrlConnected, "e", ""), msg(ctrlConnected, "f", ""),
			msg(ctrlDisconnected, "g", ""), msg(ctrlDisconnected, "h", ""),
			// A second round: a's next ack.
			msg(ctrlCredsAck, "a", `{"v":1,"version":3}`),
		}
		q := make(chan control, len(cs))
		for _, c := range cs[1:] {
			q <- c
		}
		m.handleQueued(ctx, q, cs[0])
	}
	drained, cancel := context.WithCancel(context.Background())
	cancel()
	window(drained)
	if len(acks) != 0 {
		t.Fatalf("acknowledged after the drain deadline: %v", acks)
	}
	st.calls = nil
	window(context.Background())
	want := map[string]int{"a": 2, "b": 1, "c": 1, "d": 1, "e": 1, "f": 1, "g": 1, "h": 1}
	for id, n := range want {
		if acks[id] != n {
			t.Errorf("%s acknowledged %d times, want %d (all: %v)", id, acks[id], n, acks)
		}
	}
	// Each acknowledgement comes after the store call that wrote its
	// message: a's first after "ack a:1 ...", its second after "ack a:3".
	wrote := map[string][]int{} // id → indexes of the store calls naming it
	var acked []string
	for i, c := range st.calls {
		f := strings.Fields(c)
		if f[0] == "acked" {
			acked = append(acked, f[1])
			if w := wrote[f[1]]; len(w) == 0 || w[0] > i {
				t.Fatalf("%s acknowledged before its write: %q", f[1], st.calls)
			}
			wrote[f[1]] = wrote[f[1]][1:]
			continue
		}
		for _, tok := range f[1:] {
			id, _, _ := strings.Cut(tok, ":")
			if f[0] != "retained" && f[0] != "open" {
				wrote[id] = append(wrote[id], i)
			}
		}
	}
	if len(acked) != 9 {
		t.Fatalf("%d acknowledgements, want 9: %q", len(acked), st.calls)
	}
}

// A shard writes the session starts, session ends and credential acks
// queued behind one another together, each locker's in its order.
func TestControlWindowBatchedInOrder(t *testing.T) {
	st := &presenceStore{fakeStore: newFakeStore()}
	bus := &fakeBus{}
	m, err := New(Options{Store: st, Bus: bus})
	if err != nil {
		t.Fatal(err)
	}
	q := make(chan control, 16)
	at := time.Now()
	end := func(id string) control { return control{kind: ctrlDisconnected, id: id, reason: "x", at: at} }
	start := func(id string) control { return control{kind: ctrlConnected, id: id, at: at} }
	ack := func(id string, v int) control {
		return control{kind: ctrlCredsAck, id: id, payload: []byte(fmt.Sprintf(`{"v":1,"version":%d}`, v)), at: at}
	}
	acked := 0
	bad := control{kind: ctrlCredsAck, id: "e", payload: []byte(`{"v":1,`), at: at, ack: func() { acked++ }}
	for _, c := range []control{start("b"), ack("c", 1), end("b"), start("d"), ack("c", 2), bad, ack("d", 3)} {
		q <- c
	}
	// As controlLoop does: handle what comes next until the queue is empty.
	for c, ok := end("a"), true; ok; {
		m.handleQueued(context.Background(), q, c)
		select {
		case c = <-q:
		default:
			ok = false
		}
	}
	// Round 1: each locker's first message (a's end, b's and d's starts
	// with their retained state in one read, c's first ack and e's bad
	// one); round 2: the second (b's end, c's second ack, d's ack).
	// b's and d's state is read in one round trip if they share a
	// publish lock, else one each, in the locks' order.
	retained := []string{"retained b d"}
	if lb, ld := shard("b", len(m.publishMu)), shard("d", len(m.publishMu)); lb < ld {
		retained = []string{"retained b", "retained d"}
	} else if lb > ld {
		retained = []string{"retained d", "retained b"}
	}
	want := slices.Concat([]string{"offline a", "online b d"}, retained, []string{"ack c:1", "offline b", "ack c:2 d:3"})
	if !slices.Equal(st.calls, want) {
		t.Fatalf("calls\n%q\nwant\n%q", st.calls, want)
	}
	if len(q) != 0 {
		t.Fatalf("%d left in the queue", len(q))
	}
	if acked != 1 {
		t.Errorf("the invalid ack was acknowledged %d times, want once (dropped for good)", acked)
	}
	// Each started locker was sent its creds, config and fw/job.
	for _, id := range []string{"b", "d"} {
		for _, ch := range []protocol.Channel{protocol.ChanCreds, protocol.ChanConfig, protocol.ChanFwJob} {
			bus.mu.Lock()
			sent := slices.Contains(bus.published, protocol.Topic(id, ch))
			bus.mu.Unlock()
			if !sent {
				t.Errorf("nothing published to %s", protocol.Topic(id, ch))
			}
		}
	}
}

// credsStore fails AckCredsMany with err (a database that is down).
type credsStore struct {
	*fakeStore
	err error
}

func (c *credsStore) AckCredsMany(context.Context, []CredsAck) ([]CredsLag, error) { return nil, c.err }

// A control message is acknowledged to the bus once stored or refused for
// good, never when the drain deadline cut its store call short.
func TestControlAckedOnlyWhenHandled(t *testing.T) {
	st := &credsStore{fakeStore: newFakeStore(), err: errors.New("database down")}
	m, err := New(Options{Store: st, Bus: &fakeBus{}})
	if err != nil {
		t.Fatal(err)
	}
	acks := 0
	msg := func(payload string) control {
		return control{kind: ctrlCredsAck, id: "lk-1", payload: []byte(payload), at: time.Now(), ack: func() { acks++ }}
	}
	const valid = `{"v":1,"version":1}`
	drained, cancel := context.WithCancel(context.Background())
	cancel() // the drain deadline has passed
	m.handleRound(drained, []control{msg(valid)})
	if acks != 0 {
		t.Fatal("acknowledged although its store call never succeeded")
	}
	st.err = nil
	m.handleRound(context.Background(), []control{msg(valid)})
	if acks != 1 {
		t.Fatalf("stored: %d acks, want 1", acks)
	}
	m.handleRound(context.Background(), []control{msg(`{"v":1`)})
	if acks != 2 {
		t.Fatalf("invalid for good: %d acks, want 2", acks)
	}
}

// failingGets is a fakeStore whose GetCommand fails.
type failingGets struct{ *fakeStore }

func (failingGets) GetCommand(context.Context, string, string) (*Command, error) {
	return nil, errors.New("connection refused")
}

// TestWaitCommandExpiredReadFails: a command that expired unsent while
// waited on, whose final read fails, is answered with its last known state
// (it is stored: the caller must not send another), and the error.
func TestWaitCommandExpiredReadFails(t *testing.T) {
	st := failingGets{newFakeStore()}
	m, err := New(Options{Store: st, Bus: &fakeBus{}})
	if err != nil {
		t.Fatal(err)
	}
	c := &Command{ID: "c1", DeviceID: "lk-1", Status: CmdPending, ExpiresAt: m.now().Add(-time.Second)}
	got, err := m.waitCommand(context.Background(), c, m.subscribe(c.ID), time.Minute)
	if err == nil || got == nil || got.ID != "c1" || got.Status != CmdPending {
		t.Fatalf("got %+v, %v; want the pending command and the error", got, err)
	}
}

// TestDeliverMarksSentBeforePublishing: a pending command is marked sent
// before it is published (the locker may run it at once), and is not
// published when the mark fails: answered, expired or sent meanwhile.
func TestDeliverMarksSentBeforePublishing(t *testing.T) {
	m, st, bus := newTestManager(t)
	now := time.Now()
	pending := func(id string, exp time.Time) *Command {
		c := Command{ID: id, DeviceID: testLocker.ID, Type: protocol.CmdUnlock, Compartment: 1, Status: CmdPending, CreatedAt: now, ExpiresAt: exp}
		st.mu.Lock()
		st.cmds[id] = c
		st.mu.Unlock()
		return &c
	}
	var statusAtPublish string
	bus.answer = func(string, []byte) {
		st.mu.Lock()
		statusAtPublish = st.cmds["c-1"].Status
		st.mu.Unlock()
	}
	c := pending("c-1", now.Add(time.Minute))
	m.deliver(context.Background(), c)
	if bus.count() != 1 || statusAtPublish != CmdSent || c.Status != CmdSent {
		t.Fatalf("%d publishes, stored status at the publish %q, status %q; want 1, sent, sent", bus.count(), statusAtPublish, c.Status)
	}
	bus.answer = nil

	answered := pending("c-2", now.Add(time.Minute))
	st.set("c-2", CmdOK) // answered on another instance meanwhile
	m.deliver(context.Background(), answered)
	expired := pending("c-3", now.Add(-time.Millisecond))
	m.deliver(context.Background(), expired)
	if bus.count() != 1 {
		t.Fatalf("%d publishes, want none for a command answered meanwhile or expired", bus.count()-1)
	}
}

// TestDeliverOutlivesTheRequest: a command stored as sent is published even
// when the request that asked for it has gone away meanwhile.
func TestDeliverOutlivesTheRequest(t *testing.T) {
	st, bus := newFakeStore(), &ctxBus{}
	m, err := New(Options{Store: st, Bus: bus})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	m.deliver(ctx, &Command{ID: "c-1", DeviceID: testLocker.ID, Type: protocol.CmdUnlock, Compartment: 1, Status: CmdSent,
		ExpiresAt: time.Now().Add(time.Minute)})
	if bus.sent != 1 {
		t.Fatalf("%d publishes with a live context, want 1", bus.sent)
	}
}

// TestCommandPublishedWithItsExpiry: on a bus that can publish a message
// that expires (the embedded broker), a command goes out with its
// expires_at, so that a session kept for the locker drops it once expired
// (the broker's TestExpiredCommandNotRedelivered), not as a plain publish.
func TestCommandPublishedWithItsExpiry(t *testing.T) {
	bus := &expiringBus{}
	m, err := New(Options{Store: newFakeStore(), Bus: bus})
	if err != nil {
		t.Fatal(err)
	}
	expires := time.Now().Add(time.Minute).Truncate(time.Millisecond)
	m.deliver(context.Background(), &Command{ID: "c-1", DeviceID: testLocker.ID, Type: protocol.CmdUnlock, Compartment: 1, Status: CmdSent,
		ExpiresAt: expires})
	if bus.sent != 0 || len(bus.expiring) != 1 || !bus.expiring[0].Equal(expires) {
		t.Fatalf("%d plain publishes, expiring ones %v; want one expiring at %v", bus.sent, bus.expiring, expires)
	}
}

// expiringBus is a ctxBus that can also publish a message that expires,
// recording each one's expiry.
type expiringBus struct {
	ctxBus
	expiring []time.Time
}

func (b *expiringBus) PublishExpiring(_ context.Context, _ string, _ []byte, _ byte, expiresAt time.Time) error {
	b.expiring = append(b.expiring, expiresAt)
	return nil
}

// ctxBus publishes only while the context is live, as the embedded
// broker's Publish does.
type ctxBus struct{ sent int }

func (b *ctxBus) Publish(ctx context.Context, _ string, _ []byte, _ byte, _ bool) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	b.sent++
	return nil
}

func (b *ctxBus) Subscribe(string, Handler) error { return nil }

// partialSink applies the first n events it is offered.
type partialSink struct{ n int }

func (partialSink) Wants(*protocol.Event) bool { return true }

func (s partialSink) DeviceEvents(context.Context, []EventRecord) int { return s.n }

// TestEffectsAppliedOnlyForAppliedEvents: the outbox loses only the events
// the sink applied, and only those it keeps (Pending); the rest stay to be
// offered again.
func TestEffectsAppliedOnlyForAppliedEvents(t *testing.T) {
	st := newFakeStore()
	m, err := New(Options{Store: st, Bus: &fakeBus{}, Events: partialSink{n: 2}})
	if err != nil {
		t.Fatal(err)
	}
	evs := []EventRecord{
		{DeviceID: "lk-1", EventID: "e-1", Pending: true},
		{DeviceID: "lk-1", EventID: "e-2"}, // no effects to keep
		{DeviceID: "lk-1", EventID: "e-3", Pending: true},
	}
	m.markEffectsBusy(evs) // as writeEvents does
	m.applyEffects(context.Background(), "lk-1", evs)
	if want := []string{"lk-1/e-1"}; !slices.Equal(st.applied, want) {
		t.Fatalf("recorded applied %v, want %v", st.applied, want)
	}
	if _, busy := m.effectsBusy.Load("lk-1\x00e-3"); busy {
		t.Fatal("an event not applied is still marked in flight: no replay would offer it")
	}
}

// lockCheckingSink applies every event and records whether the store's
// effects lock of the locker was held meanwhile.
type lockCheckingSink struct {
	st   *fakeStore
	held []bool
}

func (*lockCheckingSink) Wants(*protocol.Event) bool { return true }

func (s *lockCheckingSink) DeviceEvents(_ context.Context, evs []EventRecord) int {
	s.st.mu.Lock()
	defer s.st.mu.Unlock()
	s.held = append(s.held, s.st.locked[evs[0].DeviceID])
	return len(evs)
}

// TestEffectsLockedWhenShared: an instance that shares a broker's group
// (SharedReports) applies a locker's effects under the store's effects
// lock, and releases it after; a single instance, and events with no
// effects to keep, take no lock.
func TestEffectsLockedWhenShared(t *testing.T) {
	withEffects := []EventRecord{{DeviceID: "lk-1", EventID: "e-1", Pending: true}}
	noEffects := []EventRecord{{DeviceID: "lk-1", EventID: "e-2"}}
	for _, tc := range []struct {
		name   string
		shared bool
		evs    []EventRecord
		locked bool
	}{
		{"Shared", true, withEffects, true},
		{"SharedNothingToKeep", true, noEffects, false},
		{"Single", false, withEffects, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st := newFakeStore()
			sink := &lockCheckingSink{st: st}
			m, err := New(Options{Store: st, Bus: &fakeBus{}, Events: sink, SharedReports: tc.shared})
			if err != nil {
				t.Fatal(err)
			}
			m.applyEffects(context.Background(), "lk-1", slices.Clone(tc.evs))
			if len(sink.held) != 1 || sink.held[0] != tc.locked {
				t.Fatalf("effects applied with the lock held: %v, want [%v]", sink.held, tc.locked)
			}
			if want := map[bool]int{true: 1}[tc.locked]; st.locks != want || len(st.locked) != 0 {
				t.Fatalf("%d locks taken, %d still held; want %d, none held", st.locks, len(st.locked), want)
			}
		})
	}
}

// TestEffectsWithoutTheLock: when the effects lock cannot be taken within
// its bound (the database fails, this instance holds its maximum of locks
// for other lockers, or another instance holds it), the events
// are not applied, stay in the outbox (not recorded applied) and are no
// longer marked in flight, so a replay offers them again; the token for
// the lock is given back.
func TestEffectsWithoutTheLock(t *testing.T) {
	st := newFakeStore()
	st.lockErr = errors.New("database down")
	sink := &lockCheckingSink{st: st}
	m, err := New(Options{Store: st, Bus: &fakeBus{}, Events: sink, SharedReports: true})
	if err != nil {
		t.Fatal(err)
	}
	m.effectsWait = 100 * time.Millisecond
	evs := []EventRecord{{DeviceID: "lk-1", EventID: "e-1", Pending: true}}
	m.markEffectsBusy(evs)
	m.applyEffects(context.Background(), "lk-1", evs)
	if len(sink.held) != 0 || len(st.applied) != 0 {
		t.Fatalf("applied %d times, recorded applied %v; want neither", len(sink.held), st.applied)
	}
	if _, busy := m.effectsBusy.Load("lk-1\x00e-1"); busy {
		t.Fatal("the event is still marked in flight: no replay would offer it")
	}
	if n := len(m.effectsLocks); n != 0 {
		t.Fatalf("%d lock tokens kept", n)
	}
	failures := func() float64 {
		var c dto.Metric
		if err := m.m.dbErrors.WithLabelValues("effects_lock").Write(&c); err != nil {
			t.Fatal(err)
		}
		return c.GetCounter().GetValue()
	}
	failed := failures()
	if failed == 0 {
		t.Fatal("db_errors_total{op=effects_lock} 0 after the database failed")
	}

	// Every token taken (other lockers' locks held): the same, without
	// asking the store.
	st.lockErr = nil
	for range cap(m.effectsLocks) {
		m.effectsLocks <- struct{}{}
	}
	m.markEffectsBusy(evs)
	m.applyEffects(context.Background(), "lk-1", evs)
	if len(sink.held) != 0 || len(st.applied) != 0 || st.locks != 0 {
		t.Fatalf("with no token free: applied %d times, recorded %v, %d locks asked for; want none", len(sink.held), st.applied, st.locks)
	}
	if _, busy := m.effectsBusy.Load("lk-1\x00e-1"); busy {
		t.Fatal("with no token free, the event is still marked in flight")
	}
	if now := failures(); now != failed {
		t.Fatalf("db_errors_total{op=effects_lock} %v after a wait for a token, want %v: no database call was made", now, failed)
	}
	for range cap(m.effectsLocks) {
		<-m.effectsLocks
	}

	// Another holder keeping the lock past the wait (by design only a
	// failing database does): the same, counted once as a database error,
	// not per attempt.
	before := failures()
	st.lockOut = true
	m.markEffectsBusy(evs)
	m.applyEffects(context.Background(), "lk-1", evs)
	if len(sink.held) != 0 || len(st.applied) != 0 {
		t.Fatalf("with the lock held elsewhere: applied %d times, recorded %v; want neither", len(sink.held), st.applied)
	}
	if after := failures(); after != before+1 {
		t.Fatalf("db_errors_total{op=effects_lock} %v after a wait that ran out, want %v: the wait counted once", after, before+1)
	}
}

// stuckSink's steps fail until their context ends, as pickup steps do
// while the database is down; it then reports none applied.
type stuckSink struct{}

func (stuckSink) Wants(*protocol.Event) bool { return true }

func (stuckSink) DeviceEvents(ctx context.Context, _ []EventRecord) int {
	<-ctx.Done()
	return 0
}

// TestEffectsStopWhenTheLockMayPass: a holder whose steps still fail when
// the store's lock is no longer sure stops them, leaving the events to a
// replay, rather than go on applying them beside the lock's next holder.
func TestEffectsStopWhenTheLockMayPass(t *testing.T) {
	st := newFakeStore()
	st.lockFor = 100 * time.Millisecond
	m, err := New(Options{Store: st, Bus: &fakeBus{}, Events: stuckSink{}, SharedReports: true})
	if err != nil {
		t.Fatal(err)
	}
	evs := []EventRecord{{DeviceID: "lk-1", EventID: "e-1", Pending: true}}
	m.markEffectsBusy(evs)
	done := make(chan struct{})
	go func() {
		defer close(done)
		m.applyEffects(context.Background(), "lk-1", evs)
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("the steps went on 10 s past the lock's sure time")
	}
	if len(st.applied) != 0 || len(st.locked) != 0 {
		t.Fatalf("recorded applied %v, locks still held %v; want neither", st.applied, st.locked)
	}
	if _, busy := m.effectsBusy.Load("lk-1\x00e-1"); busy {
		t.Fatal("the event is still marked in flight: no replay would offer it")
	}
}

// TestDuplicateLeavesOriginalMarked: a duplicate of an event whose original
// is still on its way to the sink neither takes over nor clears the
// original's in-flight mark, so a census does not offer it meanwhile.
func TestDuplicateLeavesOriginalMarked(t *testing.T) {
	m, err := New(Options{Store: newFakeStore(), Bus: &fakeBus{}, Events: partialSink{n: 1}})
	if err != nil {
		t.Fatal(err)
	}
	orig := []EventRecord{{DeviceID: "lk-1", EventID: "e-1", Pending: true}}
	m.markEffectsBusy(orig)
	dup := []EventRecord{{DeviceID: "lk-1", EventID: "e-1", Pending: true}}
	m.markEffectsBusy(dup)
	if dup[0].claimed {
		t.Fatal("the duplicate claimed a mark its original holds")
	}
	m.unmarkEffectsBusy(dup) // as writeEvents does for a duplicate
	if _, busy := m.effectsBusy.Load("lk-1\x00e-1"); !busy {
		t.Fatal("the duplicate cleared its original's mark")
	}
	m.unmarkEffectsBusy(orig)
	if _, busy := m.effectsBusy.Load("lk-1\x00e-1"); busy {
		t.Fatal("the original's own unmark left the event marked")
	}
}

func TestByLocker(t *testing.T) {
	evs := []EventRecord{{DeviceID: "b", EventID: "1"}, {DeviceID: "a", EventID: "2"}, {DeviceID: "b", EventID: "3"}}
	got := byLocker(evs)
	if len(got) != 2 || len(got[0]) != 2 || got[0][0].EventID != "1" || got[0][1].EventID != "3" || got[1][0].EventID != "2" {
		t.Fatalf("byLocker = %+v", got)
	}
}

// flakyFirmware fails its first fails reports, as a database that is down.
type flakyFirmware struct {
	FirmwareTracker
	fails    int
	err      error
	calls    int
	onFail   func(calls int)
	recorded []protocol.FwStatus
}

func (f *flakyFirmware) JobStatus(_ context.Context, _ string, st *protocol.FwStatus, _ time.Time) error {
	f.calls++
	if f.fails > 0 {
		f.fails--
		if f.onFail != nil {
			f.onFail(f.calls)
		}
		return f.err
	}
	f.recorded = append(f.recorded, *st)
	return nil
}

// TestFirmwareReportKeptAtStop: a fw/status report is tried again while
// the database fails, and one still failing when the manager stops (the
// drain deadline cancels its work) is not acknowledged, so a broker that
// holds it delivers it to the next run.
func TestFirmwareReportKeptAtStop(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	fw := &flakyFirmware{fails: 1 << 30, err: errors.New("connection refused"), onFail: func(calls int) {
		if calls == 3 {
			cancel()
		}
	}}
	m, err := New(Options{Store: newFakeStore(), Bus: &fakeBus{}, Firmware: fw})
	if err != nil {
		t.Fatal(err)
	}
	acks := 0
	m.handleControl(ctx, control{kind: ctrlFwStatus, id: "lk-1", payload: []byte(`{"job":"j-1","state":"failed","error":"checksum","ts":"2026-12-05T07:00:00.000Z"}`),
		at: time.Now(), ack: func() { acks++ }})
	if fw.calls != 3 || acks != 0 || len(fw.recorded) != 0 {
		t.Fatalf("%d tries, %d acks, %d recorded; want 3 tries (the third at the stop), no record, no acknowledgement",
			fw.calls, acks, len(fw.recorded))
	}
}

// TestFirmwareReportOutlastsDatabaseErrors: a fw/status report the engine
// could not record is tried again, not acknowledged and lost (a lost
// "failed" would be seen only at the job's step timeout); one the
// database can never take is dropped as invalid.
func TestFirmwareReportOutlastsDatabaseErrors(t *testing.T) {
	fw := &flakyFirmware{fails: 2, err: errors.New("connection refused")}
	m, err := New(Options{Store: newFakeStore(), Bus: &fakeBus{}, Firmware: fw})
	if err != nil {
		t.Fatal(err)
	}
	acks := 0
	report := control{kind: ctrlFwStatus, id: "lk-1", payload: []byte(`{"job":"j-1","state":"failed","error":"checksum","ts":"2026-12-05T07:00:00.000Z"}`),
		at: time.Now(), ack: func() { acks++ }}
	m.handleControl(context.Background(), report)
	if len(fw.recorded) != 1 || fw.recorded[0].State != "failed" || acks != 1 {
		t.Fatalf("recorded %+v, %d acks; want the report once, acknowledged", fw.recorded, acks)
	}
	fw.fails, fw.err = 1, fmt.Errorf("%w: invalid byte sequence", ErrInvalid)
	m.handleControl(context.Background(), report)
	if len(fw.recorded) != 1 || acks != 2 {
		t.Fatalf("recorded %d, %d acks; want a value the database refuses dropped and acknowledged", len(fw.recorded), acks)
	}
	var dropped dto.Metric
	if err := m.m.dropped.WithLabelValues(string(protocol.ChanFwStatus), protocol.Reason(fw.err)).Write(&dropped); err != nil || dropped.GetCounter().GetValue() != 1 {
		t.Fatalf("dropped counter %v (%v), want 1", dropped.GetCounter().GetValue(), err)
	}
}

// TestPublishRetainedLockWaitEnds: a publish of a locker's retained state
// (all of it, or its credential set) waiting for its shard's publish lock,
// which another publish holds (one an external broker that is down keeps
// waiting), gives up when its context ends rather than wait for that
// publish, and publishes nothing.
func TestPublishRetainedLockWaitEnds(t *testing.T) {
	bus := &fakeBus{}
	m, err := New(Options{Store: newFakeStore(), Bus: bus})
	if err != nil {
		t.Fatal(err)
	}
	unlock, err := m.lockLocker(context.Background(), testLocker.ID)
	if err != nil {
		t.Fatal(err)
	}
	defer unlock()
	for name, publish := range map[string]func(context.Context, string) error{
		"PublishRetained": m.PublishRetained,
		"PublishCreds":    m.PublishCreds,
	} {
		done := make(chan error, 1)
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
			defer cancel()
			done <- publish(ctx, testLocker.ID)
		}()
		select {
		case err := <-done:
			if !errors.Is(err, context.DeadlineExceeded) {
				t.Fatalf("%s = %v, want the context's end", name, err)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("%s still waiting for the lock 10 s after its context ended", name)
		}
	}
	if n := bus.count(); n != 0 {
		t.Fatalf("%d publishes without the lock, want none", n)
	}
}

// TestResend: an unanswered sent command is published again by id,
// CommandResend after it was sent, then after twice as long each time,
// never more than ResendMaxWait apart; a pending one is marked sent and
// delivered; an answered one is no longer sent, and forgotten.
func TestResend(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	st, bus := newFakeStore(), &fakeBus{}
	m, err := New(Options{Store: st, Bus: bus, CommandResend: 5 * time.Second, Now: func() time.Time { return now }})
	if err != nil {
		t.Fatal(err)
	}
	sentAt := now.Add(-10 * time.Second)
	st.cmds["c-sent"] = Command{ID: "c-sent", DeviceID: "lk-1", Type: "unlock", Compartment: 1, Status: CmdSent, SentAt: &sentAt, ExpiresAt: now.Add(time.Hour)}
	st.cmds["c-pend"] = Command{ID: "c-pend", DeviceID: "lk-1", Type: "unlock", Compartment: 2, Status: CmdPending, ExpiresAt: now.Add(time.Hour)}
	st.unanswered = []string{"c-sent", "c-pend"}
	resent := func() float64 {
		var c dto.Metric
		if err := m.m.resent.Write(&c); err != nil {
			t.Fatal(err)
		}
		return c.GetCounter().GetValue()
	}
	sweep := func(after time.Duration, wantPublishes int, wantResent float64) {
		t.Helper()
		now = now.Add(after)
		before := bus.count()
		m.resend(context.Background())
		if n := bus.count() - before; n != wantPublishes || resent() != wantResent {
			t.Fatalf("after %v: %d publishes, resent counter %v; want %d, %v", after, n, resent(), wantPublishes, wantResent)
		}
	}
	sweep(0, 2, 1) // c-sent again, c-pend delivered (not counted as resent)
	if c := st.cmds["c-pend"]; c.Status != CmdSent || c.SentAt == nil {
		t.Fatalf("the pending command is %s, want it marked sent", c.Status)
	}
	sweep(5*time.Second, 0, 1)  // 10 s are due after the first resend
	sweep(5*time.Second, 2, 3)  // both sent again, by id
	sweep(19*time.Second, 0, 3) // then 20 s
	sweep(time.Second, 2, 5)
	sweep(39*time.Second, 0, 5) // then 40 s
	sweep(time.Second, 2, 7)
	sweep(59*time.Second, 0, 7) // then the bound, 60 s
	sweep(time.Second, 2, 9)
	sweep(59*time.Second, 0, 9) // and 60 s from then on
	if !slices.Equal(slices.Sorted(slices.Values(st.skipped)), []string{"c-pend", "c-sent"}) {
		t.Fatalf("read skipping %v, want both (not due)", st.skipped)
	}
	sweep(time.Second, 2, 11)
	st.set("c-sent", CmdOK)
	sweep(60*time.Second, 1, 12) // the answered one is not
	if _, kept := m.resent["c-sent"]; kept || len(m.resent) != 1 {
		t.Fatalf("resend times kept %v, want only c-pend's", m.resent)
	}
	// Sends that fail (the broker down) do not lengthen the wait: once it
	// is back, the command goes out a minute after the last try.
	before := m.resent["c-pend"].n
	// A pass stops at the first refusal (one error logged, not one per
	// command): here, with a second unanswered command due, one try a pass.
	st.cmds["c-due"] = Command{ID: "c-due", DeviceID: "lk-1", Type: "unlock", Compartment: 1, Status: CmdSent, SentAt: &sentAt, ExpiresAt: now.Add(time.Hour)}
	st.unanswered = []string{"c-pend", "c-due"}
	bus.mu.Lock()
	bus.down = true
	bus.mu.Unlock()
	for range 3 {
		sweep(60*time.Second, 0, 12)
	}
	bus.mu.Lock()
	bus.down = false
	refused := bus.refused
	bus.mu.Unlock()
	if refused != 3 {
		t.Fatalf("%d publishes refused in 3 passes with the bus down, want 3 (one a pass)", refused)
	}
	st.unanswered = []string{"c-pend"}
	sweep(59*time.Second, 0, 12)
	sweep(time.Second, 1, 13)
	if n := m.resent["c-pend"].n; n != before+1 {
		t.Fatalf("c-pend resent %d times, want %d (the failed tries not counted)", n, before+1)
	}
	// A pending command first in the pass, refused: the pass stops there too.
	st.cmds["c-new"] = Command{ID: "c-new", DeviceID: "lk-1", Type: "unlock", Compartment: 2, Status: CmdPending, ExpiresAt: now.Add(time.Hour)}
	st.unanswered = []string{"c-new", "c-due"}
	bus.mu.Lock()
	bus.down, bus.refused = true, 0
	bus.mu.Unlock()
	sweep(time.Minute, 0, 13)
	bus.mu.Lock()
	refused = bus.refused
	bus.mu.Unlock()
	if refused != 1 {
		t.Fatalf("%d publishes refused in a pass led by a pending command, want 1", refused)
	}
}

// TestReplayEvents: the outbox's leftovers are offered again per locker,
// in order, on the locker's control shard, marked in flight; one in
// flight already (the original still on its way) is not offered twice;
// a census that finds the shard full leaves its batch for later. A start
// reads everything before now (a single instance taking back what its
// previous run had claimed), a census only what is past replayAfter.
func TestReplayEvents(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	st := newFakeStore()
	m, err := New(Options{Store: st, Bus: &fakeBus{}, Events: partialSink{n: 1}, ControlShards: 1, ControlQueue: 2,
		Now: func() time.Time { return now }})
	if err != nil {
		t.Fatal(err)
	}
	st.pending = []EventRecord{
		{DeviceID: "lk-1", EventID: "e-1"}, {DeviceID: "lk-2", EventID: "e-2"},
		{DeviceID: "lk-1", EventID: "e-3"}, {DeviceID: "lk-3", EventID: "e-4"},
	}
	inFlight := []EventRecord{{DeviceID: "lk-3", EventID: "e-4", Pending: true}}
	m.markEffectsBusy(inFlight)
	m.replayEvents(context.Background(), false)
	if got, want := st.pendingAsk, []pendingAsk{{now.Add(-replayAfter), replayLimit, false}}; !slices.Equal(got, want) {
		t.Fatalf("census asked %+v, want %+v", got, want)
	}
	var offered []string
	for range len(m.ctrl[0]) {
		c := <-m.ctrl[0]
		for _, e := range c.events {
			offered = append(offered, c.id+":"+e.EventID)
		}
	}
	if want := []string{"lk-1:e-1", "lk-1:e-3", "lk-2:e-2"}; !slices.Equal(offered, want) {
		t.Fatalf("offered %v, want %v (lk-3's is in flight already)", offered, want)
	}
	for _, key := range []string{"lk-1\x00e-1", "lk-2\x00e-2"} {
		if _, busy := m.effectsBusy.Load(key); !busy {
			t.Errorf("%q offered but not marked in flight", key)
		}
	}

	// The shard full: nothing is offered, and nothing stays marked.
	m.unmarkEffectsBusy(inFlight)
	m.effectsBusy.Clear()
	m.ctrl[0] <- control{kind: ctrlResend, id: "lk-9"}
	m.ctrl[0] <- control{kind: ctrlResend, id: "lk-9"}
	m.replayEvents(context.Background(), false)
	if n := len(m.ctrl[0]); n != 2 {
		t.Fatalf("%d items queued on a full shard, want the 2 that were there", n)
	}
	m.effectsBusy.Range(func(k, _ any) bool {
		t.Errorf("%q marked in flight though not offered", k)
		return true
	})
	for range 2 {
		<-m.ctrl[0]
	}

	// A single instance's start: everything before now, taken back.
	st.pending = st.pending[:1]
	m.replayEvents(context.Background(), true)
	if got := st.pendingAsk[len(st.pendingAsk)-1]; got != (pendingAsk{now, math.MaxInt32, true}) {
		t.Fatalf("start asked %+v, want everything before now, reclaimed", got)
	}
	if n := len(m.ctrl[0]); n != 1 {
		t.Fatalf("%d batches offered at the start, want 1", n)
	}
}

// TestOwnResultNotification: the store's notification of a result this
// instance is recording, arriving before the recording returns, is left
// to the recording, which wakes the waiter with the command (a re-read
// saved); notifications of other changes are passed on, as is one for a
// result another instance recorded first (this one's attempt finds it
// final), so that its waiters read it.
func TestOwnResultNotification(t *testing.T) {
	m, st, _ := newTestManager(t)
	now := time.Now()
	for _, id := range []string{"c-1", "c-2"} {
		st.cmds[id] = Command{ID: id, DeviceID: testLocker.ID, Type: "unlock", Compartment: 1, Status: CmdSent, ExpiresAt: now.Add(time.Minute)}
	}
	st.committed = m.changed
	answer := func(id string) {
		res, _ := json.Marshal(map[string]any{"id": id, "status": "ok", "ts": now.UTC().Format(time.RFC3339Nano)})
		m.handleControl(context.Background(), control{kind: ctrlResult, id: testLocker.ID, payload: res, at: now})
	}
	woken := func(wake chan *Command) (*Command, bool) {
		select {
		case got := <-wake:
			return got, true
		default:
			return nil, false
		}
	}
	wake := m.subscribe("c-1")
	defer m.unsubscribe("c-1", wake)
	answer("c-1")
	if got, ok := woken(wake); !ok || got == nil || got.Status != CmdOK {
		t.Fatalf("waiter woken %v with %+v, want the command, ok: its own notification made it read again", ok, got)
	}
	m.changed("c-1") // a later change: passed on
	if got, ok := woken(wake); !ok || got != nil {
		t.Fatalf("a notification after the recording: woken %v with %+v, want a re-read", ok, got)
	}

	st.committed = nil
	st.set("c-2", CmdOK) // another instance recorded the answer first
	wake2 := m.subscribe("c-2")
	defer m.unsubscribe("c-2", wake2)
	st.committed = m.changed
	m.completingStart("c-2")() // no recording left behind
	answer("c-2")
	if got, ok := woken(wake2); !ok || got != nil {
		t.Fatalf("a result found recorded: woken %v with %+v, want a re-read", ok, got)
	}
	if len(m.completing) != 0 {
		t.Fatalf("recordings left marked: %v", m.completing)
	}
}

// endedElsewhereStore reads a locker online once, then offline: its session's
// end recorded by another instance (or from its Last Will), which this
// instance's writes of session ends never announce.
type endedElsewhereStore struct {
	*fakeStore
	reads atomic.Int32
}

func (s *endedElsewhereStore) GetLocker(_ context.Context, id string) (*Locker, error) {
	l := *testLocker
	l.Online = s.reads.Add(1) == 1
	return &l, nil
}

// TestWaitOfflineReadsAgainAtItsEnd: a wait that no local write of session
// ends wakes answers the locker as recorded at its end, not as first read.
func TestWaitOfflineReadsAgainAtItsEnd(t *testing.T) {
	st := &endedElsewhereStore{fakeStore: newFakeStore()}
	m, err := New(Options{Store: st, Bus: &fakeBus{}})
	if err != nil {
		t.Fatal(err)
	}
	l, err := m.WaitOffline(context.Background(), testLocker.ID, 20*time.Millisecond)
	if err != nil || l.Online {
		t.Fatalf("WaitOffline: %+v %v, want the locker offline as recorded at the end", l, err)
	}
}

// earlyAnswerStore stores a command pending (its locker offline) and,
// before CreateCommand returns, has it delivered and answered ok, as a
// birth handled meanwhile on the locker's control shard would.
type earlyAnswerStore struct {
	*fakeStore
	m *Manager
}

func (s earlyAnswerStore) CreateCommand(ctx context.Context, c *Command, a *AuditEntry, site string) (CommandTarget, bool, error) {
	t, created, err := s.fakeStore.CreateCommand(ctx, c, a, site)
	if err != nil || !created {
		return t, created, err
	}
	stored := *c
	s.m.deliver(ctx, &stored)
	return t, created, err
}

// TestAnswerBeforeCreateReturnsIsNotMissed: a command stored pending can
// be sent and answered before CreateCommand has returned (the locker came
// online meanwhile); the wait is woken with that answer, not left to find
// it when its time runs out.
func TestAnswerBeforeCreateReturnsIsNotMissed(t *testing.T) {
	st, bus := newFakeStore(), &fakeBus{}
	off := *testLocker
	off.Online = false
	st.lockers[off.ID] = off
	wrapped := earlyAnswerStore{fakeStore: st}
	m, err := New(Options{Store: &wrapped, Bus: bus})
	if err != nil {
		t.Fatal(err)
	}
	wrapped.m = m
	bus.answer = answerOK(m)
	c, err := m.SendCommandWait(context.Background(), CommandRequest{DeviceID: off.ID, Type: protocol.CmdUnlock, Compartment: 1, Actor: "t", TTL: 30 * time.Second}, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if c.Status != CmdOK {
		t.Fatalf("status %q, want the answer given before the create returned (ok)", c.Status)
	}
	// Handed over as it was recorded: not read back when the wait ran
	// out (a wait_s caller would wait its full time for an answer given).
	if n := st.reads(); n != 0 {
		t.Errorf("%d GetCommand calls, want 0", n)
	}
	if len(m.waiters) != 0 {
		t.Errorf("waiters left behind: %v", m.waiters)
	}
}

// ctxExpiringStore expires its pending commands past their time, as the
// database would, and fails as pgx does when the context has ended.
type ctxExpiringStore struct{ *fakeStore }

func (s ctxExpiringStore) ExpireCommands(ctx context.Context, now time.Time, _ time.Duration) ([]Command, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []Command
	for id, c := range s.cmds {
		if c.Status == CmdPending && !now.Before(c.ExpiresAt) {
			c.Status = CmdExpired
			s.cmds[id] = c
			out = append(out, c)
		}
	}
	return out, nil
}

// TestWaitersSweepOutlivesTheRequest: the sweep a waiter runs for a command
// that expired pending ends every command due and records their ends; a
// request gone away meanwhile does not cut it short.
func TestWaitersSweepOutlivesTheRequest(t *testing.T) {
	st := ctxExpiringStore{newFakeStore()}
	var ended []string
	m, err := New(Options{Store: st, Bus: &fakeBus{}, CommandFinished: func(_ context.Context, c *Command) {
		ended = append(ended, c.ID+" "+c.Status)
	}})
	if err != nil {
		t.Fatal(err)
	}
	past := m.now().Add(-time.Second)
	for _, id := range []string{"c1", "c2"} {
		st.cmds[id] = Command{ID: id, DeviceID: "lk-1", Type: protocol.CmdUnlock, Status: CmdPending, ExpiresAt: past}
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	c := st.cmds["c1"]
	m.waitCommand(ctx, &c, m.subscribe(c.ID), time.Minute)
	slices.Sort(ended)
	if !slices.Equal(ended, []string{"c1 expired", "c2 expired"}) {
		t.Fatalf("ends recorded: %q, want both commands expired", ended)
	}
}

// TestRetainedCopiesDropped: a locker's message that comes with the retain
// flag on any channel but presence is a copy a broker kept and replays to a
// new subscription (the message itself was delivered when sent): it is
// acknowledged, counted and not applied. A retained presence is taken.
func TestRetainedCopiesDropped(t *testing.T) {
	m, _, _ := newTestManager(t)
	for _, ch := range []protocol.Channel{protocol.ChanEvents, protocol.ChanHealth, protocol.ChanCmdResult, protocol.ChanCredsAck, protocol.ChanFwStatus} {
		acked := false
		m.receive(Message{Topic: protocol.Topic("lk-1", ch), Payload: []byte(`{"v":1}`), QoS: 1, Retain: true, Ack: func() { acked = true }})
		if !acked {
			t.Errorf("%s: a retained copy not acknowledged", ch)
		}
		var c dto.Metric
		if err := m.m.dropped.WithLabelValues(string(ch), "retained_copy").Write(&c); err != nil || c.GetCounter().GetValue() != 1 {
			t.Errorf("%s: dropped{retained_copy} = %v (%v), want 1", ch, c.GetCounter().GetValue(), err)
		}
	}
	if n := len(m.events) + len(m.health[shard("lk-1", len(m.health))]); n != 0 {
		t.Errorf("%d retained copies queued, want none", n)
	}
	if ids, _ := m.heard.take(); len(ids) != 0 {
		t.Errorf("retained copies counted as hearing %v", ids)
	}
}
