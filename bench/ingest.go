package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"net/http"
	"slices"
	"time"
)

// IngestOptions configure the health ingest workload.
type IngestOptions struct {
	Lockers    int           // connected lockers; default 10,000
	Rates      []float64     // the ladder of aggregate rates, messages/s
	Step       time.Duration // time at each rate; default 10s
	Runs       int           // default 3
	MarkerRate float64       // end-to-end markers per second; default 20
	Baseline   bool          // also run the bare broker
}

func (o *IngestOptions) defaults() {
	if o.Lockers <= 0 {
		o.Lockers = 10000
	}
	if len(o.Rates) == 0 {
		o.Rates = []float64{1000, 2500, 5000, 10000, 15000, 20000, 25000, 30000, 40000}
	}
	if o.Step <= 0 {
		o.Step = 10 * time.Second
	}
	if o.Runs <= 0 {
		o.Runs = 3
	}
	if o.MarkerRate <= 0 {
		o.MarkerRate = 20
	}
}

// markerLockers publish the end-to-end markers (and nothing else).
const markerLockers = 8

// ingestStep is what one rung of the ladder measured.
type ingestStep struct {
	Target, Offered float64 // messages/s asked for and sent
	Sent, Acked     uint64
	Stored          int64   // rows (gateway) or messages received (bare)
	Lost            int64   // acked but not stored
	Dropped         float64 // gateway's lockergate_ingest_messages_dropped_total
	Drain           time.Duration
	Rate            float64 // stored / (step + drain)
	LagP50, LagP99  float64 // arrival → commit, from the gateway's histogram
	LagOver         bool    // p99 past the last bucket
	E2EP50, E2EP99  float64 // publish → visible, markers
	Markers, MLost  int
	SrvCPU, PGCPU   float64 // seconds during the step and drain
	WriteMean       float64 // mean insert_health transaction, seconds
	WriteP99        float64 // its p99, seconds (from the histogram's buckets)
	BatchMean       float64 // mean messages per insert_health
	AllocPerMsg     float64 // bytes the gateway allocated per stored message (Go's own count)
	GCs             float64 // the gateway's garbage collections during the step
	Rests           float64 // the gateway's MQTT readers that rested during the step (a change to resting shows here first)
	GenCPU          float64
	OK              bool
	Why             string // why not OK
}

type ingestRun struct {
	Connect   time.Duration
	Steps     []ingestStep
	Best      *ingestStep
	PeakRSS   int64
	Truncated bool // stopped at the top of the ladder while still OK
}

// Ingest runs the health ingest workload.
func (r *Runner) Ingest(ctx context.Context, o IngestOptions) (*Report, error) {
	o.defaults()
	rep := &Report{Workload: "ingest: health at QoS 1 into PostgreSQL", Runs: o.Runs, LoadAvg: [2]string{Load(), ""}}
	lab, err := r.Lab(ctx, o.Lockers)
	if err != nil {
		return nil, err
	}
	var gwRuns, bareRuns []ingestRun
	for run := 1; run <= o.Runs; run++ {
		r.Log.Info("ingest: gateway run", "run", run)
		res, err := r.ingestGateway(ctx, lab, o)
		if err != nil {
			return nil, fmt.Errorf("gateway run %d: %w", run, err)
		}
		gwRuns = append(gwRuns, res)
		if o.Baseline {
			r.Log.Info("ingest: bare broker run", "run", run)
			res, err := r.ingestBare(ctx, o)
			if err != nil {
				return nil, fmt.Errorf("bare run %d: %w", run, err)
			}
			bareRuns = append(bareRuns, res)
		}
	}
	rep.LoadAvg[1] = Load()
	r.ingestReport(rep, o, lab, gwRuns, bareRuns)
	return rep, nil
}

