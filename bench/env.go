package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/lockergate/lockergate/client"
	"github.com/lockergate/lockergate/internal/pgcluster"
	"github.com/lockergate/lockergate/internal/sdlisten"
)

// Runner owns everything a benchmark run starts: a scratch directory, the
// binaries built into it, and the processes, which it stops on Close
// whatever happened (errors, Ctrl-C).
type Runner struct {
	Root string // scratch directory
	Log  *slog.Logger
	Out  io.Writer // where tables go
	Keep bool      // keep Root after Close
	// Profile, when set, runs the gateway as cmd/lockerbench/gwprof (the
	// same gateway with net/http/pprof) and saves CPU profiles here.
	Profile string
	bins    map[string]string
	mu      sync.Mutex
	undo    []func()
	seq     int
	module  string
	labs    map[int]*Lab
	env     []string // extra environment of started servers
	// GatewayEnv is added to the gateway's environment only (KEY=VALUE),
	// for A/B runs of runtime settings such as GOGC.
	GatewayEnv []string
	// HoldSockets: lockerbench holds the gateway's MQTT and HTTP
	// listening sockets and passes them to every start of the gateway, as
	// systemd socket activation does, so they outlive a restart.
	HoldSockets bool
	groups      []int // process groups of started servers and PostgreSQL
}

// NewRunner creates the scratch directory; binaries are built from the
// module at moduleDir (the directory holding go.mod) when first needed.
func NewRunner(ctx context.Context, moduleDir string, log *slog.Logger, out io.Writer) (*Runner, error) {
	root, err := os.MkdirTemp("", "lockerbench-")
	if err != nil {
		return nil, err
	}
	// The gateway's PostgreSQL runs as the postgres user when we are root:
	// it must be able to pass through every parent of its data directory.
	if err := os.Chmod(root, 0o711); err != nil {
		return nil, err
	}
	r := &Runner{Root: root, Log: log, Out: out, bins: map[string]string{}, module: moduleDir}
	return r, nil
}

// binaries lockerbench builds, by name.
var binaries = map[string]string{"lockergate": "./cmd/lockergate", "bare": "./cmd/lockerbench/bare",
	"gwprof": "./cmd/lockerbench/gwprof"}

// UseBinary makes the runner start bin for the named server instead of
// building it (tests use their own executable, see TestMain).
func (r *Runner) UseBinary(name, bin string, env ...string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.bins[name] = bin
	r.env = append(r.env, env...)
}

// bin builds the named binary on first use.
func (r *Runner) bin(ctx context.Context, name string) (string, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if b, ok := r.bins[name]; ok {
		return b, nil
	}
	bin := filepath.Join(r.Root, "bin", name)
	cmd := exec.CommandContext(ctx, "go", "build", "-o", bin, binaries[name])
	cmd.Dir = r.module
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build %s: %v\n%s", binaries[name], err, b)
	}
	r.bins[name] = bin
	return bin, nil
}

// FindModule walks up from dir to the directory holding go.mod.
func FindModule(dir string) (string, error) {
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("go.mod not found: run lockerbench inside the lockergate module or pass --module")
		}
		dir = parent
	}
}

// Defer registers f to run on Close (last registered, first run).
func (r *Runner) Defer(f func()) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.undo = append(r.undo, f)
}

// Close stops everything started and removes the scratch directory.
func (r *Runner) Close() {
	r.mu.Lock()
	undo := r.undo
	r.undo = nil
	r.mu.Unlock()
	for i := len(undo) - 1; i >= 0; i-- {
		undo[i]()
	}
	if !r.Keep {
		os.RemoveAll(r.Root)
	}
}

// Dir returns a new directory under Root named after prefix.
func (r *Runner) Dir(prefix string) (string, error) {
	r.mu.Lock()
	r.seq++
	n := r.seq
	r.mu.Unlock()
	d := filepath.Join(r.Root, fmt.Sprintf("%s-%d", prefix, n))
	if err := os.MkdirAll(d, 0o711); err != nil {
		return "", err
	}
	return d, os.Chmod(d, 0o711)
}

// PG is a PostgreSQL cluster for the gateway, started by the benchmark so
// that it can count rows and measure the server's CPU on its own.
type PG struct {
	c    *pgcluster.Cluster
	dir  string
	DSN  string
	Pool *pgxpool.Pool
}

