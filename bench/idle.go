package bench

import (
	"context"
	"fmt"
	"math"
	"runtime"
	"sync"
	"time"
)

// goInUse is this process's Go heap and stacks in use, after a GC: what
// the load generator's connections cost, whatever memory earlier runs left
// to reuse.
func goInUse() int64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return int64(m.HeapInuse + m.StackInuse)
}

// IdleOptions configure the idle connections workload.
type IdleOptions struct {
	Lockers int           // default 50,000
	Hold    time.Duration // after all are connected; default 30s
	// Health, if positive, has every locker publish a health message (QoS 1)
	// at this interval from the moment all are connected, as real lockers
	// do (60 s by default): a locker that is idle for commands is not
	// silent, and what handling a message leaves behind (a grown stack)
	// is part of its memory.
	Health   time.Duration
	Runs     int
	Baseline bool // mosquitto (and bare mochi unless NoMochi)
	NoMochi  bool
}

type idleRun struct {
	Connected, Alive int
	Connect          time.Duration
	Before, After    Mem // server
	End              Mem // server, at the end of the hold
	// LateMax is the highest RSS sampled (every 5 s) in the second half
	// of the hold: the settled figure at its worst point of the runtime's
	// cycle, not at a moment that happens to follow a collection.
	LateMax         int64
	GoHeap, GoStack float64 // delta of go_memstats_heap_inuse_bytes, _stack_inuse_bytes (NaN: not a Go server with metrics)
	EndStack        float64 // the stacks' delta at the end of the hold
	// At the end of the hold, deltas of the Go runtime's own accounts:
	// the heap in use, heap pages free but not yet given back to the
	// system (what the scavenger keeps up to the next collection's goal),
	// and the runtime's bookkeeping (spans, GC metadata, other).
	EndHeap, EndRetained, EndRuntime float64
	// EndStartStack is the runtime's starting goroutine stack size at the
	// end of the hold (go_gc_stack_starting_size_bytes; absolute, NaN: not
	// exported): a resting reader's new goroutine starts at it.
	EndStartStack float64
	HealthSent    uint64 // health messages published while held (IdleOptions.Health)
	GenDelta      int64  // load generator Go heap and stacks in use, delta
	Retries       int64
}

func (ir idleRun) perConn() float64 {
	return float64(ir.After.RSS-ir.Before.RSS) / float64(max(ir.Connected, 1))
}

// perConnEnd is perConn at the end of the hold: after the runtime's forced
// collections (one every 2 minutes in an idle Go server) and its scavenger
// have had the hold's time, the figure a settled fleet would see.
func (ir idleRun) perConnEnd() float64 {
	return float64(ir.End.RSS-ir.Before.RSS) / float64(max(ir.Connected, 1))
}

// perConnLate is perConn at the highest RSS of the hold's second half.
func (ir idleRun) perConnLate() float64 {
	return float64(ir.LateMax-ir.Before.RSS) / float64(max(ir.Connected, 1))
}

