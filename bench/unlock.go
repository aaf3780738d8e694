package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"
)

// UnlockOptions configure the unlock round-trip workload.
type UnlockOptions struct {
	Lockers   int           // connected lockers; default 10,000
	Rate      float64       // unlocks per second; default 100
	Duration  time.Duration // default 20s
	Telemetry float64       // background health msgs/s; default 2,000
	Runs      int
	Baseline  bool
}

func (o *UnlockOptions) defaults() {
	if o.Lockers <= 0 {
		o.Lockers = 10000
	}
	if o.Rate <= 0 {
		o.Rate = 100
	}
	if o.Duration <= 0 {
		o.Duration = 20 * time.Second
	}
	if o.Runs <= 0 {
		o.Runs = 3
	}
}

type unlockRun struct {
	Seq       []float64 // seconds, one request at a time before the load
	Lat       []float64 // seconds, successful round trips
	Errors    int
	SrvP50    float64 // gateway's lockergate_command_duration_seconds{type="unlock"}
	SrvP99    float64
	SrvCPU    float64 // cores
	PGCPU     float64 // cores (gateway only)
	GenCPU    float64
	Telemetry float64 // achieved background msgs/s
}

// Unlock runs the unlock round-trip workload.
func (r *Runner) Unlock(ctx context.Context, o UnlockOptions) (*Report, error) {
	o.defaults()
	rep := &Report{Workload: "unlock: API → locker → API round trip", Runs: o.Runs, LoadAvg: [2]string{Load(), ""}}
	lab, err := r.Lab(ctx, o.Lockers)
	if err != nil {
		return nil, err
	}
	var gw, bare []unlockRun
	for run := 1; run <= o.Runs; run++ {
		r.Log.Info("unlock: gateway run", "run", run)
		res, err := r.unlockGateway(ctx, lab, o)
		if err != nil {
			return nil, fmt.Errorf("gateway run %d: %w", run, err)
		}
		gw = append(gw, res)
		if o.Baseline {
			r.Log.Info("unlock: bare broker run", "run", run)
			res, err := r.unlockBare(ctx, o)
			if err != nil {
				return nil, fmt.Errorf("bare run %d: %w", run, err)
			}
			bare = append(bare, res)
		}
	}
	rep.LoadAvg[1] = Load()
	rep.Method = fmt.Sprintf("%d raw MQTT lockers connected (as in ingest) that answer every command at once with status ok; "+
		"background health at QoS 1, %.0f msgs/s in all; %.0f unlocks/s for %v, open loop (each request in its own goroutine "+
		"on a schedule, so a slow answer does not delay the next request), round robin over the lockers. "+
		"Gateway: POST /v1/lockers/{id}/commands {type unlock, wait_s 5} with the admin token, timed in lockerbench from "+
		"request to answer (status must be ok). Bare: POST /rt?device={id} to the bare broker, which publishes the same "+
		"command JSON at QoS 1 from its inline client and answers when its inline subscription receives the result: "+
		"the same HTTP → MQTT → locker → MQTT → HTTP path without authentication, database or fleet logic. "+
		"Before the timed load, %d unlocks one at a time give the round trip without queueing",
		o.Lockers, o.Telemetry, o.Rate, o.Duration, sequentialUnlocks)
	rep.Columns = []string{"measure", "lockergate", "bare mochi", "ratio"}
	pct := func(runs []unlockRun, p float64) Spread {
		var xs []float64
		for _, r := range runs {
			xs = append(xs, Percentile(r.Lat, p))
		}
		return SpreadOf(xs)
	}
	seq := func(runs []unlockRun, p float64) Spread {
		var xs []float64
		for _, r := range runs {
			xs = append(xs, Percentile(r.Seq, p))
		}
		return SpreadOf(xs)
	}
	g50, b50, g99, b99 := seq(gw, 50), seq(bare, 50), seq(gw, 99), seq(bare, 99)
	rep.Add(fmt.Sprintf("one at a time (%d): p50 / p99", sequentialUnlocks), g50.Format(fMs)+" / "+g99.Format(fMs),
		b50.Format(fMs)+" / "+b99.Format(fMs), ratio(g50.Median, b50.Median))
	for _, p := range []float64{50, 90, 99, 100} {
		g, b := pct(gw, p), pct(bare, p)
		name := fmt.Sprintf("at %.0f/s: round trip p%.0f", o.Rate, p)
		if p == 100 {
			name = fmt.Sprintf("at %.0f/s: round trip max", o.Rate)
		}
		rep.Add(name, g.Format(fMs), b.Format(fMs), ratio(g.Median, b.Median))
	}
	field := func(runs []unlockRun, f func(unlockRun) float64) Spread {
		var xs []float64
		for _, r := range runs {
			xs = append(xs, f(r))
		}
		return SpreadOf(xs)
	}
	n := func(r unlockRun) float64 { return float64(len(r.Lat)) }
	e := func(r unlockRun) float64 { return float64(r.Errors) }
	rep.Add("unlocks answered ok / errors", field(gw, n).Format(fInt)+" / "+field(gw, e).Format(fInt),
		field(bare, n).Format(fInt)+" / "+field(bare, e).Format(fInt), "")
	rep.Add("server-side issue→result p50 / p99 (histogram)", field(gw, func(r unlockRun) float64 { return r.SrvP50 }).Format(fMs)+" / "+
		field(gw, func(r unlockRun) float64 { return r.SrvP99 }).Format(fMs), "—", "")
	rep.Add("server CPU (cores)", field(gw, func(r unlockRun) float64 { return r.SrvCPU }).Format(fF2),
		field(bare, func(r unlockRun) float64 { return r.SrvCPU }).Format(fF2), "")
	rep.Add("PostgreSQL CPU (cores)", field(gw, func(r unlockRun) float64 { return r.PGCPU }).Format(fF2), "—", "")
	rep.Add("background telemetry achieved", field(gw, func(r unlockRun) float64 { return r.Telemetry }).Format(fRate),
		field(bare, func(r unlockRun) float64 { return r.Telemetry }).Format(fRate), "")
	rep.Add("load generator CPU (cores)", field(gw, func(r unlockRun) float64 { return r.GenCPU }).Format(fF2),
		field(bare, func(r unlockRun) float64 { return r.GenCPU }).Format(fF2), "")
	p50, p99 := pct(gw, 50), pct(gw, 99)
	rep.Targets = append(rep.Targets,
		fmt.Sprintf("p50 < 2 ms: %s (%s)", metOrNot(p50.Median < 0.002), p50.Format(fMs)),
		fmt.Sprintf("p99 < 15 ms: %s (%s)", metOrNot(p99.Median < 0.015), p99.Format(fMs)))
	return rep, nil
}