// StartPG starts a durable cluster (the gateway's private-cluster settings).
func (r *Runner) StartPG(ctx context.Context) (*PG, error) {
	dir, err := r.Dir("pg")
	if err != nil {
		return nil, err
	}
	c, err := pgcluster.Start(ctx, pgcluster.Options{DataDir: filepath.Join(dir, "data"), Database: "lockergate",
		Logger: r.Log.With("component", "pgcluster")})
	if err != nil {
		return nil, err
	}
	r.Defer(func() { _ = c.Stop() })
	pg := &PG{c: c, dir: filepath.Join(dir, "data"), DSN: c.DSN("lockergate")}
	if pid, err := postmasterPid(pg.dir); err == nil {
		r.mu.Lock()
		r.groups = append(r.groups, pid) // pgcluster starts postgres as a group leader
		r.mu.Unlock()
	}
	cfg, err := pgxpool.ParseConfig(pg.DSN)
	if err != nil {
		return nil, err
	}
	cfg.MaxConns = 4
	if pg.Pool, err = pgxpool.NewWithConfig(ctx, cfg); err != nil {
		return nil, err
	}
	r.Defer(pg.Pool.Close)
	return pg, nil
}

// CPU is the CPU time of the whole PostgreSQL server so far (0 for nil).
func (pg *PG) CPU() CPU {
	if pg == nil {
		return 0
	}
	c, _ := PostgresCPU(pg.dir)
	return c
}

// Server is a system under test or a baseline broker running as a child.
type Server struct {
	Kind     string // lockergate, bare, mosquitto
	Proc     *Proc
	MQTTAddr string
	HTTPURL  string // "" for mosquitto
	Token    string // lockergate: admin token
	PprofURL string // gateway run with --profile
	API      *client.Client

	r       *Runner
	bin     string
	args    []string
	logPath string
	dataDir string
	sockets []sdlisten.Socket // held across restarts (Runner.HoldSockets)
}

// freePort returns a free loopback port below the kernel's ephemeral range.
// A port the kernel hands out (127.0.0.1:0) is an ephemeral one, and a
// server restarted on it between runs could find it taken by one of the
// thousands of outgoing connections a run makes (the load generator's, the
// pool's to PostgreSQL): "bind: address already in use", seen once.
func freePort() (int, error) {
	lo := ephemeralLow()
	if lo > listenPortBase+1000 {
		for range 100 {
			p := listenPortBase + rand.IntN(lo-listenPortBase)
			ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p))
			if err == nil {
				ln.Close()
				return p, nil
			}
		}
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// listenPortBase is the lowest port freePort picks.
const listenPortBase = 20000

// ephemeralLow is the first port of the kernel's ephemeral range (Linux
// default 32768; 0 when unknown).
func ephemeralLow() int {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return 0
	}
	var lo, hi int
	if _, err := fmt.Sscan(string(b), &lo, &hi); err != nil {
		return 0
	}
	return lo
}

// listenFile listens on addr and returns the socket as a file to pass on.
func listenFile(addr string) (*os.File, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	defer ln.Close() // the file holds the socket
	return ln.(*net.TCPListener).File()
}

func freeAddrs(n int) ([]string, error) {
	var out []string
	for range n {
		p, err := freePort()
		if err != nil {
			return nil, err
		}
		out = append(out, fmt.Sprintf("127.0.0.1:%d", p))
	}
	return out, nil
}

// StartGateway starts cmd/lockergate on pg with a fresh data directory.
func (r *Runner) StartGateway(ctx context.Context, pg *PG) (*Server, error) {
	dir, err := r.Dir("gateway")
	if err != nil {
		return nil, err
	}
	addrs, err := freeAddrs(2)
	if err != nil {
		return nil, err
	}
	bin, err := r.bin(ctx, "lockergate")
	if err != nil {
		return nil, err
	}
	s := &Server{Kind: "lockergate", r: r, bin: bin, dataDir: filepath.Join(dir, "data"),
		logPath: filepath.Join(dir, "gateway.log"), MQTTAddr: addrs[0], HTTPURL: "http://" + addrs[1]}
	s.args = []string{"serve", "--mqtt-addr", addrs[0], "--mqtts-addr", "", "--http-addr", addrs[1],
		"--data-dir", s.dataDir, "--database-url", pg.DSN, "--log-level", "warn"}
	if r.HoldSockets {
		for i, name := range []string{"mqtt", "http"} {
			f, err := listenFile(addrs[i])
			if err != nil {
				return nil, err
			}
			r.Defer(func() { f.Close() })
			s.sockets = append(s.sockets, sdlisten.Socket{Name: name, File: f})
		}
	}
	if r.Profile != "" {
		pp, err := freeAddrs(1)
		if err != nil {
			return nil, err
		}
		if s.bin, err = r.bin(ctx, "gwprof"); err != nil {
			return nil, err
		}
		s.PprofURL = "http://" + pp[0]
		s.args = append(s.args[1:], "--pprof-addr", pp[0])
	}
	if err := s.start(ctx); err != nil {
		return nil, err
	}
	b, err := os.ReadFile(filepath.Join(s.dataDir, "admin.token"))
	if err != nil {
		return nil, fmt.Errorf("read admin token: %w", err)
	}
	s.Token = strings.TrimSpace(string(b))
	s.API = client.New(s.HTTPURL, s.Token)
	return s, nil
}

