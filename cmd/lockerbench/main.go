// Command lockerbench runs Lockergate's benchmarks: each workload against
// the gateway built from this tree and run as a separate process, with a
// baseline (a bare mochi broker, Debian's mosquitto) measured the same way
// in the same run, and prints a Markdown table per workload.
//
//	lockerbench all                      # every workload, the defaults of docs/benchmarks.md
//	lockerbench ingest --lockers 10000 --runs 3
//	lockerbench unlock | idle | pickups | storm [flags]
//	lockerbench trace-tail profiles/unlock-021000.trace
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/lockergate/lockergate/bench"
)

func main() { os.Exit(run(os.Args[1:], os.Stdout, os.Stderr)) }

const usage = `usage: lockerbench <workload> [flags]

Workloads:
  ingest   health at QoS 1 into PostgreSQL: sustained msgs/s, lag, CPU, memory (baseline: bare mochi)
  unlock   API → locker → API round trip under connected lockers and telemetry (baseline: bare mochi)
  idle     connected idle lockers: memory per connection (baselines: mosquitto, bare mochi)
  pickups  pickups created → ready → picked up per second, one site and many sites
  storm    reconnect storm after a gateway restart: time to online with current creds and config
  all      every workload in turn

  trace-tail FILE  the slowest unlocks in an execution trace saved by --profile,
                   and what each waited for

Run "lockerbench <workload> -h" for flags.
`

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "help" || args[0] == "-h" || args[0] == "--help" {
		fmt.Fprint(stderr, usage)
		return 2
	}
	cmd, args := args[0], args[1:]
	if cmd == "trace-tail" {
		return traceTail(args, stdout, stderr)
	}
	fs := flag.NewFlagSet("lockerbench "+cmd, flag.ContinueOnError)
	fs.SetOutput(stderr)
	var c config
	c.register(fs, cmd)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if err := c.finish(); err != nil {
		fmt.Fprintf(stderr, "lockerbench: %v\n", err)
		return 2
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(c.logLevel)); err != nil {
		fmt.Fprintf(stderr, "lockerbench: --log-level %q: want debug, info, warn or error\n", c.logLevel)
		return 2
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := execute(ctx, cmd, c, log, stdout); err != nil {
		log.Error("benchmark failed", "workload", cmd, "err", err)
		return 1
	}
	return 0
}

// config holds every flag; each workload registers the ones it reads.
type config struct {
	module, logLevel, rates, out, profile string
	keep, noBaseline, holdSockets         bool
	runs                                  int
	gatewayEnv                            []string
	ingest                                bench.IngestOptions
	unlock                                bench.UnlockOptions
	idle                                  bench.IdleOptions
	pickups                               bench.PickupOptions
	storm                                 bench.StormOptions
}

