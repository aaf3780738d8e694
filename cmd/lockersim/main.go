// Command lockersim runs a fleet of simulated lockers (package devicesim)
// against a Lockergate broker: each locker is a real MQTT client speaking
// protocol v1.
//
//	lockersim run --lockers 100 --broker tcp://127.0.0.1:1883 --claim TOKEN --seed 1
//
// "run" is the default command. It prints a one-line summary every few
// seconds to stderr and a final report on SIGINT/SIGTERM (or after
// --duration); -o json prints the final report as JSON on stdout.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/lockergate/lockergate/devicesim"
)

func main() { os.Exit(run()) }

func run() int {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	return runArgs(ctx, os.Args[1:], os.Getenv, os.Stdout, os.Stderr)
}

const usage = `usage: lockersim [run] [flags]

Runs simulated lockers against a Lockergate broker until SIGINT/SIGTERM.

Flags:
`

// config is what the flags say.
type config struct {
	opts            devicesim.Options
	identities      string
	duration        time.Duration
	startTimeout    time.Duration
	summaryInterval time.Duration
	output          string
	logLevel        slog.Level
}

// runArgs is the whole program behind main, with its environment passed in.
func runArgs(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		switch args[0] {
		case "run":
			args = args[1:]
		case "help":
			fmt.Fprint(stderr, usage)
			newFlagSet(&config{}, getenv, stderr).PrintDefaults()
			return 0
		default:
			fmt.Fprintf(stderr, "lockersim: unknown command %q (want run)\n", args[0])
			return 2
		}
	}
	var cfg config
	fs := newFlagSet(&cfg, getenv, stderr)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "lockersim: unexpected arguments %q\n", fs.Args())
		return 2
	}
	if cfg.output != "text" && cfg.output != "json" {
		fmt.Fprintf(stderr, "lockersim: -o %q: want text or json\n", cfg.output)
		return 2
	}
	return simulate(ctx, cfg, stdout, stderr)
}

func newFlagSet(cfg *config, getenv func(string) string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("lockersim run", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(stderr, usage)
		fs.PrintDefaults()
	}
	o := &cfg.opts
	fs.IntVar(&o.Lockers, "lockers", 10, "number of lockers")
	fs.StringVar(&o.Broker, "broker", "tcp://127.0.0.1:1883", "MQTT broker URL (tcp://, mqtts://)")
	fs.StringVar(&o.ClaimToken, "claim", getenv("LOCKERSIM_CLAIM"), "claim token for lockers without identity (default $LOCKERSIM_CLAIM)")
	fs.Int64Var(&o.Seed, "seed", 1, "seed for serials, models and decisions")
	fs.StringVar(&o.API, "api", "", "gateway HTTP API base URL (recorded in the report; used by scenarios)")
	fs.DurationVar(&o.HealthInterval, "health-interval", devicesim.DefaultHealthInterval, "health period until config says otherwise (negative: none)")
	fs.DurationVar(&o.KeepAlive, "keepalive", devicesim.DefaultKeepAlive, "MQTT keep-alive")
	fs.Float64Var(&o.ConnectRate, "connect-rate", devicesim.DefaultConnectRate, "new connections per second across the fleet (negative: unlimited)")
	fs.StringVar(&o.SerialPrefix, "serial-prefix", devicesim.DefaultSerialPrefix, "serial number prefix")
	fs.IntVar(&o.FirstIndex, "first-index", 0, "index of the first locker (to split one seeded fleet over processes)")
	fs.StringVar(&o.FW, "fw", devicesim.DefaultFW, "firmware version the lockers report")
	fs.DurationVar(&o.DoorCloseDelay, "door-close-delay", devicesim.DefaultDoorCloseDelay, "how long a door stays open after an unlock")
	fs.Float64Var(&o.Behavior.LeaveItemProb, "leave-item", 0, "probability a driver leaves the item after opening with a code")
	fs.StringVar(&cfg.identities, "identities", "", "JSON file of provisioned identities: loaded if present, saved after start and at exit (mode 0600)")
	fs.DurationVar(&cfg.duration, "duration", 0, "stop after this long (0: run until SIGINT/SIGTERM)")
	fs.DurationVar(&cfg.startTimeout, "start-timeout", 0, "give up waiting for all lockers to connect after this long (0: no limit)")
	fs.DurationVar(&cfg.summaryInterval, "summary-interval", 5*time.Second, "period of the live summary line")
	fs.StringVar(&cfg.output, "o", "text", "final report format: text or json (json goes to stdout)")
	fs.TextVar(&cfg.logLevel, "log-level", slog.LevelInfo, "log level: debug, info, warn, error")
	return fs
}

// report is the final report.
type report struct {
	Lockers      int             `json:"lockers"`
	Seed         int64           `json:"seed"`
	Broker       string          `json:"broker"`
	API          string          `json:"api,omitempty"`
	Started      time.Time       `json:"started"`
	DurationS    float64         `json:"duration_s"`
	AllConnected bool            `json:"all_connected"`
	ConnectS     float64         `json:"connect_s,omitempty"` // time until all were connected
	StartError   string          `json:"start_error,omitempty"`
	OutPerS      float64         `json:"published_per_s"`
	InPerS       float64         `json:"received_per_s"`
	Errors       uint64          `json:"errors"`
	Stats        devicesim.Stats `json:"stats"`
}

