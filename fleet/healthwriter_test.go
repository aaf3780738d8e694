package fleet

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"math"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lockergate/lockergate/internal/testtool"
)

// healthStore records InsertHealth calls; err, when set, is what they return.
type healthStore struct {
	*fakeStore
	mu     sync.Mutex
	rows   int
	latest []LatestHealth
	err    error
}

func (s *healthStore) InsertHealth(_ context.Context, recs []HealthRecord, latest []LatestHealth) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err != nil {
		return s.err
	}
	s.rows += len(recs)
	s.latest = append(s.latest, latest...)
	return nil
}

func healthIn(id string, seqs ...int64) []inbound {
	var out []inbound
	for _, seq := range seqs {
		out = append(out, inbound{id: id, at: time.Now(),
			payload: fmt.Appendf(nil, `{"ts":"2026-12-03T10:00:00Z","seq":%d}`, seq)})
	}
	return out
}

// TestSharedReportsGaps: an instance that sees only some of a locker's
// reports counts no gaps between the reports of a batch; one that sees
// them all does.
func TestSharedReportsGaps(t *testing.T) {
	for _, shared := range []bool{false, true} {
		st := &healthStore{fakeStore: newFakeStore()}
		m, err := New(Options{Store: st, Bus: &fakeBus{}, LatestHealthEvery: -1, SharedReports: shared})
		if err != nil {
			t.Fatal(err)
		}
		(&healthWriter{m: m}).write(context.Background(), healthIn("lk-1", 1, 3, 4))
		want := LatestHealth{FirstSeq: 1, Gaps: 1} // 2 missing
		if shared {
			// 2 went to another instance. The stored report is still
			// compared with the run's first, 1: compared with 4, a stored
			// seq of 0 < n < 3 would count the run's own 1 and 3 missing.
			want = LatestHealth{FirstSeq: 1, Gaps: 0}
		}
		if st.rows != 3 || len(st.latest) != 1 || st.latest[0].Seq != 4 ||
			st.latest[0].FirstSeq != want.FirstSeq || st.latest[0].Gaps != want.Gaps {
			t.Errorf("shared %v: %d rows, latest %+v, want seq 4 first %d gaps %d",
				shared, st.rows, st.latest, want.FirstSeq, want.Gaps)
		}
	}
}

// TestHeldLatestWrittenByTick: a report held back is written by the
// writer's tick once its time is up, on the manager's clock; a failed
// write is logged, not retried forever.
func TestHeldLatestWrittenByTick(t *testing.T) {
	now := time.Date(2026, 12, 3, 10, 0, 0, 0, time.UTC)
	var clock sync.Mutex
	st := &healthStore{fakeStore: newFakeStore()}
	logs := &testtool.LockedBuffer{}
	m, err := New(Options{Store: st, Bus: &fakeBus{}, LatestHealthEvery: time.Second,
		Logger: slog.New(slog.NewTextHandler(logs, nil)),
		Now:    func() time.Time { clock.Lock(); defer clock.Unlock(); return now }})
	if err != nil {
		t.Fatal(err)
	}
	advance := func(d time.Duration) { clock.Lock(); now = now.Add(d); clock.Unlock() }
	w := &healthWriter{m: m, latest: newLatestThrottle(m.opts.LatestHealthEvery)}
	ctx := context.Background()

	w.write(ctx, healthIn("lk-1", 1)) // written through: the first
	advance(100 * time.Millisecond)
	w.write(ctx, healthIn("lk-1", 2)) // held: within the second
	w.tick(ctx, false)
	if len(st.latest) != 1 || st.latest[0].Seq != 1 {
		t.Fatalf("latest written %+v, want seq 1 only (2 held)", st.latest)
	}
	advance(time.Second)
	w.tick(ctx, false)
	if len(st.latest) != 2 || st.latest[1].Seq != 2 {
		t.Fatalf("latest written %+v, want seq 2 written by the tick", st.latest)
	}

	advance(100 * time.Millisecond)
	w.write(ctx, healthIn("lk-1", 3)) // held
	st.mu.Lock()
	st.err = fmt.Errorf("bad row: %w", ErrInvalid) // not retried
	st.mu.Unlock()
	advance(time.Second)
	w.tick(ctx, false)
	if !bytes.Contains([]byte(logs.String()), []byte("latest health refused by the database")) {
		t.Errorf("failed tick write not logged; log:\n%s", logs.String())
	}
}

// poisonStore refuses, as a value PostgreSQL cannot take (ErrInvalid),
// every write that holds a row or latest health of locker poison.
type poisonStore struct {
	healthStore
	poison string
	calls  int
}