// Idle runs the idle connections workload.
func (r *Runner) Idle(ctx context.Context, o IdleOptions) (*Report, error) {
	if o.Lockers <= 0 {
		o.Lockers = 50000
	}
	if o.Hold <= 0 {
		o.Hold = 30 * time.Second
	}
	if o.Runs <= 0 {
		o.Runs = 3
	}
	rep := &Report{Workload: "idle: connected idle lockers at keep-alive 60 s", Runs: o.Runs, LoadAvg: [2]string{Load(), ""}}
	// Every connection is a descriptor in the server and one in lockerbench.
	if lim := FileLimit(); o.Lockers > lim-1000-OpenFiles() {
		capped := (lim - 1000 - OpenFiles()) / 1000 * 1000
		rep.Notes = append(rep.Notes, fmt.Sprintf("asked for %d lockers but RLIMIT_NOFILE is %d here and cannot be raised "+
			"(setrlimit needs CAP_SYS_RESOURCE, which this machine does not grant even to root): every connection needs a "+
			"descriptor in the server process, so no server here can hold more than ~%d; measured %d. Memory per "+
			"connection is the figure that carries over to 50,000", o.Lockers, lim, lim, capped))
		r.Log.Warn("idle: lockers capped by the open file limit", "asked", o.Lockers, "limit", lim, "measured", capped)
		o.Lockers = capped
	}
	lab, err := r.Lab(ctx, o.Lockers)
	if err != nil {
		return nil, err
	}
	kinds := []string{"lockergate"}
	if o.Baseline {
		kinds = append(kinds, "mosquitto")
		if !o.NoMochi {
			kinds = append(kinds, "bare")
		}
	}
	results := map[string][]idleRun{}
	for run := 1; run <= o.Runs; run++ {
		for _, k := range kinds {
			r.Log.Info("idle run", "server", k, "run", run, "lockers", o.Lockers)
			res, err := r.idleOnce(ctx, k, lab, o)
			if err != nil {
				return nil, fmt.Errorf("%s run %d: %w", k, run, err)
			}
			r.Log.Info("idle run done", "server", k, "alive", res.Alive, "connect", res.Connect.Round(time.Millisecond),
				"per_conn_kib", res.perConn()/1024)
			results[k] = append(results[k], res)
		}
	}
	rep.LoadAvg[1] = Load()
	rep.Method = fmt.Sprintf("%d raw MQTT 3.1.1 clients (one goroutine and a 512-byte read buffer each in lockerbench), keep-alive 60 s "+
		"with PINGREQ after 45 s idle, each behaving as an idle locker: Last Will, subscribe to its cmd, creds, config and "+
		"fw/job topics, retained birth at QoS 1, creds/ack. Source addresses 127.0.0.2 and up, %d connections "+
		"each, past one address. %s Memory per connection = (server VmRSS with all connected and settled 10 s − VmRSS "+
		"before the first connection) / connections, and the same at the end of the hold and at the highest of RSS samples taken every 5 s in its second half (the settled figure the target is judged on); held %v after all connected; "+
		"a fresh server process per run. "+
		"Gateway lockers are provisioned through the gateway (%v for all); baselines accept anyone",
		o.Lockers, perSourceAddr, idleHealthMethod(o.Health), o.Hold, lab.Prov.Round(time.Second))
	rep.Columns = []string{"measure", "lockergate"}
	names := map[string]string{"mosquitto": "mosquitto " + mosquittoVersion(), "bare": "bare mochi"}
	for _, k := range kinds[1:] {
		rep.Columns = append(rep.Columns, names[k])
	}
	if len(kinds) > 1 {
		rep.Columns = append(rep.Columns, "ratio to mosquitto")
	}
	row := func(name string, f func(idleRun) float64, format func(float64) string, withRatio bool) {
		cells := []string{name}
		var med []float64
		for _, k := range kinds {
			var xs []float64
			for _, res := range results[k] {
				xs = append(xs, f(res))
			}
			s := SpreadOf(xs)
			med = append(med, s.Median)
			cells = append(cells, s.Format(format))
		}
		if len(kinds) > 1 {
			if withRatio {
				cells = append(cells, ratio(med[0], med[1]))
			} else {
				cells = append(cells, "")
			}
		}
		rep.Add(cells...)
	}
	row("connections held (alive after hold)", func(x idleRun) float64 { return float64(x.Alive) }, fInt, false)
	row("connect time (all connected)", func(x idleRun) float64 { return x.Connect.Seconds() }, fSec, true)
	row("memory per connection (RSS delta / connections)", idleRun.perConn, fKiB, true)
	row("memory per connection at the end of the hold", idleRun.perConnEnd, fKiB, true)
	row("memory per connection, highest in the hold's second half", idleRun.perConnLate, fKiB, true)
	row("server RSS with all connected", func(x idleRun) float64 { return float64(x.After.RSS) }, fMiB, true)
	row("server peak RSS (VmHWM)", func(x idleRun) float64 { return float64(x.After.HWM) }, fMiB, true)
	row("  Go heap in use per connection", func(x idleRun) float64 { return x.GoHeap / float64(max(x.Connected, 1)) }, fKiB, false)
	row("  Go stacks per connection", func(x idleRun) float64 { return x.GoStack / float64(max(x.Connected, 1)) }, fKiB, false)
	row("  Go stacks per connection at the end of the hold", func(x idleRun) float64 { return x.EndStack / float64(max(x.Connected, 1)) }, fKiB, false)
	row("  Go heap in use per connection at the end of the hold", func(x idleRun) float64 { return x.EndHeap / float64(max(x.Connected, 1)) }, fKiB, false)
	row("  free heap not yet returned, at the end of the hold", func(x idleRun) float64 { return x.EndRetained / float64(max(x.Connected, 1)) }, fKiB, false)
	row("  runtime bookkeeping per connection at the end of the hold", func(x idleRun) float64 { return x.EndRuntime / float64(max(x.Connected, 1)) }, fKiB, false)
	row("  starting goroutine stack at the end of the hold (whole process)", func(x idleRun) float64 { return x.EndStartStack }, fKiB, false)
	if o.Health > 0 {
		row("health messages published while held", func(x idleRun) float64 { return float64(x.HealthSent) }, fInt, false)
	}
	row("load generator Go heap + stacks per connection", func(x idleRun) float64 { return float64(x.GenDelta) / float64(max(x.Connected, 1)) }, fKiB, false)
	var alive, per, perLate []float64
	for _, res := range results["lockergate"] {
		alive = append(alive, float64(res.Alive))
		per = append(per, res.perConn())
		perLate = append(perLate, res.perConnLate())
	}
	a, p, pl := SpreadOf(alive), SpreadOf(per), SpreadOf(perLate)
	rep.Targets = append(rep.Targets,
		fmt.Sprintf("50,000 connected: %s (%s)", metOrNot(a.Median >= 50000), a.Format(fInt)),
		fmt.Sprintf("< 20 KiB gateway memory per settled idle locker (highest RSS in the second half of a %v hold): %s (%s)",
			o.Hold, metOrNot(pl.Median < 20*1024), pl.Format(fKiB)),
		fmt.Sprintf("< 20 KiB gateway memory per locker 10 s after the last connect (the connects' garbage not yet returned): %s (%s)",
			metOrNot(p.Median < 20*1024), p.Format(fKiB)))
	return rep, nil
}

