package fleet

import (
	"slices"
	"strings"
	"time"
)

// LatestHealth is a locker's newest health message standing for a run of
// its messages written as one latest-health update: Seq and Body are the
// newest's, FirstSeq is the oldest's, and Gaps counts the sequence numbers
// missing between them.
type LatestHealth struct {
	HealthRecord
	FirstSeq int64
	Gaps     int64
}

func newLatest(r HealthRecord) *LatestHealth {
	return &LatestHealth{HealthRecord: r, FirstSeq: r.Seq}
}

// merge makes r, the locker's next message, the newest of l. A sequence
// number that does not follow (a reboot starts again at 1) counts no gap,
// nor one after a message without seq (0: unknown), nor a leap of more
// than MaxSeqGap (a counter that jumped, not messages lost), as the store
// counts them against the stored latest.
func (l *LatestHealth) merge(r HealthRecord) {
	l.Gaps = min(l.Gaps+SeqGap(l.Seq, r.Seq), maxRunGaps)
	l.HealthRecord = r
}

// MaxSeqGap is the largest leap of a locker's health seq counted as
// messages lost: at one a minute, about two years of them. Seqs are never
// negative (protocol.Health), so no difference of two overflows.
const MaxSeqGap = 1_000_000

// maxRunGaps bounds the gaps one run of held messages adds: the stored
// count cannot overflow (postgres adds at most this to at most 2^62).
const maxRunGaps = 1 << 40

// SeqGap is how many messages were lost between a locker's health seq
// prev and its next, next: none unless prev is known (not 0) and next
// leaps ahead of it by 2 to MaxSeqGap+1.
func SeqGap(prev, next int64) int64 {
	if prev <= 0 || next <= prev {
		return 0
	}
	if gap := next - prev - 1; gap <= MaxSeqGap {
		return gap
	}
	return 0
}

// LatestOf returns each locker's latest health in recs, which are in the
// order they arrived, sorted by locker.
func LatestOf(recs []HealthRecord) []LatestHealth {
	by := make(map[string]*LatestHealth, len(recs))
	for _, r := range recs {
		if l := by[r.DeviceID]; l != nil {
			l.merge(r)
		} else {
			by[r.DeviceID] = newLatest(r)
		}
	}
	return sortedLatest(by)
}

func sortedLatest(by map[string]*LatestHealth) []LatestHealth {
	out := make([]LatestHealth, 0, len(by))
	for _, l := range by {
		out = append(out, *l)
	}
	// One order for every writer and instance, so that two updates of
	// the same lockers lock their rows in the same order.
	slices.SortFunc(out, func(a, b LatestHealth) int { return strings.Compare(a.DeviceID, b.DeviceID) })
	return out
}

// latestThrottle decides when a locker's latest health is written. Health
// rows are all stored; the latest-health update is what a locker's
// frequent reports make expensive (one row rewritten per message). A locker
// whose latest was written more than every ago is written with its batch,
// so one that reports once a minute is never held back; a newer report
// within every is held, merged with those after it, and written once every
// has passed. Each health writer has its own (one locker, one writer).
type latestThrottle struct {
	every   time.Duration
	written map[string]time.Time // lockers written within every, and when
	held    map[string]*LatestHealth
	// writes lists the writes in the order they were made (so by time),
	// from head on: what comes due is found at the front, without a
	// look at every held locker for each batch.
	writes []latestWrite
	head   int
}

type latestWrite struct {
	id string
	at time.Time
}

func newLatestThrottle(every time.Duration) *latestThrottle {
	return &latestThrottle{every: every, written: map[string]time.Time{}, held: map[string]*LatestHealth{}}
}

// take returns the latest health to write with recs, a batch in arrival
// order, at now, and holds back the rest.
func (t *latestThrottle) take(now time.Time, recs []HealthRecord) []LatestHealth {
	out := make(map[string]*LatestHealth)
	for _, r := range recs {
		id := r.DeviceID
		switch {
		case out[id] != nil:
			out[id].merge(r)
		case t.held[id] != nil:
			t.held[id].merge(r)
		case t.recent(now, id):
			t.held[id] = newLatest(r)
		default:
			out[id] = newLatest(r)
		}
	}
	return t.release(now, out)
}

// due returns the held latest health whose time has come, at now.
func (t *latestThrottle) due(now time.Time) []LatestHealth {
	return t.release(now, make(map[string]*LatestHealth))
}

// all returns everything held (at shutdown).
func (t *latestThrottle) all() []LatestHealth {
	out := t.held
	t.held = map[string]*LatestHealth{}
	return sortedLatest(out)
}

func (t *latestThrottle) recent(now time.Time, id string) bool {
	at, ok := t.written[id]
	return ok && now.Sub(at) < t.every
}

// release adds to out the held latest health whose last write is every
// old, forgets lockers written that long ago with nothing held, and records
// the writes of out at now.
func (t *latestThrottle) release(now time.Time, out map[string]*LatestHealth) []LatestHealth {
	for ; t.head < len(t.writes) && now.Sub(t.writes[t.head].at) >= t.every; t.head++ {
		w := t.writes[t.head]
		t.writes[t.head] = latestWrite{}
		if at := t.written[w.id]; !at.Equal(w.at) {
			continue // written again since
		}
		if l := t.held[w.id]; l != nil {
			out[w.id] = l
			delete(t.held, w.id)
		} else {
			delete(t.written, w.id)
		}
	}
	if t.head > len(t.writes)/2 {
		t.writes = t.writes[:copy(t.writes, t.writes[t.head:])]
		t.head = 0
	}
	for id := range out {
		t.written[id] = now
		t.writes = append(t.writes, latestWrite{id: id, at: now})
	}
	return sortedLatest(out)
}