// StartBare starts the bare mochi broker (cmd/lockerbench/bare).
func (r *Runner) StartBare(ctx context.Context) (*Server, error) {
	dir, err := r.Dir("bare")
	if err != nil {
		return nil, err
	}
	addrs, err := freeAddrs(2)
	if err != nil {
		return nil, err
	}
	bin, err := r.bin(ctx, "bare")
	if err != nil {
		return nil, err
	}
	s := &Server{Kind: "bare", r: r, bin: bin, logPath: filepath.Join(dir, "bare.log"),
		MQTTAddr: addrs[0], HTTPURL: "http://" + addrs[1]}
	s.args = []string{"--mqtt-addr", addrs[0], "--http-addr", addrs[1]}
	return s, s.start(ctx)
}

// StartMosquitto starts Debian's mosquitto with anonymous access on loopback.
func (r *Runner) StartMosquitto(ctx context.Context) (*Server, error) {
	bin, err := exec.LookPath("mosquitto")
	if err != nil {
		return nil, errors.New("mosquitto not found: apt-get install -y mosquitto")
	}
	dir, err := r.Dir("mosquitto")
	if err != nil {
		return nil, err
	}
	addrs, err := freeAddrs(1)
	if err != nil {
		return nil, err
	}
	host, port, _ := net.SplitHostPort(addrs[0])
	conf := filepath.Join(dir, "mosquitto.conf")
	body := fmt.Sprintf("listener %s %s\nallow_anonymous true\npersistence false\nmax_connections -1\nlog_dest stderr\nlog_type error\nlog_type warning\n", port, host)
	if err := os.WriteFile(conf, []byte(body), 0o644); err != nil {
		return nil, err
	}
	s := &Server{Kind: "mosquitto", r: r, bin: bin, args: []string{"-c", conf},
		logPath: filepath.Join(dir, "mosquitto.log"), MQTTAddr: addrs[0]}
	return s, s.start(ctx)
}

func (s *Server) start(ctx context.Context) error {
	env := s.r.env
	if s.Kind == "lockergate" {
		env = append(slices.Clip(env), s.r.GatewayEnv...)
	}
	p, err := startProc(s.Kind, s.bin, s.args, s.logPath, env, s.sockets)
	if err != nil {
		return err
	}
	s.Proc = p
	s.r.mu.Lock()
	s.r.groups = append(s.r.groups, p.Pid())
	s.r.mu.Unlock()
	s.r.Defer(func() {
		if err := p.Stop(30 * time.Second); err != nil {
			s.r.Log.Warn("server stopped with an error", "server", s.Kind, "err", err)
		}
	})
	if err := s.waitReady(ctx, 2*time.Minute); err != nil {
		_ = p.Stop(5 * time.Second)
		return fmt.Errorf("%s not ready: %w\n%s", s.Kind, err, tail(s.logPath, 20))
	}
	return nil
}

