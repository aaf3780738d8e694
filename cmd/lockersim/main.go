// Command lockersim runs a fleet of simulated lockers (package devicesim)
// against a Lockergate broker: each locker is a real MQTT client speaking
// protocol v1.
//
//	lockersim run --scenario rush-hour --broker tcp://127.0.0.1:1883 --claim TOKEN
//	lockersim run --lockers 100 --broker tcp://127.0.0.1:1883 --claim TOKEN --seed 1
//	lockersim scenarios
//	lockersim bench connect --lockers 10000
//
// "run" is the default command. It prints a one-line summary every few
// seconds to stderr and a final report on SIGINT/SIGTERM (or after
// --duration, or the scenario's duration); -o json prints the final report
// as JSON on stdout. docs/simulator.md describes scenarios and the bench.
package main

import (
	"bufio"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/lockergate/lockergate/client"
	"github.com/lockergate/lockergate/devicesim"
	"github.com/lockergate/lockergate/devicesim/orders"
	"github.com/lockergate/lockergate/fleet"
)

func main() { os.Exit(run()) }

func run() int {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	return runArgs(ctx, os.Args[1:], os.Getenv, os.Stdout, os.Stderr)
}

const usage = `usage: lockersim [run] [flags]
       lockersim scenarios [NAME]
       lockersim bench connect [flags]

Runs simulated lockers against a Lockergate broker until SIGINT/SIGTERM, the
--duration or the scenario's duration. With --scenario, the scenario sets the
fleet, behaviour and faults; flags given explicitly override it.

Flags of run:
`

// config is what the flags say.
type config struct {
	opts            devicesim.Options
	scenario        string
	siteClaims      siteClaims
	sourceAddrs     string
	decisions       string
	restartCmd      string
	bootstrap       bool
	apiToken        string
	identities      string
	duration        time.Duration
	startTimeout    time.Duration
	summaryInterval time.Duration
	output          string
	logLevel        slog.Level

	sc  *devicesim.Scenario // loaded --scenario
	set map[string]bool     // flags given on the command line
}

// runArgs is the whole program behind main, with its environment passed in.
func runArgs(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		switch args[0] {
		case "run":
			args = args[1:]
		case "bench":
			return runBench(ctx, args[1:], getenv, stdout, stderr)
		case "scenarios":
			return listScenarios(args[1:], stdout, stderr)
		case "help":
			fmt.Fprint(stderr, usage)
			newFlagSet(&config{}, getenv, stderr).PrintDefaults()
			return 0
		default:
			fmt.Fprintf(stderr, "lockersim: unknown command %q (want run, scenarios or bench)\n", args[0])
			return 2
		}
	}
	var cfg config
	fs := newFlagSet(&cfg, getenv, stderr)
	if err := fs.Parse(args); err != nil {
		return flagExit(err)
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "lockersim: unexpected arguments %q\n", fs.Args())
		return 2
	}
	if cfg.output != "text" && cfg.output != "json" {
		fmt.Fprintf(stderr, "lockersim: -o %q: want text or json\n", cfg.output)
		return 2
	}
	cfg.set = map[string]bool{}
	fs.Visit(func(f *flag.Flag) { cfg.set[f.Name] = true })
	if err := cfg.resolve(); err != nil {
		fmt.Fprintf(stderr, "lockersim: %v\n", err)
		return 2
	}
	return simulate(ctx, cfg, stdout, stderr)
}