func (r *Runner) unlockGateway(ctx context.Context, lab *Lab, o UnlockOptions) (unlockRun, error) {
	var res unlockRun
	if err := lab.FreshGateway(ctx); err != nil {
		return res, err
	}
	gw := lab.GW
	f, err := ConnectFleet(ctx, gw.MQTTAddr, lab.IDs, FleetOptions{Locker: true, Answer: true})
	if err != nil {
		return res, err
	}
	defer f.Close()
	if err := lab.WaitOnline(ctx, len(lab.IDs), 5*time.Minute); err != nil {
		return res, err
	}
	time.Sleep(2 * time.Second)
	hc := apiHTTP()
	body := []byte(`{"type":"unlock","compartment":1,"reason":"remote","wait_s":5}`)
	call := func(ctx context.Context, c *Conn) error {
		req, _ := http.NewRequestWithContext(ctx, "POST", gw.HTTPURL+"/v1/lockers/"+url.PathEscape(c.ID)+"/commands", strings.NewReader(string(body)))
		req.Header.Set("Authorization", "Bearer "+gw.Token)
		req.Header.Set("Content-Type", "application/json")
		return expectStatusOK(hc.Do(req))
	}
	m0, err := gw.Metrics(ctx)
	if err != nil {
		return res, err
	}
	stamp := time.Now().Format("150405")
	prof := gw.ProfileCPU(ctx, "unlock-"+stamp, o.Duration)
	// The tail is a few requests in a thousand: an execution trace of part
	// of the run shows what they waited for.
	trace := gw.TraceExec(ctx, "unlock-"+stamp, min(o.Duration, 5*time.Second))
	res, err = r.unlockLoad(ctx, f, gw, lab.PG, o, call)
	<-prof
	<-trace
	if err != nil {
		return res, err
	}
	m1, err := gw.Metrics(ctx)
	if err != nil {
		return res, err
	}
	h := m1.Hist("lockergate_command_duration_seconds", `type="unlock"`).Sub(m0.Hist("lockergate_command_duration_seconds", `type="unlock"`))
	res.SrvP50, _ = h.Quantile(0.5)
	res.SrvP99, _ = h.Quantile(0.99)
	return res, nil
}

