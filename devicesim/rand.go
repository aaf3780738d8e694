package devicesim

import (
	"context"
	"math"
	"math/rand/v2"
	"sync"
	"time"
)

// Random streams of a locker. Each is seeded from (fleet seed, locker index,
// stream) so one kind of randomness never shifts another.
const (
	streamDecide uint64 = iota + 1 // model choice, baselines, people's behaviour
	streamSensor                   // health noise
	streamJitter                   // network back-off
)

func newRand(seed int64, index int, stream uint64) *rand.Rand {
	return rand.New(rand.NewPCG(uint64(seed), splitmix64(uint64(index)<<8|stream)))
}

// splitmix64 spreads neighbouring inputs over the whole 64-bit space.
func splitmix64(x uint64) uint64 {
	x += 0x9e3779b97f4a7c15
	x = (x ^ x>>30) * 0xbf58476d1ce4e5b9
	x = (x ^ x>>27) * 0x94d049bb133111eb
	return x ^ x>>31
}

// backoff is the delay before retry number attempt (0-based): full jitter over
// min(max, base·2^attempt), so a fleet that lost its broker does not come back
// in lock-step.
func backoff(r *rand.Rand, attempt int, base, max time.Duration) time.Duration {
	ceil := max
	if attempt < 62 {
		if e := base << attempt; e > 0 && e < max {
			ceil = e
		}
	}
	if ceil <= 0 {
		return 0
	}
	return time.Duration(r.Int64N(int64(ceil)))
}

// limiter paces events to a rate across goroutines: each caller reserves the
// next free slot. A nil limiter does not limit.
type limiter struct {
	mu       sync.Mutex
	interval time.Duration
	next     time.Time
}

func newLimiter(perSecond float64) *limiter {
	if perSecond <= 0 || math.IsInf(perSecond, 1) {
		return nil
	}
	return &limiter{interval: time.Duration(float64(time.Second) / perSecond)}
}

// wait blocks until the caller's slot or ctx ends.
func (l *limiter) wait(ctx context.Context) error {
	if l == nil {
		return ctx.Err()
	}
	l.mu.Lock()
	now := time.Now()
	slot := l.next
	if slot.Before(now) {
		slot = now
	}
	l.next = slot.Add(l.interval)
	l.mu.Unlock()
	d := time.Until(slot)
	if d <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