// resolve combines the scenario (if any) with the flags given explicitly.
func (c *config) resolve() error {
	addrs, err := parseSourceAddrs(c.sourceAddrs)
	if err != nil {
		return err
	}
	if c.scenario != "" {
		sc, err := devicesim.LoadScenario(c.scenario)
		if err != nil {
			return err
		}
		if c.set["lockers"] {
			sc.Resize(c.opts.Lockers)
		}
		o := sc.Options()
		f := &c.opts
		// Flags given on the command line win over the scenario.
		for name, apply := range map[string]func(){
			"seed":             func() { o.Seed = f.Seed },
			"health-interval":  func() { o.HealthInterval = f.HealthInterval },
			"keepalive":        func() { o.KeepAlive = f.KeepAlive },
			"connect-rate":     func() { o.ConnectRate = f.ConnectRate },
			"serial-prefix":    func() { o.SerialPrefix = f.SerialPrefix },
			"fw":               func() { o.FW = f.FW },
			"door-close-delay": func() { o.DoorCloseDelay = f.DoorCloseDelay },
			"leave-item":       func() { o.Behavior.LeaveItemProb = f.Behavior.LeaveItemProb },
			"code-report":      func() { o.CodeReport = f.CodeReport },
			"time-scale":       func() { o.TimeScale = f.TimeScale },
		} {
			if c.set[name] {
				apply()
			}
		}
		if !c.set["seed"] && sc.Seed == 0 {
			o.Seed = f.Seed
		}
		o.Broker, o.ClaimToken, o.API, o.FirstIndex = f.Broker, f.ClaimToken, f.API, f.FirstIndex
		if scale := cmp.Or(o.TimeScale, 1); !c.set["duration"] && scale > 0 {
			// Scenario time; a scenario without time_scale runs at 1.
			c.duration = time.Duration(float64(sc.Duration) / scale)
		}
		c.opts, c.sc = o, sc
	}
	c.opts.SourceAddrs = addrs
	for i, s := range c.opts.Sites {
		if tok, ok := c.siteClaims[s.ID]; ok {
			c.opts.Sites[i].ClaimToken = tok
		}
	}
	for site := range c.siteClaims {
		if !slices.ContainsFunc(c.opts.Sites, func(s devicesim.Site) bool { return s.ID == site }) {
			return fmt.Errorf("--site-claim %s: no such site in the scenario", site)
		}
	}
	if c.bootstrap && (c.opts.API == "" || c.apiToken == "") {
		return errors.New("--bootstrap needs --api and --token (or $LOCKERSIM_TOKEN)")
	}
	return nil
}

// siteClaims is the repeatable --site-claim SITE=TOKEN flag.
type siteClaims map[string]string

func (s *siteClaims) String() string { return fmt.Sprint(len(*s), " site claims") }

func (s *siteClaims) Set(v string) error {
	site, tok, ok := strings.Cut(v, "=")
	if !ok || site == "" || tok == "" {
		return errors.New("want SITE=TOKEN")
	}
	if *s == nil {
		*s = siteClaims{}
	}
	(*s)[site] = tok
	return nil
}

// parseSourceAddrs reads "127.0.0.2-127.0.0.9,10.1.1.1": addresses and
// inclusive IPv4 ranges, at most 1024 addresses.
func parseSourceAddrs(v string) ([]string, error) {
	var out []string
	for _, part := range strings.Split(v, ",") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		lo, hi, isRange := strings.Cut(part, "-")
		a, err := netip.ParseAddr(lo)
		if err != nil {
			return nil, fmt.Errorf("source address %q: %w", lo, err)
		}
		if !isRange {
			out = append(out, a.String())
			continue
		}
		b, err := netip.ParseAddr(hi)
		if err != nil || !a.Is4() || !b.Is4() || b.Less(a) {
			return nil, fmt.Errorf("source address range %q: want e.g. 127.0.0.2-127.0.0.9", part)
		}
		for ; !b.Less(a); a = a.Next() {
			out = append(out, a.String())
			if len(out) > 1024 {
				return nil, errors.New("more than 1024 source addresses")
			}
		}
	}
	return out, nil
}

// listScenarios is "lockersim scenarios [NAME]": the shipped scenarios, or
// one of them as JSON (a starting point for a scenario file).
func listScenarios(args []string, stdout, stderr io.Writer) int {
	if len(args) > 1 {
		fmt.Fprintln(stderr, "usage: lockersim scenarios [NAME]")
		return 2
	}
	if len(args) == 1 {
		sc, err := devicesim.LoadScenario(args[0])
		if err != nil {
			fmt.Fprintln(stderr, err)
			return 1
		}
		if err := writeJSON(stdout, sc); err != nil {
			return 1
		}
		return 0
	}
	for _, name := range devicesim.ScenarioNames() {
		sc, err := devicesim.LoadScenario(name)
		if err != nil {
			fmt.Fprintln(stderr, err)
			return 1
		}
		fmt.Fprintf(stdout, "%-14s %6d lockers  %s\n", name, sc.Lockers(), sc.Description)
	}
	return 0
}

// commandFlags returns the flag set of a lockersim command: on -h or a bad
// flag it prints the command's usage and flags to stderr.
func commandFlags(name, usage string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(stderr, usage)
		fs.PrintDefaults()
	}
	return fs
}

// flagExit is the exit code after the flags did not parse: 0 after -h
// (the usage is what was asked for), 2 after a bad flag.
func flagExit(err error) int {
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	return 2
}

