package firmware_test

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"fmt"
	"hash/fnv"
	"io"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/lockergate/lockergate/firmware"
	"github.com/lockergate/lockergate/internal/pgtest"
	"github.com/lockergate/lockergate/internal/testtool"
	"github.com/lockergate/lockergate/postgres"
	"github.com/lockergate/lockergate/protocol"
)

func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }

// Outcomes of a fake device's install.
const (
	outOK      = ""
	outBoot    = "boot"    // comes back on the old version
	outInstall = "install" // reports failed/install
	outSilent  = "silent"  // says nothing after receiving the job
)

// harness is the engine on a real PostgreSQL with fake devices that answer
// fw/job in zero time, the way the fleet manager would feed their reports.
type harness struct {
	tb   testing.TB
	db   *postgres.DB
	key  ed25519.PrivateKey
	dir  string
	eng  *firmware.Engine
	reg  *prometheus.Registry
	devs *devices

	cancel context.CancelFunc
	done   chan struct{}
}

type hopt struct {
	tick time.Duration
	// now, when set, is the engine's clock, and the engine is not run: the
	// test calls h.eng.Tick itself.
	now func() time.Time
	// store, when set, wraps the engine's store (faults for a test).
	store func(firmware.Store) firmware.Store
	// log, when set, is the engine's logger.
	log *slog.Logger
}

