package fleet

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"

	"github.com/lockergate/lockergate/protocol"
)

// retainedBus answers Retained with its fields.
type retainedBus struct {
	fakeBus
	payload []byte
	err     error
	asked   []string
}

func (b *retainedBus) Retained(_ context.Context, topic string) ([]byte, error) {
	b.asked = append(b.asked, topic)
	return b.payload, b.err
}

// TestStaleWill: a Last Will is an earlier session's (not applied) only
// when the broker's retained presence of the locker is a birth; a retained
// will, nothing retained, something unreadable, an error reading it, or a
// bus that cannot read retained messages, and it is applied. A bus that is
// closing with a persistent session (ErrBusClosed) leaves it (not applied,
// not counted), for the broker to deliver again.
func TestStaleWill(t *testing.T) {
	for _, tc := range []struct {
		name    string
		payload string
		err     error
		want    verdict
	}{
		{"LaterBirth", `{"online":true,"ts":"2026-12-05T09:00:00.000Z","fw":"1.4.2","model":"LX-24","boot_id":"b-2"}`, nil, verdictStale},
		{"TheWillItself", `{"online":false}`, nil, verdictApply},
		{"NothingRetained", "", nil, verdictApply},
		{"Unreadable", `{"online":`, nil, verdictApply},
		{"ReadFailed", "", errors.New("broker down"), verdictApply},
		{"BusClosing", "", fmt.Errorf("read: %w", ErrBusClosed), verdictLeave},
	} {
		t.Run(tc.name, func(t *testing.T) {
			bus := &retainedBus{err: tc.err}
			if tc.payload != "" {
				bus.payload = []byte(tc.payload)
			}
			m, err := New(Options{Store: newFakeStore(), Bus: bus, PresenceFromWill: true})
			if err != nil {
				t.Fatal(err)
			}
			if got := m.staleWill(context.Background(), "lk-1"); got != tc.want {
				t.Fatalf("verdict %v, want %v", got, tc.want)
			}
			if len(bus.asked) != 1 || bus.asked[0] != "lockers/v1/lk-1/presence" {
				t.Fatalf("read %v, want the locker's presence topic", bus.asked)
			}
			var pb dto.Metric
			if err := m.m.staleWills.Write(&pb); err != nil {
				t.Fatal(err)
			}
			if n := pb.GetCounter().GetValue(); n != map[bool]float64{true: 1}[tc.want == verdictStale] {
				t.Fatalf("stale wills counted %v", n)
			}
		})
	}
	t.Run("NoRetainedReader", func(t *testing.T) {
		m, err := New(Options{Store: newFakeStore(), Bus: &fakeBus{}, PresenceFromWill: true})
		if err != nil {
			t.Fatal(err)
		}
		if got := m.staleWill(context.Background(), "lk-1"); got != verdictApply {
			t.Fatalf("verdict %v without a way to read the retained presence, want it applied", got)
		}
	})
}

// TestStaleBirth: a birth is an earlier session's (not applied) only when
// its ts is well behind its arrival and the broker's retained presence is
// no longer this birth; a birth on time is not even checked. A late one
// read while the bus is closing is left (not applied, not counted).
func TestStaleBirth(t *testing.T) {
	at := time.Date(2026, 12, 5, 10, 0, 0, 0, time.UTC)
	birth := func(ts time.Time, boot string) []byte {
		return protocol.Encode(protocol.Presence{Online: true, TS: protocol.T(ts), FW: "1.4.2", Model: "LX-24", BootID: boot})
	}
	late := birth(at.Add(-10*time.Minute), "b-1")
	for _, tc := range []struct {
		name     string
		payload  []byte
		retained []byte
		err      error
		want     verdict
		asked    bool
	}{
		{"OnTime", birth(at.Add(-2*time.Second), "b-1"), []byte(`{"online":false}`), nil, verdictApply, false},
		{"LateWillSince", late, []byte(`{"online":false}`), nil, verdictStale, true},
		{"LateLaterBirth", late, birth(at.Add(-time.Minute), "b-2"), nil, verdictStale, true},
		{"LateButCurrent", late, late, nil, verdictApply, true}, // a clock behind
		{"LateNothingRetained", late, nil, nil, verdictApply, true},
		{"LateReadFailed", late, nil, errors.New("broker down"), verdictApply, true},
		{"LateBusClosing", late, nil, fmt.Errorf("read: %w", ErrBusClosed), verdictLeave, true},
		{"NoTS", []byte(`{"online":true}`), []byte(`{"online":false}`), nil, verdictApply, false},
		// The birth the session on record started from (a retained copy at
		// an instance's start): known from the database, no broker read.
		{"LateButRecorded", birth(at.Add(-time.Hour), "b-rec"), []byte(`{"online":false}`), nil, verdictKnown, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			bus := &retainedBus{payload: tc.retained, err: tc.err}
			recorded := at.Add(-time.Hour)
			st := &lockerStore{fakeStore: newFakeStore(), l: &Locker{ID: "lk-1", Online: true, BootID: "b-rec", BirthTS: &recorded}}
			m, err := New(Options{Store: st, Bus: bus, PresenceFromWill: true})
			if err != nil {
				t.Fatal(err)
			}
			p, err := protocol.Decode[protocol.Presence](tc.payload)
			if err != nil {
				t.Fatal(err)
			}
			if got := m.staleBirth(context.Background(), "lk-1", p, tc.payload, at, true); got != tc.want {
				t.Fatalf("verdict %v, want %v", got, tc.want)
			}
			if asked := len(bus.asked) == 1; asked != tc.asked {
				t.Fatalf("retained presence read %v, want %v", bus.asked, tc.asked)
			}
			var pb dto.Metric
			if err := m.m.staleBirths.Write(&pb); err != nil {
				t.Fatal(err)
			}
			if n := pb.GetCounter().GetValue(); n != map[bool]float64{true: 1}[tc.want == verdictStale] {
				t.Fatalf("stale births counted %v", n)
			}
		})
	}
}