func (c *config) register(fs *flag.FlagSet, cmd string) {
	fs.StringVar(&c.module, "module", "", "directory of the lockergate module to build (default: found from the working directory)")
	fs.StringVar(&c.logLevel, "log-level", "info", "progress log level: debug, info, warn, error")
	fs.StringVar(&c.out, "out", "", "also write the tables to this file")
	fs.BoolVar(&c.keep, "keep", false, "keep the scratch directory (logs, data) after the run")
	fs.Func("gateway-env", "KEY=VALUE added to the gateway's environment only, not the baselines' nor the load generator's (repeatable; e.g. GOGC=50)",
		func(v string) error {
			if k, _, ok := strings.Cut(v, "="); !ok || k == "" {
				return fmt.Errorf("want KEY=VALUE, got %q", v)
			}
			c.gatewayEnv = append(c.gatewayEnv, v)
			return nil
		})
	fs.StringVar(&c.profile, "profile", "", "run the gateway with net/http/pprof (cmd/lockerbench/gwprof) and save CPU profiles (and, for ingest steps, allocation profiles) of each ingest step, unlock run and reconnect storm (the first 20 s after the restart), an execution trace of the first 5 s of each unlock run, and a heap profile of the idle gateway, in this directory")
	fs.BoolVar(&c.noBaseline, "no-baseline", false, "skip the baseline servers")
	fs.BoolVar(&c.holdSockets, "hold-sockets", false, "hold the gateway's listening sockets and pass them to each of its starts, as systemd socket activation does, so they outlive a restart (docs/operations.md)")
	fs.IntVar(&c.runs, "runs", 3, "runs of each workload (medians and ranges are reported)")
	all := cmd == "all"
	if cmd == "ingest" || all {
		fs.IntVar(&c.ingest.Lockers, "lockers", 10000, "connected lockers (ingest, unlock, storm)")
		fs.StringVar(&c.rates, "rates", "1000,2500,5000,10000,15000,20000,25000,30000,40000", "ingest: ladder of aggregate rates, msgs/s")
		fs.DurationVar(&c.ingest.Step, "step", 10*time.Second, "ingest: time at each rate")
		fs.Float64Var(&c.ingest.MarkerRate, "markers", 20, "ingest: end-to-end marker messages per second")
	}
	if cmd == "unlock" || all {
		if !all {
			fs.IntVar(&c.unlock.Lockers, "lockers", 10000, "connected lockers")
		}
		fs.Float64Var(&c.unlock.Rate, "unlock-rate", 100, "unlock: unlocks per second")
		fs.DurationVar(&c.unlock.Duration, "unlock-duration", 20*time.Second, "unlock: how long to send unlocks")
		fs.Float64Var(&c.unlock.Telemetry, "telemetry", 2000, "unlock: background health msgs/s (QoS 1) across the lockers")
	}
	if cmd == "idle" || all {
		fs.IntVar(&c.idle.Lockers, "idle-lockers", 50000, "idle: connected idle lockers")
		fs.DurationVar(&c.idle.Hold, "hold", 30*time.Second, "idle: how long to hold them after all are connected")
		fs.BoolVar(&c.idle.NoMochi, "no-bare-idle", false, "idle: skip the bare mochi baseline (mosquitto only)")
		fs.DurationVar(&c.idle.Health, "idle-health", 0, "idle: each locker publishes health at this interval (QoS 1) while held, as real lockers do every 60s; 0: none")
	}
	if cmd == "pickups" || all {
		fs.IntVar(&c.pickups.SiteLockers, "site-lockers", 20, "pickups: lockers at the one-site case")
		fs.IntVar(&c.pickups.Sites, "sites", 500, "pickups: sites in the many-sites case (one locker each)")
		fs.Float64Var(&c.pickups.Rate, "pickup-rate", 80, "pickups: highest orders/s offered (the ladder is rate/4, rate/2, rate)")
		fs.DurationVar(&c.pickups.Duration, "pickup-duration", 20*time.Second, "pickups: how long orders are offered")
	}
	if cmd == "storm" || all {
		if !all {
			fs.IntVar(&c.storm.Lockers, "lockers", 10000, "connected lockers")
		}
		fs.DurationVar(&c.storm.Settle, "settle", 10*time.Second, "storm: steady state before the restart")
	}
}

func (c *config) finish() error {
	if c.rates != "" {
		c.ingest.Rates = nil
		for _, f := range strings.Split(c.rates, ",") {
			v, err := strconv.ParseFloat(strings.TrimSpace(f), 64)
			if err != nil || v <= 0 {
				return fmt.Errorf("--rates: %q is not a positive number", f)
			}
			c.ingest.Rates = append(c.ingest.Rates, v)
		}
	}
	if c.runs < 1 {
		return errors.New("--runs must be at least 1")
	}
	c.ingest.Runs, c.unlock.Runs, c.idle.Runs, c.pickups.Runs, c.storm.Runs = c.runs, c.runs, c.runs, c.runs, c.runs
	c.ingest.Baseline, c.unlock.Baseline, c.idle.Baseline, c.storm.Baseline = !c.noBaseline, !c.noBaseline, !c.noBaseline, !c.noBaseline
	if c.unlock.Lockers == 0 {
		c.unlock.Lockers = c.ingest.Lockers
	}
	if c.storm.Lockers == 0 {
		c.storm.Lockers = c.ingest.Lockers
	}
	return nil
}