func (r *Runner) unlockBare(ctx context.Context, o UnlockOptions) (unlockRun, error) {
	srv, err := r.StartBare(ctx)
	if err != nil {
		return unlockRun{}, err
	}
	defer srv.Stop()
	f, err := ConnectFleet(ctx, srv.MQTTAddr, FakeIdentities(o.Lockers), FleetOptions{Locker: true, Answer: true})
	if err != nil {
		return unlockRun{}, err
	}
	defer f.Close()
	hc := apiHTTP()
	call := func(ctx context.Context, c *Conn) error {
		req, _ := http.NewRequestWithContext(ctx, "POST", srv.HTTPURL+"/rt?device="+url.QueryEscape(c.ID), nil)
		return expectStatusOK(hc.Do(req))
	}
	return r.unlockLoad(ctx, f, srv, nil, o, call)
}

func expectStatusOK(resp *http.Response, err error) error {
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusCreated {
		return fmt.Errorf("%s: %s", resp.Status, b)
	}
	var out struct {
		Status string `json:"status"`
	}
	if err := json.Unmarshal(b, &out); err != nil {
		return err
	}
	if out.Status != "ok" {
		return fmt.Errorf("command ended %q", out.Status)
	}
	return nil
}

// unlockLoad sends o.Rate calls per second for o.Duration with background
// telemetry, and times each call.
// sequentialUnlocks are sent one at a time before the timed load.
const sequentialUnlocks = 50

func (r *Runner) unlockLoad(ctx context.Context, f *Fleet, srv *Server, pg *PG, o UnlockOptions, call func(context.Context, *Conn) error) (unlockRun, error) {
	var res unlockRun
	pub := NewPublisher(f, 1)
	tctx, stopTelemetry := context.WithCancel(ctx)
	telDone := make(chan struct{})
	go func() {
		defer close(telDone)
		pub.Run(tctx, o.Telemetry, o.Duration+time.Hour)
	}()
	time.Sleep(time.Second) // telemetry running before the first unlock
	// One at a time first: the round trip without queueing.
	for i := 0; i < sequentialUnlocks && ctx.Err() == nil; i++ {
		t0 := time.Now()
		if err := call(ctx, f.Conns[(i*104729)%len(f.Conns)]); err == nil {
			res.Seq = append(res.Seq, time.Since(t0).Seconds())
		}
	}
	srv0, gen0, sent0, pg0 := srv.CPU(), SelfCPU(), pub.Sent.Load(), pg.CPU()
	start := time.Now()
	var mu sync.Mutex
	var wg sync.WaitGroup
	interval := time.Duration(float64(time.Second) / o.Rate)
	n := int(o.Rate * o.Duration.Seconds())
	var firstErr error
	for i := 0; i < n && ctx.Err() == nil; i++ {
		if d := time.Until(start.Add(time.Duration(i) * interval)); d > 0 {
			time.Sleep(d)
		}
		c := f.Conns[(i*7919)%len(f.Conns)] // spread over the fleet
		wg.Add(1)
		go func() {
			defer wg.Done()
			cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			defer cancel()
			t0 := time.Now()
			err := call(cctx, c)
			lat := time.Since(t0).Seconds()
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				res.Errors++
				if firstErr == nil {
					firstErr = err
				}
				return
			}
			res.Lat = append(res.Lat, lat)
		}()
	}
	wg.Wait()
	el := time.Since(start).Seconds()
	res.SrvCPU = float64(srv.CPU()-srv0) / el
	res.PGCPU = float64(pg.CPU()-pg0) / el
	res.GenCPU = float64(SelfCPU()-gen0) / el
	res.Telemetry = float64(pub.Sent.Load()-sent0) / el
	stopTelemetry()
	<-telDone
	if firstErr != nil {
		r.Log.Warn("unlock errors", "server", srv.Kind, "errors", res.Errors, "first", firstErr)
	}
	r.Log.Info("unlock run", "server", srv.Kind, "ok", len(res.Lat), "errors", res.Errors,
		"p50_ms", Percentile(res.Lat, 50)*1000, "p99_ms", Percentile(res.Lat, 99)*1000)
	return res, ctx.Err()
}