// writeJSON writes v as indented JSON (reports and scenarios on stdout).
func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func newFlagSet(cfg *config, getenv func(string) string, stderr io.Writer) *flag.FlagSet {
	fs := commandFlags("lockersim run", usage, stderr)
	o := &cfg.opts
	fs.IntVar(&o.Lockers, "lockers", 10, "number of lockers")
	fs.StringVar(&o.Broker, "broker", "tcp://127.0.0.1:1883", "MQTT broker URL (tcp://, mqtts://)")
	fs.StringVar(&o.ClaimToken, "claim", getenv("LOCKERSIM_CLAIM"), "claim token for lockers without identity (default $LOCKERSIM_CLAIM)")
	fs.Int64Var(&o.Seed, "seed", 1, "seed for serials, models and decisions")
	fs.StringVar(&o.API, "api", "", "gateway HTTP API base URL, for --bootstrap and for a scenario's orders (behavior.orders_per_hour; with --token); recorded in the report")
	fs.DurationVar(&o.HealthInterval, "health-interval", devicesim.DefaultHealthInterval, "health period until config says otherwise (negative: none)")
	fs.DurationVar(&o.KeepAlive, "keepalive", devicesim.DefaultKeepAlive, "MQTT keep-alive")
	fs.Float64Var(&o.ConnectRate, "connect-rate", devicesim.DefaultConnectRate, "new connections per second across the fleet (negative: unlimited)")
	fs.StringVar(&o.SerialPrefix, "serial-prefix", devicesim.DefaultSerialPrefix, "serial number prefix")
	fs.IntVar(&o.FirstIndex, "first-index", 0, "index of the first locker (to split one seeded fleet over processes)")
	fs.StringVar(&o.FW, "fw", devicesim.DefaultFW, "firmware version the lockers report")
	fs.DurationVar(&o.DoorCloseDelay, "door-close-delay", devicesim.DefaultDoorCloseDelay, "how long a door stays open after an unlock")
	fs.Float64Var(&o.Behavior.LeaveItemProb, "leave-item", 0, "probability a driver leaves the item after opening with a code")
	fs.TextVar(&o.CodeReport, "code-report", devicesim.CodeAcceptedFirst,
		"how lockers report a code's use: code_accepted (then door_opened: the protocol's order), door_first (door_opened, then code_accepted) or door_only")
	fs.StringVar(&cfg.scenario, "scenario", "", "scenario: a shipped one (lockersim scenarios) or a JSON file")
	fs.Var(&cfg.siteClaims, "site-claim", "claim token of one site of the scenario: SITE=TOKEN (repeatable; --claim covers the rest)")
	fs.BoolVar(&cfg.bootstrap, "bootstrap", false, "create the scenario's sites and a claim per site through --api first (needs --token)")
	fs.StringVar(&cfg.apiToken, "token", getenv("LOCKERSIM_TOKEN"), "admin API token for --bootstrap and a scenario's orders (default $LOCKERSIM_TOKEN)")
	fs.Float64Var(&o.TimeScale, "time-scale", 1, "run fault and behaviour schedules this many times faster")
	fs.StringVar(&cfg.sourceAddrs, "source-addrs", "", "local addresses to connect from, e.g. 127.0.0.2-127.0.0.5 (for more than ~28,000 lockers)")
	fs.StringVar(&cfg.decisions, "decisions", "", "write every device decision to this file as JSON lines (compare runs with the same seed)")
	fs.StringVar(&cfg.restartCmd, "gateway-restart-cmd", "", "shell command that restarts the gateway at the scenario's planned restarts ($LOCKERSIM_DOWN_S: seconds to stay down)")
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
	Scenario     string    `json:"scenario,omitempty"`
	Lockers      int       `json:"lockers"`
	Seed         int64     `json:"seed"`
	Broker       string    `json:"broker"`
	API          string    `json:"api,omitempty"`
	Started      time.Time `json:"started"`
	DurationS    float64   `json:"duration_s"`
	AllConnected bool      `json:"all_connected"`
	ConnectS     float64   `json:"connect_s,omitempty"` // time until all were connected
	StartError   string    `json:"start_error,omitempty"`
	OutPerS      float64   `json:"published_per_s"`
	InPerS       float64   `json:"received_per_s"`
	Errors       uint64    `json:"errors"`
	Pickups      uint64    `json:"pickups"`
	// Orders is what the scenario's people did through the API
	// (behavior.orders_per_hour), when it places orders.
	Orders *orders.Stats   `json:"orders,omitempty"`
	Stats  devicesim.Stats `json:"stats"`
	// Unmet lists the scenario's expectations the run did not meet.
	Unmet []string `json:"unmet,omitempty"`
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
	if cfg.bootstrap {
		if err := bootstrap(ctx, &cfg, log); err != nil {
			log.Error("cannot create sites and claims", "err", err)
			return 1
		}
	}
	if cfg.opts.Lockers > 1000 {
		if err := raiseFileLimit(uint64(cfg.opts.Lockers) + 1024); err != nil {
			log.Warn("cannot raise the open file limit", "err", err)
		}
	}
	var dlog *decisionFile
	if cfg.decisions != "" {
		if dlog, err = createDecisionFile(cfg.decisions); err != nil {
			log.Error("cannot write decisions", "err", err)
			return 1
		}
		cfg.opts.OnDecision = dlog.write
	}
	if cfg.restartCmd != "" {
		cfg.opts.GatewayRestart = restartCommand(cfg.restartCmd, stderr)
	}
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
	rep := report{Lockers: fleet.Options().Lockers, Seed: cfg.opts.Seed, Broker: cfg.opts.Broker, API: cfg.opts.API, Started: began.UTC()}
	if cfg.sc != nil {
		rep.Scenario = cfg.sc.Name
	}
	code := 0
	if startErr != nil {
		rep.StartError = startErr.Error()
		if ctx.Err() == nil { // not interrupted by a signal
			code = 1
			log.Error("not every locker connected", "err", startErr)
			if hint := startHint(startErr); hint != "" {
				log.Error(hint)
			}
		}
	} else {
		rep.AllConnected = true
		rep.ConnectS = time.Since(began).Seconds()
	}
	if err := saveIdentities(cfg.identities, known, fleet); err != nil {
		log.Error("cannot save identities", "err", err)
		code = 1
	}
	var ordersDone chan orders.Stats
	if startErr != nil && fleet.Stats().Connected == 0 && runCtx.Err() == nil {
		log.Error("no locker connected; stopping")
	} else {
		ordersDone = placeOrders(runCtx, cfg, fleet, log)
		<-runCtx.Done()
	}
	stopLive()
	wg.Wait()
	if ordersDone != nil {
		st := <-ordersDone
		rep.Orders = &st
	}

	st := fleet.Stats() // before Close, while the connected gauge still means something
	fleet.Close()
	if err := saveIdentities(cfg.identities, known, fleet); err != nil {
		log.Error("cannot save identities", "err", err)
		code = 1
	}
	if dlog != nil {
		if err := dlog.close(); err != nil {
			log.Error("cannot write decisions", "err", err)
			code = 1
		}
	}
	el := time.Since(began)
	rep.DurationS = el.Seconds()
	rep.Stats = st
	rep.Errors = st.Errors()
	rep.Pickups = st.Pickups()
	rep.OutPerS = float64(st.Published) / el.Seconds()
	rep.InPerS = float64(st.Received) / el.Seconds()
	if cfg.sc != nil {
		rep.Unmet = unmet(cfg.sc.Expect, rep)
		if len(rep.Unmet) > 0 && code == 0 {
			code = 1
		}
	}
	printReport(stderr, rep)
	if cfg.output == "json" {
		if err := writeJSON(stdout, rep); err != nil {
			log.Error("cannot write report", "err", err)
			code = 1
		}
	}
	return code
}