func simulate(ctx context.Context, cfg config, stdout, stderr io.Writer) int {
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: cfg.logLevel}))
	known, err := loadIdentities(cfg.identities)
	if err != nil {
		log.Error("cannot load identities", "err", err)
		return 1
	}
	cfg.opts.Identities = known
	cfg.opts.Logger = log
	fleet, err := devicesim.NewFleet(cfg.opts)
	if err != nil {
		log.Error("bad options", "err", err)
		return 2
	}
	defer fleet.Close()

	runCtx, cancelRun := ctx, context.CancelFunc(func() {})
	if cfg.duration > 0 {
		runCtx, cancelRun = context.WithTimeout(ctx, cfg.duration)
	}
	defer cancelRun()

	began := time.Now()
	liveCtx, stopLive := context.WithCancel(runCtx)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		live(liveCtx, fleet, cfg.summaryInterval, stderr)
	}()

	startCtx, cancelStart := runCtx, context.CancelFunc(func() {})
	if cfg.startTimeout > 0 {
		startCtx, cancelStart = context.WithTimeout(runCtx, cfg.startTimeout)
	}
	startErr := fleet.Start(startCtx)
	cancelStart()
	rep := report{Lockers: cfg.opts.Lockers, Seed: cfg.opts.Seed, Broker: cfg.opts.Broker, API: cfg.opts.API, Started: began.UTC()}
	code := 0
	if startErr != nil {
		rep.StartError = startErr.Error()
		if ctx.Err() == nil { // not interrupted by a signal
			code = 1
			log.Error("not every locker connected", "err", startErr)
		}
	} else {
		rep.AllConnected = true
		rep.ConnectS = time.Since(began).Seconds()
	}
	if err := saveIdentities(cfg.identities, known, fleet); err != nil {
		log.Error("cannot save identities", "err", err)
		code = 1
	}
	if startErr != nil && fleet.Stats().Connected == 0 && runCtx.Err() == nil {
		log.Error("no locker connected; stopping")
	} else {
		<-runCtx.Done()
	}
	stopLive()
	wg.Wait()

	st := fleet.Stats() // before Close, while the connected gauge still means something
	fleet.Close()
	if err := saveIdentities(cfg.identities, known, fleet); err != nil {
		log.Error("cannot save identities", "err", err)
		code = 1
	}
	el := time.Since(began)
	rep.DurationS = el.Seconds()
	rep.Stats = st
	rep.Errors = st.Errors()
	rep.OutPerS = float64(st.Published) / el.Seconds()
	rep.InPerS = float64(st.Received) / el.Seconds()
	printReport(stderr, rep)
	if cfg.output == "json" {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(rep); err != nil {
			log.Error("cannot write report", "err", err)
			code = 1
		}
	}
	return code
}

// live prints a one-line summary every interval until ctx ends.
func live(ctx context.Context, f *devicesim.Fleet, every time.Duration, w io.Writer) {
	if every <= 0 {
		return
	}
	t := time.NewTicker(every)
	defer t.Stop()
	began, last, lastAt := time.Now(), f.Stats(), time.Now()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			st := f.Stats()
			dt := now.Sub(lastAt).Seconds()
			fmt.Fprintf(w, "lockersim %s: connected %d/%d | out %.1f msg/s, in %.1f msg/s | commands %d | codes %d/%d | errors %d\n",
				now.Sub(began).Round(time.Second), st.Connected, st.Lockers,
				float64(st.Published-last.Published)/dt, float64(st.Received-last.Received)/dt,
				st.CommandsAnswered, st.CodesAccepted, st.CodesRejected, st.Errors())
			last, lastAt = st, now
		}
	}
}

func printReport(w io.Writer, r report) {
	st := r.Stats
	connected := "all connected"
	if r.AllConnected {
		connected += fmt.Sprintf(" in %.1fs", r.ConnectS)
	} else {
		connected = "NOT all connected: " + r.StartError
	}
	fmt.Fprintf(w, "lockersim: %d lockers (seed %d) for %.1fs: %s\n", r.Lockers, r.Seed, r.DurationS, connected)
	fmt.Fprintf(w, "  provisioned %d, connects %d, published %d (%.1f/s), received %d (%.1f/s)\n",
		st.Provisioned, st.Connects, st.Published, r.OutPerS, st.Received, r.InPerS)
	fmt.Fprintf(w, "  commands answered %d (run %d, repeats %d), codes accepted %d, rejected %d\n",
		st.CommandsAnswered, st.CommandsRun, st.CommandRepeats, st.CodesAccepted, st.CodesRejected)
	fmt.Fprintf(w, "  errors %d: connect failures %d, connections lost %d, publish errors %d, decode errors %d, dropped %d\n",
		r.Errors, st.ConnectFailures, st.ConnectionsLost, st.PublishErrors, st.DecodeErrors, st.Dropped)
}

// loadIdentities reads the identities file; a missing file is an empty set.
func loadIdentities(path string) (map[string]devicesim.Identity, error) {
	ids := map[string]devicesim.Identity{}
	if path == "" {
		return ids, nil
	}
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return ids, nil
	}
	if err != nil {
		return nil, err
	}
	if err := json.Unmarshal(b, &ids); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return ids, nil
}

// saveIdentities writes the known identities plus the fleet's, atomically:
// they hold device secrets, hence mode 0600.
func saveIdentities(path string, known map[string]devicesim.Identity, f *devicesim.Fleet) error {
	if path == "" {
		return nil
	}
	all := make(map[string]devicesim.Identity, len(known))
	for k, v := range known {
		all[k] = v
	}
	for _, l := range f.Lockers() {
		if id, ok := l.Identity(); ok {
			all[l.Serial()] = id
		}
	}
	b, err := json.MarshalIndent(all, "", "  ")
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, append(b, '\n'), 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}
