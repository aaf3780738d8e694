package gateway_test

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"net/url"
	"sync"
	"testing"
	"time"

	"github.com/lockergate/lockergate/devicesim"
	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/gateway"
	"github.com/lockergate/lockergate/protocol"
)

// stormLockers is the fleet size of TestReconnectStorm: the shipped storm
// scenario's 2,000 lockers, or 500 under the race detector (which slows
// every goroutine of 2,000 paho clients and the gateway about tenfold) and
// with -short.
func stormLockers() int {
	if stormRace || testing.Short() {
		return 500
	}
	return 2000
}

// countOnline counts the lockers the API lists with online=want.
func countOnline(ctx context.Context, tg *TestGateway, want bool) (int, error) {
	n, after := 0, ""
	for {
		var page lockerList
		q := url.Values{"online": {fmt.Sprint(want)}, "limit": {"1000"}}
		if after != "" {
			q.Set("after", after)
		}
		if err := tg.Admin.Get(ctx, "/v1/lockers", q, &page); err != nil {
			return 0, err
		}
		n += len(page.Items)
		if page.Next == "" || len(page.Items) == 0 {
			return n, nil
		}
		after = page.Next
	}
}

// mustProvisionFleet registers the scenario's lockers in process, site by
// site with a claim each, as provisioning by claim would (8 at a time), and
// returns their identities. Provisioning over MQTT is tested elsewhere; here
// it would double the connections before the storm.
func mustProvisionFleet(tb testing.TB, tg *TestGateway, sc *devicesim.Scenario, opts devicesim.Options) map[string]devicesim.Identity {
	tb.Helper()
	claims := map[string]string{}
	for _, s := range sc.Fleet.Sites {
		claims[s.ID] = tg.MustSiteAndClaim(tb, s.ID, s.Lockers)
	}
	po := opts
	po.ClaimToken = "unused"
	probe, err := devicesim.NewFleet(po) // serials and models only; never started
	if err != nil {
		tb.Fatal(err)
	}
	probe.Close()
	ls := probe.Lockers()
	ids := make([]devicesim.Identity, len(ls))
	errs := make([]error, len(ls))
	var wg sync.WaitGroup
	work := make(chan int)
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range work {
				l := ls[i]
				req := protocol.ProvisionRequest{Serial: l.Serial(), Model: l.Model().Name, FW: probe.Options().FW, Compartments: l.Model().Compartments}
				r, err := tg.Provisioning().Provision(context.Background(), claims[l.Site()], l.Serial(), protocol.Encode(req))
				if err != nil {
					errs[i] = fmt.Errorf("provision %s: %w", l.Serial(), err)
					continue
				}
				key, err := base64.StdEncoding.DecodeString(r.CredKey)
				if r.Status != "ok" || err != nil {
					errs[i] = fmt.Errorf("provision %s: %+v (%v)", l.Serial(), r, err)
					continue
				}
				ids[i] = devicesim.Identity{DeviceID: r.DeviceID, Password: r.Password, CredKey: key}
			}
		}()
	}
	for i := range ls {
		work <- i
	}
	close(work)
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		tb.Fatal(err)
	}
	out := make(map[string]devicesim.Identity, len(ls))
	for i, l := range ls {
		out[l.Serial()] = ids[i]
	}
	return out
}

// countOnlineDB counts online lockers with one query: cheap enough to poll,
// unlike listing thousands of lockers through the API.
func countOnlineDB(ctx context.Context, tg *TestGateway) (int, error) {
	var c int
	err := tg.DB().Pool().QueryRow(ctx, `SELECT count(*) FROM devices WHERE online`).Scan(&c)
	return c, err
}

// onlineBoth waits (polling the database) until want lockers are online,
// then checks that the API lists exactly as many.
func onlineBoth(tb testing.TB, ctx context.Context, tg *TestGateway, d time.Duration, want int) {
	tb.Helper()
	Eventually(tb, d, fmt.Sprintf("%d lockers online", want), func() error {
		if c, err := countOnlineDB(ctx, tg); err != nil || c != want {
			return fmt.Errorf("%d online (%v)", c, err)
		}
		return nil
	})
	if c, err := countOnline(ctx, tg, true); err != nil || c != want {
		tb.Fatalf("the API lists %d lockers online (%v), want %d", c, err, want)
	}
}