// placeOrders plays the scenario's people (behavior.orders_per_hour, per
// site) through the gateway's API, as a platform whose token --token (an
// admin token) makes for the run (runPlatform), until ctx ends: staff stage orders, and
// drivers come and type the code (devicesim/orders). It returns nil when
// the scenario places none, or when it cannot (said in the log), else a
// channel that gets the totals once ctx has ended.
func placeOrders(ctx context.Context, cfg config, fleet *devicesim.Fleet, log *slog.Logger) chan orders.Stats {
	o := fleet.Options()
	b := o.Behavior
	if b.OrdersPerHour <= 0 {
		return nil
	}
	var sites []string
	for _, s := range o.Sites {
		if s.ID != "" {
			sites = append(sites, s.ID)
		}
	}
	switch {
	case cfg.opts.API == "" || cfg.apiToken == "":
		log.Warn("the scenario places orders (behavior.orders_per_hour), but none are placed: give --api and --token (an admin token)")
		return nil
	case len(sites) == 0:
		log.Warn("the scenario places orders (behavior.orders_per_hour), but none are placed: its fleet names no site ids (fleet.sites)")
		return nil
	}
	scale := max(o.TimeScale, 1e-9)
	delay := [2]time.Duration{b.DriverDelay.Min.D(), b.DriverDelay.Max.D()}
	if delay[1] <= 0 {
		delay = orders.DefaultDriverDelay
	}
	driver := [2]time.Duration{time.Duration(float64(delay[0]) / scale), time.Duration(float64(delay[1]) / scale)}
	rate := b.OrdersPerHour * float64(len(sites)) / 3600 * scale
	log.Info("placing orders through the API", "sites", len(sites), "per_hour_per_site", b.OrdersPerHour, "time_scale", o.TimeScale)
	api, revoke := runPlatform(ctx, client.New(cfg.opts.API, cfg.apiToken), sites, log)
	done := make(chan orders.Stats, 1)
	go func() {
		st, err := orders.Run(ctx, orders.Options{API: api, Fleet: fleet, Sites: sites,
			Platform: simPlatform, Rate: rate, DriverDelay: driver, WrongCode: b.WrongCodeShare, NoShow: b.NoShowShare,
			// A run's own references: a rerun within the hour finds the
			// last run's live pickups under other ones (else 409s).
			RefPrefix: fmt.Sprintf("SIM-%d-%s", o.Seed, strconv.FormatInt(time.Now().Unix(), 36)),
			Seed:      o.Seed, Logger: log.With("component", "orders")})
		if err != nil {
			log.Error("orders", "err", err)
		}
		revoke() // before the totals: the process may exit once it has them
		done <- st
	}()
	return done
}

