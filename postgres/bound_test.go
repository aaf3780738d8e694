package postgres_test

import (
	"errors"
	"fmt"
	"sync"
	"testing"

	"github.com/lockergate/lockergate/pickup"
)

// TestAllocateBoundPerLocker: a locker takes at most
// pickup.MaxLivePerLocker live pickups, whatever its compartments and
// however many allocations race for it, so that its credential set always
// fits one creds message; a second locker at the site takes the rest.
func TestAllocateBoundPerLocker(t *testing.T) {
	max := pickup.MaxLivePerLocker
	e := newCredEnv(t, "SN-BIG", max+10)
	allocate := e.allocate
	var wg sync.WaitGroup
	var mu sync.Mutex
	placed, refused := 0, 0
	for i := range max + 5 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := allocate(fmt.Sprintf("R-%d", i))
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err == nil:
				placed++
			case errors.Is(err, pickup.ErrNoCompartment):
				refused++
			default:
				t.Errorf("allocate: %v", err)
			}
		}()
	}
	wg.Wait()
	if placed != max || refused != 5 {
		t.Fatalf("%d placed, %d refused at a locker of %d compartments; want %d and 5", placed, refused, max+10, max)
	}
	// Another locker at the site still takes pickups.
	other := MustDevice(t, e.db, "s1", "SN-SMALL", 2)
	e.exec(`UPDATE devices SET online = true WHERE id = $1`, other)
	if p, err := allocate("R-next"); err != nil || p.Locker != other {
		t.Fatalf("next pickup at %v (%v), want locker %s", p.Locker, err, other)
	}
}

// TestAllocatePassesOverHeldLocker: a locker whose only free compartment
// another transaction holds (a door event being applied) is passed over
// for the next one, not tried again until the allocation gives up.
func TestAllocatePassesOverHeldLocker(t *testing.T) {
	e := newCredEnv(t, "SN-A1", 1)
	other := MustDevice(t, e.db, "s1", "SN-B1", 1)
	e.exec(`UPDATE devices SET online = true WHERE id = $1`, other)
	ctx := t.Context()
	tx, err := e.db.Pool().Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(ctx)
	if _, err := tx.Exec(ctx, `SELECT 1 FROM compartments WHERE device_id = $1 FOR UPDATE`, e.id); err != nil {
		t.Fatal(err)
	}
	if p, err := e.allocate("H-1"); err != nil || p.Locker != other {
		t.Fatalf("pickup at %v (%v), want %s: %s's compartment is held", p.Locker, err, other, e.id)
	}
}