func (r *Runner) ingestGateway(ctx context.Context, lab *Lab, o IngestOptions) (ingestRun, error) {
	var res ingestRun
	if err := lab.FreshGateway(ctx); err != nil {
		return res, err
	}
	gw := lab.GW
	start := time.Now()
	f, err := ConnectFleet(ctx, gw.MQTTAddr, lab.IDs, FleetOptions{Locker: true})
	if err != nil {
		return res, err
	}
	defer f.Close()
	if err := lab.WaitOnline(ctx, len(lab.IDs), 5*time.Minute); err != nil {
		return res, err
	}
	res.Connect = time.Since(start)
	// Let the connect work (retained state, births) finish.
	time.Sleep(min(2*time.Second, time.Duration(len(lab.IDs))*time.Millisecond))
	pub := NewPublisher(f, 1)
	pub.Exclude = func(i int) bool { return i < markerLockers }
	mk, err := NewMarkers(ctx, f.Conns[:markerLockers], lab.PG.Pool)
	if err != nil {
		return res, err
	}
	defer mk.Close()
	err = res.climbLadder(o.Rates, time.Second, func(rate float64) (ingestStep, error) {
		st, err := r.ingestStepGateway(ctx, lab, f, pub, mk, rate, o)
		if err == nil {
			r.Log.Info("ingest step", "target", rate, "offered", int(st.Offered), "stored/s", int(st.Rate), "lost", st.Lost,
				"drain", st.Drain.Round(time.Millisecond), "lag_p99", st.LagP99, "e2e_p99", st.E2EP99, "write_p99", st.WriteP99, "write_mean", st.WriteMean,
				"alloc_per_msg", int(st.AllocPerMsg), "gcs", st.GCs, "reader_rests", st.Rests, "ok", st.OK, "why", st.Why)
		}
		return st, err
	})
	if err != nil {
		return res, err
	}
	res.PeakRSS = gw.Mem().HWM
	res.pickBest()
	return res, nil
}

// next decides how the ladder goes on after the step just appended: up
// after a sustained step; the same rate once more after a step that failed
// without losing anything (a backlog or a starved generator: on a shared
// machine that can be another process's burst); otherwise it ends.
func (res *ingestRun) next(i *int) bool {
	n := len(res.Steps)
	last := res.Steps[n-1]
	if last.OK {
		return true
	}
	if last.Lost != 0 || last.Dropped != 0 {
		return false
	}
	if n >= 2 && res.Steps[n-2].Target == last.Target && !res.Steps[n-2].OK {
		return false // failed twice
	}
	*i-- // retry
	return true
}

// climbLadder runs step at each rung of the ladder asked, pausing between
// rungs, and records the steps in res: up after a sustained step, the same
// rate once more after a first failure (next), and past the top while the
// run is still sustained (climb).
func (res *ingestRun) climbLadder(asked []float64, pause time.Duration, step func(rate float64) (ingestStep, error)) error {
	rates := slices.Clone(asked)
	for i := 0; i < len(rates); i++ {
		st, err := step(rates[i])
		if err != nil {
			return err
		}
		res.Steps = append(res.Steps, st)
		if !res.next(&i) {
			return nil
		}
		rates = climb(rates, i, asked)
		time.Sleep(pause)
	}
	return nil
}

// climbFactor bounds climb: a ladder grows to at most this many times its
// top rate.
const climbFactor = 2

// climb adds a rung above the top of the ladder when the run is about to
// go past it still sustained (i is the rung just run), so that the limit is
// found and not the ladder's top taken for it: a ratio against a baseline
// still sustained at its top would only be an upper bound. Each rung is an
// eighth of the top higher, up to climbFactor times the top asked for.
func climb(rates []float64, i int, asked []float64) []float64 {
	n := len(rates)
	if i+1 < n || n == 0 {
		return rates
	}
	top := asked[len(asked)-1]
	next := rates[n-1] + math.Max(1000, math.Round(top/8/1000)*1000)
	if next > climbFactor*top {
		return rates
	}
	return append(rates, next)
}

func (res *ingestRun) pickBest() {
	for i := range res.Steps {
		if res.Steps[i].OK {
			res.Best = &res.Steps[i]
		}
	}
	res.Truncated = len(res.Steps) > 0 && res.Steps[len(res.Steps)-1].OK
}