// simPlatform is the delivery platform the simulated orders are for.
const simPlatform = "lockersim"

// runPlatform makes a platform token named simPlatform for this run's
// orders, limited to their sites, as a delivery platform's integration
// holds one (the gateway then knows the orders' platform), and returns a
// client with it and a func that revokes it. If it cannot (an older
// gateway, a token that may not make tokens), the orders go through admin,
// and the gateway logs each as made for a platform it does not know.
func runPlatform(ctx context.Context, admin *client.Client, sites []string, log *slog.Logger) (*client.Client, func()) {
	var tok struct {
		ID             string   `json:"id"`
		Token          string   `json:"token"`
		Sites          []string `json:"sites"`
		SharesPlatform bool     `json:"shares_platform"`
	}
	err := admin.Post(ctx, "/v1/tokens", map[string]any{"role": "platform", "name": simPlatform, "sites": sites}, &tok)
	if err == nil && (tok.ID == "" || tok.Token == "") {
		err = errors.New("answer without a token")
	}
	if err != nil {
		log.Warn("orders placed with --token, for platform "+simPlatform+" (no token of that platform could be made: the gateway warns of each order)", "err", err)
		return admin, func() {}
	}
	revoke := func() {
		ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		if _, err := admin.Do(ctx, client.Request{Method: http.MethodDelete, Path: "/v1/tokens/" + tok.ID}, nil); err != nil {
			log.Warn("the run's platform token not revoked: revoke it (lockerctl tokens revoke ID)", "id", tok.ID, "err", err)
		}
	}
	if want := fleet.TokenSites(sites); !slices.Equal(tok.Sites, want) {
		// A gateway older than token sites made one for every site.
		revoke()
		log.Warn("orders placed with --token, for platform "+simPlatform+" (the gateway did not limit its token to the scenario's sites: an older version; it warns of each order)",
			"sites", tok.Sites)
		return admin, func() {}
	}
	if tok.SharesPlatform {
		log.Info("another live "+simPlatform+" token exists (another run?): both see the orders of both", "token", tok.ID)
	}
	return client.New(admin.BaseURL, tok.Token), revoke
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
			fmt.Fprintf(w, "lockersim %s: connected %d/%d | out %.1f msg/s, in %.1f msg/s | pickups %d (codes rejected %d) | commands %d | faults %d | errors %d\n",
				now.Sub(began).Round(time.Second), st.Connected, st.Lockers,
				float64(st.Published-last.Published)/dt, float64(st.Received-last.Received)/dt,
				st.Pickups(), st.CodesRejected, st.CommandsAnswered,
				st.NetworkLosses+st.DoorJams+st.Tampers+st.PowerCuts+st.GatewayRestarts, st.Errors())
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
	name := ""
	if r.Scenario != "" {
		name = "scenario " + r.Scenario + ", "
	}
	fmt.Fprintf(w, "lockersim: %s%d lockers (seed %d) for %.1fs: %s\n", name, r.Lockers, r.Seed, r.DurationS, connected)
	fmt.Fprintf(w, "  provisioned %d, connects %d, published %d (%.1f/s), received %d (%.1f/s)\n",
		st.Provisioned, st.Connects, st.Published, r.OutPerS, st.Received, r.InPerS)
	fmt.Fprintf(w, "  commands answered %d (run %d, repeats %d), codes accepted %d, rejected %d\n",
		st.CommandsAnswered, st.CommandsRun, st.CommandRepeats, st.CodesAccepted, st.CodesRejected)
	fmt.Fprintf(w, "  faults injected: network losses %d, door jams %d, tampers %d, power cuts %d, gateway restarts %d (skipped %d)\n",
		st.NetworkLosses, st.DoorJams, st.Tampers, st.PowerCuts, st.GatewayRestarts, st.RestartsSkipped)
	fmt.Fprintf(w, "  errors %d: connect failures %d, connections lost %d, publish errors %d, decode errors %d, dropped %d, restart errors %d\n",
		r.Errors, st.ConnectFailures, st.ConnectionsLost, st.PublishErrors, st.DecodeErrors, st.Dropped, st.RestartErrors)
	if o := r.Orders; o != nil {
		fmt.Fprintf(w, "  orders: created %d, ready %d, picked up %d, no-shows %d, wrong codes %d, no compartment %d, failed %d\n",
			o.Created, o.Ready, o.PickedUp, o.NoShows, o.WrongCodes, o.NoCompartment, o.Failed)
	}
	for _, u := range r.Unmet {
		fmt.Fprintf(w, "  EXPECTATION NOT MET: %s\n", u)
	}
}

