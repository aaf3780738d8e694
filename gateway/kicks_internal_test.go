package gateway

import (
	"slices"
	"testing"
	"time"
)

type cacheRecorder struct{ calls []string }

func (c *cacheRecorder) Invalidate(id string) { c.calls = append(c.calls, id) }
func (c *cacheRecorder) InvalidateAll()       { c.calls = append(c.calls, "*") }

// TestKickWatch: kicks invalidate one locker; the first notification, the
// first after a silence and a reconnect invalidate everything (kicks may
// have been missed); trusted is true only within kickTrust of the last.
func TestKickWatch(t *testing.T) {
	now := time.Unix(1000, 0)
	c := &cacheRecorder{}
	k := &kickWatch{cache: c, now: func() time.Time { return now }}
	if k.trusted() {
		t.Fatal("trusted before anything was heard")
	}
	k.heard("") // the first heartbeat
	k.heard("lk-1")
	now = now.Add(kickSilence)
	k.heard("lk-2") // not after a silence yet
	now = now.Add(kickSilence + time.Millisecond)
	if !k.trusted() {
		t.Fatal("not trusted within kickTrust")
	}
	k.heard("lk-3") // after a silence
	now = now.Add(kickTrust + time.Millisecond)
	if k.trusted() {
		t.Fatal("trusted past kickTrust")
	}
	k.gap()
	if want := []string{"*", "lk-1", "lk-2", "*", "lk-3", "*"}; !slices.Equal(c.calls, want) {
		t.Fatalf("cache calls %v, want %v", c.calls, want)
	}
}
