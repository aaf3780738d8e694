package firmware

import (
	"context"
	"testing"
	"time"
)

// TestPendingGates: a wait returns at once with nothing pending, when the
// last of the rollout's pending checks is done (not the first), and at
// its bound when one never is.
func TestPendingGates(t *testing.T) {
	var p pendingGates
	ctx := context.Background()
	p.wait(ctx, "ro-1", time.Hour) // nothing pending: returns at once

	first, second := p.add("ro-1"), p.add("ro-1")
	other := p.add("ro-2")
	waited := make(chan struct{})
	go func() {
		p.wait(ctx, "ro-1", time.Hour)
		close(waited)
	}()
	first()
	first() // done twice counts once
	other()
	select {
	case <-waited:
		t.Fatal("the wait ended with one of ro-1's checks still pending")
	case <-time.After(100 * time.Millisecond): // an observation window for something that must not happen
	}
	second()
	select {
	case <-waited:
	case <-time.After(10 * time.Second):
		t.Fatal("the wait did not end when ro-1's last check was done")
	}

	stuck := p.add("ro-3")
	defer stuck()
	start := time.Now()
	p.wait(ctx, "ro-3", 50*time.Millisecond) // bounded
	if time.Since(start) < 50*time.Millisecond {
		t.Fatal("the wait ended before its bound with a check pending")
	}
	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	p.wait(cancelled, "ro-3", time.Hour) // its context ended: returns
}
