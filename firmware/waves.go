package firmware

import (
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"slices"
	"time"
)

// ValidateWaves checks cumulative wave percentages: 1 to 20 waves, each
// 1..100, strictly increasing, the last 100 (every target is in a wave).
func ValidateWaves(pcts []int) error {
	if len(pcts) == 0 || len(pcts) > 20 {
		return fmt.Errorf("waves: want 1 to 20 cumulative percentages ending at 100")
	}
	prev := 0
	for _, p := range pcts {
		if p <= prev || p > 100 {
			return fmt.Errorf("waves %v: want strictly increasing percentages in 1..100", pcts)
		}
		prev = p
	}
	if prev != 100 {
		return fmt.Errorf("waves %v: the last wave must be 100 (every locker is in a wave)", pcts)
	}
	return nil
}

// WaveSizes splits n jobs into waves by cumulative percentages (rounded
// up), giving each wave at least minPer jobs while jobs remain. The last wave
// takes the rest, so the sizes sum to n; trailing waves may be empty when
// minPer used the jobs up.
func WaveSizes(n int, pcts []int, minPer int) []int {
	sizes := make([]int, len(pcts))
	done := 0
	for i, p := range pcts {
		cum := (p*n + 99) / 100
		s := max(cum-done, minPer)
		s = min(s, n-done)
		if i == len(pcts)-1 {
			s = n - done
		}
		sizes[i] = s
		done += s
	}
	return sizes
}

// Crossed reports whether a wave's failures exceed the threshold: a wave of
// size jobs fails its gate once more than maxPct percent of them failed.
// Failures are counted against the whole wave, so a crossing is final and
// can be acted on as soon as it happens, before the wave finishes.
func Crossed(failed, size int, maxPct float64) bool {
	return size > 0 && float64(failed)*100 > maxPct*float64(size)
}

// order shuffles targets deterministically per rollout, so that the first
// waves sample every site and model rather than the lowest ids.
func order(rolloutID string, ids []string) []string {
	key := func(id string) uint64 {
		h := sha256.Sum256([]byte(rolloutID + "\x00" + id))
		return binary.BigEndian.Uint64(h[:8])
	}
	out := slices.Clone(ids)
	slices.SortFunc(out, func(a, b string) int {
		ka, kb := key(a), key(b)
		switch {
		case ka < kb:
			return -1
		case ka > kb:
			return 1
		}
		return 0
	})
	return out
}

// rate paces job hand-out at perMin jobs per minute with a generic cell
// rate algorithm: tat is the theoretical time the next job is due. It is
// stored with the rollout so a restarted gateway keeps the pace. Idle time
// earns at most slack's worth of jobs (one dispatch tick), so no minute sees
// more than perMin plus one tick's share of jobs.
type rate struct {
	interval, slack time.Duration
}

func newRate(perMin int, slack time.Duration) rate {
	return rate{interval: time.Minute / time.Duration(max(perMin, 1)), slack: slack}
}

// budget returns how many jobs may go out at now.
func (r rate) budget(tat, now time.Time) int {
	tat = later(tat, now.Add(-r.slack))
	if tat.After(now) {
		return 0
	}
	return int(now.Sub(tat)/r.interval) + 1
}

// take returns the new tat after n jobs went out at now.
func (r rate) take(tat, now time.Time, n int) time.Time {
	if n == 0 {
		return tat
	}
	return later(tat, now.Add(-r.slack)).Add(time.Duration(n) * r.interval)
}

func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}