func (s *Server) waitReady(ctx context.Context, d time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	hc := &http.Client{Timeout: 2 * time.Second}
	for {
		if s.Proc.Exited() {
			return errors.New("exited")
		}
		if s.HTTPURL != "" {
			req, _ := http.NewRequestWithContext(ctx, "GET", s.HTTPURL+"/readyz", nil)
			if resp, err := hc.Do(req); err == nil {
				resp.Body.Close()
				if resp.StatusCode == 200 {
					return nil
				}
			}
		} else if c, err := net.DialTimeout("tcp", s.MQTTAddr, time.Second); err == nil {
			c.Close()
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Stop stops the server process (SIGTERM, then SIGKILL after grace).
func (s *Server) Stop() error { return s.Proc.Stop(30 * time.Second) }

// Restart stops the server and starts it again on the same data directory
// and addresses; it returns when the new process is ready.
func (s *Server) Restart(ctx context.Context) error {
	if err := s.Stop(); err != nil {
		s.r.Log.Warn("server stopped with an error", "server", s.Kind, "err", err)
	}
	return s.start(ctx)
}

// CPU is the server process's CPU time so far.
func (s *Server) CPU() CPU {
	c, _ := ProcCPU(s.Proc.Pid(), false)
	return c
}

// Mem is the server process's resident memory.
func (s *Server) Mem() Mem {
	m, _ := ProcMem(s.Proc.Pid())
	return m
}

// Metrics scrapes /metrics.
func (s *Server) Metrics(ctx context.Context) (Metrics, error) {
	if s.HTTPURL == "" {
		return nil, errors.New("no metrics")
	}
	return scrape(ctx, s.HTTPURL+"/metrics")
}

// mosquittoVersion is the installed mosquitto's version ("" if unknown).
func mosquittoVersion() string {
	out, _ := exec.Command("mosquitto", "-h").CombinedOutput()
	line, _, _ := strings.Cut(string(out), "\n")
	return strings.TrimPrefix(strings.TrimSpace(line), "mosquitto version ")
}

// ProfileHeap saves a heap profile of the server to Runner.Profile/name.pprof.
func (s *Server) ProfileHeap(ctx context.Context, name string) {
	if s.PprofURL == "" || s.r.Profile == "" {
		return
	}
	s.save(ctx, s.PprofURL+"/debug/pprof/heap?gc=1", name+".pprof", 30*time.Second)
}

// save writes what url answers to Runner.Profile/file.
func (s *Server) save(ctx context.Context, url, file string, timeout time.Duration) {
	req, _ := http.NewRequestWithContext(ctx, "GET", url, nil)
	resp, err := (&http.Client{Timeout: timeout}).Do(req)
	if err != nil {
		s.r.Log.Warn("profile", "err", err)
		return
	}
	defer resp.Body.Close()
	if err := os.MkdirAll(s.r.Profile, 0o755); err != nil {
		return
	}
	f, err := os.Create(filepath.Join(s.r.Profile, file))
	if err != nil {
		s.r.Log.Warn("profile", "err", err)
		return
	}
	defer f.Close()
	if _, err := io.Copy(f, resp.Body); err != nil {
		s.r.Log.Warn("profile", "err", err)
	}
}

// ProfileCPU saves a CPU profile of the next d of the server to
// Runner.Profile/name.pprof, in the background; wait on the channel.
func (s *Server) ProfileCPU(ctx context.Context, name string, d time.Duration) <-chan struct{} {
	return s.record(ctx, "profile", name+".pprof", d)
}

// ProfileAllocs saves what the server allocates in the next d (a delta
// of /debug/pprof/allocs) to Runner.Profile/name.pprof, in the background;
// wait on the channel.
func (s *Server) ProfileAllocs(ctx context.Context, name string, d time.Duration) <-chan struct{} {
	return s.record(ctx, "allocs", name+".pprof", d)
}

// TraceExec saves an execution trace of the next d of the server to
// Runner.Profile/name.trace (go tool trace), in the background; wait on the
// channel. It can run alongside ProfileCPU; keep d to a few seconds (the
// trace of a loaded gateway grows by megabytes per second).
func (s *Server) TraceExec(ctx context.Context, name string, d time.Duration) <-chan struct{} {
	return s.record(ctx, "trace", name+".trace", d)
}

// record saves the next d of /debug/pprof/<kind> to Runner.Profile/file in
// the background; the channel closes when it is saved (at once without
// --profile).
func (s *Server) record(ctx context.Context, kind, file string, d time.Duration) <-chan struct{} {
	done := make(chan struct{})
	if s.PprofURL == "" || s.r.Profile == "" {
		close(done)
		return done
	}
	go func() {
		defer close(done)
		s.save(ctx, fmt.Sprintf("%s/debug/pprof/%s?seconds=%d", s.PprofURL, kind, max(1, int(d.Seconds()))), file, d+30*time.Second)
	}()
	return done
}

// ourGroups are the process groups of the servers started (each child
// runs in its own group; PostgreSQL in the one pgcluster gives it).
func (r *Runner) ourGroups() map[int]bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	m := map[int]bool{}
	for _, g := range r.groups {
		m[g] = true
	}
	return m
}

// WatchNoise samples what else runs on the machine every interval until
// the returned stop is called; stop returns a few samples for the report.
func (r *Runner) WatchNoise(interval time.Duration) (stop func() []string) {
	done := make(chan struct{})
	var mu sync.Mutex
	var samples []string
	go func() {
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			s := BusyElsewhere(r.ourGroups())
			mu.Lock()
			samples = append(samples, time.Now().UTC().Format("15:04:05")+": "+s)
			mu.Unlock()
			select {
			case <-done:
				return
			case <-t.C:
			}
		}
	}()
	return func() []string {
		close(done)
		mu.Lock()
		defer mu.Unlock()
		if len(samples) > 4 { // first, two from the middle, last
			n := len(samples)
			return []string{samples[0], samples[n/3], samples[2*n/3], samples[n-1]}
		}
		return samples
	}
}