func execute(ctx context.Context, cmd string, c config, log *slog.Logger, stdout io.Writer) error {
	switch cmd {
	case "ingest", "unlock", "idle", "pickups", "storm", "all":
	default:
		return fmt.Errorf("unknown workload %q\n%s", cmd, usage)
	}
	if n, err := bench.RaiseFileLimit(1 << 20); err != nil {
		log.Warn("could not raise the open file limit", "limit", n, "err", err)
	}
	mod := c.module
	if mod == "" {
		wd, err := os.Getwd()
		if err != nil {
			return err
		}
		if mod, err = bench.FindModule(wd); err != nil {
			return err
		}
	}
	out := stdout
	if c.out != "" {
		f, err := os.Create(c.out)
		if err != nil {
			return err
		}
		defer f.Close()
		out = io.MultiWriter(stdout, f)
	}
	log.Info("building lockergate and the bare broker", "module", mod)
	r, err := bench.NewRunner(ctx, mod, log, out)
	if err != nil {
		return err
	}
	r.Keep = c.keep
	r.GatewayEnv = c.gatewayEnv
	r.HoldSockets = c.holdSockets
	if c.profile != "" {
		if r.Profile, err = filepath.Abs(c.profile); err != nil {
			return err
		}
	}
	defer r.Close()
	if c.keep {
		log.Info("scratch directory kept", "dir", r.Root)
	}
	m := bench.ThisMachine()
	fmt.Fprintf(out, "# lockerbench %s\n\nmachine: %s; started %s\n", cmd, m, time.Now().UTC().Format(time.RFC3339))
	steps := []string{cmd}
	if cmd == "all" {
		// idle first: it needs nearly every descriptor the machine allows.
		steps = []string{"idle", "ingest", "unlock", "storm", "pickups"}
	}
	var firstErr error
	for _, s := range steps {
		var rep *bench.Report
		var err error
		noise := r.WatchNoise(time.Minute)
		switch s {
		case "ingest":
			rep, err = r.Ingest(ctx, c.ingest)
		case "unlock":
			rep, err = r.Unlock(ctx, c.unlock)
		case "idle":
			rep, err = r.Idle(ctx, c.idle)
		case "pickups":
			rep, err = r.Pickups(ctx, c.pickups)
		case "storm":
			rep, err = r.Storm(ctx, c.storm)
		}
		busy := noise()
		log.Info("workload done", "workload", s, "open_files", bench.OpenFiles())
		if err != nil {
			log.Error("workload failed", "workload", s, "err", err)
			if firstErr == nil {
				firstErr = fmt.Errorf("%s: %w", s, err)
			}
			if ctx.Err() != nil {
				break
			}
			continue
		}
		rep.Busy = busy
		rep.Print(out, m)
	}
	return firstErr
}

// traceTail prints the slowest calls of a function in an execution trace.
func traceTail(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("lockerbench trace-tail", flag.ContinueOnError)
	fs.SetOutput(stderr)
	frame := fs.String("frame", bench.UnlockFrame, "follow goroutines while this function is on their stack")
	top := fs.Int("top", 20, "how many of the slowest calls to show")
	minWait := fs.Duration("min-wait", 500*time.Microsecond, "show waits of at least this long")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() != 1 {
		fmt.Fprintln(stderr, "usage: lockerbench trace-tail [flags] FILE.trace (saved by --profile, or from /debug/pprof/trace)")
		return 2
	}
	f, err := os.Open(fs.Arg(0))
	if err != nil {
		fmt.Fprintf(stderr, "lockerbench: %v\n", err)
		return 1
	}
	defer f.Close()
	rep, err := bench.TraceTail(f, *frame)
	if err != nil {
		fmt.Fprintf(stderr, "lockerbench: %s: %v\n", fs.Arg(0), err)
		return 1
	}
	if len(rep.Calls) == 0 {
		fmt.Fprintf(stderr, "lockerbench: no call of %s in %s; is --frame right?\n", *frame, fs.Arg(0))
		return 1
	}
	bench.WriteTraceTail(stdout, rep, *top, *minWait)
	return 0
}
