package bench

import (
	"context"
	"errors"
	"fmt"
	"math"
	"sync"
	"time"

	"github.com/lockergate/lockergate/devicesim"
)

// StormOptions configure the reconnect storm workload.
type StormOptions struct {
	Lockers int           // default 10,000
	Settle  time.Duration // steady state before the restart; default 10s
	Runs    int
	// Baseline runs the same storm on the bare mochi broker: no
	// authentication, no database, nothing to deliver after a connect.
	Baseline bool
}

// bareStormRun is a storm on the bare broker: the lockers' view only.
type bareStormRun struct {
	Connect            time.Duration
	Down               time.Duration // stop signalled → new process ready
	Dev95, Dev100      time.Duration // from the restart: connected
	SteadyRSS, PeakRSS int64
	ConnectFailures    uint64
}

type stormRun struct {
	Connect                  time.Duration
	Down                     time.Duration // stop signalled → new process ready
	GW95, GW100              time.Duration // from the restart: gateway's view (online, creds acked)
	Dev95, Dev100            time.Duration // from the restart: lockers' view (connected, new creds and config)
	SteadyRSS, PeakRSS       int64
	AfterRSS                 int64
	ConnectFailures, Dropped uint64
	Errors                   uint64
	InitialRefused           int // refused at the first connect (then reconnected by the harness)
	// The new process's own count of CONNECTs it answered "server busy"
	// (no credential check slot within the wait) and its credential
	// checks' p99, from its /metrics after the storm.
	RefusedBusy float64
	AuthP99     float64
	GaveUp      int // refused for good during the storm: never came back
}

