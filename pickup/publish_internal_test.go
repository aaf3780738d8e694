package pickup

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/lockergate/lockergate/fleet"
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

// stagingStore allocates every pickup at lk-1's compartment 3 and then
// ends the request that asked for it (a client that gave up).
type stagingStore struct {
	Store
	cancel context.CancelFunc
}

func (s *stagingStore) Allocate(_ context.Context, p *Pickup, _ time.Time) error {
	p.Locker, p.Compartment = "lk-1", 3
	s.cancel()
	return nil
}

// stagingFleet records the staging unlocks made, and whether with a live
// context.
type stagingFleet struct {
	Fleet
	live, calls int
}

func (f *stagingFleet) SendCommand(ctx context.Context, req fleet.CommandRequest) (*fleet.Command, error) {
	f.calls++
	if ctx.Err() != nil {
		return nil, ctx.Err()
	}
	f.live++
	return &fleet.Command{ID: "c-1", DeviceID: req.DeviceID, Type: req.Type, Compartment: req.Compartment}, nil
}

// TestStagingUnlockOutlivesTheRequest: a pickup stored is opened for staff
// even when the request that made it has gone away meanwhile; else the
// compartment would never open, and a retry of the order be refused by its
// order_ref.
func TestStagingUnlockOutlivesTheRequest(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	f := &stagingFleet{}
	s, err := New(Options{Store: &stagingStore{cancel: cancel}, Fleet: f, MasterKey: make([]byte, 32), Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	p := &Pickup{Site: "s1", OrderRef: "A-1", Recipient: Recipient{Kind: "customer"}}
	if err := s.Create(ctx, p); err != nil {
		t.Fatal(err)
	}
	if f.calls != 1 || f.live != 1 || p.CommandID != "c-1" {
		t.Fatalf("%d staging unlocks, %d with a live context, command %q; want 1, 1, c-1", f.calls, f.live, p.CommandID)
	}
}

// rerunStore holds pickup p-derived, made by an earlier run of the request;
// hidden, GetPickup does not find it at its first call (the earlier run
// commits it between the lookup and the insert). Allocate answers
// allocErr (the earlier run may have taken the last compartment).
type rerunStore struct {
	Store
	prev     Pickup
	hidden   bool
	lookups  int
	allocErr error
	getErr   error // GetPickup fails so (the database down)
}

func (s *rerunStore) Allocate(context.Context, *Pickup, time.Time) error { return s.allocErr }

func (s *rerunStore) GetPickup(_ context.Context, id string) (*Pickup, error) {
	s.lookups++
	if s.getErr != nil {
		return nil, s.getErr
	}
	if id != s.prev.ID || (s.hidden && s.lookups == 1) {
		return nil, fleet.ErrNotFound
	}
	p := s.prev
	return &p, nil
}

// TestCreateRunAgain: a request run again (its id derived from its
// Idempotency-Key) answers the pickup its earlier run made, looked up
// before any allocation (the earlier run may have taken the last free
// compartment) or found by the allocation's taken id, and makes the
// staging unlock only when that run ended before making it. A pickup made
// over a day before is a new order's key reused: a conflict. A random id
// that is taken is a conflict too, not another request's pickup.
func TestCreateRunAgain(t *testing.T) {
	taken := fmt.Errorf("pickup p-derived: %w", fleet.ErrExists)
	recent := time.Now().Add(-10 * time.Minute)
	for _, c := range []struct {
		name     string
		prev     Pickup
		hidden   bool
		unlocks  int
		command  string
		conflict bool
	}{
		{"staging, no unlock made", Pickup{ID: "p-derived", State: Staging, Locker: "lk-1", Compartment: 3, CreatedAt: recent}, false, 1, "c-1", false},
		{"staging, unlock made", Pickup{ID: "p-derived", State: Staging, Locker: "lk-1", Compartment: 3, CommandID: "c-0", CreatedAt: recent}, false, 0, "c-0", false},
		{"ready", Pickup{ID: "p-derived", State: Ready, Locker: "lk-1", Compartment: 3, CreatedAt: recent}, false, 0, "", false},
		{"committed meanwhile", Pickup{ID: "p-derived", State: Staging, Locker: "lk-1", Compartment: 3, CreatedAt: recent}, true, 1, "c-1", false},
		{"a day old", Pickup{ID: "p-derived", State: PickedUp, Locker: "lk-1", Compartment: 3, CreatedAt: time.Now().Add(-25 * time.Hour)}, false, 0, "", true},
	} {
		t.Run(c.name, func(t *testing.T) {
			f := &stagingFleet{}
			st := &rerunStore{prev: c.prev, hidden: c.hidden, allocErr: ErrNoCompartment}
			if c.hidden {
				st.allocErr = taken
			}
			s, err := New(Options{Store: st, Fleet: f, MasterKey: make([]byte, 32), Logger: slog.New(slog.DiscardHandler)})
			if err != nil {
				t.Fatal(err)
			}
			p := &Pickup{ID: "p-derived", Site: "s1", OrderRef: "A-1", Recipient: Recipient{Kind: "customer"}}
			err = s.Create(context.Background(), p)
			if c.conflict {
				if !errors.Is(err, fleet.ErrConflict) || !strings.Contains(err.Error(), "use another key") {
					t.Fatalf("%v, want a conflict that says to use another key", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if p.State != c.prev.State || p.Compartment != 3 || f.calls != c.unlocks || p.CommandID != c.command {
				t.Fatalf("answered %+v after %d staging unlocks; want the earlier run's pickup, %d unlocks, command %q", p, f.calls, c.unlocks, c.command)
			}
		})
	}
	// The lookup of a derived id failing is the request's error: no
	// allocation under an id that may be taken.
	down := errors.New("database down")
	st := &rerunStore{getErr: down, allocErr: errors.New("allocated")}
	s, err := New(Options{Store: st, Fleet: &stagingFleet{}, MasterKey: make([]byte, 32), Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Create(context.Background(), &Pickup{ID: "p-derived", Site: "s1", OrderRef: "A-3", Recipient: Recipient{Kind: "customer"}}); !errors.Is(err, down) {
		t.Fatalf("a derived id whose lookup fails: %v, want the lookup's error", err)
	}
	st = &rerunStore{prev: Pickup{ID: "p-taken"}, allocErr: fmt.Errorf("pickup p-random: %w", fleet.ErrExists)}
	s, err = New(Options{Store: st, Fleet: &stagingFleet{}, MasterKey: make([]byte, 32), Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Create(context.Background(), &Pickup{Site: "s1", OrderRef: "A-2", Recipient: Recipient{Kind: "customer"}}); !errors.Is(err, fleet.ErrConflict) {
		t.Fatalf("a random id taken: %v, want a conflict", err)
	}
}
