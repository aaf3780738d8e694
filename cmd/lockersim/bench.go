package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/lockergate/lockergate/broker"
	"github.com/lockergate/lockergate/devicesim"
)

const benchUsage = `usage: lockersim bench connect [flags]

Connects a fleet and measures what one virtual locker costs: memory (Go heap,
stacks, RSS) and goroutines per locker, connect throughput and CPU at steady
state. By default the broker runs in a child process (lockersim bench broker)
so the numbers are the simulator's alone; --broker measures against a running
gateway instead (with --claim or --identities).

Flags:
`

// benchConfig is what the bench flags say.
type benchConfig struct {
	opts        devicesim.Options
	sourceAddrs string
	identities  string
	settle      time.Duration
	timeout     time.Duration
	inProcess   bool
	output      string
	logLevel    slog.Level
}

// benchReport is the outcome of lockersim bench connect.
type benchReport struct {
	Lockers        int     `json:"lockers"`
	Broker         string  `json:"broker"` // child, in-process or the URL
	GoVersion      string  `json:"go_version"`
	OS             string  `json:"os"`
	CPUs           int     `json:"cpus"`
	HealthInterval string  `json:"health_interval"`
	ConnectRate    float64 `json:"connect_rate"`
	ConnectS       float64 `json:"connect_s"`
	ConnectsPerS   float64 `json:"connects_per_s"`
	SteadyS        float64 `json:"steady_s"`
	MsgsPerS       float64 `json:"messages_per_s"`
	CPUCores       float64 `json:"cpu_cores"` // CPU time / wall time at steady state
	// Per locker, after a GC, minus the process before the fleet.
	HeapKiBPerLocker     float64         `json:"heap_kib_per_locker"`
	StackKiBPerLocker    float64         `json:"stack_kib_per_locker"`
	GoKiBPerLocker       float64         `json:"go_kib_per_locker"` // heap + stacks
	RSSKiBPerLocker      float64         `json:"rss_kib_per_locker"`
	GoroutinesPerLocker  float64         `json:"goroutines_per_locker"`
	BrokerRSSMiB         float64         `json:"broker_rss_mib,omitempty"`
	GoroutinesAfterClose int             `json:"goroutines_after_close"`
	GoroutinesBaseline   int             `json:"goroutines_baseline"`
	Errors               uint64          `json:"errors"`
	Stats                devicesim.Stats `json:"stats"`
}

func runBench(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	if len(args) == 0 || (args[0] != "connect" && args[0] != "broker") {
		fmt.Fprint(stderr, benchUsage)
		newBenchFlagSet(&benchConfig{}, getenv, stderr).PrintDefaults()
		if len(args) == 0 || args[0] == "help" || args[0] == "-h" {
			return 0
		}
		return 2
	}
	if args[0] == "broker" {
		return benchBroker(ctx, args[1:], getenv, stdout, stderr)
	}
	var cfg benchConfig
	fs := newBenchFlagSet(&cfg, getenv, stderr)
	if err := fs.Parse(args[1:]); err != nil {
		return flagExit(err)
	}
	if fs.NArg() > 0 || (cfg.output != "text" && cfg.output != "json") {
		fmt.Fprintf(stderr, "lockersim bench: bad arguments %q, -o %q\n", fs.Args(), cfg.output)
		return 2
	}
	addrs, err := parseSourceAddrs(cfg.sourceAddrs)
	if err != nil {
		fmt.Fprintf(stderr, "lockersim bench: %v\n", err)
		return 2
	}
	cfg.opts.SourceAddrs = addrs
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: cfg.logLevel}))
	rep, err := bench(ctx, cfg, log, stderr)
	if err != nil {
		log.Error("bench failed", "err", err)
		return 1
	}
	printBench(stderr, rep)
	if cfg.output == "json" {
		if err := writeJSON(stdout, rep); err != nil {
			return 1
		}
	}
	if rep.GoroutinesAfterClose > rep.GoroutinesBaseline {
		log.Error("goroutines leaked", "after_close", rep.GoroutinesAfterClose, "baseline", rep.GoroutinesBaseline)
		return 1
	}
	return 0
}