// TestReconnectStorm runs the storm scenario's fleet against the real
// gateway: every locker loses its network at the same moment (abrupt: no
// DISCONNECT, the broker sees the connections die), an unlock is issued to
// every locker and each keypad rejects two codes while they are offline,
// then the network comes back and all lockers reconnect at once, paced only
// by their jittered back-off and the connect rate. All must be back online,
// every unlock run exactly once, every event stored exactly once, within a
// bound derived from the configured back-off and connect rate.
//
// The first connect of the fleet does the same work (the lockers start with
// an unlock waiting and two rejected codes queued) paced by the same connect
// rate: the ramp. On a quiet machine it takes about n/ConnectRate; when the
// gateway is slower than the connect rate (a loaded CI machine, the race
// detector) it takes longer, and the storm gets the same allowance.
func TestReconnectStorm(t *testing.T) {
	ctx := context.Background()
	n := stormLockers()
	sc, err := devicesim.LoadScenario("storm")
	if err != nil {
		t.Fatal(err)
	}
	sc.Resize(n)
	// Health every 30 s: the storm is about connections, not health ingest.
	tg := MustStart(t, func(o *gateway.Options) { o.Config.HealthIntervalS = 30 })
	began := time.Now()
	phase := func(what string) { t.Logf("%6.1fs %s", time.Since(began).Seconds(), what) }
	opts := sc.Options()
	opts.Broker = "tcp://" + tg.MQTTAddr()
	opts.Logger = testLogger(t)
	// The test makes the storm itself, at moments it controls.
	opts.Faults = devicesim.Faults{}
	// CI timing: the scenario's 30 s back-off ceiling would make the wait
	// ~45 s; the shape of the storm is the same.
	opts.RetryBase, opts.RetryMax = 200*time.Millisecond, 4*time.Second
	opts.ConnectRate = 150
	opts.ConnectTimeout = 5 * time.Second
	opts.DoorCloseDelay = 50 * time.Millisecond
	opts.Identities = mustProvisionFleet(t, tg, sc, opts)
	phase(fmt.Sprintf("%d lockers provisioned", n))

	// The same fleet path as MustFleet and lockersim: NewFleet, Start.
	sim, err := devicesim.NewFleet(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(sim.Close)
	lockers := sim.Lockers()
	pacing := time.Duration(float64(n) / opts.ConnectRate * float64(time.Second))
	offlineWork := func(ttl time.Duration) []string {
		t.Helper()
		cmds := mustUnlockAll(t, tg, lockers, ttl)
		for _, l := range lockers {
			for range 2 {
				if r := l.EnterCode("000000"); r.Accepted || r.Reason != protocol.RejectUnknown {
					t.Fatalf("%s: wrong code %+v", l.Serial(), r)
				}
			}
		}
		return cmds
	}
	// recovered waits until the gateway has every locker online, every
	// unlock answered ok and every event stored, and returns how long that took.
	recovered := func(from time.Time, d time.Duration, cmds []string, events int) {
		t.Helper()
		deadline := from.Add(d)
		wait := func(what string, cond func() error) {
			t.Helper()
			Eventually(t, time.Until(deadline), what, cond)
			phase(fmt.Sprintf("%s (%.1fs)", what, time.Since(from).Seconds()))
		}
		wait("every locker connected", func() error {
			if c := sim.Stats().Connected; c != n {
				return fmt.Errorf("%d of %d connected", c, n)
			}
			return nil
		})
		wait("the gateway has every locker online", func() error {
			if c, err := countOnlineDB(ctx, tg); err != nil || c != n {
				return fmt.Errorf("%d of %d online (%v)", c, n, err)
			}
			return nil
		})
		wait("every unlock answered", func() error {
			var ok, final int
			err := tg.DB().Pool().QueryRow(ctx, `SELECT count(*) FILTER (WHERE status = $2), count(*) FILTER (WHERE status NOT IN ($3, $4))
				FROM commands WHERE id = ANY($1)`, cmds, fleet.CmdOK, fleet.CmdPending, fleet.CmdSent).Scan(&ok, &final)
			if err == nil && final != n {
				err = fmt.Errorf("%d of %d unlocks answered", final, n)
			}
			if err == nil && ok != n {
				t.Fatalf("%d of %d unlocks ended other than ok", n-ok, n)
			}
			return err
		})
		wait("every offline event stored", func() error {
			var devices, rows, distinct int
			err := tg.DB().Pool().QueryRow(ctx, `SELECT count(DISTINCT device_id), count(*), count(DISTINCT (device_id, event_id))
				FROM events WHERE type = 'code_rejected'`).Scan(&devices, &rows, &distinct)
			if err == nil && (devices != n || rows != events || distinct != events) {
				err = fmt.Errorf("code_rejected events: %d rows, %d distinct, from %d lockers; want %d from %d", rows, distinct, devices, events, n)
			}
			return err
		})
		if c, err := countOnline(ctx, tg, true); err != nil || c != n {
			t.Fatalf("the API lists %d lockers online (%v), want %d", c, err, n)
		}
	}

	// The ramp, given plenty of time: it is the measurement.
	first := offlineWork(fleet.MaxCommandTTL)
	rampStart := time.Now()
	rampMax := 3*opts.ReconnectBound(n) + 60*time.Second
	sctx, cancel := context.WithTimeout(ctx, rampMax)
	defer cancel()
	if err := sim.Start(sctx); err != nil {
		t.Fatalf("start simulated fleet: %v", err)
	}
	recovered(rampStart, rampMax, first, 2*n)
	ramp := time.Since(rampStart)

	// The storm: every connection dies at once. First every event's PUBACK
	// must have reached its locker: one still on its way when the network
	// goes would make the locker send the event again, as MQTT has it, and
	// the gateway count a duplicate. The unlocks' doors close on timers:
	// each closing must have been sent before the count is read.
	Eventually(t, 10*time.Second, "every event acknowledged to its locker", func() error {
		for _, l := range lockers {
			for c := 1; l.Compartment(c).N != 0; c++ {
				if l.Compartment(c).Open {
					return fmt.Errorf("%s: compartment %d still open", l.Serial(), c)
				}
			}
		}
		if n := sim.Stats().EventsInFlight; n != 0 {
			return fmt.Errorf("%d events unacknowledged", n)
		}
		return nil
	})
	sim.LoseNetwork()
	onlineBoth(t, ctx, tg, 30*time.Second, 0)
	if c := sim.Stats().Connected; c != 0 {
		t.Fatalf("%d lockers connected without a network", c)
	}
	phase("all offline at the gateway and the API")

	// The bound, once the network comes back: the back-off a locker may be
	// in, the last handshake, and the pacing of n connections (by the
	// connect rate, or the ramp when the gateway was slower than that),
	// + 10 s. The unlocks live for the bound plus a minute to issue them.
	bound := opts.ReconnectBound(n) - pacing + max(pacing, ramp) + 10*time.Second
	ttl := min(bound+time.Minute, fleet.MaxCommandTTL)
	issued := time.Now()
	second := offlineWork(ttl)
	phase("offline: unlocks issued and codes typed")
	if spent := time.Since(issued); spent+bound > ttl {
		t.Fatalf("issuing took %v: the unlocks (ttl %v) would expire within the bound %v", spent, ttl, bound)
	}
	t.Logf("%d lockers reconnecting; bound %v = RetryMax %v + ConnectTimeout %v + max(%d/%v per s = %v, ramp %v) + 10 s",
		n, bound.Round(time.Millisecond), opts.RetryMax, opts.ConnectTimeout, n, opts.ConnectRate, pacing, ramp.Round(time.Millisecond))
	back := time.Now()
	sim.RestoreNetwork()
	recovered(back, bound, second, 4*n)

	// Exactly once: each unlock ran once on its locker, and no event
	// reached the gateway twice.
	for i, l := range lockers {
		for _, id := range []string{first[i], second[i]} {
			if got := l.CommandsRun(id); got != 1 {
				t.Errorf("%s ran unlock %s %d times, want 1", l.Serial(), id, got)
			}
		}
	}
	for _, i := range []int{0, n / 2, n - 1} { // as the API shows it
		if c, err := tg.Fleet().GetCommand(ctx, lockers[i].DeviceID(), second[i]); err != nil || c.Status != fleet.CmdOK {
			t.Errorf("unlock %s: %+v, %v", second[i], c, err)
		}
	}
	if v, err := tg.Metric("lockergate_events_duplicates_total"); err != nil || v != 0 {
		t.Errorf("duplicate events reached the gateway: %v (%v)", v, err)
	}
	st := sim.Stats()
	// Connect attempts may time out on a loaded machine and are retried;
	// nothing may be dropped or lost.
	if st.Dropped != 0 || st.PublishErrors != 0 || st.ConnectionsLost != 0 {
		t.Errorf("simulator stats %+v", st)
	}
	t.Logf("simulator: %d connects (%d attempts failed and were retried), %d network losses, %d commands run, %d results repeated",
		st.Connects, st.ConnectFailures, st.NetworkLosses, st.CommandsRun, st.CommandRepeats)
}

// mustUnlockAll issues an unlock of compartment 1 to every locker through
// the API, 8 at a time, and returns the command ids by locker.
func mustUnlockAll(tb testing.TB, tg *TestGateway, lockers []*devicesim.Locker, ttl time.Duration) []string {
	tb.Helper()
	cmds := make([]string, len(lockers))
	errs := make([]error, len(lockers))
	var wg sync.WaitGroup
	work := make(chan int)
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range work {
				id, _ := lockers[i].Identity()
				var c fleet.Command
				err := tg.Admin.Post(context.Background(), "/v1/lockers/"+id.DeviceID+"/commands",
					map[string]any{"type": "unlock", "compartment": 1, "reason": "remote", "ttl_s": int(ttl / time.Second)}, &c)
				if err == nil && c.Status != fleet.CmdPending {
					err = fmt.Errorf("status %q, want pending (the locker is offline)", c.Status)
				}
				if err != nil {
					errs[i] = fmt.Errorf("unlock %s: %w", lockers[i].Serial(), err)
				}
				cmds[i] = c.ID
			}
		}()
	}
	for i := range lockers {
		work <- i
	}
	close(work)
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		tb.Fatal(err)
	}
	return cmds
}
