package orders

import (
	"context"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lockergate/lockergate/client"
	"github.com/lockergate/lockergate/pickup"
)

// TestAwaitOutlastsAFailedRead: a read of the pickup that fails (the
// gateway restarting) is no answer about it: await reads again, and takes
// the state it then finds; a pickup that ended is an error at once.
func TestAwaitOutlastsAFailedRead(t *testing.T) {
	var reads atomic.Int32
	var state atomic.Value
	state.Store("ready")
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if reads.Add(1) <= 3 {
			http.Error(w, "restarting", http.StatusServiceUnavailable)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		w.Write([]byte(`{"id":"p-1","state":"` + state.Load().(string) + `"}`))
	}))
	defer srv.Close()
	o := &Options{API: client.New(srv.URL, "tok")}
	p, err := o.await(context.Background(), "p-1", pickup.Ready)
	if err != nil || p.State != pickup.Ready || reads.Load() != 4 {
		t.Fatalf("await: %+v %v after %d reads; want ready after 3 failed reads and one more", p, err, reads.Load())
	}
	state.Store("expired")
	if _, err := o.await(context.Background(), "p-1", pickup.PickedUp); err == nil || !strings.Contains(err.Error(), "ended expired") {
		t.Fatalf("await of an ended pickup: %v, want it ended", err)
	}
}

// TestCreateWaitsOutA429: a create answered 429 (the platform's token has
// as many requests in flight as the gateway allows) was not acted on and
// is sent again; other answers are the create's; one that stays busy is
// given up when ctx ends.
func TestCreateWaitsOutA429(t *testing.T) {
	var posts, busy atomic.Int32
	busy.Store(1)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if posts.Add(1) <= busy.Load() {
			w.Header().Set("Content-Type", "application/problem+json")
			w.Header().Set("Retry-After", "1")
			w.WriteHeader(http.StatusTooManyRequests)
			w.Write([]byte(`{"title":"Too Many Requests","status":429,"detail":"16 in flight"}`))
			return
		}
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusCreated)
		w.Write([]byte(`{"id":"p-1","state":"staging"}`))
	}))
	defer srv.Close()
	o := &Options{API: client.New(srv.URL, "tok"), Platform: "speedy", ExpiresIn: time.Hour, BusyWait: 10 * time.Millisecond}
	var p pickup.Pickup
	status, err := o.create(context.Background(), order{ref: "A-1", site: "s1"}, &p)
	if status != http.StatusCreated || err != nil || p.ID != "p-1" || posts.Load() != 2 {
		t.Fatalf("create: %d %v %+v after %d posts; want 201 on the second", status, err, p, posts.Load())
	}
	busy.Store(1 << 30)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		for posts.Load() < 5 && ctx.Err() == nil { // some retries, then the end of the run
			runtime.Gosched()
		}
		cancel()
	}()
	// It returns (the 429, or the request ctx cut short), an error either way.
	if status, err := o.create(ctx, order{ref: "A-2", site: "s1"}, &p); status == http.StatusCreated || err == nil {
		t.Fatalf("create while busy until ctx ended: %d %v, want an error", status, err)
	}
}