// TestWillLeftAtClose: a Last Will whose check the closing bus cut short
// (ErrBusClosed) is neither applied nor acknowledged, so the broker's
// persistent session delivers it again; one whose check failed otherwise is
// applied and acknowledged.
func TestWillLeftAtClose(t *testing.T) {
	for _, tc := range []struct {
		name    string
		err     error
		applied bool
	}{
		{"BusClosing", fmt.Errorf("read: %w", ErrBusClosed), false},
		{"ReadFailed", errors.New("the external broker connection is closed"), true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st := &presenceStore{fakeStore: newFakeStore()}
			m, err := New(Options{Store: st, Bus: &retainedBus{err: tc.err}, PresenceFromWill: true})
			if err != nil {
				t.Fatal(err)
			}
			acks := 0
			m.handleControl(context.Background(), control{kind: ctrlPresence, id: "lk-1", payload: []byte(`{"online":false}`),
				at: time.Now(), ack: func() { acks++ }})
			if applied := len(st.calls) == 1 && st.calls[0] == "offline lk-1"; applied != tc.applied || acks != map[bool]int{true: 1}[tc.applied] {
				t.Fatalf("writes %v, %d acks; want applied and acknowledged: %v", st.calls, acks, tc.applied)
			}
		})
	}
}

// lockerStore answers GetLocker with its one locker (ErrNotFound: none).
type lockerStore struct {
	*fakeStore
	l *Locker
}

func (s *lockerStore) GetLocker(context.Context, string) (*Locker, error) {
	if s.l == nil {
		return nil, ErrNotFound
	}
	l := *s.l
	return &l, nil
}

// TestRecordedBirth: a birth is the session on record only when the
// locker is online on the same boot with the same ts as recorded (to 2 ms:
// the rounding of a ts derived before migration 025).
func TestRecordedBirth(t *testing.T) {
	ts := time.Date(2026, 12, 7, 4, 0, 0, 0, time.UTC)
	on := Locker{ID: "lk-1", Online: true, BootID: "b-1", BirthTS: &ts}
	birth := func(boot string, ts time.Time) *protocol.Presence {
		return &protocol.Presence{Online: true, BootID: boot, TS: protocol.T(ts)}
	}
	with := func(f func(l *Locker)) *Locker {
		l := on
		f(&l)
		return &l
	}
	for _, c := range []struct {
		name     string
		locker   *Locker
		p        *protocol.Presence
		retained bool
		want     bool
	}{
		{"the session on record", &on, birth("b-1", ts), false, true},
		{"within a derived ts's rounding", &on, birth("b-1", ts.Add(time.Millisecond)), false, true},
		{"a later session of the same boot", &on, birth("b-1", ts.Add(400*time.Millisecond)), false, false},
		{"another boot", &on, birth("b-2", ts), false, false},
		{"the locker offline", with(func(l *Locker) { l.Online = false }), birth("b-1", ts), true, false},
		{"no ts, none recorded, retained", with(func(l *Locker) { l.BirthTS = nil }), birth("b-1", time.Time{}), true, true},
		{"no ts, none recorded, live (a reconnect?)", with(func(l *Locker) { l.BirthTS = nil }), birth("b-1", time.Time{}), false, false},
		{"no ts, one recorded", &on, birth("b-1", time.Time{}), true, false},
		{"a ts, none recorded", with(func(l *Locker) { l.BirthTS = nil }), birth("b-1", ts), true, false},
		{"an unknown locker", nil, birth("b-1", ts), true, false},
	} {
		m, err := New(Options{Store: &lockerStore{fakeStore: newFakeStore(), l: c.locker}, Bus: &fakeBus{}, Logger: slog.New(slog.DiscardHandler)})
		if err != nil {
			t.Fatal(err)
		}
		if got := m.recordedBirth(context.Background(), "lk-1", c.p, c.retained); got != c.want {
			t.Errorf("%s: recorded %v, want %v", c.name, got, c.want)
		}
	}
}

