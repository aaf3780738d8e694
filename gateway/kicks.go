package gateway

import (
	"context"
	"sync"
	"sync/atomic"
	"time"
)

// Kick notifications between gateway instances (postgres.WatchKicks).
const (
	kickHeartbeat = 3 * time.Second  // every instance sends an empty kick this often
	kickSilence   = 10 * time.Second // heard nothing this long: kicks may be missed
	// DefaultAuthStaleWindow is Options.AuthStaleWindow's default.
	DefaultAuthStaleWindow = 2 * time.Minute
	maxAuthStaleWindow     = 24 * time.Hour
)

// kickWatch applies kicks heard from every instance (a locker disabled or
// re-provisioned) to the embedded broker's secret cache, and knows whether
// it has heard them lately: the auth hook admits a secret it cannot confirm
// only then (broker.Options.KicksHeard).
type kickWatch struct {
	cache interface {
		Invalidate(id string)
		InvalidateAll()
	}
	now func() time.Time
	// trust bounds how long after the last notification heard the auth
	// hook still admits a secret it cannot confirm (Options.AuthStaleWindow;
	// negative: never). During an outage of the whole database no kick can
	// be made, so the rule keeps lockers online; when only this instance is
	// cut off, another may disable a locker that this one then admits, for
	// at most this long after it last heard.
	trust    time.Duration
	last     atomic.Int64 // unix ns of the last notification heard; 0: none yet
	listened atomic.Int64 // unix ns when LISTEN was last in place
}

// heard is called with each notification ("" for a heartbeat). The first
// after a silence (since the last one, or since LISTEN was in place) may
// follow kicks missed on a connection that looked alive: everything cached
// is forgotten then.
func (k *kickWatch) heard(id string) {
	now := k.now().UnixNano()
	if prev := max(k.last.Swap(now), k.listened.Load()); now-prev > int64(kickSilence) {
		k.cache.InvalidateAll()
	}
	if id != "" {
		k.cache.Invalidate(id)
	}
}

// listening is called each time LISTEN is in place, the first time too:
// kicks sent before were missed, so everything cached is forgotten. The
// first heartbeat after it is no silence, so a secret verified in between
// is kept.
func (k *kickWatch) listening() {
	k.listened.Store(k.now().UnixNano())
	k.cache.InvalidateAll()
}

// lastHeard is the unix time in seconds of the last notification heard, 0
// before the first.
func (k *kickWatch) lastHeard() float64 { return float64(k.last.Load()) / 1e9 }

// trusted reports whether a notification arrived within the trust window.
func (k *kickWatch) trusted() bool { return k.trust >= 0 && k.heardWithin(k.trust) }

func (k *kickWatch) heardWithin(d time.Duration) bool {
	last := k.last.Load()
	return last != 0 && k.now().UnixNano()-last <= int64(d)
}

// runKicks listens for kicks and sends heartbeats until ctx ends. A
// listener that has heard nothing for kickSilence is started again: its
// connection may be half-open, which TCP keep-alive would notice only
// after minutes.
func (g *Gateway) runKicks(ctx context.Context) error {
	k := g.kicks
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Add(1)
	go func() {
		defer wg.Done()
		every(ctx, kickHeartbeat, func() bool {
			if err := g.db.HeartbeatKicks(ctx); err != nil && ctx.Err() == nil {
				g.log.Debug("kick heartbeat", "err", err)
			}
			return true
		})
	}()
	for ctx.Err() == nil {
		lctx, restart := context.WithCancel(ctx)
		started := k.now()
		wg.Add(1)
		go func() {
			defer wg.Done()
			every(lctx, kickHeartbeat, func() bool {
				if k.now().Sub(started) > kickSilence && !k.heardWithin(kickSilence) {
					g.log.Warn("kick listener heard nothing for 10 s; starting it again")
					restart()
					return false
				}
				return true
			})
		}()
		g.db.WatchKicks(lctx, k.heard, k.listening)
		restart()
	}
	return nil
}

// every calls f now and then every d until ctx ends or f returns false.
func every(ctx context.Context, d time.Duration, f func() bool) {
	t := time.NewTicker(d)
	defer t.Stop()
	for f() {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
