package gateway

import (
	"slices"
	"testing"
	"time"
)

type cacheRecorder struct{ calls []string }

func (c *cacheRecorder) Invalidate(id string) { c.calls = append(c.calls, id) }
func (c *cacheRecorder) InvalidateAll()       { c.calls = append(c.calls, "*") }

// TestKickWatch: kicks invalidate one locker; LISTEN in place (the first
// time and after a reconnect) and the first notification after a silence
// invalidate everything (kicks may have been missed), but the first
// heartbeat after LISTEN does not; trusted is true only within the window of
// the last notification.
func TestKickWatch(t *testing.T) {
	now := time.Unix(1000, 0)
	c := &cacheRecorder{}
	k := &kickWatch{cache: c, now: func() time.Time { return now }, trust: DefaultAuthStaleWindow}
	if k.trusted() {
		t.Fatal("trusted before anything was heard")
	}
	k.listening()
	now = now.Add(time.Second)
	k.heard("") // the first heartbeat: a secret verified since LISTEN stays
	if got := k.lastHeard(); got != 1001 {
		t.Fatalf("last heard %v, want 1001", got)
	}
	k.heard("lk-1")
	now = now.Add(kickSilence)
	k.heard("lk-2") // not after a silence yet
	now = now.Add(kickSilence + time.Millisecond)
	if !k.trusted() {
		t.Fatal("not trusted within the window")
	}
	k.heard("lk-3") // after a silence
	now = now.Add(DefaultAuthStaleWindow + time.Millisecond)
	if k.trusted() {
		t.Fatal("trusted past the window")
	}
	k.listening() // back after losing the connection
	now = now.Add(time.Second)
	k.heard("lk-4") // long after the last, but just after LISTEN
	if want := []string{"*", "lk-1", "lk-2", "*", "lk-3", "*", "lk-4"}; !slices.Equal(c.calls, want) {
		t.Fatalf("cache calls %v, want %v", c.calls, want)
	}
}

// TestKickWatchTrustWindow: the window is configurable, and "never" trusts
// nothing however recent the last kick.
func TestKickWatchTrustWindow(t *testing.T) {
	now := time.Unix(1000, 0)
	clock := func() time.Time { return now }
	long := &kickWatch{cache: &cacheRecorder{}, now: clock, trust: time.Hour}
	never := &kickWatch{cache: &cacheRecorder{}, now: clock, trust: -1}
	for _, k := range []*kickWatch{long, never} {
		k.listening()
		k.heard("")
	}
	now = now.Add(59 * time.Minute)
	if !long.trusted() || never.trusted() {
		t.Fatalf("59 min after a kick: 1 h window trusted %v (want true), never trusted %v (want false)", long.trusted(), never.trusted())
	}
	now = now.Add(2 * time.Minute)
	if long.trusted() {
		t.Fatal("trusted past the 1 h window")
	}
}
