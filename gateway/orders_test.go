package gateway_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/lockergate/lockergate/devicesim/orders"
)

// TestOrdersWorkload: the simulator's staff and drivers run 40 orders
// through the real gateway; every order that got a compartment ends as
// the workload decided (picked up, or waiting for a no-show driver).
func TestOrdersWorkload(t *testing.T) {
	e := newPickupEnv(t, 3, 0)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	st, err := orders.Run(ctx, orders.Options{
		API: e.tg.Admin, Fleet: e.sim, Sites: []string{"store-042"}, Platform: "speedy",
		Orders: 40, Rate: 40, DriverDelay: [2]time.Duration{0, 50 * time.Millisecond},
		WrongCode: 0.25, NoShow: 0.1, Seed: 7, Logger: testLogger(t),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("workload: %+v", st)
	if st.Failed != 0 || st.Created == 0 || st.Created+st.NoCompartment != 40 {
		t.Fatalf("stats %+v", st)
	}
	if st.PickedUp != st.Created-st.NoShows || st.Ready != st.Created {
		t.Fatalf("stats %+v: every created order should be ready, and picked up unless a no-show", st)
	}
	Eventually(t, 10*time.Second, "wrong codes counted", func() error {
		v, err := e.tg.Metric(`lockergate_credential_rejections_total{reason="unknown"}`)
		if err == nil && v < float64(st.WrongCodes) {
			err = fmt.Errorf("%v rejections, %d wrong codes typed", v, st.WrongCodes)
		}
		return err
	})
	// Counted after each transition's commit, which the workload saw.
	e.tg.WaitMetric(t, 10*time.Second, `lockergate_pickups_total{state="picked_up"}`, float64(st.PickedUp))
}
