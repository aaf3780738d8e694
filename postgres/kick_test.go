package postgres_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/lockergate/lockergate/internal/testtool"
	"github.com/lockergate/lockergate/protocol"
)

// TestWatchKicks: disabling a locker and re-issuing its identity reach
// every listener; enabling does not; the listener says when LISTEN is in
// place, the first time and again after it lost its connection.
func TestWatchKicks(t *testing.T) {
	ctx := context.Background()
	db := MustOpen(t)
	a := MustDevice(t, db, "s1", "SN-KA", 1)
	b := MustDevice(t, db, "s1", "SN-KB", 1)
	got := make(chan string, 64)
	listens := make(chan struct{}, 4)
	wctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		db.WatchKicks(wctx, func(id string) { got <- id }, func() { listens <- struct{}{} })
	}()
	t.Cleanup(func() { cancel(); <-done })
	on, off := true, false
	next := func() string {
		t.Helper()
		select {
		case id := <-got:
			return id
		case <-time.After(10 * time.Second):
			t.Fatal("no kick notification within 10 s")
		}
		return ""
	}

	// Notifications before LISTEN is in place are lost: send heartbeats
	// (empty kicks) until one arrives.
	testtool.Eventually(t, 10*time.Second, "the listener hears a heartbeat", func() error {
		if err := db.HeartbeatKicks(ctx); err != nil {
			return err
		}
		select {
		case id := <-got:
			if id != "" {
				t.Fatalf("heartbeat heard as %q, want \"\"", id)
			}
			return nil
		case <-time.After(200 * time.Millisecond):
			return errors.New("nothing yet")
		}
	})
	if n := len(listens); n != 1 {
		t.Fatalf("LISTEN in place reported %d times for the first connection, want 1", n)
	}
	<-listens
	// The next kick, past the heartbeats the loop above still has on the way.
	nextKick := func() string {
		t.Helper()
		for {
			if id := next(); id != "" {
				return id
			}
		}
	}
	if _, err := db.UpdateLocker(ctx, a, &on, nil); err != nil {
		t.Fatal(err)
	}
	if id := nextKick(); id != a {
		t.Fatalf("kick for %s, want %s (disabled)", id, a)
	}
	// Enabling, or marking replaceable, is no kick: the next one is b's.
	if _, err := db.UpdateLocker(ctx, a, &off, &on); err != nil {
		t.Fatal(err)
	}
	if _, err := db.UpdateLocker(ctx, b, &on, nil); err != nil {
		t.Fatal(err)
	}
	if id := nextKick(); id != b {
		t.Fatalf("kick for %s, want only %s (enabling is no kick)", id, b)
	}
	// Re-provisioning a (replaceable) kicks it.
	req := &protocol.ProvisionRequest{Serial: "SN-KA", Model: "LX", FW: "1.0.0",
		Compartments: []protocol.CompartmentSpec{{N: 1, Size: "M", Zone: "ambient"}}}
	mustReregister(t, db, a, req)
	if id := nextKick(); id != a {
		t.Fatalf("kick for %s, want %s (replaced)", id, a)
	}
	// The listening connection dies: LISTEN in place is reported once it is back.
	if _, err := db.Pool().Exec(ctx, `SELECT pg_terminate_backend(pid) FROM pg_stat_activity
		WHERE datname = current_database() AND query LIKE 'LISTEN%'`); err != nil {
		t.Fatal(err)
	}
	select {
	case <-listens:
	case <-time.After(10 * time.Second):
		t.Fatal("LISTEN not back within 10 s of the listener's connection ending")
	}
}