func idleHealthMethod(every time.Duration) string {
	if every <= 0 {
		return "No health messages."
	}
	return fmt.Sprintf("From the moment all are connected, each locker publishes health (QoS 1, ~190 bytes) every %v, paced over the fleet.", every)
}

func (r *Runner) idleOnce(ctx context.Context, kind string, lab *Lab, o IdleOptions) (idleRun, error) {
	var res idleRun
	var srv *Server
	var ids []Identity
	var err error
	switch kind {
	case "lockergate":
		if err := lab.FreshGateway(ctx); err != nil {
			return res, err
		}
		srv, ids = lab.GW, lab.IDs
	case "mosquitto":
		if srv, err = r.StartMosquitto(ctx); err != nil {
			return res, err
		}
		defer srv.Stop()
		ids = FakeIdentities(o.Lockers)
	case "bare":
		if srv, err = r.StartBare(ctx); err != nil {
			return res, err
		}
		defer srv.Stop()
		ids = FakeIdentities(o.Lockers)
	}
	time.Sleep(3 * time.Second)
	res.Before = srv.Mem()
	m0, _ := srv.Metrics(ctx)
	gen0 := goInUse()
	start := time.Now()
	f, err := ConnectFleet(ctx, srv.MQTTAddr, ids, FleetOptions{Locker: true, Concurrency: 256})
	if err != nil {
		return res, err
	}
	defer f.Close()
	if kind == "lockergate" {
		if err := lab.WaitOnline(ctx, len(ids), 5*time.Minute); err != nil {
			return res, err
		}
	}
	res.Connect = time.Since(start)
	res.Connected = len(f.Conns)
	res.Retries = f.Retries
	stopHealth := func() {}
	if o.Health > 0 {
		pub := NewPublisher(f, 1)
		pctx, stop := context.WithCancel(ctx)
		done := make(chan struct{})
		go func() {
			defer close(done)
			pub.Run(pctx, float64(len(f.Conns))/o.Health.Seconds(), 24*time.Hour)
		}()
		var once sync.Once
		stopHealth = func() {
			once.Do(func() {
				stop()
				<-done
				res.HealthSent = pub.Sent.Load()
				r.Log.Info("idle health published", "server", kind, "sent", res.HealthSent, "skipped", pub.Skipped.Load())
			})
		}
		defer stopHealth() // on the error paths
	}
	select {
	case <-time.After(10 * time.Second):
	case <-ctx.Done():
		return res, ctx.Err()
	}
	res.After = srv.Mem()
	if kind == "lockergate" {
		srv.ProfileHeap(ctx, fmt.Sprintf("idle-heap-%d-%s", len(ids), time.Now().Format("150405")))
	}
	res.GoHeap, res.GoStack = math.NaN(), math.NaN()
	if m1, err := srv.Metrics(ctx); err == nil && m0 != nil {
		res.GoHeap = m1.Sum("go_memstats_heap_inuse_bytes") - m0.Sum("go_memstats_heap_inuse_bytes")
		res.GoStack = m1.Sum("go_memstats_stack_inuse_bytes") - m0.Sum("go_memstats_stack_inuse_bytes")
	}
	res.GenDelta = goInUse() - gen0
	if hold := o.Hold - 10*time.Second; hold > 0 {
		late := time.Now().Add(hold - o.Hold/2)
		done := time.NewTimer(hold)
		defer done.Stop()
		tick := time.NewTicker(5 * time.Second)
		defer tick.Stop()
	sample:
		for {
			select {
			case now := <-tick.C:
				if !now.Before(late) {
					res.LateMax = max(res.LateMax, srv.Mem().RSS)
				}
			case <-done.C:
				break sample
			case <-ctx.Done():
				return res, ctx.Err()
			}
		}
	}
	// Both end-of-hold readings while the lockers still report health.
	res.Alive = f.Alive()
	res.End = srv.Mem()
	res.LateMax = max(res.LateMax, res.End.RSS)
	res.EndStack, res.EndHeap, res.EndRetained, res.EndRuntime = math.NaN(), math.NaN(), math.NaN(), math.NaN()
	res.EndStartStack = math.NaN()
	if m2, err := srv.Metrics(ctx); err == nil && m0 != nil {
		d := func(names ...string) float64 {
			var s float64
			for _, n := range names {
				s += m2.Sum(n) - m0.Sum(n)
			}
			return s
		}
		res.EndStack = d("go_memstats_stack_inuse_bytes")
		for k, v := range m2 {
			if seriesName(k) == "go_gc_stack_starting_size_bytes" {
				res.EndStartStack = v
			}
		}
		res.EndHeap = d("go_memstats_heap_inuse_bytes")
		res.EndRetained = d("go_memstats_heap_idle_bytes") - d("go_memstats_heap_released_bytes")
		res.EndRuntime = d("go_memstats_mspan_inuse_bytes", "go_memstats_mcache_inuse_bytes", "go_memstats_gc_sys_bytes",
			"go_memstats_other_sys_bytes", "go_memstats_buck_hash_sys_bytes")
	}
	stopHealth()
	if res.End.HWM > res.After.HWM {
		res.After.HWM = res.End.HWM
	}
	return res, nil
}