func (s *poisonStore) InsertHealth(ctx context.Context, recs []HealthRecord, latest []LatestHealth) error {
	s.mu.Lock()
	s.calls++
	s.mu.Unlock()
	for _, r := range recs {
		if r.DeviceID == s.poison {
			return fmt.Errorf("bigint out of range: %w", ErrInvalid)
		}
	}
	for _, l := range latest {
		if l.DeviceID == s.poison {
			return fmt.Errorf("bigint out of range: %w", ErrInvalid)
		}
	}
	return s.healthStore.InsertHealth(ctx, recs, latest)
}

// TestRefusedHealthIsolated: a batch the database refuses for one locker's
// value is split until that locker is alone: every other locker's rows and
// latest health are stored, the refused row is dropped (and counted),
// every message is acknowledged, and the write is not retried forever.
func TestRefusedHealthIsolated(t *testing.T) {
	st := &poisonStore{healthStore: healthStore{fakeStore: newFakeStore()}, poison: "lk-250"}
	logs := &testtool.LockedBuffer{}
	m, err := New(Options{Store: st, Bus: &fakeBus{}, LatestHealthEvery: -1, Logger: slog.New(slog.NewTextHandler(logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	var batch []inbound
	acked := 0
	for i := 1; i <= 500; i++ {
		for _, in := range healthIn(fmt.Sprintf("lk-%d", i), 1, 2) {
			in.ack = func() { acked++ }
			batch = append(batch, in)
		}
	}
	(&healthWriter{m: m}).write(context.Background(), batch)
	if st.rows != 998 || len(st.latest) != 499 || acked != 1000 {
		t.Fatalf("stored %d rows, %d latest, acknowledged %d; want 998, 499 (all but lk-250's), 1000", st.rows, len(st.latest), acked)
	}
	for _, l := range st.latest {
		if l.DeviceID == "lk-250" {
			t.Fatalf("the refused locker's latest was stored: %+v", l)
		}
	}
	// Halving: about 2 log2(n) writes for each side, not one per row.
	if st.calls > 60 {
		t.Errorf("%d writes to isolate one locker in 1,000 rows", st.calls)
	}
	// Logged once: a minute's drops of one locker, channel and reason are
	// one line (the metric counts both).
	if got := strings.Count(logs.String(), "dropped device message"); got != 1 || !strings.Contains(logs.String(), "locker=lk-250") {
		t.Errorf("want lk-250's rows dropped and logged once; log:\n%s", logs)
	}
}

// TestSeqGap: gaps are counted only after a known seq, and only for a leap
// a counter makes by losing messages; no seq overflows the count.
func TestSeqGap(t *testing.T) {
	for _, c := range []struct{ prev, next, want int64 }{
		{1, 2, 0}, {1, 5, 3}, {5, 1, 0}, {0, 9, 0}, {7, 0, 0},
		{1, MaxSeqGap + 2, MaxSeqGap}, {1, MaxSeqGap + 3, 0},
		{math.MaxInt64, 1, 0}, {1, math.MaxInt64, 0}, {math.MaxInt64 - 1, math.MaxInt64, 0},
	} {
		if got := SeqGap(c.prev, c.next); got != c.want {
			t.Errorf("SeqGap(%d, %d) = %d, want %d", c.prev, c.next, got, c.want)
		}
	}
	l := newLatest(HealthRecord{Seq: math.MaxInt64})
	l.merge(HealthRecord{Seq: 1})
	l.merge(HealthRecord{Seq: 3})
	if l.Gaps != 1 || l.Seq != 3 || l.FirstSeq != math.MaxInt64 {
		t.Errorf("run from MaxInt64: %+v, want 1 gap (2 missing), seq 3", l)
	}
}

// TestEveryHealthRecordRefused: when the database refuses every record of
// a batch, the fault is the gateway's or the schema's (an overflow in its
// SQL, say), not the lockers': the batch is an error, logged as lost, and
// nothing is dropped as the lockers' invalid messages or acknowledged.
func TestEveryHealthRecordRefused(t *testing.T) {
	st := &healthStore{fakeStore: newFakeStore(), err: fmt.Errorf("bigint out of range: %w", ErrInvalid)}
	logs := &testtool.LockedBuffer{}
	m, err := New(Options{Store: st, Bus: &fakeBus{}, LatestHealthEvery: -1, Logger: slog.New(slog.NewTextHandler(logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	acked := 0
	var batch []inbound
	for _, id := range []string{"lk-1", "lk-2", "lk-3"} {
		for _, in := range healthIn(id, 1, 2) {
			in.ack = func() { acked++ }
			batch = append(batch, in)
		}
	}
	(&healthWriter{m: m}).write(context.Background(), batch)
	out := logs.String()
	if acked != 0 || strings.Contains(out, "dropped device message") || !strings.Contains(out, "health batch lost") ||
		!strings.Contains(out, "every one of the batch's 6 health rows refused") {
		t.Fatalf("acknowledged %d; log:\n%s", acked, out)
	}
}
