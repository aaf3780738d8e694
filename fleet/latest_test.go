package fleet

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/lockergate/lockergate/protocol"
)

func rec(id string, seq int64) HealthRecord {
	return HealthRecord{DeviceID: id, Seq: seq, Body: []byte(`{}`)}
}

// seqs renders latest health as "id:first-seq/gaps" for comparison.
func seqs(ls []LatestHealth) []string {
	var out []string
	for _, l := range ls {
		out = append(out, fmt.Sprintf("%s:%d-%d/%d", l.DeviceID, l.FirstSeq, l.Seq, l.Gaps))
	}
	return out
}

func TestLatestThrottle(t *testing.T) {
	const every = time.Second
	t0 := time.Date(2026, 12, 3, 10, 0, 0, 0, time.UTC)
	at := func(d time.Duration) time.Time { return t0.Add(d) }
	tr := newLatestThrottle(every)
	want := func(step string, got []LatestHealth, w ...string) {
		t.Helper()
		if g := seqs(got); !slices.Equal(g, w) {
			t.Fatalf("%s: got %q, want %q", step, g, w)
		}
	}

	// First reports are written at once, merged within the batch, in
	// locker order.
	want("first batch", tr.take(at(0), []HealthRecord{rec("b", 1), rec("a", 7), rec("b", 2), rec("b", 4)}),
		"a:7-7/0", "b:1-4/1")
	// Within a second of their write they are held and merged.
	want("held", tr.take(at(300*time.Millisecond), []HealthRecord{rec("a", 8), rec("c", 1)}), "c:1-1/0")
	want("held again", tr.take(at(600*time.Millisecond), []HealthRecord{rec("a", 11), rec("b", 5)}))
	want("not due yet", tr.due(at(900*time.Millisecond)))
	// Due a second after their last write: a with the run 8..11 (9, 10
	// missing), b with 5.
	want("due", tr.due(at(time.Second)), "a:8-11/2", "b:5-5/0")
	// c was written at 0.3 s; its next report at 1.2 s is held until 1.3 s
	// and goes with the batch that comes then.
	want("c held", tr.take(at(1200*time.Millisecond), []HealthRecord{rec("c", 2)}))
	want("c with a batch", tr.take(at(1300*time.Millisecond), []HealthRecord{rec("d", 1)}), "c:2-2/0", "d:1-1/0")
	// A reboot starts the sequence again: no gap.
	want("reboot held", tr.take(at(1400*time.Millisecond), []HealthRecord{rec("c", 3), rec("c", 1)}))
	want("reboot", tr.due(at(2300*time.Millisecond)), "c:3-1/0")
	// Lockers quiet for a second are forgotten: their next report is
	// written at once.
	want("quiet", tr.due(at(5*time.Second)))
	if len(tr.written) != 0 || len(tr.held) != 0 {
		t.Fatalf("after a quiet spell: written %v, held %v", tr.written, tr.held)
	}
	want("after quiet", tr.take(at(5*time.Second), []HealthRecord{rec("a", 12)}), "a:12-12/0")
	// Shutdown takes everything held.
	want("held at shutdown", tr.take(at(5100*time.Millisecond), []HealthRecord{rec("a", 13), rec("e", 1)}), "e:1-1/0")
	want("all", tr.all(), "a:13-13/0")
	want("nothing left", tr.due(at(time.Hour)))
}

func TestLatestOf(t *testing.T) {
	got := LatestOf([]HealthRecord{rec("z", 3), rec("y", 1), rec("z", 5), rec("z", 2)})
	if g := seqs(got); !slices.Equal(g, []string{"y:1-1/0", "z:3-2/1"}) {
		t.Fatalf("got %q", g)
	}
	if len(LatestOf(nil)) != 0 {
		t.Fatal("LatestOf(nil) not empty")
	}
}