func newHarness(tb testing.TB, o hopt) *harness {
	tb.Helper()
	ctx := context.Background()
	db, err := postgres.Open(ctx, postgres.Options{DSN: pgtest.NewDB(tb), MaxConns: 16, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(db.Close)
	_, key, _ := ed25519.GenerateKey(nil)
	h := &harness{tb: tb, db: db, key: key, dir: tb.TempDir()}
	h.devs = newDevices(h)
	if _, err := db.Pool().Exec(ctx, `INSERT INTO sites (id, name, timezone) VALUES ('s1', 'Site 1', 'America/Chicago')`); err != nil {
		tb.Fatal(err)
	}
	h.start(o)
	return h
}

// start runs a new engine on the harness's database (a gateway start).
func (h *harness) start(o hopt) {
	h.tb.Helper()
	if o.tick == 0 {
		o.tick = 20 * time.Millisecond
	}
	h.reg = prometheus.NewRegistry()
	var store firmware.Store = h.db
	if o.store != nil {
		store = o.store(store)
	}
	if o.log == nil {
		o.log = slog.New(slog.DiscardHandler)
	}
	eng, err := firmware.New(firmware.Options{
		Store: store, Fleet: h.devs, Key: h.key, URLKey: firmware.DeriveURLKey([]byte("master key for tests, 32 bytes!")),
		BaseURL: func() string { return "http://gw.test" }, Dir: h.dir, Tick: o.tick, GaugeInterval: 50 * time.Millisecond,
		Registerer: h.reg, Logger: o.log, Now: o.now,
	})
	if err != nil {
		h.tb.Fatal(err)
	}
	h.eng = eng
	h.devs.eng.Store(eng)
	if o.now != nil {
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	h.cancel, h.done = cancel, make(chan struct{})
	go func() {
		defer close(h.done)
		eng.Run(ctx)
	}()
	h.tb.Cleanup(h.stop)
}

// stop stops the engine (a gateway shutdown); devices keep running.
func (h *harness) stop() {
	if h.cancel != nil {
		h.cancel()
		<-h.done
		h.cancel = nil
	}
}

// addLockers registers n online lockers of model on fw, ids prefix-00001...
func (h *harness) addLockers(prefix, model, fw string, n int) []string {
	h.tb.Helper()
	_, err := h.db.Pool().Exec(context.Background(), `
		INSERT INTO devices (id, serial, site, model, fw, secret_hash, online)
		SELECT $1 || lpad(i::text, 5, '0'), 'SN-' || $1 || i, 's1', $2, $3, '\x00', true FROM generate_series(1, $4) i`,
		prefix, model, fw, n)
	if err != nil {
		h.tb.Fatal(err)
	}
	ids := make([]string, n)
	for i := range ids {
		ids[i] = fmt.Sprintf("%s%05d", prefix, i+1)
		h.devs.fw.Store(ids[i], fw)
	}
	return ids
}

func (h *harness) upload(model, version string) *firmware.Artifact {
	h.tb.Helper()
	a, err := h.eng.Upload(context.Background(), model, version, bytes.NewReader(bytes.Repeat([]byte{7}, 4096)), "test")
	if err != nil {
		h.tb.Fatal(err)
	}
	return a
}

func (h *harness) create(spec firmware.Spec) *firmware.Status {
	h.tb.Helper()
	st, err := h.eng.Create(context.Background(), spec, "test")
	if err != nil {
		h.tb.Fatalf("create rollout: %v", err)
	}
	return st
}

func (h *harness) status(id string) *firmware.Status {
	h.tb.Helper()
	st, err := h.eng.Status(context.Background(), id)
	if err != nil {
		h.tb.Fatal(err)
	}
	return st
}

// waitStatus waits for the rollout to reach status.
func (h *harness) waitStatus(id, status string, d time.Duration) *firmware.Status {
	h.tb.Helper()
	var st *firmware.Status
	testtool.Eventually(h.tb, d, "rollout "+status, func() error {
		st = h.status(id)
		if st.Status != status {
			return fmt.Errorf("status %s (wave %d, counts %v, reason %q)", st.Status, st.CurrentWave, st.Counts, st.Reason)
		}
		return nil
	})
	return st
}

func (h *harness) jobs(id string) []firmware.Job {
	h.tb.Helper()
	var all []firmware.Job
	f := firmware.JobFilter{Limit: 1000}
	for {
		js, err := h.eng.Jobs(context.Background(), id, f)
		if err != nil {
			h.tb.Fatal(err)
		}
		all = append(all, js...)
		if len(js) < f.Limit {
			return all
		}
		f.After = js[len(js)-1].DeviceID
	}
}

// devices fakes lockers behind Fleet.PublishRetained: each publish is
// queued on one of four shards by locker id (like the fleet manager's
// control workers), and a shard worker reads the retained fw/job from the
// store and plays the device's reports into the engine.
type devices struct {
	h       *harness
	eng     atomic.Pointer[firmware.Engine]
	shards  []*shard
	fw      sync.Map // id → version it runs
	seen    sync.Map // job id → times received
	runs    sync.Map // id → jobs run (attempts started)
	outcome func(id string, attempt int) string
	// spell, when set, is how a device spells the version it runs after an
	// install (its image's own spelling): job.Version by default.
	spell func(version string) string
	// failAt is when the engine got the failure report the harness sent last.
	published atomic.Int64
	cleared   sync.Map // id → *atomic.Int32: publishes that found no job (the locker's fw/job empty)
	mu        sync.Mutex
	closed    bool
}

type shard struct {
	mu    sync.Mutex
	q     []string
	ready chan struct{}
}

func newDevices(h *harness) *devices {
	d := &devices{h: h, outcome: func(string, int) string { return outOK }}
	for range 4 {
		s := &shard{ready: make(chan struct{}, 1)}
		d.shards = append(d.shards, s)
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() {
			defer close(done)
			d.work(ctx, s)
		}()
		h.tb.Cleanup(func() {
			cancel()
			<-done
		})
	}
	return d
}

// clearedFor counts the publishes for locker id that found no job.
func (d *devices) clearedFor(id string) int32 {
	if n, ok := d.cleared.Load(id); ok {
		return n.(*atomic.Int32).Load()
	}
	return 0
}

// PublishRetained implements firmware.Fleet.
func (d *devices) PublishRetained(ctx context.Context, id string) error {
	d.published.Add(1)
	f := fnv.New32a()
	io.WriteString(f, id)
	s := d.shards[f.Sum32()%uint32(len(d.shards))]
	s.mu.Lock()
	s.q = append(s.q, id)
	s.mu.Unlock()
	select {
	case s.ready <- struct{}{}:
	default:
	}
	return nil
}

func (d *devices) work(ctx context.Context, s *shard) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.ready:
		}
		for {
			s.mu.Lock()
			q := s.q
			s.q = nil
			s.mu.Unlock()
			if len(q) == 0 {
				break
			}
			for _, id := range q {
				if ctx.Err() != nil {
					return
				}
				d.handle(ctx, id)
			}
		}
	}
}