func newBenchFlagSet(cfg *benchConfig, getenv func(string) string, stderr io.Writer) *flag.FlagSet {
	fs := commandFlags("lockersim bench connect", benchUsage, stderr)
	o := &cfg.opts
	fs.IntVar(&o.Lockers, "lockers", 1000, "number of lockers")
	fs.StringVar(&o.Broker, "broker", "", "MQTT broker URL of a running gateway (default: a bench broker in a child process)")
	fs.BoolVar(&cfg.inProcess, "in-process", false, "run the bench broker in this process (numbers then include the broker)")
	fs.StringVar(&o.ClaimToken, "claim", getenv("LOCKERSIM_CLAIM"), "claim token, with --broker, for lockers without identity")
	fs.StringVar(&cfg.identities, "identities", "", "identities file (lockersim run --identities), with --broker")
	fs.Int64Var(&o.Seed, "seed", 1, "seed")
	fs.StringVar(&o.SerialPrefix, "serial-prefix", "BENCH", "serial number prefix")
	fs.DurationVar(&o.HealthInterval, "health-interval", devicesim.DefaultHealthInterval, "health period")
	fs.DurationVar(&o.KeepAlive, "keepalive", devicesim.DefaultKeepAlive, "MQTT keep-alive")
	fs.Float64Var(&o.ConnectRate, "connect-rate", 500, "new connections per second")
	fs.StringVar(&cfg.sourceAddrs, "source-addrs", "", "local addresses to connect from, e.g. 127.0.0.2-127.0.0.5 (for more than ~28,000 lockers)")
	fs.DurationVar(&cfg.settle, "settle", 0, "steady state to run after connecting before measuring (default: one health interval + 5s)")
	fs.DurationVar(&cfg.timeout, "timeout", 10*time.Minute, "give up if not all lockers connect within this")
	fs.StringVar(&cfg.output, "o", "text", "report format: text or json (json goes to stdout)")
	fs.TextVar(&cfg.logLevel, "log-level", slog.LevelWarn, "log level")
	return fs
}

// memSample is the process's memory and goroutines at one moment, after a GC.
type memSample struct {
	heap, stack, rss uint64
	goroutines       int
}

func sampleMem() memSample {
	runtime.GC()
	debug.FreeOSMemory()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return memSample{heap: ms.HeapInuse, stack: ms.StackInuse, rss: rssOf(os.Getpid()), goroutines: runtime.NumGoroutine()}
}

// rssOf reads VmRSS of a process from /proc (0 where there is none).
func rssOf(pid int) uint64 {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			f := strings.Fields(rest)
			if len(f) >= 1 {
				kb, _ := strconv.ParseUint(f[0], 10, 64)
				return kb * 1024
			}
		}
	}
	return 0
}

