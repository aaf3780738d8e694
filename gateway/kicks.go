package gateway

import (
	"context"
	"sync/atomic"
	"time"
)

// Kick notifications between gateway instances (postgres.WatchKicks).
const (
	kickHeartbeat = 3 * time.Second  // every instance sends an empty kick this often
	kickSilence   = 10 * time.Second // heard nothing this long: kicks may be missed
	// kickTrust bounds how long after the last notification heard the auth
	// hook still admits a secret it cannot confirm. During an outage of the
	// whole database no kick can be made, so the rule keeps lockers online;
	// when only this instance is cut off, another may disable a locker that
	// this one then admits, for at most this long after it last heard.
	kickTrust = 2 * time.Minute
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
	now  func() time.Time
	last atomic.Int64 // unix ns of the last notification heard; 0: none yet
}

// heard is called with each notification ("" for a heartbeat). The first
// one, and the first after a silence, may follow missed kicks: everything
// cached is forgotten then.
func (k *kickWatch) heard(id string) {
	now := k.now().UnixNano()
	if prev := k.last.Swap(now); now-prev > int64(kickSilence) {
		k.cache.InvalidateAll()
	}
	if id != "" {
		k.cache.Invalidate(id)
	}
}

// gap is called when the listener is back after losing its connection.
func (k *kickWatch) gap() { k.cache.InvalidateAll() }

// trusted reports whether a notification arrived within kickTrust.
func (k *kickWatch) trusted() bool {
	last := k.last.Load()
	return last != 0 && k.now().UnixNano()-last <= int64(kickTrust)
}

// runKicks listens for kicks and sends heartbeats until ctx ends.
func (g *Gateway) runKicks(ctx context.Context, k *kickWatch) error {
	go func() {
		t := time.NewTicker(kickHeartbeat)
		defer t.Stop()
		for {
			if err := g.db.HeartbeatKicks(ctx); err != nil && ctx.Err() == nil {
				g.log.Debug("kick heartbeat", "err", err)
			}
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
		}
	}()
	g.db.WatchKicks(ctx, k.heard, k.gap)
	return nil
}
