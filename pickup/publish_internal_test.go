package pickup

import (
	"context"
	"log/slog"
	"testing"
)

// liveFleet records whether PublishCreds got a live context.
type liveFleet struct {
	Fleet
	live, calls int
}

func (f *liveFleet) PublishCreds(ctx context.Context, _ string) error {
	f.calls++
	if ctx.Err() == nil {
		f.live++
	}
	return ctx.Err()
}

// TestPublishOutlivesTheRequest: a credential set is published after a
// committed change even when the request that made it has gone away (a
// cancelled pickup's code must leave the locker).
func TestPublishOutlivesTheRequest(t *testing.T) {
	f := &liveFleet{}
	s := &Service{o: Options{Fleet: f}, log: slog.New(slog.DiscardHandler)}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	s.publish(ctx, "lk-1")
	if f.calls != 1 || f.live != 1 {
		t.Fatalf("%d publishes, %d with a live context; want 1, 1", f.calls, f.live)
	}
}