func bench(ctx context.Context, cfg benchConfig, log *slog.Logger, progress io.Writer) (*benchReport, error) {
	o := cfg.opts
	if o.Lockers <= 0 {
		return nil, errors.New("--lockers must be positive")
	}
	fds := uint64(o.Lockers) + 1024
	if cfg.inProcess {
		fds += uint64(o.Lockers) // the broker's ends too
	}
	if err := raiseFileLimit(fds); err != nil {
		log.Warn("not enough open files for the fleet", "err", err)
	}
	rep := &benchReport{Lockers: o.Lockers, GoVersion: runtime.Version(), OS: runtime.GOOS + "/" + runtime.GOARCH,
		CPUs: runtime.NumCPU(), ConnectRate: o.ConnectRate, HealthInterval: o.HealthInterval.String()}
	brokerPID := 0
	switch {
	case o.Broker != "":
		rep.Broker = o.Broker
		known, err := loadIdentities(cfg.identities)
		if err != nil {
			return nil, err
		}
		o.Identities = known
	default:
		secret := randomHex(16)
		var stop func()
		var err error
		if cfg.inProcess {
			rep.Broker = "in-process"
			o.Broker, stop, err = startBenchBroker(secret, log)
		} else {
			rep.Broker = "child process"
			o.Broker, brokerPID, stop, err = spawnBenchBroker(ctx, secret)
		}
		if err != nil {
			return nil, fmt.Errorf("start bench broker: %w", err)
		}
		defer stop()
		o.Identities = benchIdentities(o, secret)
	}
	o.Logger = log
	before := sampleMem()
	rep.GoroutinesBaseline = before.goroutines
	fleet, err := devicesim.NewFleet(o)
	if err != nil {
		return nil, err
	}
	defer fleet.Close()

	began := time.Now()
	sctx, cancel := context.WithTimeout(ctx, cfg.timeout)
	err = fleet.Start(sctx)
	cancel()
	if err != nil {
		return nil, err
	}
	rep.ConnectS = time.Since(began).Seconds()
	rep.ConnectsPerS = float64(o.Lockers) / rep.ConnectS
	fmt.Fprintf(progress, "lockersim bench: %d lockers connected in %.1fs; measuring steady state\n", o.Lockers, rep.ConnectS)

	settle := cfg.settle
	if settle <= 0 {
		settle = fleet.Options().HealthInterval + 5*time.Second
	}
	st0, cpu0, t0 := fleet.Stats(), cpuTime(), time.Now()
	select {
	case <-time.After(settle): // measuring a steady state over a fixed window
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	st1, cpu1, el := fleet.Stats(), cpuTime(), time.Since(t0)
	rep.SteadyS = el.Seconds()
	rep.MsgsPerS = float64(st1.Published-st0.Published) / el.Seconds()
	rep.CPUCores = float64(cpu1-cpu0) / float64(el)

	after := sampleMem()
	n := float64(o.Lockers)
	kib := func(a, b uint64) float64 { return (float64(a) - float64(b)) / 1024 / n }
	rep.HeapKiBPerLocker = kib(after.heap, before.heap)
	rep.StackKiBPerLocker = kib(after.stack, before.stack)
	rep.GoKiBPerLocker = rep.HeapKiBPerLocker + rep.StackKiBPerLocker
	rep.RSSKiBPerLocker = kib(after.rss, before.rss)
	rep.GoroutinesPerLocker = float64(after.goroutines-before.goroutines) / n
	if brokerPID > 0 {
		rep.BrokerRSSMiB = float64(rssOf(brokerPID)) / (1 << 20)
	}
	rep.Stats = st1
	rep.Errors = st1.Errors()

	fleet.Close()
	deadline := time.Now().Add(30 * time.Second)
	for runtime.NumGoroutine() > before.goroutines && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond) // polling a condition with a deadline
	}
	rep.GoroutinesAfterClose = runtime.NumGoroutine()
	return rep, nil
}

func printBench(w io.Writer, r *benchReport) {
	fmt.Fprintf(w, "lockersim bench connect: %d lockers, broker: %s, %s %s, %d CPUs\n", r.Lockers, r.Broker, r.GoVersion, r.OS, r.CPUs)
	fmt.Fprintf(w, "  connected in %.1fs (%.0f/s at a limit of %.0f/s)\n", r.ConnectS, r.ConnectsPerS, r.ConnectRate)
	fmt.Fprintf(w, "  steady state (health every %s) over %.0fs: %.1f msg/s out, CPU %.3f cores\n", r.HealthInterval, r.SteadyS, r.MsgsPerS, r.CPUCores)
	fmt.Fprintf(w, "  per locker: Go heap %.1f KiB + stacks %.1f KiB = %.1f KiB; RSS %.1f KiB; %.2f goroutines\n",
		r.HeapKiBPerLocker, r.StackKiBPerLocker, r.GoKiBPerLocker, r.RSSKiBPerLocker, r.GoroutinesPerLocker)
	if r.BrokerRSSMiB > 0 {
		fmt.Fprintf(w, "  broker process RSS %.0f MiB\n", r.BrokerRSSMiB)
	}
	fmt.Fprintf(w, "  errors %d; goroutines after Close %d (baseline %d)\n", r.Errors, r.GoroutinesAfterClose, r.GoroutinesBaseline)
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b) // never fails (crypto/rand, Go ≥1.24)
	return hex.EncodeToString(b)
}