func (r *Runner) ingestStepGateway(ctx context.Context, lab *Lab, f *Fleet, pub *Publisher, mk *Markers, rate float64, o IngestOptions) (ingestStep, error) {
	gw := lab.GW
	st := ingestStep{Target: rate}
	rows0, err := lab.HealthRows(ctx)
	if err != nil {
		return st, err
	}
	m0, err := gw.Metrics(ctx)
	if err != nil {
		return st, err
	}
	srv0, pg0, poll0, gen0 := gw.CPU(), lab.PG.CPU(), mk.PollerCPU(), SelfCPU()
	sent0, skip0, ack0 := pub.Sent.Load(), pub.Skipped.Load(), f.Acks.Load()
	committed0 := m0.Hist("lockergate_ingest_lag_seconds").Total()
	marks0 := mk.Published.Load()

	// The markers' Run uses their session until it returns: every return
	// from here on stops it and waits (mk.Close follows the last step).
	markerDone := make(chan struct{})
	mctx, stopMarkers := context.WithCancel(ctx)
	defer func() {
		stopMarkers()
		<-markerDone
	}()
	var lags []time.Duration
	var pollErr error
	go func() {
		defer close(markerDone)
		lags, st.MLost, pollErr = mk.Run(mctx, o.MarkerRate, o.Step, 10*time.Second)
	}()
	profName := fmt.Sprintf("ingest-%s-%.0f", time.Now().Format("150405"), rate)
	prof := gw.ProfileCPU(ctx, profName, o.Step-time.Second)
	allocs := gw.ProfileAllocs(ctx, profName+"-allocs", o.Step-time.Second)
	pub.Run(ctx, rate, o.Step)
	pubEnd := time.Now()
	st.Sent = pub.Sent.Load() - sent0
	st.Offered = float64(st.Sent) / o.Step.Seconds()
	skipped := pub.Skipped.Load() - skip0
	<-prof
	<-allocs

	// Drain: wait until every acknowledged message is committed, as the
	// gateway's lag histogram counts them (it observes after the commit).
	deadline := pubEnd.Add(20 * time.Second)
	var m1 Metrics
	for {
		if m1, err = gw.Metrics(ctx); err != nil {
			return st, err
		}
		committed := m1.Hist("lockergate_ingest_lag_seconds").Total() - committed0
		if f.Inflight() == 0 && committed >= float64(st.Sent)+float64(mk.Published.Load()-marks0) {
			break
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	st.Drain = time.Since(pubEnd)
	srv1, pg1, poll1, gen1 := gw.CPU(), lab.PG.CPU(), mk.PollerCPU(), SelfCPU()
	<-markerDone
	if pollErr != nil {
		r.Log.Warn("ingest: the end-to-end markers' poller failed; markers it missed count as lost", "err", pollErr)
	}
	st.Acked = f.Acks.Load() - ack0
	rows1, err := lab.HealthRows(ctx)
	if err != nil {
		return st, err
	}
	st.Stored = rows1 - rows0 - (mk.Published.Load() - marks0) // ordinary messages only
	st.Lost = int64(st.Sent) - st.Stored
	st.Dropped = m1.Sum("lockergate_ingest_messages_dropped_total") - m0.Sum("lockergate_ingest_messages_dropped_total")
	st.Rate = float64(st.Stored) / (o.Step + st.Drain).Seconds()
	h := m1.Hist("lockergate_ingest_lag_seconds").Sub(m0.Hist("lockergate_ingest_lag_seconds"))
	st.LagP50, _ = h.Quantile(0.5)
	st.LagP99, st.LagOver = h.Quantile(0.99)
	st.Markers = len(lags)
	st.E2EP50 = Percentile(Durations(lags), 50)
	st.E2EP99 = Percentile(Durations(lags), 99)
	st.SrvCPU, st.PGCPU, st.GenCPU = float64(srv1-srv0), float64(pg1-pg0), float64(gen1-gen0)
	if poll0.OK && poll1.OK && poll0.PID == poll1.PID {
		st.PGCPU -= float64(poll1.CPU - poll0.CPU) // lockerbench's own queries
	} else {
		r.Log.Warn("ingest: PostgreSQL CPU of this step includes the markers' poller (its backend could not be followed)",
			"target", rate, "pid_before", poll0.PID, "pid_after", poll1.PID)
	}
	op := `op="insert_health"`
	if n := m1.Sum("lockergate_db_write_duration_seconds_count", op) - m0.Sum("lockergate_db_write_duration_seconds_count", op); n > 0 {
		st.WriteMean = (m1.Sum("lockergate_db_write_duration_seconds_sum", op) - m0.Sum("lockergate_db_write_duration_seconds_sum", op)) / n
		st.BatchMean = float64(st.Stored) / n
		wh := m1.Hist("lockergate_db_write_duration_seconds", op).Sub(m0.Hist("lockergate_db_write_duration_seconds", op))
		st.WriteP99, _ = wh.Quantile(0.99)
	}
	// Go's allocation counter, exact at any moment; an allocation profile
	// of the step is not (the runtime publishes a cycle's allocations at
	// the end of a later one, so it also holds what came before the step).
	if st.Stored > 0 {
		st.AllocPerMsg = (m1.Sum("go_memstats_alloc_bytes_total") - m0.Sum("go_memstats_alloc_bytes_total")) / float64(st.Stored)
	}
	st.GCs = m1.Sum("go_gc_duration_seconds_count") - m0.Sum("go_gc_duration_seconds_count")
	st.Rests = m1.Sum("lockergate_mqtt_reader_rests_total") - m0.Sum("lockergate_mqtt_reader_rests_total")
	st.judge(rate, skipped)
	return st, nil
}

// judge decides whether the step was sustained: everything offered was
// stored, the generator kept up, and the backlog at the end was under a
// second (the stored rate kept up with the offered one).
func (st *ingestStep) judge(rate float64, skipped uint64) {
	switch {
	case st.Lost != 0 || st.Dropped != 0:
		st.Why = fmt.Sprintf("lost %d, dropped %.0f", st.Lost, st.Dropped)
	case st.Acked < st.Sent:
		st.Why = fmt.Sprintf("%d publishes not acknowledged", st.Sent-st.Acked)
	case st.Offered < 0.95*rate:
		st.Why = fmt.Sprintf("generator offered only %.0f/s (%d skipped)", st.Offered, skipped)
	case st.Drain > time.Second:
		st.Why = fmt.Sprintf("backlog: %v to drain after the step", st.Drain.Round(time.Millisecond))
	default:
		st.OK = true
	}
}

func (r *Runner) ingestBare(ctx context.Context, o IngestOptions) (ingestRun, error) {
	var res ingestRun
	srv, err := r.StartBare(ctx)
	if err != nil {
		return res, err
	}
	defer srv.Stop()
	start := time.Now()
	f, err := ConnectFleet(ctx, srv.MQTTAddr, FakeIdentities(o.Lockers), FleetOptions{Locker: true})
	if err != nil {
		return res, err
	}
	defer f.Close()
	res.Connect = time.Since(start)
	pub := NewPublisher(f, 1)
	pub.Exclude = func(i int) bool { return i < markerLockers }
	err = res.climbLadder(o.Rates, time.Second, func(rate float64) (ingestStep, error) {
		st := ingestStep{Target: rate}
		s0, err := bareStats(ctx, srv)
		if err != nil {
			return st, err
		}
		srv0, gen0 := srv.CPU(), SelfCPU()
		sent0, skip0, ack0 := pub.Sent.Load(), pub.Skipped.Load(), f.Acks.Load()
		pub.Run(ctx, rate, o.Step)
		pubEnd := time.Now()
		st.Sent = pub.Sent.Load() - sent0
		st.Offered = float64(st.Sent) / o.Step.Seconds()
		var s1 bareCounts
		for {
			if s1, err = bareStats(ctx, srv); err != nil {
				return st, err
			}
			if (f.Inflight() == 0 && s1.Health-s0.Health >= st.Sent) || time.Since(pubEnd) > 20*time.Second {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
		st.Drain = time.Since(pubEnd)
		st.SrvCPU, st.GenCPU = float64(srv.CPU()-srv0), float64(SelfCPU()-gen0)
		st.Acked = f.Acks.Load() - ack0
		st.Stored = int64(s1.Health - s0.Health)
		st.Lost = int64(st.Sent) - st.Stored
		st.Rate = float64(st.Stored) / (o.Step + st.Drain).Seconds()
		st.LagP50, st.LagP99, st.E2EP50, st.E2EP99 = math.NaN(), math.NaN(), math.NaN(), math.NaN()
		st.judge(rate, pub.Skipped.Load()-skip0)
		r.Log.Info("ingest step (bare)", "target", rate, "offered", int(st.Offered), "received/s", int(st.Rate), "lost", st.Lost,
			"drain", st.Drain.Round(time.Millisecond), "ok", st.OK, "why", st.Why)
		return st, nil
	})
	if err != nil {
		return res, err
	}
	res.PeakRSS = srv.Mem().HWM
	res.pickBest()
	return res, nil
}

type bareCounts struct {
	Received uint64 `json:"received"`
	Health   uint64 `json:"health"`
	Results  uint64 `json:"results"`
}

func bareStats(ctx context.Context, s *Server) (bareCounts, error) {
	var c bareCounts
	req, err := http.NewRequestWithContext(ctx, "GET", s.HTTPURL+"/stats", nil)
	if err != nil {
		return c, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return c, err
	}
	defer resp.Body.Close()
	return c, json.NewDecoder(resp.Body).Decode(&c)
}

func (r *Runner) ingestReport(rep *Report, o IngestOptions, lab *Lab, gw, bare []ingestRun) {
	rep.Method = fmt.Sprintf("%d lockers provisioned through the gateway (MQTT claim flow, %v), connected as raw MQTT 3.1.1 clients "+
		"(Last Will, subscribe to cmd/creds/config/fw/job, retained birth); health messages (protocol v1, ~190 bytes) at QoS 1 "+
		"at an aggregate rate climbing %v msgs/s, %v per step; a step is sustained when every acknowledged message is stored "+
		"(count(*) of health rows vs messages sent), none dropped, the generator offered ≥95%% of the target and the backlog "+
		"drained within 1 s after the step; a step that fails without losing anything is tried once more (the machine is shared), "+
		"a loss or a second failure ends the ladder; past its top a run still sustained climbs on in rungs of an eighth of the top "+
		"(up to twice the top). Gateway and bare broker are separate processes; gateway CPU is its own "+
		"utime+stime, PostgreSQL CPU is the postmaster, its live and its exited backends, less the marker poller's "+
		"backend (external cluster started by "+
		"lockerbench, same settings as the gateway's private one: durable, fsync on)", o.Lockers, lab.Prov.Round(time.Second), o.Rates, o.Step)
	rep.Columns = []string{"measure", "lockergate", "bare mochi", "ratio"}
	best := func(runs []ingestRun, f func(*ingestStep) float64) Spread {
		var xs []float64
		for _, r := range runs {
			if r.Best != nil {
				xs = append(xs, f(r.Best))
			} else {
				xs = append(xs, math.NaN())
			}
		}
		return SpreadOf(xs)
	}
	all := func(runs []ingestRun, f func(*ingestRun) float64) Spread {
		var xs []float64
		for i := range runs {
			xs = append(xs, f(&runs[i]))
		}
		return SpreadOf(xs)
	}
	rate := func(s *ingestStep) float64 { return s.Rate }
	g, b := best(gw, rate), best(bare, rate)
	rep.Add("sustained msgs/s stored (received for bare)", g.Format(fInt), b.Format(fInt), ratio(g.Median, b.Median))
	rep.Add("connect time (all lockers online)", all(gw, func(r *ingestRun) float64 { return r.Connect.Seconds() }).Format(fSec),
		all(bare, func(r *ingestRun) float64 { return r.Connect.Seconds() }).Format(fSec), "")
	lp50 := best(gw, func(s *ingestStep) float64 { return s.LagP50 })
	lp99 := best(gw, func(s *ingestStep) float64 { return s.LagP99 })
	rep.Add("lag arrival→commit p50 / p99 (histogram)", lp50.Format(fMs)+" / "+lp99.Format(fMs), "—", "")
	ep50 := best(gw, func(s *ingestStep) float64 { return s.E2EP50 })
	ep99 := best(gw, func(s *ingestStep) float64 { return s.E2EP99 })
	rep.Add("lag publish→visible p50 / p99 (markers)", ep50.Format(fMs)+" / "+ep99.Format(fMs), "—", "")
	per1k := func(s *ingestStep) float64 { return (s.SrvCPU + s.PGCPU) / float64(s.Stored) * 1000 }
	srv1k := func(s *ingestStep) float64 { return s.SrvCPU / float64(s.Stored) * 1000 }
	pg1k := func(s *ingestStep) float64 { return s.PGCPU / float64(s.Stored) * 1000 }
	gt, bt := best(gw, per1k), best(bare, srv1k)
	rep.Add("CPU-s per 1,000 msgs (server + PostgreSQL)", gt.Format(fF3), bt.Format(fF3), ratio(gt.Median, bt.Median))
	rep.Add("  of which server process", best(gw, srv1k).Format(fF3), bt.Format(fF3), "")
	rep.Add("  of which PostgreSQL", best(gw, pg1k).Format(fF3), "—", "")
	gen := func(s *ingestStep) float64 { return s.GenCPU / (o.Step + s.Drain).Seconds() }
	rep.Add("insert_health: mean rows per transaction / mean duration", best(gw, func(s *ingestStep) float64 { return s.BatchMean }).Format(fInt)+" / "+
		best(gw, func(s *ingestStep) float64 { return s.WriteMean }).Format(fMs), "—", "")
	rep.Add("gateway: bytes allocated per message / collections in the step", best(gw, func(s *ingestStep) float64 { return s.AllocPerMsg }).Format(fInt)+" / "+
		best(gw, func(s *ingestStep) float64 { return s.GCs }).Format(fInt), "—", "")
	rep.Add("load generator CPU (cores) at that step", best(gw, gen).Format(fF2), best(bare, gen).Format(fF2), "")
	pr, pb := all(gw, func(r *ingestRun) float64 { return float64(r.PeakRSS) }), all(bare, func(r *ingestRun) float64 { return float64(r.PeakRSS) })
	rep.Add("peak RSS of the server (VmHWM)", pr.Format(fMiB), pb.Format(fMiB), ratio(pr.Median, pb.Median))
	rep.Add("ladder ended at (why)", firstFail(gw), firstFail(bare), "")

	rep.DetailColumns = []string{"server", "run", "target/s", "offered/s", "stored/s", "lost", "drain", "commit p50/p99", "e2e p50/p99 (n)", "CPU-s/1k", "server cores", "pg cores", "batch rows / tx", "sustained"}
	for _, set := range []struct {
		name string
		runs []ingestRun
	}{{"lockergate", gw}, {"bare", bare}} {
		for i, run := range set.runs {
			for _, s := range run.Steps {
				ok := "yes"
				if !s.OK {
					ok = "no: " + s.Why
				}
				cpu := (s.SrvCPU + s.PGCPU) / float64(max(s.Stored, 1)) * 1000
				rep.Detail = append(rep.Detail, []string{set.name, fmt.Sprint(i + 1), fInt(s.Target), fInt(s.Offered), fInt(s.Rate),
					fmt.Sprint(s.Lost), s.Drain.Round(time.Millisecond).String(),
					fmtPair(s.LagP50, s.LagP99, s.LagOver), fmtPair(s.E2EP50, s.E2EP99, false) + fmt.Sprintf(" (%d)", s.Markers),
					fF3(cpu), fF2(s.SrvCPU / (o.Step + s.Drain).Seconds()), fF2(s.PGCPU / (o.Step + s.Drain).Seconds()),
					fmt.Sprintf("%.0f / %.0f ms", s.BatchMean, s.WriteMean*1000), ok})
			}
		}
	}
	// Targets (issue 4).
	rep.Targets = append(rep.Targets,
		fmt.Sprintf("≥ 20,000 msgs/s stored: %s (%s)", metOrNot(g.Median >= 20000), g.Format(fInt)),
		fmt.Sprintf("p99 lag < 250 ms (publish→visible, markers): %s (%s)", metOrNot(ep99.Median < 0.25), ep99.Format(fMs)),
		fmt.Sprintf("≥ 70%% of the bare broker's rate: %s (%s)", metOrNot(b.Median > 0 && g.Median >= 0.7*b.Median), ratio(g.Median, b.Median)))
	for _, set := range [][]ingestRun{gw, bare} {
		for _, run := range set {
			if run.Truncated {
				rep.Notes = append(rep.Notes, "a run was still sustained at the top of the ladder (twice the highest rate asked for): the true limit is higher; add rates with --rates")
				return
			}
		}
	}
}

func firstFail(runs []ingestRun) string {
	var xs []float64
	why := ""
	for _, r := range runs {
		if n := len(r.Steps); n > 0 && !r.Steps[n-1].OK {
			xs = append(xs, r.Steps[n-1].Target)
			why = r.Steps[n-1].Why
		}
	}
	if len(xs) == 0 {
		return "none (top of the ladder)"
	}
	return SpreadOf(xs).Format(fInt) + ": " + why
}

func fmtPair(a, b float64, over bool) string {
	if math.IsNaN(a) {
		return "—"
	}
	s := fmt.Sprintf("%.1f/%.1f ms", a*1000, b*1000)
	if over {
		s = fmt.Sprintf("%.1f/>%.0f ms", a*1000, b*1000)
	}
	return s
}
