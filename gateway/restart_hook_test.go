package gateway_test

import (
	"context"
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/lockergate/lockergate/devicesim"
	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/gateway"
)

// freeAddr returns a loopback address with a port that was free a moment
// ago, so a restarted gateway can listen where the lockers connect.
func freeAddr(tb testing.TB) string {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// TestScenarioGatewayRestart lets a scenario's planned gateway restart run
// through the Options.GatewayRestart hook, implemented here by stopping the
// in-process gateway and starting a new one on the same database and
// addresses. Keypad events of the downtime arrive once, every locker is back
// online, got its retained configuration again and takes commands.
func TestScenarioGatewayRestart(t *testing.T) {
	ctx := context.Background()
	const n = 20
	var gopts gateway.Options
	tg := MustStart(t, func(o *gateway.Options) {
		o.MQTTAddr, o.HTTPAddr = freeAddr(t), freeAddr(t)
		gopts = *o
	})
	claim := tg.MustSiteAndClaim(t, "s1", n)

	// The hook runs on the fleet's goroutine; the restart itself happens on
	// the test goroutine, where MustRun may fail the test.
	type restart struct {
		down time.Duration
		done chan error
	}
	restarts := make(chan restart)
	sim := MustFleet(t, tg, claim, n, func(o *devicesim.Options) {
		o.RetryBase, o.RetryMax = 100*time.Millisecond, time.Second
		o.Faults.GatewayRestarts = []devicesim.GatewayRestart{{At: devicesim.Duration(2 * time.Second), Down: devicesim.Duration(time.Second)}}
		o.GatewayRestart = func(ctx context.Context, down time.Duration) error {
			r := restart{down: down, done: make(chan error, 1)}
			select {
			case restarts <- r:
			case <-ctx.Done():
				return ctx.Err()
			}
			select {
			case err := <-r.done:
				return err
			case <-ctx.Done():
				return ctx.Err()
			}
		}
	})
	var r restart
	select {
	case r = <-restarts:
	case <-time.After(30 * time.Second):
		t.Fatal("the planned restart did not come")
	}
	tg.Stop(t)
	Eventually(t, 10*time.Second, "every locker notices the gateway is gone", func() error {
		if c := sim.Stats().Connected; c != 0 {
			return fmt.Errorf("%d still connected", c)
		}
		return nil
	})
	for _, l := range sim.Lockers() {
		if res := l.EnterCode("000000"); res.Accepted {
			t.Fatalf("%s accepted a wrong code", l.Serial())
		}
	}
	down := time.NewTimer(r.down) // the scenario's downtime, part of the fault
	<-down.C
	gopts.Logger = testLogger(t)
	tg = MustRun(t, gopts)
	r.done <- nil

	// Back: RetryMax + ConnectTimeout + n/ConnectRate, + 10 s for the gateway.
	o := sim.Options()
	bound := o.ReconnectBound(n) + 10*time.Second
	Eventually(t, bound, "every locker online at the restarted gateway", func() error {
		c, err := countOnline(ctx, tg, true)
		if err == nil && c != n {
			err = fmt.Errorf("%d of %d online", c, n)
		}
		return err
	})
	Eventually(t, 10*time.Second, "the downtime's events stored once", func() error {
		var rows, distinct int
		if err := tg.DB().Pool().QueryRow(ctx, `SELECT count(*), count(DISTINCT (device_id, event_id)) FROM events WHERE type = 'code_rejected'`).Scan(&rows, &distinct); err != nil {
			return err
		}
		if rows != n || distinct != n {
			return fmt.Errorf("%d rows, %d distinct; want %d", rows, distinct, n)
		}
		return nil
	})
	st := sim.Stats()
	if st.GatewayRestarts != 1 || st.RestartErrors != 0 || st.Connects < 2*n {
		t.Errorf("stats %+v", st)
	}
	l := sim.Lockers()[3]
	if l.ConfigVersion() == 0 {
		t.Error("no configuration after the restart")
	}
	var c fleet.Command
	if err := tg.Admin.Post(ctx, "/v1/lockers/"+l.DeviceID()+"/commands",
		map[string]any{"type": "unlock", "compartment": 1, "reason": "remote", "wait_s": 10}, &c); err != nil || c.Status != fleet.CmdOK {
		t.Fatalf("unlock after the restart: %+v, %v", c, err)
	}
	if got := l.CommandsRun(c.ID); got != 1 {
		t.Errorf("unlock ran %d times", got)
	}
}