// benchIdentities gives every locker a made-up identity the bench broker
// accepts: device id from the serial, the shared bench secret.
func benchIdentities(o devicesim.Options, secret string) map[string]devicesim.Identity {
	prefix := o.SerialPrefix
	if prefix == "" {
		prefix = devicesim.DefaultSerialPrefix
	}
	ids := make(map[string]devicesim.Identity, o.Lockers)
	for i := range o.Lockers {
		serial := fmt.Sprintf("%s-%06d", prefix, o.FirstIndex+i)
		ids[serial] = devicesim.Identity{DeviceID: "lk-" + strings.ToLower(serial), Password: secret, CredKey: []byte(secret)}
	}
	return ids
}

// benchAuth accepts any valid device id with the bench secret and no claims.
type benchAuth struct{ secret string }

func (a benchAuth) AuthDevice(_ context.Context, _ string, password []byte) error {
	if string(password) != a.secret {
		return broker.ErrBadSecret
	}
	return nil
}

func (a benchAuth) AuthClaim(context.Context, string, string) (bool, error) {
	return false, broker.ErrUnknownClaim
}

// startBenchBroker runs the gateway's broker (without database or fleet
// manager) on a loopback port; devices log in with secret.
func startBenchBroker(secret string, log *slog.Logger) (url string, stop func(), err error) {
	b, err := broker.New(broker.Options{TCPAddr: "127.0.0.1:0", Auth: benchAuth{secret}, Logger: log, Registerer: prometheus.NewRegistry()})
	if err != nil {
		return "", nil, err
	}
	if err := b.Start(); err != nil {
		_ = b.Close()
		return "", nil, err
	}
	return "tcp://" + b.TCPAddr().String(), func() { _ = b.Close() }, nil
}

// spawnBenchBroker runs "lockersim bench broker" as a child process and
// returns its URL; the child ends when its stdin closes (stop, or our death).
func spawnBenchBroker(ctx context.Context, secret string) (url string, pid int, stop func(), err error) {
	exe, err := os.Executable()
	if err != nil {
		return "", 0, nil, err
	}
	cmd := exec.CommandContext(ctx, exe, "bench", "broker")
	cmd.Env = append(os.Environ(), "LOCKERSIM_BENCH_SECRET="+secret)
	cmd.Stderr = os.Stderr
	in, err := cmd.StdinPipe()
	if err != nil {
		return "", 0, nil, err
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return "", 0, nil, err
	}
	if err := cmd.Start(); err != nil {
		return "", 0, nil, err
	}
	stop = func() {
		_ = in.Close()
		done := make(chan struct{})
		go func() { _ = cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
	}
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		stop()
		return "", 0, nil, fmt.Errorf("bench broker did not report its address: %w", err)
	}
	return strings.TrimSpace(line), cmd.Process.Pid, stop, nil
}

// benchBroker is "lockersim bench broker": it serves until stdin closes.
func benchBroker(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("lockersim bench broker", flag.ContinueOnError)
	fs.SetOutput(stderr)
	lvl := slog.LevelWarn
	fs.TextVar(&lvl, "log-level", slog.LevelWarn, "log level")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	secret := getenv("LOCKERSIM_BENCH_SECRET")
	if secret == "" {
		fmt.Fprintln(stderr, "lockersim bench broker: LOCKERSIM_BENCH_SECRET is not set")
		return 2
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: lvl}))
	if err := raiseFileLimit(1 << 20); err != nil {
		log.Info("open file limit", "err", err)
	}
	url, stop, err := startBenchBroker(secret, log)
	if err != nil {
		log.Error("start broker", "err", err)
		return 1
	}
	defer stop()
	fmt.Fprintln(stdout, url)
	gone := make(chan struct{})
	go func() { _, _ = io.Copy(io.Discard, os.Stdin); close(gone) }()
	select {
	case <-gone:
	case <-ctx.Done():
	}
	return 0
}
