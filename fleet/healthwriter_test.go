package fleet

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
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
	if !bytes.Contains([]byte(logs.String()), []byte("latest health not updated")) {
		t.Errorf("failed tick write not logged; log:\n%s", logs.String())
	}
}