// birthStore records the births StartSessionWithBirth is given (started:
// its answer), and answers what follows a started one.
type birthStore struct {
	*fakeStore
	started bool
	births  []BirthRecord
}

func (s *birthStore) StartSessionWithBirth(_ context.Context, b BirthRecord) (bool, error) {
	s.births = append(s.births, b)
	return s.started, nil
}

func (s *birthStore) Retained(context.Context, string) (*Retained, error) { return &Retained{}, nil }

func (s *birthStore) OpenCommands(context.Context, []string, time.Time) ([]Command, error) {
	return nil, nil
}

// TestBirthThatWaitedRecordsNoOffset: behind an external broker a birth
// whose ts is well behind its arrival waited at the broker while no
// instance ran (its clock may be right): it records no clock offset, where
// the offset from its late arrival would read minutes behind and judge
// the locker's late closings by it. One on time records its offset. A
// birth the store finds recorded already (another instance's copy) is
// counted as known and brings nothing more (no retained state sent).
func TestBirthThatWaitedRecordsNoOffset(t *testing.T) {
	at := time.Date(2026, 12, 7, 5, 0, 0, 0, time.UTC)
	for _, c := range []struct {
		name     string
		behind   time.Duration
		noOffset bool
	}{
		{"OnTime", time.Second, false},
		{"Waited", 40 * time.Second, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			st := &birthStore{fakeStore: newFakeStore(), started: true}
			bus := &fakeBus{}
			m, err := New(Options{Store: st, Bus: bus, PresenceFromWill: true, Logger: slog.New(slog.DiscardHandler)})
			if err != nil {
				t.Fatal(err)
			}
			p := &protocol.Presence{Online: true, BootID: "b-1", TS: protocol.T(at.Add(-c.behind))}
			m.startFromBirth(context.Background(), birth{id: testLocker.ID, p: p, at: at}, false)
			if len(st.births) != 1 || st.births[0].NoOffset != c.noOffset {
				t.Fatalf("births recorded %+v, want one with NoOffset %v", st.births, c.noOffset)
			}
			if len(bus.published) == 0 {
				t.Fatal("a started session's retained state was not published")
			}
		})
	}
	st := &birthStore{fakeStore: newFakeStore()}
	bus := &fakeBus{}
	m, err := New(Options{Store: st, Bus: bus, PresenceFromWill: true, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	m.startFromBirth(context.Background(), birth{id: testLocker.ID, p: &protocol.Presence{Online: true, TS: protocol.T(at)}, at: at}, false)
	var pb dto.Metric
	if err := m.m.knownBirths.Write(&pb); err != nil {
		t.Fatal(err)
	}
	if known := pb.GetCounter().GetValue(); len(bus.published) != 0 || known != 1 {
		t.Fatalf("a birth recorded already: %d publishes, %v known; want none and 1", len(bus.published), known)
	}
}

// willStore is lockerStore that records the session ends it is given.
type willStore struct {
	lockerStore
	ends []SessionEnd
}

func (s *willStore) MarkOfflineMany(_ context.Context, ends []SessionEnd) error {
	s.ends = append(s.ends, ends...)
	return nil
}

// TestRetainedWillOfAnOfflineLocker: a retained will handed to a new
// subscription, of a locker already offline on record, changes nothing
// and costs no broker read; of one online on record (its will missed), it
// is judged (a read) and applied.
func TestRetainedWillOfAnOfflineLocker(t *testing.T) {
	for _, online := range []bool{false, true} {
		st := &willStore{lockerStore: lockerStore{fakeStore: newFakeStore(), l: &Locker{ID: "lk-1", Online: online}}}
		bus := &retainedBus{payload: []byte(`{"online":false}`)}
		m, err := New(Options{Store: st, Bus: bus, PresenceFromWill: true, Logger: slog.New(slog.DiscardHandler)})
		if err != nil {
			t.Fatal(err)
		}
		m.handleControl(context.Background(), control{kind: ctrlPresence, id: "lk-1", payload: []byte(`{"online":false}`),
			at: time.Now(), retained: true})
		if reads, ends := len(bus.asked), len(st.ends); online && (reads != 1 || ends != 1) || !online && (reads != 0 || ends != 0) {
			t.Fatalf("locker online %v on record: %d broker reads, %d session ends", online, reads, ends)
		}
	}
}
