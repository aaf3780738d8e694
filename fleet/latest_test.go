package fleet

import (
	"fmt"
	"slices"
	"testing"
	"time"
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