// Storm runs the reconnect storm workload.
func (r *Runner) Storm(ctx context.Context, o StormOptions) (*Report, error) {
	if o.Lockers <= 0 {
		o.Lockers = 10000
	}
	if o.Settle <= 0 {
		o.Settle = 10 * time.Second
	}
	if o.Runs <= 0 {
		o.Runs = 3
	}
	rep := &Report{Workload: "storm: every locker reconnects after a gateway restart", Runs: o.Runs, LoadAvg: [2]string{Load(), ""}}
	lab, err := r.Lab(ctx, o.Lockers)
	if err != nil {
		return nil, err
	}
	var runs []stormRun
	var bare []bareStormRun
	for run := 1; run <= o.Runs; run++ {
		if o.Baseline {
			// With the gateway stopped (the run below starts a fresh one),
			// so that it does not write the previous run's 10,000 session
			// ends beside the bare broker's connects.
			if err := lab.GW.Stop(); err != nil {
				r.Log.Warn("gateway stopped with an error", "err", err)
			}
			r.Log.Info("storm: bare broker run", "run", run)
			b, err := r.stormBare(ctx, lab, o)
			if err != nil {
				return nil, fmt.Errorf("bare run %d: %w", run, err)
			}
			r.Log.Info("storm bare run done", "dev95", b.Dev95, "dev100", b.Dev100, "peak/steady", float64(b.PeakRSS)/float64(b.SteadyRSS))
			bare = append(bare, b)
		}
		r.Log.Info("storm run", "run", run, "lockers", o.Lockers)
		res, err := r.stormOnce(ctx, lab, o)
		if err != nil {
			return nil, fmt.Errorf("run %d: %w", run, err)
		}
		r.Log.Info("storm run done", "gw95", res.GW95, "gw100", res.GW100, "dev95", res.Dev95, "dev100", res.Dev100,
			"peak/steady", float64(res.PeakRSS)/float64(res.SteadyRSS))
		runs = append(runs, res)
	}
	rep.LoadAvg[1] = Load()
	rep.Method = fmt.Sprintf("%d devicesim lockers (paho, real reconnect logic: full-jitter back-off 0.5 s·2^n capped at 30 s, "+
		"no fleet-wide connect limit) connected to a fresh gateway process; steady state held %v. Then the gateway gets "+
		"SIGTERM; while it is down lockerbench bumps every locker's creds_version and config_version in PostgreSQL (as if "+
		"credentials and config changed meanwhile), so 'current' after the restart can only mean 'received the state the "+
		"new process republished from PostgreSQL and acknowledged it'; then the gateway starts again on the same data "+
		"directory and ports. Times are from the SIGTERM. Gateway view: devices online AND creds_acked = creds_version "+
		"(what the API reports as online and creds_current), polled in PostgreSQL every 100 ms; lockers' view: connected "+
		"with the new creds and config versions applied. Peak = VmHWM of the new process; steady = VmRSS of the old one "+
		"at the end of the steady state", o.Lockers, o.Settle)
	if r.HoldSockets {
		rep.Method += ". The gateway's listening sockets are held by lockerbench and passed to each start, as systemd " +
			"socket activation does (--hold-sockets): a locker reconnecting while no process runs waits in the accept " +
			"queue instead of being refused"
	}
	rep.Columns = []string{"measure", "lockergate"}
	if o.Baseline {
		rep.Columns = append(rep.Columns, "bare mochi")
		rep.Method += ". Baseline: the same lockers and restart on the bare mochi broker (no authentication, no database, " +
			"nothing retained to deliver), which admits every CONNECT at once; its lockers' view is 'connected', and its " +
			"peak is read after the same settle as the gateway's; before each gateway run"
		if r.HoldSockets {
			rep.Method += "; its sockets are not held (a plain restart)"
		}
	}
	field := func(f func(stormRun) float64) Spread {
		var xs []float64
		for _, x := range runs {
			xs = append(xs, f(x))
		}
		return SpreadOf(xs)
	}
	bareField := func(f func(bareStormRun) float64) Spread {
		var xs []float64
		for _, x := range bare {
			xs = append(xs, f(x))
		}
		return SpreadOf(xs)
	}
	sec := func(d time.Duration) float64 {
		if d < 0 {
			return math.NaN()
		}
		return d.Seconds()
	}
	// add adds a row; bareCell is the baseline's, when it runs.
	add := func(name, gwCell, bareCell string) {
		if o.Baseline {
			rep.Add(name, gwCell, bareCell)
		} else {
			rep.Add(name, gwCell)
		}
	}
	const none = "—"
	add("initial connect (all online)", field(func(x stormRun) float64 { return x.Connect.Seconds() }).Format(fSec),
		bareField(func(x bareStormRun) float64 { return x.Connect.Seconds() }).Format(fSec))
	add("gateway down (SIGTERM → new process ready)", field(func(x stormRun) float64 { return x.Down.Seconds() }).Format(fSec),
		bareField(func(x bareStormRun) float64 { return x.Down.Seconds() }).Format(fSec))
	gw95 := field(func(x stormRun) float64 { return sec(x.GW95) })
	add("95% online with creds current (gateway view)", gw95.Format(fSec), none)
	add("100% online with creds current (gateway view)", field(func(x stormRun) float64 { return sec(x.GW100) }).Format(fSec), none)
	dev95 := field(func(x stormRun) float64 { return sec(x.Dev95) })
	add("95% connected with new creds and config (lockers' view; bare: connected)", dev95.Format(fSec),
		bareField(func(x bareStormRun) float64 { return sec(x.Dev95) }).Format(fSec))
	add("100% connected with new creds and config (lockers' view; bare: connected)", field(func(x stormRun) float64 { return sec(x.Dev100) }).Format(fSec),
		bareField(func(x bareStormRun) float64 { return sec(x.Dev100) }).Format(fSec))
	add("steady RSS before the restart", field(func(x stormRun) float64 { return float64(x.SteadyRSS) }).Format(fMiB),
		bareField(func(x bareStormRun) float64 { return float64(x.SteadyRSS) }).Format(fMiB))
	add("peak RSS of the new process (VmHWM)", field(func(x stormRun) float64 { return float64(x.PeakRSS) }).Format(fMiB),
		bareField(func(x bareStormRun) float64 { return float64(x.PeakRSS) }).Format(fMiB))
	peak := field(func(x stormRun) float64 { return float64(x.PeakRSS) / float64(x.SteadyRSS) })
	add("peak / steady", peak.Format(fF2), bareField(func(x bareStormRun) float64 { return float64(x.PeakRSS) / float64(x.SteadyRSS) }).Format(fF2))
	add("RSS of the new process once settled", field(func(x stormRun) float64 { return float64(x.AfterRSS) }).Format(fMiB), none)
	add("locker connect attempts refused or failed", field(func(x stormRun) float64 { return float64(x.ConnectFailures) }).Format(fInt),
		bareField(func(x bareStormRun) float64 { return float64(x.ConnectFailures) }).Format(fInt))
	add("  of which answered 'server busy' by the new process (its metric)", field(func(x stormRun) float64 { return x.RefusedBusy }).Format(fInt), none)
	add("credential check p99 in the new process (its histogram)", field(func(x stormRun) float64 { return x.AuthP99 }).Format(fMs), none)
	add("lockers refused as 'bad username or password' at the initial connect (reconnected by the harness)",
		field(func(x stormRun) float64 { return float64(x.InitialRefused) }).Format(fInt), none)
	add("lockers that gave up during the storm (refused, never back)", field(func(x stormRun) float64 { return float64(x.GaveUp) }).Format(fInt), none)
	add("messages lost by lockers (devicesim dropped)", field(func(x stormRun) float64 { return float64(x.Dropped) }).Format(fInt), none)
	rep.Targets = append(rep.Targets,
		fmt.Sprintf("95%% within 15 s (gateway view): %s (%s)", metOrNot(gw95.Median <= 15), gw95.Format(fSec)),
		fmt.Sprintf("peak memory < 1.5× steady: %s (%s)", metOrNot(peak.Median < 1.5), peak.Format(fF2)))
	return rep, nil
}

