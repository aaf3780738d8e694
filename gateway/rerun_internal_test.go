package gateway

import (
	"context"
	"sync/atomic"
	"testing"
)

// Requests made while the job runs are not lost: they collapse into one
// more run after it, made by the caller already running it.
func TestRerunRunsOnceMoreForRequestsMeanwhile(t *testing.T) {
	var r rerun
	started, release := make(chan struct{}), make(chan struct{})
	var runs atomic.Int32
	job := func(context.Context) {
		if runs.Add(1) == 1 {
			close(started)
			<-release
		}
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		r.Do(context.Background(), job)
	}()
	<-started
	// Both return at once: the first caller is running the job.
	r.Do(context.Background(), job)
	r.Do(context.Background(), job)
	if got := runs.Load(); got != 1 {
		t.Fatalf("runs while the first was under way = %d, want 1 (a second caller ran it alongside)", got)
	}
	close(release)
	<-done
	if got := runs.Load(); got != 2 {
		t.Fatalf("runs = %d, want 2: the two requests made meanwhile are one more run", got)
	}
	// Nothing asked since: a Wait does not block, and the next request runs it.
	r.Wait()
	r.Do(context.Background(), job)
	if got := runs.Load(); got != 3 {
		t.Fatalf("runs after a later request = %d, want 3", got)
	}
}

// A request made after the running caller's last look, before it lets go,
// is run: by that caller, which looks again once it has let go.
func TestRerunRequestAtTheRelease(t *testing.T) {
	var r rerun
	var runs atomic.Int32
	job := func(context.Context) { runs.Add(1) }
	r.beforeUnlock = func() {
		r.beforeUnlock = nil
		r.Do(context.Background(), job) // returns at once: the lock is still held
	}
	r.Do(context.Background(), job)
	if got := runs.Load(); got != 2 {
		t.Fatalf("runs = %d, want 2: the request made at the release was lost", got)
	}
}

// A cancelled context ends the runs: a request made meanwhile does not run.
func TestRerunStopsWithItsContext(t *testing.T) {
	var r rerun
	ctx, cancel := context.WithCancel(context.Background())
	var runs atomic.Int32
	job := func(context.Context) {
		runs.Add(1)
		cancel()
		r.Do(ctx, func(context.Context) { t.Error("run alongside the first") }) // asks again
	}
	r.Do(ctx, job)
	if got := runs.Load(); got != 1 {
		t.Fatalf("runs = %d, want 1: the context ended during the first", got)
	}
	r.Wait()
}