// naiveThrottle is latestThrottle's rule written the obvious way (every
// held locker looked at on each call), to check the real one against.
type naiveThrottle struct {
	every   time.Duration
	written map[string]time.Time
	held    map[string]*LatestHealth
}

func (n *naiveThrottle) release(now time.Time, out map[string]*LatestHealth) []LatestHealth {
	for id, l := range n.held {
		if now.Sub(n.written[id]) >= n.every {
			out[id] = l
			delete(n.held, id)
		}
	}
	for id := range out {
		n.written[id] = now
	}
	return sortedLatest(out)
}

func (n *naiveThrottle) take(now time.Time, recs []HealthRecord) []LatestHealth {
	out := map[string]*LatestHealth{}
	for _, r := range recs {
		at, written := n.written[r.DeviceID]
		switch id := r.DeviceID; {
		case out[id] != nil:
			out[id].merge(r)
		case n.held[id] != nil:
			n.held[id].merge(r)
		case written && now.Sub(at) < n.every:
			n.held[id] = newLatest(r)
		default:
			out[id] = newLatest(r)
		}
	}
	return n.release(now, out)
}

// TestLatestThrottleAgainstNaive drives both with the same random batches
// and ticks: the same latest health must come out of each at each step.
func TestLatestThrottleAgainstNaive(t *testing.T) {
	const every = time.Second
	rng := rand.New(rand.NewPCG(1, 2))
	real := newLatestThrottle(every)
	naive := &naiveThrottle{every: every, written: map[string]time.Time{}, held: map[string]*LatestHealth{}}
	now := time.Date(2026, 12, 3, 10, 0, 0, 0, time.UTC)
	seq := map[string]int64{}
	for step := range 5000 {
		now = now.Add(time.Duration(rng.IntN(300)) * time.Millisecond)
		if rng.IntN(4) == 0 {
			if g, w := seqs(real.due(now)), seqs(naive.release(now, map[string]*LatestHealth{})); !slices.Equal(g, w) {
				t.Fatalf("step %d due: got %q, want %q", step, g, w)
			}
			continue
		}
		var recs []HealthRecord
		for range rng.IntN(8) {
			id := fmt.Sprintf("lk-%d", rng.IntN(12))
			seq[id] += 1 + int64(rng.IntN(3)) // sometimes a gap
			recs = append(recs, rec(id, seq[id]))
		}
		if g, w := seqs(real.take(now, recs)), seqs(naive.take(now, recs)); !slices.Equal(g, w) {
			t.Fatalf("step %d take: got %q, want %q", step, g, w)
		}
		if len(real.writes)-real.head > 4*len(real.written)+16 {
			t.Fatalf("step %d: %d writes queued for %d lockers", step, len(real.writes)-real.head, len(real.written))
		}
	}
	if g, w := seqs(real.all()), seqs(sortedLatest(naive.held)); !slices.Equal(g, w) {
		t.Fatalf("all: got %q, want %q", g, w)
	}
}

// TestLatestHealthEveryDefault: held latest health moves last_seen late, so
// by default it is held at most half a health interval (a locker is stale
// after three silent ones), and at most a second.
func TestLatestHealthEveryDefault(t *testing.T) {
	fast := DefaultConfig
	fast.HealthIntervalS = 1
	for _, c := range []struct {
		cfg  protocol.Config
		set  time.Duration
		want time.Duration
	}{
		{DefaultConfig, 0, time.Second},
		{fast, 0, 500 * time.Millisecond},
		{fast, time.Hour, time.Hour}, // set explicitly: as set
		{fast, -1, -1},
	} {
		m, err := New(Options{Store: newFakeStore(), Bus: &fakeBus{}, Config: c.cfg, LatestHealthEvery: c.set})
		if err != nil {
			t.Fatal(err)
		}
		if got := m.opts.LatestHealthEvery; got != c.want {
			t.Errorf("health interval %d s, set %v: LatestHealthEvery %v, want %v", c.cfg.HealthIntervalS, c.set, got, c.want)
		}
	}
}