// unmet checks a run against the scenario's expectations.
func unmet(e devicesim.ScenarioExpect, r report) []string {
	var out []string
	if e.AllConnected && !r.AllConnected {
		out = append(out, "all lockers connected")
	}
	if e.MaxErrors != nil && r.Errors > *e.MaxErrors {
		out = append(out, fmt.Sprintf("at most %d errors (got %d)", *e.MaxErrors, r.Errors))
	}
	if e.MaxDropped != nil && r.Stats.Dropped > *e.MaxDropped {
		out = append(out, fmt.Sprintf("at most %d messages dropped (got %d)", *e.MaxDropped, r.Stats.Dropped))
	}
	return out
}

// decisionFile writes decisions as JSON lines, from many goroutines.
type decisionFile struct {
	mu  sync.Mutex
	f   *os.File
	w   *bufio.Writer
	enc *json.Encoder
	err error
}

func createDecisionFile(path string) (*decisionFile, error) {
	f, err := os.Create(path)
	if err != nil {
		return nil, err
	}
	w := bufio.NewWriterSize(f, 64<<10)
	return &decisionFile{f: f, w: w, enc: json.NewEncoder(w)}, nil
}

func (d *decisionFile) write(x devicesim.Decision) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.err == nil {
		d.err = d.enc.Encode(x)
	}
}

func (d *decisionFile) close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	err := errors.Join(d.err, d.w.Flush(), d.f.Close())
	d.err = errors.New("closed")
	return err
}

// restartCommand carries out planned gateway restarts with a shell command.
func restartCommand(command string, stderr io.Writer) func(context.Context, time.Duration) error {
	return func(ctx context.Context, down time.Duration) error {
		cmd := exec.CommandContext(ctx, "sh", "-c", command)
		cmd.Env = append(os.Environ(), fmt.Sprintf("LOCKERSIM_DOWN_S=%d", int(down.Round(time.Second)/time.Second)))
		cmd.Stdout, cmd.Stderr = stderr, stderr
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("%s: %w", command, err)
		}
		return nil
	}
}

// startHint says what to do when lockers were refused provisioning because
// their serials are taken (an earlier run provisioned them and its
// identities were not kept): "" for other failures.
func startHint(err error) string {
	var se *devicesim.StartError
	if !errors.As(err, &se) {
		return ""
	}
	n := 0
	for _, e := range se.Failed {
		var pe *devicesim.ProvisionError
		if errors.As(e, &pe) && pe.Code == "serial_taken" {
			n++
		}
	}
	if n == 0 {
		return ""
	}
	return fmt.Sprintf("%d lockers' serials were provisioned by an earlier run (serial_taken): run with --identities FILE "+
		"(the run that provisions them saves their identities there, later runs reuse them), or choose another --serial-prefix, "+
		"or let the gateway provision them again (lockerctl lockers replaceable ID)", n)
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