func (r *Runner) stormOnce(ctx context.Context, lab *Lab, o StormOptions) (stormRun, error) {
	res := stormRun{GW95: -1, GW100: -1, Dev95: -1, Dev100: -1}
	if err := lab.FreshGateway(ctx); err != nil {
		return res, err
	}
	devIDs := make([]string, len(lab.IDs))
	for i, id := range lab.IDs {
		devIDs[i] = id.DeviceID
	}
	sim, err := r.stormFleet(lab, lab.GW.MQTTAddr)
	if err != nil {
		return res, err
	}
	defer sim.Close()
	start := time.Now()
	sctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	err = sim.Start(sctx)
	cancel()
	var se *devicesim.StartError
	if errors.As(err, &se) {
		// A locker refused at CONNECT gives up until Reconnect (a refusal
		// is final for a real locker too). The initial connect is not what
		// is measured here: bring the refused ones up, 100 at a time.
		res.InitialRefused = len(se.Failed)
		r.Log.Warn("storm: lockers refused during the initial connect; reconnecting them", "refused", len(se.Failed), "err", err)
		err = reconnectAll(ctx, sim, 100)
	}
	if err != nil {
		return res, err
	}
	if err := lab.WaitOnline(ctx, len(lab.IDs), 5*time.Minute); err != nil {
		return res, err
	}
	res.Connect = time.Since(start)
	select {
	case <-time.After(o.Settle):
	case <-ctx.Done():
		return res, ctx.Err()
	}
	res.SteadyRSS = lab.GW.Mem().RSS
	st0 := sim.Stats()

	// The restart.
	t0 := time.Now()
	if err := lab.GW.Stop(); err != nil {
		r.Log.Warn("gateway stopped with an error", "err", err)
	}
	var credsWant, cfgWant int64
	err = lab.PG.Pool.QueryRow(ctx, `WITH u AS (UPDATE devices SET creds_version = creds_version + 1, config_version = config_version + 1
		WHERE id = ANY($1) RETURNING creds_version, config_version) SELECT min(creds_version), min(config_version) FROM u`, devIDs).Scan(&credsWant, &cfgWant)
	if err != nil {
		return res, fmt.Errorf("bump versions: %w", err)
	}
	if err := lab.GW.start(ctx); err != nil {
		return res, err
	}
	res.Down = time.Since(t0)
	// With --profile: where the new process spends the reconnect storm.
	prof := lab.GW.ProfileCPU(ctx, "storm-"+time.Now().Format("150405"), 20*time.Second)
	defer func() { <-prof }()

	n := len(lab.IDs)
	lockers := sim.Lockers()
	deadline := t0.Add(3 * time.Minute)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		el := time.Since(t0)
		var gwCount int
		if err := lab.PG.Pool.QueryRow(ctx, "SELECT count(*) FROM devices WHERE id = ANY($1) AND online AND creds_acked = creds_version",
			devIDs).Scan(&gwCount); err != nil {
			return res, err
		}
		dev := 0
		for _, l := range lockers {
			if l.Connected() && l.CredsVersion() >= credsWant && l.ConfigVersion() >= cfgWant {
				dev++
			}
		}
		mark := func(count int, d95, d100 *time.Duration) {
			if *d95 < 0 && count*100 >= n*95 {
				*d95 = el
			}
			if *d100 < 0 && count >= n {
				*d100 = el
			}
		}
		mark(gwCount, &res.GW95, &res.GW100)
		mark(dev, &res.Dev95, &res.Dev100)
		if res.GW100 >= 0 && res.Dev100 >= 0 {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	select {
	case <-time.After(o.Settle):
	case <-ctx.Done():
		return res, ctx.Err()
	}
	if mt, err := lab.GW.Metrics(ctx); err == nil {
		res.RefusedBusy = mt.Sum("lockergate_mqtt_auth_failures_total", `reason="busy"`)
		res.AuthP99, _ = mt.Hist("lockergate_mqtt_auth_backend_duration_seconds").Quantile(0.99)
	} else {
		r.Log.Warn("storm: scrape the new process's metrics", "err", err)
		res.RefusedBusy, res.AuthP99 = math.NaN(), math.NaN()
	}
	m := lab.GW.Mem()
	res.PeakRSS, res.AfterRSS = m.HWM, m.RSS
	st1 := sim.Stats()
	res.ConnectFailures = st1.ConnectFailures - st0.ConnectFailures
	res.Dropped = st1.Dropped - st0.Dropped
	res.Errors = st1.Errors() - st0.Errors()
	for _, l := range lockers {
		if !l.Connected() && errors.Is(l.LastError(), devicesim.ErrConnRefused) {
			res.GaveUp++
		}
	}
	return res, nil
}

// stormFleet is the storm's devicesim fleet on the broker at addr: lab's
// lockers with their identities, connecting as fast as they can.
func (r *Runner) stormFleet(lab *Lab, addr string) (*devicesim.Fleet, error) {
	ids := map[string]devicesim.Identity{}
	for _, id := range lab.IDs {
		ids[id.Serial] = id.Identity
	}
	return devicesim.NewFleet(devicesim.Options{Broker: "tcp://" + addr, Lockers: len(lab.IDs), Seed: 1,
		SerialPrefix: SerialPrefix, Models: []devicesim.Model{BenchModel}, Identities: ids, ConnectRate: -1,
		SourceAddrs: SourceAddrs(len(lab.IDs)), Logger: r.Log.With("component", "devicesim")})
}

// stormBare is the storm on the bare broker: the same lockers connect,
// hold the steady state, and reconnect after the broker restarts on the
// same port. The bare broker authenticates nobody and holds nothing to
// deliver, so the lockers' view is "connected".
func (r *Runner) stormBare(ctx context.Context, lab *Lab, o StormOptions) (bareStormRun, error) {
	res := bareStormRun{Dev95: -1, Dev100: -1}
	b, err := r.StartBare(ctx)
	if err != nil {
		return res, err
	}
	defer func() {
		if err := b.Stop(); err != nil {
			r.Log.Warn("bare broker stopped with an error", "err", err)
		}
	}()
	sim, err := r.stormFleet(lab, b.MQTTAddr)
	if err != nil {
		return res, err
	}
	defer sim.Close()
	lockers := sim.Lockers()
	connected := func() int {
		n := 0
		for _, l := range lockers {
			if l.Connected() {
				n++
			}
		}
		return n
	}
	start := time.Now()
	sctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	err = sim.Start(sctx)
	cancel()
	if err != nil {
		return res, fmt.Errorf("bare broker: initial connect: %w", err)
	}
	res.Connect = time.Since(start)
	select {
	case <-time.After(o.Settle):
	case <-ctx.Done():
		return res, ctx.Err()
	}
	res.SteadyRSS = b.Mem().RSS
	st0 := sim.Stats()

	t0 := time.Now()
	if err := b.Stop(); err != nil {
		r.Log.Warn("bare broker stopped with an error", "err", err)
	}
	if err := b.start(ctx); err != nil {
		return res, err
	}
	res.Down = time.Since(t0)
	n := len(lockers)
	for deadline := t0.Add(3 * time.Minute); time.Now().Before(deadline) && ctx.Err() == nil; {
		el, c := time.Since(t0), connected()
		if res.Dev95 < 0 && c*100 >= n*95 {
			res.Dev95 = el
		}
		if c >= n {
			res.Dev100 = el
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	select { // as the gateway's run does before it reads its peak
	case <-time.After(o.Settle):
	case <-ctx.Done():
		return res, ctx.Err()
	}
	res.PeakRSS = b.Mem().HWM
	res.ConnectFailures = sim.Stats().ConnectFailures - st0.ConnectFailures
	return res, ctx.Err()
}

// reconnectAll calls Reconnect on every locker that is not connected,
// conc at a time, until all are connected or ctx ends.
func reconnectAll(ctx context.Context, sim *devicesim.Fleet, conc int) error {
	for round := 0; round < 5; round++ {
		var down []*devicesim.Locker
		for _, l := range sim.Lockers() {
			if !l.Connected() {
				down = append(down, l)
			}
		}
		if len(down) == 0 {
			return nil
		}
		sem := make(chan struct{}, conc)
		var wg sync.WaitGroup
		for _, l := range down {
			sem <- struct{}{}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer func() { <-sem }()
				rctx, cancel := context.WithTimeout(ctx, time.Minute)
				defer cancel()
				_ = l.Reconnect(rctx)
			}()
		}
		wg.Wait()
		if ctx.Err() != nil {
			return ctx.Err()
		}
	}
	n := 0
	for _, l := range sim.Lockers() {
		if !l.Connected() {
			n++
		}
	}
	if n > 0 {
		return fmt.Errorf("%d lockers still not connected after 5 rounds of Reconnect", n)
	}
	return nil
}