func (d *devices) handle(ctx context.Context, id string) {
	r, err := d.h.db.Retained(ctx, id)
	if err != nil {
		return
	}
	if r.FwJob == nil {
		n, _ := d.cleared.LoadOrStore(id, new(atomic.Int32))
		n.(*atomic.Int32).Add(1)
		return
	}
	job := r.FwJob
	n, _ := d.seen.LoadOrStore(job.Job, new(atomic.Int32))
	if n.(*atomic.Int32).Add(1) > 1 {
		return // a repeat of a job it runs or ran
	}
	runs, _ := d.runs.LoadOrStore(id, new(atomic.Int32))
	attempt := int(runs.(*atomic.Int32).Add(1))
	eng := d.eng.Load()
	report := func(state, kind string) {
		err := eng.JobStatus(ctx, id, &protocol.FwStatus{Job: job.Job, State: state, Error: kind}, time.Now())
		if err != nil && ctx.Err() == nil {
			d.h.tb.Errorf("report %s of %s: %v", state, job.Job, err)
		}
	}
	out := d.outcome(id, attempt)
	if out == outSilent {
		return
	}
	for _, s := range []string{firmware.StateDownloading, firmware.StateVerifying, firmware.StateInstalling} {
		report(s, "")
	}
	if out == outInstall {
		report(firmware.StateFailed, firmware.KindInstall)
		return
	}
	report(firmware.StateRebooting, "")
	v, _ := d.fw.Load(id)
	if out == outOK {
		v = job.Version
		if d.spell != nil {
			v = d.spell(job.Version)
		}
		d.fw.Store(id, v)
	}
	if err := d.h.db.RecordBirth(ctx, id, &protocol.Presence{Online: true, FW: v.(string)}, time.Now(), false); err != nil {
		return
	}
	eng.Booted(ctx, id, v.(string), time.Now())
	if out == outBoot {
		report(firmware.StateFailed, firmware.KindBoot)
	} else {
		report(firmware.StateSucceeded, "")
	}
}

// received returns how many times a job id reached a device.
func (d *devices) received(job string) int {
	n, ok := d.seen.Load(job)
	if !ok {
		return 0
	}
	return int(n.(*atomic.Int32).Load())
}

// attempts returns how many jobs a device started.
func (d *devices) attempts(id string) int {
	n, ok := d.runs.Load(id)
	if !ok {
		return 0
	}
	return int(n.(*atomic.Int32).Load())
}

// clock is a test clock for an engine run one Tick at a time (hopt.now).
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func newClock() *clock { return &clock{t: time.Now().UTC().Truncate(time.Second)} }

func (c *clock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// exec runs a statement on the harness's database.
func (h *harness) exec(sql string, args ...any) {
	h.tb.Helper()
	if _, err := h.db.Pool().Exec(context.Background(), sql, args...); err != nil {
		h.tb.Fatal(err)
	}
}

// sentJob waits until locker id received its job of rollout, and returns
// the job's id.
func (h *harness) sentJob(rollout, id string) string {
	h.tb.Helper()
	var job string
	testtool.Eventually(h.tb, 5*time.Second, "job sent", func() error {
		if job = h.job(rollout, id).JobID; h.devs.received(job) == 0 {
			return fmt.Errorf("not received")
		}
		return nil
	})
	return job
}

// job returns a locker's job in a rollout.
func (h *harness) job(rollout, id string) firmware.Job {
	h.tb.Helper()
	for _, j := range h.jobs(rollout) {
		if j.DeviceID == id {
			return j
		}
	}
	h.tb.Fatalf("no job for %s in %s", id, rollout)
	return firmware.Job{}
}
