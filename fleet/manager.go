package fleet

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"log/slog"
	"maps"
	"math"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/lockergate/lockergate/protocol"
)

// Options configure a Manager.
type Options struct {
	Store      Store
	Bus        Bus
	Logger     *slog.Logger
	Registerer prometheus.Registerer
	// HealthQueue bounds queued health messages (all writers together); when
	// full, QoS 0 health is dropped and counted and QoS 1 health waits.
	// Default 65536.
	HealthQueue int
	// HealthWriters is how many health batches are written to the store at
	// once; one locker's health always goes to the same writer, in order.
	// Default 2: on the reference machine (2 cores) two writers store ~1.7×
	// the rows of one, and four no more than two (postgres
	// BenchmarkInsertHealth).
	HealthWriters int
	// LatestHealthEvery bounds how often one locker's latest health (the
	// devices row) is rewritten: a report within this long of the last
	// write is held and written, merged with any after it, when the time
	// is up (or at shutdown). Every report is stored as a health row at
	// once either way. Default (0) 1s, or half the configured health
	// interval when that is shorter; negative: every report is written
	// through (SharedReports needs that).
	LatestHealthEvery time.Duration
	// SharedReports says this instance receives only some of each
	// locker's reports (instances sharing an external broker's shared
	// subscriptions): reports written through count sequence gaps only
	// against the stored latest, not between the reports of one batch,
	// where they are mostly the other instances' reports. Write through
	// (LatestHealthEvery < 0) with it: a held run would count them too.
	SharedReports bool
	// EventQueue bounds queued events; when full, publishers wait (events are
	// never dropped). Default 16384.
	EventQueue int
	// ControlQueue bounds each control shard (presence, results, acks). Default 4096.
	ControlQueue int
	// ControlShards is how many workers handle control messages; one locker's
	// messages always go to the same shard, in order. Default 16: each
	// (re)connect costs several database round trips on its shard, and with
	// 4 a reconnect storm was held to a few hundred lockers a second.
	ControlShards int
	// BatchSize and FlushInterval bound ingest batches. Defaults 2000, 20ms.
	BatchSize     int
	FlushInterval time.Duration
	// Events receives each stored batch of new events in order (the pickup
	// workflow); nil: none.
	Events EventSink
	// PresenceFromWill ends a session on the Last Will message; set it when
	// the bus reports no session events (an external broker).
	PresenceFromWill bool
	// Firmware follows firmware jobs (nil: fw/status is validated and dropped).
	Firmware FirmwareTracker
	// Config is the configuration every locker receives.
	Config protocol.Config
	// RepublishAtStart makes Run publish every enabled locker's retained
	// state (creds, Config, fw/job) once, in the background: set it where
	// lockers keep their sessions across a gateway restart (an external
	// broker), so that they get a configuration changed at this start, or
	// at another instance's (whose start this one, still on the old flags,
	// may have undone for the lockers it synced since), without waiting
	// for their next connect; and so that the broker's retained copies
	// are the database's after each start.
	RepublishAtStart bool
	// SharedPublish says other instances publish the same lockers'
	// retained state (instances sharing an external broker): publish locks
	// are each instance's own, so a credential set read here may be
	// published after a newer one another instance published. Each publish
	// of a set is then followed by a read of the current one, published in
	// turn while newer (catchUpCreds).
	SharedPublish bool
	// CommandFinished, when set, is told of each command this instance saw
	// end otherwise than ok: answered failed, rejected or expired, or ended
	// by the sweep (expired, timed_out); and of one answered ok after such
	// an end (LateAnswer: the door did open). It runs on the goroutine that
	// recorded the end (a control shard, the sweep): keep it short. The
	// pickup workflow tells staff of a staging unlock that did not open,
	// and withdraws that once it did.
	CommandFinished func(ctx context.Context, c *Command)
	// SweepInterval is how often expired commands are finalised. Default 1s.
	SweepInterval time.Duration
	// CommandResend is how long a sent command may go unanswered by an
	// online locker before it is sent again (by id; then again, each wait
	// twice the last, at most ResendMaxWait, until it is answered or
	// expires). Default 5s; negative: never.
	CommandResend time.Duration
	// CensusInterval is how often the fleet-wide gauges (registered, stale,
	// flapping lockers, open alerts) are counted. Default 15s.
	CensusInterval time.Duration
	// MaxClockSkew is how far a locker's clock may be from the gateway's,
	// as its birth shows, before a clock_skew alert is raised (a locker
	// judges codes' not_after and commands' expires_at by its own clock).
	// Default DefaultMaxClockSkew; negative: never judged.
	MaxClockSkew time.Duration
	// AlertRaised, when set, is called after an alert was opened (the
	// webhook dispatcher's Wake: the alert.raised deliveries are queued
	// with the alert).
	AlertRaised func()
	// DrainTimeout bounds writing what is queued at shutdown. Default 10s.
	DrainTimeout time.Duration
	// Now is the clock; default time.Now.
	Now func() time.Time
}

// DefaultConfig is the locker configuration unless one is given.
var DefaultConfig = protocol.Config{Version: 1, HealthIntervalS: 60, DoorAjarS: 120, Lockout: protocol.DefaultLockout}

// Manager runs the fleet: it ingests device messages, tracks presence,
// delivers commands and retained state.
type Manager struct {
	store Store
	bus   Bus
	log   *slog.Logger
	m     *metrics
	opts  Options
	// started is when Run began (doorsLeftOpen waits a while after it).
	started time.Time
	heard   heardSet // lockers heard since the last flush of last_seen
	drops   dropLog  // rate-limits the log of dropped messages
	// backRepublish: the versions published to lockers whose ack went
	// back (credsAcked), once each.
	backRepublish versionOnce
	now           func() time.Time
	health        []chan inbound
	events        chan inbound
	ctrl          []chan control

	// held counts, per metricQueues entry, the messages its writers have
	// taken from the queue and not yet stored (queueDepth).
	held [2]atomic.Int64

	// waitsEnded is closed by EndWaits.
	waitsEnded   chan struct{}
	endWaitsOnce sync.Once

	// ended, under endedMu, is closed and replaced each time session ends
	// have been written (markOffline): WaitOffline wakes on it.
	endedMu sync.Mutex
	ended   chan struct{}

	mu      sync.Mutex
	waiters map[string][]chan *Command
	// completing counts the results being recorded per command id: the
	// store's notification of such a change (changed) is left to the
	// recording, which wakes the waiters with the command.
	completing map[string]int

	resent map[string]resent // command id → its resends by this instance (Run's goroutine only)
	// effectsBusy holds the events (EventRecord.Key) handed to the sink and not
	// yet done with.
	effectsBusy sync.Map
	// effectsLocks holds a token per effects lock held (SharedReports):
	// each takes a pool connection while its steps take others.
	effectsLocks chan struct{}
	effectsWait  time.Duration           // bounds the wait for one (effectsLockWait)
	credsLag     map[string]credsLagSeen // lockers behind on credentials at the last census (Run's goroutine only)

	doorFaults sync.Map // locker id → []int, the last door_faults seen (or faultsUnsynced)
	// faultsLoaded: doorFaults was filled at start with the open door_fault
	// alerts, so a locker absent from it has none.
	faultsLoaded atomic.Bool
	publishMu    [64]chan struct{} // lockLocker's locks, one slot each

	stopped    atomic.Bool
	subscribed atomic.Bool
	done       chan struct{}

	wg       sync.WaitGroup
	ctrlWG   sync.WaitGroup
	ctrlDone chan struct{}
}

type inbound struct {
	id      string
	payload []byte
	at      time.Time
	ack     func() // nil: nothing to acknowledge
}

// done acknowledges the message to the bus: its effect is stored (or it can
// never be, and a redelivery would not help).
func (in *inbound) done() {
	if in.ack != nil {
		in.ack()
	}
}

type controlKind int

const (
	ctrlConnected controlKind = iota
	ctrlDisconnected
	ctrlPresence
	ctrlResult
	ctrlCredsAck
	ctrlFwStatus
	ctrlEvents
	ctrlResend // send the open commands again (a late cmd subscription)
)

type control struct {
	kind    controlKind
	id      string
	reason  string
	payload []byte
	at      time.Time
	events  []EventRecord
	ack     func()
	// retained: a presence message an external broker handed a new
	// subscription (Message.Retain), not one the locker just sent.
	retained bool
}

// New returns a Manager; call Run to start it.
func New(opts Options) (*Manager, error) {
	if opts.Store == nil || opts.Bus == nil {
		return nil, errors.New("fleet: Store and Bus are required")
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	def := func(v *int, d int) {
		if *v <= 0 {
			*v = d
		}
	}
	def(&opts.HealthQueue, 65536)
	def(&opts.HealthWriters, 2)
	def(&opts.EventQueue, 16384)
	def(&opts.ControlQueue, 4096)
	def(&opts.ControlShards, 16)
	def(&opts.BatchSize, 2000)
	if opts.FlushInterval <= 0 {
		opts.FlushInterval = 20 * time.Millisecond
	}
	if opts.CommandResend == 0 {
		opts.CommandResend = 5 * time.Second
	}
	if opts.SweepInterval <= 0 {
		opts.SweepInterval = time.Second
	}
	if opts.CensusInterval <= 0 {
		opts.CensusInterval = DefaultCensusInterval
	}
	if opts.MaxClockSkew == 0 {
		opts.MaxClockSkew = DefaultMaxClockSkew
	}
	if opts.Config.Version == 0 {
		opts.Config = DefaultConfig
	}
	if err := opts.Config.Validate(); err != nil {
		return nil, fmt.Errorf("fleet: config: %w", err)
	}
	if opts.LatestHealthEvery == 0 {
		// last_seen and the latest health lag a locker's reports by up to
		// the hold and a quarter of it (the tick): at most 5/8 of a health
		// interval, so less than one report behind at any interval.
		opts.LatestHealthEvery = min(time.Second, time.Duration(opts.Config.HealthIntervalS)*time.Second/2)
	}
	if opts.DrainTimeout <= 0 {
		opts.DrainTimeout = 10 * time.Second
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	m := &Manager{
		store: opts.Store, bus: opts.Bus, log: opts.Logger, opts: opts, now: opts.Now,
		effectsLocks: make(chan struct{}, maxEffectsLocks), effectsWait: effectsLockWait,
		m:          newMetrics(opts.Registerer),
		events:     make(chan inbound, opts.EventQueue),
		waiters:    make(map[string][]chan *Command),
		ended:      make(chan struct{}),
		waitsEnded: make(chan struct{}),
		completing: make(map[string]int),
		resent:     make(map[string]resent),
		credsLag:   make(map[string]credsLagSeen),
		done:       make(chan struct{}),
		ctrlDone:   make(chan struct{}),
	}
	for i := 0; i < opts.HealthWriters; i++ {
		m.health = append(m.health, make(chan inbound, max(1, opts.HealthQueue/opts.HealthWriters)))
	}
	for i := 0; i < opts.ControlShards; i++ {
		m.ctrl = append(m.ctrl, make(chan control, opts.ControlQueue))
	}
	for i := range m.publishMu {
		m.publishMu[i] = make(chan struct{}, 1)
	}
	if opts.Registerer != nil {
		if err := opts.Registerer.Register(queueDepth{m}); err != nil {
			return nil, fmt.Errorf("fleet: register the queue depth: %w", err)
		}
	}
	return m, nil
}

// Config returns the configuration lockers receive.
func (m *Manager) Config() protocol.Config { return m.opts.Config }

// Subscribe subscribes to the device topics. Call it before devices can
// connect; Run calls it when it was not called.
func (m *Manager) Subscribe() error {
	if m.subscribed.Swap(true) {
		return nil
	}
	for _, c := range []protocol.Channel{protocol.ChanPresence, protocol.ChanHealth, protocol.ChanEvents,
		protocol.ChanCmdResult, protocol.ChanCredsAck, protocol.ChanFwStatus} {
		if err := m.bus.Subscribe(protocol.Root+"+/"+string(c), m.receive); err != nil {
			return fmt.Errorf("subscribe %s: %w", c, err)
		}
	}
	return nil
}

// Run processes device messages until ctx ends; then it drains what was
// queued and returns. Stop the bus before ctx ends.
func (m *Manager) Run(ctx context.Context) error {
	m.loadDoorFaults(ctx)
	if err := m.Subscribe(); err != nil {
		return err
	}
	// Workers keep running on their own context so that what is queued when
	// ctx ends is still written.
	wctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	defer cancel()
	// The drain's bound starts when ctx ends, whatever the loop below is
	// doing then: a sweep or census stuck on a database that does not
	// answer (stopped, not down) would otherwise hold it off for as long.
	// A timer still set when Run returns only cancels what is cancelled.
	defer context.AfterFunc(ctx, func() { time.AfterFunc(m.opts.DrainTimeout, cancel) })()
	m.wg.Add(1 + len(m.health))
	for _, q := range m.health {
		w := &healthWriter{m: m}
		var tick func(context.Context, bool)
		if m.opts.LatestHealthEvery > 0 {
			w.latest = newLatestThrottle(m.opts.LatestHealthEvery)
			tick = w.tick
		}
		go m.batchLoop(wctx, "health", q, w.write, tick)
	}
	m.ctrlWG.Add(len(m.ctrl))
	for _, q := range m.ctrl {
		go m.controlLoop(wctx, q)
	}
	// Effects a previous run stored but did not apply go to the control
	// shards before any new event, so each locker's stay in order.
	m.replayEvents(wctx, true)
	go m.batchLoop(wctx, "events", m.events, m.writeEvents, nil)
	// Results another instance took (or expiries it swept) wake our waiters.
	watchCtx, stopWatch := context.WithCancel(ctx)
	defer stopWatch()
	go m.store.WatchCommands(watchCtx, m.changed)
	sweep := time.NewTicker(m.opts.SweepInterval)
	defer sweep.Stop()
	census := time.NewTicker(m.opts.CensusInterval)
	defer census.Stop()
	m.started = m.now()
	m.census(wctx)
	var republish sync.WaitGroup
	if m.opts.RepublishAtStart {
		republish.Go(func() { m.republishAll(ctx) })
	}
	for {
		select {
		case <-ctx.Done():
			republish.Wait() // it ends with ctx
			// Callers stop the bus first; what was queued before is written.
			m.stopped.Store(true)
			close(m.done)
			m.flushHeard(wctx)
			// The drain is bounded (above) so a database that stays down
			// cannot hold the shutdown forever.
			m.wg.Wait()
			// The event writers hand work to the control shards: stop those
			// only once the writers are done.
			close(m.ctrlDone)
			m.ctrlWG.Wait()
			return nil
		case <-sweep.C:
			m.sweep(wctx)
			m.resend(wctx)
			m.flushHeard(wctx)
		case <-census.C:
			m.census(wctx)
			m.reconcileCreds(wctx)
			m.replayEvents(wctx, false)
		}
	}
}

// receive is the bus handler. It runs on the publishing client's goroutine,
// so it only routes: decoding and storage happen on the workers.
func (m *Manager) receive(msg Message) {
	id, ch, ok := protocol.ParseTopic(msg.Topic)
	if !ok || !ch.DeviceToGateway() || (msg.ClientID != "" && msg.ClientID != id && msg.ClientID != "inline") {
		m.m.dropped.WithLabelValues("unknown", "wrong_topic").Inc()
		ackMsg(msg)
		return
	}
	m.m.received.WithLabelValues(string(ch)).Inc()
	if m.stopped.Load() {
		// Not acknowledged: a bus that redelivers gives it to the next run.
		m.m.dropped.WithLabelValues(string(ch), "shutdown").Inc()
		return
	}
	if len(msg.Payload) > protocol.MaxPayload {
		// Counted and logged as any bad message (the embedded broker drops
		// these itself; an external broker passes them on).
		m.dropInvalid(ch, id, fmt.Errorf("%w: %d bytes", protocol.ErrTooLarge, len(msg.Payload)))
		ackMsg(msg)
		return
	}
	if msg.Retain && ch != protocol.ChanPresence {
		// A copy the broker kept of a message a locker published with the
		// retain flag (only presence is retained), handed over because this
		// instance subscribed: the message itself was delivered when it was
		// sent, or waits in this instance's session. An external broker
		// keeps such a copy (the embedded one does not) and would replay it
		// at every start, also for a locker disabled since.
		m.m.dropped.WithLabelValues(string(ch), "retained_copy").Inc()
		ackMsg(msg)
		return
	}
	at := m.now()
	if ch != protocol.ChanHealth && ch != protocol.ChanPresence {
		m.heard.add(id, at) // health and births write last_seen themselves (health dropped does not: below)
	}
	in := inbound{id: id, payload: msg.Payload, at: at, ack: msg.Ack}
	switch ch {
	case protocol.ChanHealth:
		q := m.health[shard(id, len(m.health))]
		if msg.QoS > 0 {
			q <- in // QoS 1: back-pressure, never a drop
			break
		}
		select {
		case q <- in:
		default:
			m.m.dropped.WithLabelValues(string(ch), "queue_full").Inc()
			m.heard.add(id, at) // heard all the same: not stale
			in.done()
		}
	case protocol.ChanEvents:
		m.events <- in // back-pressure: events are never dropped
	case protocol.ChanPresence:
		m.enqueue(control{kind: ctrlPresence, id: id, payload: msg.Payload, at: at, ack: msg.Ack, retained: msg.Retain})
	case protocol.ChanCmdResult:
		m.enqueue(control{kind: ctrlResult, id: id, payload: msg.Payload, at: at, ack: msg.Ack})
	case protocol.ChanCredsAck:
		m.enqueue(control{kind: ctrlCredsAck, id: id, payload: msg.Payload, at: at, ack: msg.Ack})
	case protocol.ChanFwStatus:
		m.enqueue(control{kind: ctrlFwStatus, id: id, payload: msg.Payload, at: at, ack: msg.Ack})
	}
}

func ackMsg(msg Message) {
	if msg.Ack != nil {
		msg.Ack()
	}
}

// shard maps a locker id to one of n workers.
func shard(id string, n int) int {
	h := fnv.New32a()
	h.Write([]byte(id))
	return int(h.Sum32() % uint32(n))
}

// lockLocker takes the lock that orders retained publishes of a locker
// (shared with the lockers of its shard), waiting until ctx ends at most:
// a publish that holds it can take as long as the bus lets it (an
// external broker that is down: 10 s). It returns the unlock.
func (m *Manager) lockLocker(ctx context.Context, id string) (func(), error) {
	return m.lockSlot(ctx, shard(id, len(m.publishMu)), id)
}

// lockSlot takes publish lock i, that of locker id (and of the other
// lockers hashed to it).
func (m *Manager) lockSlot(ctx context.Context, i int, id string) (func(), error) {
	l := m.publishMu[i]
	select {
	case l <- struct{}{}:
		return func() { <-l }, nil
	case <-ctx.Done():
		return nil, fmt.Errorf("publish lock of locker %s: %w", id, ctx.Err())
	}
}

func (m *Manager) enqueue(c control) {
	if m.stopped.Load() {
		return // not acknowledged: a bus that redelivers gives it to the next run
	}
	m.enqueueSink(c)
}

// enqueueSink queues c on its locker's shard even while stopping: the
// events it carries are stored already and their effects must not be lost.
func (m *Manager) enqueueSink(c control) {
	m.ctrl[shard(c.id, len(m.ctrl))] <- c
}

// byLocker splits events by locker, in the order each locker first appears,
// keeping each locker's events in their order.
func byLocker(events []EventRecord) [][]EventRecord {
	at := map[string]int{}
	var out [][]EventRecord
	for _, e := range events {
		i, ok := at[e.DeviceID]
		if !ok {
			i = len(out)
			at[e.DeviceID] = i
			out = append(out, nil)
		}
		out[i] = append(out[i], e)
	}
	return out
}

// markEffectsBusy notes events handed to the sink, so that replayEvents
// does not offer them a second time meanwhile. An event already marked by
// another holder (the original of a duplicate, still on its way) stays
// that holder's: only the events it claims here are this caller's to
// unmark.
func (m *Manager) markEffectsBusy(events []EventRecord) {
	for i := range events {
		if events[i].Pending {
			_, held := m.effectsBusy.LoadOrStore(events[i].Key(), struct{}{})
			events[i].claimed = !held
		}
	}
}

// unmarkEffectsBusy clears the marks the caller's copies claimed.
func (m *Manager) unmarkEffectsBusy(events []EventRecord) {
	for i := range events {
		if events[i].claimed {
			m.effectsBusy.Delete(events[i].Key())
			events[i].claimed = false
		}
	}
}

// applyEffects hands a locker's events to the sink, then drops from the
// outbox those it applied; the rest stay for replayEvents.
//
// With SharedReports other instances apply this locker's other events at
// the same time, so the steps take the locker's effects lock: a code use
// judging again a closing that another instance is applying could
// otherwise issue two fresh codes, or leave an alert that the re-judging
// withdrew before it was raised.
func (m *Manager) applyEffects(ctx context.Context, id string, events []EventRecord) {
	defer m.unmarkEffectsBusy(events)
	applyCtx := ctx
	if m.opts.SharedReports && slices.ContainsFunc(events, func(e EventRecord) bool { return e.Pending }) {
		until, release, err := m.lockEffects(ctx, id)
		if err != nil {
			m.log.Warn("device events not applied yet: their locker's effects lock was not taken; offered again later",
				"locker", id, "pending", len(events), "err", err)
			return
		}
		defer release()
		// Steps still failing when the lock may pass to another holder
		// stop, and leave their events for a replay.
		held, cancel := context.WithDeadline(ctx, until)
		defer cancel()
		applyCtx = held
	}
	n := min(m.opts.Events.DeviceEvents(applyCtx, events), len(events))
	var done []string
	for _, e := range events[:n] {
		if e.Pending {
			done = append(done, e.EventID)
		}
	}
	if n < len(events) {
		m.log.Warn("device events not applied yet: offered again later", "locker", id, "pending", len(events)-n)
	}
	if len(done) == 0 {
		return
	}
	// Recorded even when the drain's time is up: otherwise the next start
	// applies them again (harmless, but avoidable).
	actx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	if err := m.retry(actx, "effects_applied", func(ctx context.Context) error { return m.store.EffectsApplied(ctx, id, done) }); err != nil {
		m.log.Error("record applied event effects (they will be offered again)", "locker", id, "err", err)
	}
}

// lockEffects takes locker id's effects lock, waiting at most
// m.effectsWait. Its holder (another instance) normally has it for
// milliseconds, and one that stops answering loses it to the store's idle
// bound; meanwhile this control shard, and every locker hashed to it,
// waits. A lock not taken leaves the events in the outbox, to be offered
// again (replayEvents), after the locker's later batches: a locker's
// effects stay in order only while locks are taken. At most
// maxEffectsLocks are held at once, each on a pool connection of its
// own. The lock is sure until the time returned. Releasing twice is
// harmless.
func (m *Manager) lockEffects(parent context.Context, id string) (time.Time, func(), error) {
	ctx, cancel := context.WithTimeout(parent, m.effectsWait)
	defer cancel()
	select {
	case m.effectsLocks <- struct{}{}:
	case <-ctx.Done():
		return time.Time{}, nil, ctx.Err() // logged by the caller: no database call made
	}
	var until time.Time
	var release func()
	var cut bool // the last attempt was cut short by the wait's end
	err := m.retry(ctx, "effects_lock", func(ctx context.Context) (err error) {
		until, release, err = m.store.LockEffects(ctx, id)
		cut = err != nil && ctx.Err() != nil
		return err
	})
	if err != nil {
		<-m.effectsLocks
		// A wait for the lock that runs out while the caller still wants
		// it means the database failing (or holders hung past their idle
		// bound): counted once, as retry leaves out the attempt it cut.
		if cut && parent.Err() == nil {
			m.m.dbErrors.WithLabelValues("effects_lock").Inc()
		}
		return time.Time{}, nil, err
	}
	var once sync.Once
	return until, func() {
		once.Do(func() {
			release()
			<-m.effectsLocks
		})
	}, nil
}

const (
	// effectsLockWait bounds the wait for a locker's effects lock. Past
	// the store's idle bound on a holder (postgres: 2 min), so that it
	// runs out only when the database fails: a batch left for a replay is
	// applied after the locker's later batches.
	effectsLockWait = 3 * time.Minute
	// maxEffectsLocks bounds the effects locks an instance holds at once
	// (half the default 16 control shards: with their steps, half the
	// default 32 pool connections).
	maxEffectsLocks = 8
)

const (
	// replayAfter is how long an event's effects may wait to be applied
	// before a census offers it again: far past any queue's normal delay
	// (the sink retries a failing step itself, in order).
	replayAfter = 5 * time.Minute
	// replayAtStartAfter is replayAfter at start with an external broker:
	// other instances are applying the events they received just now.
	replayAtStartAfter = time.Minute
	// replayLimit bounds the events one census offers.
	replayLimit = 2000
	// replayLease is how long a replay claims the events it offers.
	replayLease = 10 * time.Minute
)

// replayEvents offers the sink again the events whose effects were not
// applied: left by a crash between storing them and applying them, or by
// a shutdown in the middle of a step. It runs at start, before new events
// are taken (atStart: all of them with the embedded broker, in order), and
// at each census for what is older than replayAfter, on Run's goroutine; a
// full control queue is tried again next time.
func (m *Manager) replayEvents(ctx context.Context, atStart bool) {
	if m.opts.Events == nil {
		return
	}
	before, limit := m.now().Add(-replayAfter), replayLimit
	if atStart {
		before, limit = m.now(), math.MaxInt32 // all, before any new event
		if m.opts.SharedReports {
			before = before.Add(-replayAtStartAfter)
		}
	}
	var evs []EventRecord
	load := func(ctx context.Context) (err error) {
		ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		// A single instance's start takes back what its previous run had
		// claimed and not applied.
		evs, err = m.store.PendingEffects(ctx, before, limit, replayLease, atStart && !m.opts.SharedReports)
		return err
	}
	var err error
	if atStart {
		// New events wait for this: a leftover applied after them would
		// be applied against a state they changed.
		err = m.retry(ctx, "pending_effects", load)
	} else if err = load(ctx); err != nil {
		m.m.dbErrors.WithLabelValues("pending_effects").Inc()
	}
	if err != nil {
		m.log.Error("load event effects not applied", "err", err)
		return
	}
	m.markEffectsBusy(evs)
	evs = slices.DeleteFunc(evs, func(e EventRecord) bool { return !e.claimed }) // on their way already
	for _, group := range byLocker(evs) {
		id := group[0].DeviceID
		c := control{kind: ctrlEvents, id: id, events: group}
		q := m.ctrl[shard(id, len(m.ctrl))]
		if atStart {
			select { // before any new event of the locker
			case q <- c:
			case <-ctx.Done():
				return
			}
		} else {
			select {
			case q <- c:
			default:
				m.unmarkEffectsBusy(c.events) // claimed until the lease ends, then offered again
				continue
			}
		}
		m.m.effectsReplayed.Add(float64(len(c.events)))
		m.log.Info("device events offered again: their effects were not applied", "locker", id, "events", len(c.events))
	}
}

// DeviceSubscribedAfterBirth is called by the broker when a locker
// subscribes to its cmd topic after its birth: the open commands sent at the
// birth could not reach it, so they are sent again (the same ids: a locker
// runs each once).
func (m *Manager) DeviceSubscribedAfterBirth(id string) {
	m.enqueue(control{kind: ctrlResend, id: id})
}

// DeviceConnected is called by the broker when a locker's session starts.
func (m *Manager) DeviceConnected(id, remoteAddr string) {
	m.m.online.Inc()
	m.m.presenceEvent.WithLabelValues("online").Inc()
	m.enqueue(control{kind: ctrlConnected, id: id, reason: remoteAddr, at: m.now()})
}

// DeviceDisconnected is called by the broker when a locker's session ends.
func (m *Manager) DeviceDisconnected(id, reason string) {
	m.m.online.Dec()
	m.m.presenceEvent.WithLabelValues("offline").Inc()
	m.enqueue(control{kind: ctrlDisconnected, id: id, reason: reason, at: m.now()})
}

// batchLoop writes what arrives on q in batches. tick, when not nil, is
// also called every quarter of LatestHealthEvery while the loop waits, and
// once with final set after the last batch at shutdown.
func (m *Manager) batchLoop(ctx context.Context, name string, q chan inbound, write func(context.Context, []inbound),
	tick func(ctx context.Context, final bool)) {
	defer m.wg.Done()
	batch := make([]inbound, 0, m.opts.BatchSize)
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	var ticks <-chan time.Time
	if tick != nil {
		t := time.NewTicker(max(m.opts.LatestHealthEvery/4, time.Millisecond))
		defer t.Stop()
		ticks = t.C
	}
	held := &m.held[slices.Index(metricQueues, name)]
	flush := func() {
		if len(batch) > 0 {
			held.Add(int64(len(batch)))
			write(ctx, batch)
			held.Add(-int64(len(batch)))
			batch = batch[:0]
		}
	}
	for {
		var in inbound
		select {
		case in = <-q:
		case <-ticks:
			tick(ctx, false)
			continue
		case <-m.done:
			for {
				select {
				case in = <-q:
					if batch = append(batch, in); len(batch) >= m.opts.BatchSize {
						flush()
					}
				default:
					flush()
					if tick != nil {
						tick(ctx, true)
					}
					return
				}
			}
		}
		batch = append(batch, in)
		timer.Reset(m.opts.FlushInterval)
	fill:
		for len(batch) < m.opts.BatchSize {
			select {
			case in = <-q:
				batch = append(batch, in)
			case <-timer.C:
				break fill
			case <-m.done:
				break fill
			}
		}
		timer.Stop()
		flush()
	}
}

// retry runs op until it succeeds or ctx ends, backing off; storage
// outages must not lose QoS 1 data that was already accepted. An attempt
// that ctx's end cut short is not counted as a database error.
func (m *Manager) retry(ctx context.Context, op string, f func(context.Context) error) error {
	backoff := 50 * time.Millisecond
	for {
		start := time.Now()
		err := f(ctx)
		m.m.dbWrite.WithLabelValues(op).Observe(time.Since(start).Seconds())
		if err == nil || errors.Is(err, ErrInvalid) || errors.Is(err, ErrNotFound) || errors.Is(err, ErrBusGone) {
			return err
		}
		if ctx.Err() != nil { // cut short by the caller, not a failure
			return ctx.Err()
		}
		m.m.dbErrors.WithLabelValues(op).Inc()
		m.log.Error("database write failed; retrying", "op", op, "err", err, "retry_in", backoff)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, 5*time.Second)
	}
}

// healthWriter is one health writer's state: the latest health it holds
// back (one locker's health always goes to the same writer); latest is nil
// when every report is written through.
type healthWriter struct {
	m      *Manager
	latest *latestThrottle
}

func (w *healthWriter) write(ctx context.Context, batch []inbound) {
	m := w.m
	recs := make([]HealthRecord, 0, len(batch))
	faults := make([][]int, 0, len(batch))
	for _, in := range batch {
		// The body as read: whole numbers written as floats are stored as
		// integers, for every later reader of it.
		h, body, err := protocol.DecodeHealthBody(in.payload)
		if err != nil {
			m.dropInvalid(protocol.ChanHealth, in.id, err)
			m.heard.add(in.id, in.at) // heard all the same: a locker that is not silent is not stale
			in.done()
			continue
		}
		recs = append(recs, HealthRecord{DeviceID: in.id, ReceivedAt: in.at, TS: h.TS.Time, Seq: h.Seq, Body: body})
		faults = append(faults, h.DoorFaults)
	}
	if len(recs) == 0 {
		return
	}
	var latest []LatestHealth
	switch {
	case w.latest != nil:
		latest = w.latest.take(m.now(), recs)
	case m.opts.SharedReports:
		// Gaps inside the run are mostly the other instances' reports;
		// the run's first report is still checked against the stored one.
		latest = LatestOf(recs)
		for i := range latest {
			latest[i].Gaps = 0
		}
	default:
		latest = LatestOf(recs)
	}
	if err := w.store(ctx, "insert_health", recs, latest); err != nil {
		m.log.Error("health batch lost", "n", len(recs), "err", err)
		return
	}
	m.observeLag(batch)
	ackAll(batch)
	for i := range recs {
		m.syncDoorFaults(ctx, recs[i].DeviceID, faults[i], recs[i].ReceivedAt)
	}
}

// store writes health rows recs and latest health latest (op names the
// write in metrics and logs). A batch the database refuses for one of its
// values (ErrInvalid: the same write fails every time) would otherwise hold
// up every locker's health behind it: it is split, the rows from the
// latest health and then in halves, until what is refused is alone. A
// refused row is dropped and counted as invalid, a refused latest health
// logged (its rows are stored); the rest is stored. When every row of a
// batch of several is refused, the fault is the gateway's or the schema's,
// not a locker's: that is an error, and nothing is dropped as invalid.
func (w *healthWriter) store(ctx context.Context, op string, recs []HealthRecord, latest []LatestHealth) error {
	var refused []error
	err := w.split(ctx, op, recs, latest, &refused)
	// Judged by the rows: the latest health comes from the same messages.
	if err == nil && len(recs) > 1 && !slices.Contains(refused[:len(recs)], nil) {
		return fmt.Errorf("every one of the batch's %d health rows refused: %w", len(recs), refused[0])
	}
	if err != nil {
		return err
	}
	w.dropRefused(recs, latest, refused)
	return nil
}

// split writes recs and latest, halving what the database refuses until
// each refused record is alone; refused gets its error (nil for each
// record stored), in the order of recs then latest.
func (w *healthWriter) split(ctx context.Context, op string, recs []HealthRecord, latest []LatestHealth, refused *[]error) error {
	m := w.m
	err := m.retry(ctx, op, func(ctx context.Context) error { return m.store.InsertHealth(ctx, recs, latest) })
	if !errors.Is(err, ErrInvalid) {
		if err == nil {
			for range len(recs) + len(latest) {
				*refused = append(*refused, nil)
			}
		}
		return err
	}
	type part struct {
		recs   []HealthRecord
		latest []LatestHealth
	}
	var parts []part
	switch r, l := len(recs)/2, len(latest)/2; {
	case len(recs) > 0 && len(latest) > 0:
		parts = []part{{recs, nil}, {nil, latest}}
	case len(recs) > 1:
		parts = []part{{recs[:r], nil}, {recs[r:], nil}}
	case len(latest) > 1:
		parts = []part{{nil, latest[:l]}, {nil, latest[l:]}}
	default: // alone: refused
		*refused = append(*refused, err)
	}
	for _, p := range parts {
		if err := w.split(ctx, op, p.recs, p.latest, refused); err != nil {
			return err
		}
	}
	return nil
}

// dropRefused drops and counts the rows the database refused (refused:
// split's errors), and logs the refused latest health.
func (w *healthWriter) dropRefused(recs []HealthRecord, latest []LatestHealth, refused []error) {
	for i, err := range refused {
		switch {
		case err == nil:
		case i < len(recs):
			w.m.dropInvalid(protocol.ChanHealth, recs[i].DeviceID, err)
		default:
			w.m.log.Warn("latest health refused by the database; the locker's health rows are stored", "locker", latest[i-len(recs)].DeviceID, "err", err)
		}
	}
}

// tick writes the latest health held back whose time has come, or all of
// it when final (shutdown).
func (w *healthWriter) tick(ctx context.Context, final bool) {
	var latest []LatestHealth
	if final {
		latest = w.latest.all() // the due ones included
	} else {
		latest = w.latest.due(w.m.now())
	}
	if len(latest) == 0 {
		return
	}
	if err := w.store(ctx, "latest_health", nil, latest); err != nil {
		// Only the devices row's copy is behind; every health row is stored.
		w.m.log.Warn("latest health not updated", "lockers", len(latest), "err", err)
	}
}

func (m *Manager) writeEvents(ctx context.Context, batch []inbound) {
	recs := make([]EventRecord, 0, len(batch))
	for _, in := range batch {
		e, body, err := protocol.DecodeBody[protocol.Event](in.payload) // the body as read (DecodeBody)
		if err != nil {
			m.dropInvalid(protocol.ChanEvents, in.id, err)
			in.done()
			continue
		}
		recs = append(recs, EventRecord{DeviceID: in.id, EventID: e.ID, ReceivedAt: in.at, TS: e.TS.Time,
			Type: e.Type, Compartment: e.Compartment, Body: body,
			Pending: m.opts.Events != nil && m.opts.Events.Wants(e),
			Alert:   eventAlert(in.id, in.at, e, m.opts.Config.Lockout)})
	}
	if len(recs) == 0 {
		return
	}
	// In flight from before they are stored: a census must not offer them
	// meanwhile (after a long outage they are old when they commit).
	m.markEffectsBusy(recs)
	insert := func(recs []EventRecord) (fresh []EventRecord, err error) {
		err = m.retry(ctx, "insert_events", func(ctx context.Context) (err error) {
			fresh, err = m.store.InsertEvents(ctx, recs)
			return err
		})
		return fresh, err
	}
	fresh, err := insert(recs)
	dropped := 0
	if errors.Is(err, ErrInvalid) {
		// An event the store cannot take (a value PostgreSQL refuses)
		// fails its whole batch, every time: store them one at a time,
		// and drop only what fails so, rather than hold up every
		// locker's events behind it.
		fresh, err = nil, nil
		for i := range recs {
			f, ierr := insert(recs[i : i+1])
			if errors.Is(ierr, ErrInvalid) {
				m.dropInvalid(protocol.ChanEvents, recs[i].DeviceID, ierr)
				dropped++
				continue
			}
			if ierr != nil {
				// Stopped part way: nothing is acknowledged, so the lockers
				// send the batch again; what was stored is then a duplicate,
				// and its effects wait in the outbox for a replay.
				err = ierr
				break
			}
			fresh = append(fresh, f...)
		}
	}
	if err != nil {
		m.unmarkEffectsBusy(recs)
		m.log.Error("event batch not stored", "n", len(recs), "err", err)
		return
	}
	if len(fresh) < len(recs) {
		// Duplicates are not handed on; the fresh stay marked.
		isFresh := make(map[string]bool, len(fresh))
		for i := range fresh {
			isFresh[fresh[i].Key()] = true
		}
		for i := range recs {
			if recs[i].claimed && !isFresh[recs[i].Key()] {
				m.effectsBusy.Delete(recs[i].Key())
			}
		}
	}
	m.m.eventsDup.Add(float64(len(recs) - len(fresh) - dropped))
	m.observeLag(batch)
	ackAll(batch)
	for i := range fresh {
		if a := fresh[i].Alert; a != nil && a.Raised {
			m.alertRaised(a.Raise)
		}
	}
	if m.opts.Events != nil && len(fresh) > 0 {
		// The sink's work (pickup transitions) runs on the control shards:
		// in order per locker, in parallel across lockers, and not holding
		// up the next batch of inserts.
		for _, evs := range byLocker(fresh) {
			m.enqueueSink(control{kind: ctrlEvents, id: evs[0].DeviceID, events: evs})
		}
	}
}

// verdict is what a check of the broker's retained presence decided about
// a presence message (staleWill, staleBirth).
type verdict int

const (
	verdictApply verdict = iota // current, or not known to be stale: applied
	verdictStale                // an earlier session's: dropped (acknowledged)
	verdictLeave                // not judged, the bus is closing: neither applied nor acknowledged
	verdictKnown                // the birth the session on record started from: dropped (acknowledged)
)

// staleWill judges whether a Last Will is an earlier session's, delivered
// late: the broker's retained presence of the locker is a birth. Through
// an external broker a will can wait in a crashed instance's session while
// the locker connects again through another instance; applied when that
// instance comes back, it would mark an online locker offline (and its
// commands would wait). The broker retained the will when it published it,
// so a later birth in its place means a later session. When the retained
// presence cannot be read the will is applied; when the bus is closing
// (ErrBusClosed) it is left, for the broker to deliver again.
func (m *Manager) staleWill(ctx context.Context, id string) verdict {
	payload, err := m.retainedPresence(ctx, id)
	if errors.Is(err, ErrBusClosed) {
		return verdictLeave
	}
	if err != nil || len(payload) == 0 {
		return verdictApply
	}
	if p, err := protocol.Decode[protocol.Presence](payload); err != nil || !p.Online {
		return verdictApply
	}
	m.m.staleWills.Inc()
	m.log.Info("Last Will of an earlier session not applied: the locker's retained presence is a later birth", "locker", id)
	return verdictStale
}

// recordedBirth reports whether p, a birth from an external broker, is
// the birth of locker id's session on record: the locker online, on the
// same boot, and the same ts as recorded (to the rounding of one recorded
// before migration 025). The broker hands a new subscription (every
// instance's start, a reconnect that subscribes again) each locker's
// retained birth, and a birth can reach two instances (retained to one,
// live to the other); applied again, it would start a second session for
// a locker that never reconnected: every gateway restart would add one
// per locker (connect counts, presence history, flapping) and reset each
// session's start. A read that fails reads as not recorded: the birth
// goes on to StartSessionWithBirth, which checks again as it writes.
func (m *Manager) recordedBirth(ctx context.Context, id string, p *protocol.Presence, retained bool) bool {
	l, err := m.store.GetLocker(ctx, id)
	if err != nil {
		if !errors.Is(err, ErrNotFound) && ctx.Err() == nil {
			m.log.Warn("retained birth not compared with the session on record; applied as a new one", "locker", id, "err", err)
		}
		return false
	}
	if !l.Online || l.BootID != p.BootID || p.TS.IsZero() != (l.BirthTS == nil) {
		return false
	}
	// Without a ts there is no clock to tell sessions apart: only a
	// retained copy is taken for the birth on record (a live one may be a
	// reconnect whose will was missed; protocol v1 allows such births).
	return p.TS.IsZero() && retained || !p.TS.IsZero() && p.TS.Sub(*l.BirthTS).Abs() < 2*time.Millisecond
}

// offlineOnRecord reports whether locker id reads offline in the store
// (false when it cannot be read: the will goes on to be judged).
func (m *Manager) offlineOnRecord(ctx context.Context, id string) bool {
	l, err := m.store.GetLocker(ctx, id)
	return err == nil && !l.Online
}

// lateBirthAfter is how far behind its arrival a birth's ts must be for
// the birth to be checked against the broker (staleBirth): one that waited
// in a crashed instance's session is minutes behind; one on time, seconds
// at most, unless the locker's clock is off (then it is checked, and
// found current).
const lateBirthAfter = 30 * time.Second

// staleBirth judges whether a birth is an earlier session's, delivered
// late (as a will can be: staleWill): its ts is well behind its arrival
// and the broker's retained presence of the locker is no longer this
// birth (a will since, or a later birth). Applied, it would mark a locker
// online that went away since, and report a version it may no longer run
// to the firmware engine. A late one that is the birth the session on
// record started from (recordedBirth; isRetained: a retained copy) is
// verdictKnown. A birth on time is not checked (a reconnect storm's
// births cost nothing more: StartSessionWithBirth tells a copy of one
// as it writes); nothing retained, or a read that fails, and the birth is
// applied (a bus closing: as staleWill).
func (m *Manager) staleBirth(ctx context.Context, id string, p *protocol.Presence, payload []byte, at time.Time, isRetained bool) verdict {
	if p.TS.IsZero() || at.Sub(p.TS.Time) < lateBirthAfter {
		return verdictApply
	}
	// A copy of the birth on record (a retained one at every instance's
	// start: a locker connected for hours has an old birth) is known by
	// the database before the broker is asked.
	if m.recordedBirth(ctx, id, p, isRetained) {
		return verdictKnown
	}
	retained, err := m.retainedPresence(ctx, id)
	if errors.Is(err, ErrBusClosed) {
		return verdictLeave
	}
	if err != nil || len(retained) == 0 || bytes.Equal(retained, payload) {
		return verdictApply
	}
	m.m.staleBirths.Inc()
	m.log.Info("birth of an earlier session not applied: the locker's retained presence has changed since",
		"locker", id, "birth_ts", p.TS.Time, "boot_id", p.BootID)
	return verdictStale
}

// errNoRetainedReader: the bus cannot read retained messages.
var errNoRetainedReader = errors.New("the bus cannot read retained messages")

// retainedPresence reads the broker's retained presence of locker id,
// when the bus can (RetainedReader). A read that failed is logged: the
// presence message is applied as it came, or, when the bus is closing
// (ErrBusClosed), left.
func (m *Manager) retainedPresence(ctx context.Context, id string) ([]byte, error) {
	rr, ok := m.bus.(RetainedReader)
	if !ok {
		return nil, errNoRetainedReader
	}
	rctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	payload, err := rr.Retained(rctx, protocol.Topic(id, protocol.ChanPresence))
	switch {
	case errors.Is(err, ErrBusClosed):
		m.log.Info("presence message not judged: the bus is closing; left for the broker to deliver again", "locker", id)
	case err != nil:
		m.log.Warn("retained presence not read; the presence message is applied as it came", "locker", id, "err", err)
	}
	return payload, err
}

// ackAll acknowledges a stored batch (acknowledging twice is harmless).
func ackAll(batch []inbound) {
	for i := range batch {
		batch[i].done()
	}
}

// queued is how many messages wait in the named ingest queue(s).
func (m *Manager) queued(name string) int {
	if name == "events" {
		return len(m.events)
	}
	n := 0
	for _, q := range m.health {
		n += len(q)
	}
	return n
}

func (m *Manager) observeLag(batch []inbound) {
	now := m.now()
	for _, in := range batch {
		m.m.ingestLag.Observe(now.Sub(in.at).Seconds())
	}
}

func (m *Manager) dropInvalid(ch protocol.Channel, id string, err error) {
	reason := protocol.Reason(err)
	m.m.dropped.WithLabelValues(string(ch), reason).Inc()
	log, quiet, unlogged := m.drops.allow(dropKey{id: id, ch: ch, reason: reason}, m.now())
	for _, u := range unlogged {
		if u.key.id == "" {
			m.log.Warn("dropped device messages not logged: more lockers sent bad messages than the log follows", "dropped_unlogged", u.quiet,
				"hint", "lockergate_ingest_messages_dropped_total counts them all")
			continue
		}
		m.log.Warn("dropped device messages not logged since the last line", "locker", u.key.id, "channel", u.key.ch, "reason", u.key.reason,
			"dropped_unlogged", u.quiet)
	}
	if !log {
		return
	}
	attrs := []any{"locker", id, "channel", ch, "reason", reason, "err", err}
	if quiet > 0 {
		attrs = append(attrs, "dropped_unlogged", quiet,
			"hint", "logged once a minute per locker, channel and reason; lockergate_ingest_messages_dropped_total counts them all")
	}
	m.log.Warn("dropped device message", attrs...)
}

// eventAlert is what event ev of locker id, received at at, does to the
// locker's alerts; nil: nothing. A locker that reports its keypad locked
// out raises code_lockout, and so does one whose rejected codes reach
// lockout's failures within its window (RejectedCodes), so that a locker
// that does not lock its keypad still raises it.
func eventAlert(id string, at time.Time, ev *protocol.Event, lockout protocol.Lockout) *AlertChange {
	a := Alert{DeviceID: id, Compartment: ev.Compartment, RaisedAt: at}
	switch ev.Type {
	case protocol.EventDoorAjar:
		a.Kind, a.Detail = AlertDoorAjar, fmt.Sprintf("open %d s", ev.OpenS)
	case protocol.EventDoorClosed:
		return &AlertChange{ClearKind: AlertDoorAjar, ClearAt: ev.Compartment}
	case protocol.EventTamper:
		a.Kind, a.Detail = AlertTamper, ev.Detail
	case protocol.EventPower:
		if ev.Source != protocol.PowerBattery {
			return &AlertChange{ClearKind: AlertOnBattery}
		}
		a.Kind = AlertOnBattery
	case protocol.EventCodeRejected:
		a.Kind = AlertCodeLockout
		if ev.Reason == protocol.RejectLockedOut {
			a.Detail = "keypad locked out after too many rejected codes (reported by the locker)"
			break
		}
		if lockout.MaxFailures < 1 || lockout.WindowS < 1 {
			return nil // no policy to count by
		}
		window := time.Duration(lockout.WindowS) * time.Second
		a.Detail = fmt.Sprintf("%d or more codes rejected within %s by the locker's clock (counted by the gateway)",
			lockout.MaxFailures, window)
		return &AlertChange{Raise: &a, IfRejected: &RejectedCodes{Window: window, Min: lockout.MaxFailures}}
	}
	if a.Kind == "" {
		return nil
	}
	return &AlertChange{Raise: &a}
}

// DefaultMaxClockSkew is Options.MaxClockSkew's default: the default
// unlock lifetime, 30 s. A locker further off than that could run a
// command well past its expiry, or take a code for longer than it is good.
const DefaultMaxClockSkew = 30 * time.Second

// judgeClock reads a locker's clock from birth p, received at at: a birth
// is sent right after connecting, so its arrival is the best reading the
// gateway gets. judged is false when the birth says nothing either way (no
// ts), and skewed is true when ts is further than MaxClockSkew from at.
// With the check off (MaxClockSkew < 0) every birth is judged right, so
// alerts left open from before clear. Through an external broker a birth
// may be delivered late (queued in the gateway's session while it was down,
// or sent again), which makes a clock look behind: there only a clock ahead
// is judged skewed, and one that reads behind is not judged at all.
func (m *Manager) judgeClock(p *protocol.Presence, at time.Time) (skewed, judged bool) {
	if m.opts.MaxClockSkew < 0 {
		return false, true
	}
	if p.TS.IsZero() {
		return false, false
	}
	off := p.TS.Sub(at)
	if off.Abs() <= m.opts.MaxClockSkew {
		return false, true
	}
	if off < 0 && m.opts.PresenceFromWill {
		return false, false
	}
	return true, true
}

// raiseClockSkew raises the clock_skew alert of a birth judgeClock found
// skewed.
func (m *Manager) raiseClockSkew(ctx context.Context, id string, p *protocol.Presence, at time.Time) {
	off := p.TS.Sub(at)
	way := "ahead of"
	if off < 0 {
		way = "behind"
	}
	m.alert(ctx, Alert{DeviceID: id, Kind: AlertClockSkew, RaisedAt: at,
		Detail: fmt.Sprintf("clock %s %s the gateway's (birth ts %s): the locker judges code and command expiry by it; set its time (NTP)",
			off.Abs().Round(time.Second), way, protocol.FormatTime(p.TS.Time))})
}

// alert raises a, and reports whether it was stored (raised, or open
// already); a failure is logged.
func (m *Manager) alert(ctx context.Context, a Alert) bool {
	raised, err := m.store.RaiseAlert(ctx, a)
	if err != nil {
		m.log.Error("raise alert", "locker", a.DeviceID, "kind", a.Kind, "err", err)
		return false
	}
	if raised {
		m.alertRaised(&a)
	}
	return true
}

// alertRaised counts and logs a newly raised alert.
func (m *Manager) alertRaised(a *Alert) {
	m.m.alerts.WithLabelValues(a.Kind).Inc()
	m.log.Warn("alert", "locker", a.DeviceID, "kind", a.Kind, "compartment", a.Compartment, "detail", a.Detail)
	if m.opts.AlertRaised != nil {
		m.opts.AlertRaised()
	}
}

// clearAlerts clears alerts (see Store.ClearAlerts), and reports whether it
// did; a failure is logged.
func (m *Manager) clearAlerts(ctx context.Context, id, kind string, at time.Time, keep []int) bool {
	if _, err := m.store.ClearAlerts(ctx, id, kind, keep, at); err != nil {
		m.log.Error("clear alerts", "locker", id, "kind", kind, "err", err)
		return false
	}
	return true
}

// syncDoorFaults raises an alert per newly failing door and clears those
// that recovered. Only changes cost a database round trip: the last fault
// list of each locker is remembered, starting from the open door_fault
// alerts when Run starts (loadDoorFaults: a fault that recovered while the
// gateway was down is cleared by the first report without it). The list is
// per instance: behind an external broker another instance's alerts are
// not in it. A change raises the doors that were not in the list before
// (all of them when it is not known: the store keeps one open alert per
// door, so one raised again is counted as a repeat, raiseAlertSQL), and a
// door that stays listed is not raised again: its alert's repeats are not
// the other doors' changes, and one staff cleared stays cleared.
// When the database fails, the list is marked unsynced, so the next report
// tries again whatever it says.
func (m *Manager) syncDoorFaults(ctx context.Context, id string, faults []int, at time.Time) {
	prev, known := m.doorFaults.Load(id)
	if !known && m.faultsLoaded.Load() {
		prev, known = []int(nil), true // no open alert at start
	}
	if prevList, ok := prev.([]int); (ok && slices.Equal(prevList, faults)) || (!known && len(faults) == 0) {
		return
	}
	m.doorFaults.Store(id, slices.Clone(faults))
	raise := faults
	if prevList, ok := prev.([]int); ok {
		raise = slices.DeleteFunc(slices.Clone(faults), func(n int) bool { return slices.Contains(prevList, n) })
	}
	stored := true
	for _, n := range raise {
		stored = m.alert(ctx, Alert{DeviceID: id, Kind: AlertDoorFault, Compartment: n, Detail: "door sensor or latch fails", RaisedAt: at}) && stored
	}
	if !m.clearAlerts(ctx, id, AlertDoorFault, at, faults) || !stored {
		m.doorFaults.Store(id, faultsUnsynced{})
	}
}

// loadDoorFaults fills doorFaults with the open door_fault alerts. Should
// the read fail, a locker's first report without faults clears nothing
// (its open alerts stay until a fault is reported and recovers again).
func (m *Manager) loadDoorFaults(ctx context.Context) {
	open, err := m.store.OpenAlertCompartments(ctx, AlertDoorFault)
	if err != nil {
		if ctx.Err() == nil {
			m.log.Error("read open door_fault alerts: one whose door recovered while the gateway was down stays open until the fault is reported and recovers again",
				"err", err)
		}
		return
	}
	for id, comps := range open {
		m.doorFaults.LoadOrStore(id, comps)
	}
	m.faultsLoaded.Store(true)
}

// faultsUnsynced stands in doorFaults for a locker whose door-fault alerts
// could not be written.
type faultsUnsynced struct{}

func (m *Manager) controlLoop(ctx context.Context, q chan control) {
	defer m.ctrlWG.Done()
	for {
		select {
		case c := <-q:
			m.handleQueued(ctx, q, c)
		case <-m.ctrlDone:
			for {
				select {
				case c := <-q:
					m.handleQueued(ctx, q, c)
				default:
					return
				}
			}
		}
	}
}

// maxWindow bounds the control messages a shard takes from its queue at
// once, and so the lockers whose session starts, births, session ends or
// credential acknowledgements are written in one statement.
const maxWindow = 512

// handleQueued handles c and the messages queued right behind it on the
// shard (up to maxWindow). A locker's messages keep their order; those of
// different lockers need none among them (other shards run beside this
// one). So the window is handled in rounds, round k holding each locker's
// k-th message of the window, and a round's session starts, births, session
// ends and credential acknowledgements are each written in one statement
// (handleRound): a reconnect storm, a gateway shutdown or a network outage
// queues thousands, and written one by one, each costs its shard a round
// trip and a commit.
func (m *Manager) handleQueued(ctx context.Context, q chan control, c control) {
	window := []control{c}
collect:
	for len(window) < maxWindow {
		select {
		case n := <-q:
			window = append(window, n)
		default:
			break collect
		}
	}
	for _, round := range rounds(window) {
		m.handleRound(ctx, round)
	}
}

// rounds splits w into rounds: the k-th holds each locker's k-th message
// of w, in w's order.
func rounds(w []control) [][]control {
	if len(w) == 1 {
		return [][]control{w}
	}
	seen := make(map[string]int, len(w))
	var out [][]control
	for _, c := range w {
		k := seen[c.id]
		seen[c.id] = k + 1
		if k == len(out) {
			out = append(out, nil)
		}
		out[k] = append(out[k], c)
	}
	return out
}

// handleRound handles messages of distinct lockers: session starts,
// births (on the embedded broker), session ends and credential
// acknowledgements each together, the rest one by one.
func (m *Manager) handleRound(ctx context.Context, round []control) {
	var starts, ends, acks, presences []control
	for _, c := range round {
		switch c.kind {
		case ctrlPresence:
			if m.opts.PresenceFromWill {
				m.handleControl(ctx, c) // judged one by one against the broker's retained state
			} else {
				presences = append(presences, c)
			}
		case ctrlConnected:
			starts = append(starts, c)
		case ctrlDisconnected:
			ends = append(ends, c)
		case ctrlCredsAck:
			acks = append(acks, c)
		default:
			m.handleControl(ctx, c)
		}
	}
	if len(ends) > 0 {
		se := make([]SessionEnd, len(ends))
		for i, c := range ends {
			se[i] = SessionEnd{ID: c.id, Reason: c.reason, At: c.at}
		}
		m.markOffline(ctx, se)
		ackHandled(ctx, ends)
	}
	if len(starts) > 0 {
		m.connected(ctx, starts)
		ackHandled(ctx, starts)
	}
	if len(presences) > 0 {
		m.births(ctx, presences)
		ackHandled(ctx, presences)
	}
	if len(acks) > 0 {
		m.credsAcked(ctx, acks)
		ackHandled(ctx, acks)
	}
}

// births handles presence messages cs of distinct lockers on the embedded
// broker: the births together (born). Wills and cleared retained messages
// change nothing: the embedded broker reports session ends itself and
// knows a takeover from a loss, and a will of a taken-over session can
// arrive after the new session's birth, so wills are only used where the
// bus has no session events (an external broker: handleControl).
func (m *Manager) births(ctx context.Context, cs []control) {
	bs := make([]birth, 0, len(cs))
	for _, c := range cs {
		p, ok := m.presence(c)
		if ok && p.Online {
			bs = append(bs, birth{id: c.id, p: p, at: c.at})
		}
	}
	if len(bs) > 0 {
		m.born(ctx, bs)
	}
}

// presence decodes a presence message; ok is false for a cleared retained
// message (empty) and for an invalid one, which is counted and dropped.
func (m *Manager) presence(c control) (p *protocol.Presence, ok bool) {
	if len(c.payload) == 0 {
		return nil, false // a cleared retained message
	}
	p, err := protocol.Decode[protocol.Presence](c.payload)
	if err != nil {
		m.dropInvalid(protocol.ChanPresence, c.id, err)
		return nil, false
	}
	return p, true
}

// birth is a locker's birth message, decoded, received at at.
type birth struct {
	id string
	p  *protocol.Presence
	at time.Time
}

// born records the births bs of distinct lockers, each with its clock
// offset, tells the firmware tracker the versions they run and sends them
// their open commands: one statement and two reads for all of them.
func (m *Manager) born(ctx context.Context, bs []birth) {
	recs := make([]BirthRecord, len(bs))
	skewed := make([]bool, len(bs))
	for i, b := range bs {
		recs[i], skewed[i] = m.birthRecord(b)
	}
	record := func(recs []BirthRecord) error {
		return m.retry(ctx, "presence", func(ctx context.Context) error { return m.store.RecordBirths(ctx, recs) })
	}
	err := record(recs)
	if errors.Is(err, ErrInvalid) && len(recs) > 1 {
		// One of them the database refuses: the others are recorded
		// one by one.
		for _, r := range recs {
			if err := record([]BirthRecord{r}); err != nil {
				m.log.Error("record birth", "locker", r.ID, "err", err)
			}
		}
	} else if err != nil {
		m.log.Error("record birth", "lockers", len(recs), "first", recs[0].ID, "err", err)
	}
	m.afterBirths(ctx, bs, skewed)
}

// birthRecord is what birth b records, and whether its clock is judged
// skewed (judgeClock).
func (m *Manager) birthRecord(b birth) (BirthRecord, bool) {
	s, judged := m.judgeClock(b.p, b.at)
	return BirthRecord{ID: b.id, Presence: b.p, At: b.at, ClearSkew: judged && !s}, s
}

// startFromBirth starts the session of a locker behind an external broker
// from its birth b (the broker reports no session events) and records the
// birth, unless the session on record is that birth's (a copy another
// instance applied meanwhile: StartSessionWithBirth), then delivers what a
// (re)connect and a birth bring (connected, born). A birth whose ts is
// well behind its arrival waited at the broker while no instance ran (or
// comes from a clock that far behind: the two cannot be told apart here):
// its arrival is not when it was sent, so it records no clock offset
// rather than a wrong one.
func (m *Manager) startFromBirth(ctx context.Context, b birth, retained bool) {
	rec, skewed := m.birthRecord(b)
	rec.Retained = retained
	rec.NoOffset = !b.p.TS.IsZero() && b.at.Sub(b.p.TS.Time) > lateBirthAfter
	var started bool
	err := m.retry(ctx, "presence", func(ctx context.Context) (err error) {
		started, err = m.store.StartSessionWithBirth(ctx, rec)
		return err
	})
	switch {
	case err != nil:
		m.log.Error("record birth", "locker", b.id, "err", err)
		return
	case !started:
		m.m.knownBirths.Inc()
		return
	}
	m.syncDevices(ctx, []string{b.id})
	m.afterBirths(ctx, []birth{b}, []bool{skewed})
}

// afterBirths does what births bs (recorded; skewed as judged) bring
// besides their record: clock_skew alerts, the firmware engine told the
// versions they run, and their open commands sent.
func (m *Manager) afterBirths(ctx context.Context, bs []birth, skewed []bool) {
	var boots []Boot
	ids := make([]string, len(bs))
	for i, b := range bs {
		ids[i] = b.id
		if skewed[i] {
			m.raiseClockSkew(ctx, b.id, b.p, b.at)
		}
		if b.p.FW != "" { // no version, nothing to confirm
			boots = append(boots, Boot{DeviceID: b.id, FW: b.p.FW, At: b.at})
		}
	}
	if m.opts.Firmware != nil && len(boots) > 0 {
		m.opts.Firmware.BootedMany(ctx, boots)
	}
	// Lockers that subscribe before their birth get their open commands
	// now; one that subscribes to cmd after it gets them again then
	// (ctrlResend, from the embedded broker).
	m.deliverOpen(ctx, ids...)
}

// ackHandled acknowledges handled messages to the bus, as handleControl
// does: unless the drain deadline cut their store calls short.
func ackHandled(ctx context.Context, cs []control) {
	if ctx.Err() != nil {
		return
	}
	for _, c := range cs {
		if c.ack != nil {
			c.ack()
		}
	}
}

// connected records the session starts cs (ctrlConnected) and delivers
// the lockers their retained state.
func (m *Manager) connected(ctx context.Context, cs []control) {
	starts := make([]SessionStart, len(cs))
	ids := make([]string, len(cs))
	for i, c := range cs {
		starts[i], ids[i] = SessionStart{ID: c.id, At: c.at}, c.id
	}
	if err := m.retry(ctx, "presence", func(ctx context.Context) error { return m.store.MarkOnlineMany(ctx, starts) }); err != nil {
		m.log.Error("mark online", "lockers", len(starts), "first", starts[0].ID, "err", err)
	}
	m.syncDevices(ctx, ids)
}

// credsAcked records the credential acknowledgements cs (ctrlCredsAck).
func (m *Manager) credsAcked(ctx context.Context, cs []control) {
	acks := make([]CredsAck, 0, len(cs))
	for _, c := range cs {
		a, err := protocol.Decode[protocol.CredsAck](c.payload)
		if err != nil {
			m.dropInvalid(protocol.ChanCredsAck, c.id, err)
			continue
		}
		acks = append(acks, CredsAck{ID: c.id, Version: a.Version})
	}
	if len(acks) == 0 {
		return
	}
	var back []CredsLag
	if err := m.retry(ctx, "creds_ack", func(ctx context.Context) (err error) {
		back, err = m.store.AckCredsMany(ctx, acks)
		return err
	}); err != nil {
		m.log.Error("record creds ack", "lockers", len(acks), "first", acks[0].ID, "err", err)
		return
	}
	// A locker whose acknowledgement went back holds an older set than
	// the one it had (a set applied out of order), or its acks were
	// handled out of order (an external broker's unordered dispatch): its
	// current set is published now, not after two censuses, while it
	// could accept codes since cancelled. A locker that has it only
	// acknowledges it again. Once per locker and version: one that keeps
	// going back (firmware that re-applies a stale copy) is left to the
	// census, whose republishes are bounded.
	//
	// An acknowledgement ahead of the current set names a set never
	// published (firmware at fault, a database restored from a backup, or
	// a forgery): it was not recorded, and is dropped as invalid; the
	// locker is sent its current set the same way, and stays behind (the
	// census's republishes, then creds_not_applied) until it acknowledges
	// that set. Recorded, it would read every set up to it as applied, and
	// release compartments whose codes the locker may still accept.
	for _, l := range back {
		if l.Ahead > 0 {
			m.dropInvalid(protocol.ChanCredsAck, l.DeviceID,
				fmt.Errorf("%w: acknowledged credential set %d is ahead of the current set %d, which the locker is sent again: not recorded",
					protocol.ErrInvalid, l.Ahead, l.Version))
		}
		if m.backRepublish.done(l) {
			continue
		}
		pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		err := m.PublishCreds(pctx, l.DeviceID)
		cancel()
		if err != nil {
			m.log.Error("republish credential set after an older one was acknowledged: the census tries again", "locker", l.DeviceID, "err", err)
			continue
		}
		m.backRepublish.mark(l) // a locker's acks are on one control shard: no other marks it meanwhile
		m.m.credsRepublished.Inc()
		if l.Ahead > 0 {
			m.log.Info("credential set republished: the locker acknowledged one never published", "locker", l.DeviceID, "version", l.Version, "acknowledged", l.Ahead)
			continue
		}
		m.log.Info("credential set republished: the locker acknowledged an older one than before", "locker", l.DeviceID, "version", l.Version)
	}
}

// versionOnce remembers, per locker, the credential-set version something
// was done for, so that it is done once per version. Bounded: past
// versionOnceMax lockers it forgets them all (at worst once more each).
type versionOnce struct {
	mu   sync.Mutex
	seen map[string]int64
}

// versionOnceMax bounds the lockers a versionOnce remembers.
const versionOnceMax = 100_000

// done reports whether it was done for l's locker at l's version.
func (o *versionOnce) done(l CredsLag) bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	v, ok := o.seen[l.DeviceID]
	return ok && v == l.Version
}

// mark records that it was done for l's locker at l's version.
func (o *versionOnce) mark(l CredsLag) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.seen == nil || len(o.seen) >= versionOnceMax {
		o.seen = make(map[string]int64)
	}
	o.seen[l.DeviceID] = l.Version
}

func (m *Manager) markOffline(ctx context.Context, ends []SessionEnd) {
	if err := m.retry(ctx, "presence", func(ctx context.Context) error { return m.store.MarkOfflineMany(ctx, ends) }); err != nil {
		m.log.Error("mark offline", "lockers", len(ends), "first", ends[0].ID, "err", err)
	}
	m.endedMu.Lock()
	close(m.ended)
	m.ended = make(chan struct{})
	m.endedMu.Unlock()
}

// SessionKicked records the end of locker id's session that the gateway
// itself ended (a disable; a replacement, by its new secret or EMQX's
// kick), where the broker reports no session ends and publishes no Last
// Will for a client it disconnects (an external broker: mosquitto's
// dynamic security, EMQX's API). The session ends "kicked",
// and the locker's retained presence becomes the will's {"online":false},
// so that no instance that subscribes later takes its last birth, still
// retained, for a live session. With the embedded broker (which reports
// the end itself) it does nothing.
func (m *Manager) SessionKicked(ctx context.Context, id string) {
	if !m.opts.PresenceFromWill {
		return
	}
	// Recorded first: the will published next comes back to this very
	// subscription, and would end the session as "will".
	m.markOffline(ctx, []SessionEnd{{ID: id, Reason: "kicked", At: m.now()}})
	if err := m.bus.Publish(ctx, protocol.Topic(id, protocol.ChanPresence), []byte(`{"online":false}`), 1, true); err != nil {
		m.log.Warn("retained presence of a kicked locker (disabled or replaced) not set offline: an instance that subscribes before it is may take the locker's last birth for a live session",
			"locker", id, "err", err)
	}
}

// WaitOffline returns locker id as recorded once it reads offline, or as it
// is after d: a disable's answer, after the broker ended the session, which
// the fleet records a moment later. It reads the locker again each time
// this instance wrote session ends, not on a timer, and once more at d.
func (m *Manager) WaitOffline(ctx context.Context, id string, d time.Duration) (*Locker, error) {
	timer := time.NewTimer(d)
	defer timer.Stop()
	for {
		m.endedMu.Lock()
		ended := m.ended
		m.endedMu.Unlock()
		l, err := m.GetLocker(ctx, id)
		if err != nil || !l.Online {
			return l, err
		}
		select {
		case <-ended:
		case <-timer.C:
			// As recorded now: another instance (or a Last Will behind an
			// external broker) may have recorded the end meanwhile.
			return m.GetLocker(ctx, id)
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// handleControl handles a message handleRound does not write together
// with others': any but session starts and ends, credential
// acknowledgements and (on the embedded broker) presence.
func (m *Manager) handleControl(ctx context.Context, c control) {
	leave := false // set when the message is left for the bus to deliver again
	if c.ack != nil {
		// Acknowledged once handled: stored, or invalid for good. Store
		// calls are retried until they succeed, unless the drain deadline
		// cancels ctx: then nothing is acknowledged and a bus that
		// redelivers gives the message to the next run. A presence
		// message left unjudged (verdictLeave) is not acknowledged either.
		defer func() {
			if ctx.Err() == nil && !leave {
				c.ack()
			}
		}()
	}
	switch c.kind {
	case ctrlEvents:
		m.applyEffects(ctx, c.id, c.events)
	case ctrlPresence: // from an external broker (handleRound)
		p, ok := m.presence(c)
		if !ok {
			return
		}
		if !p.Online {
			// The Last Will. A retained one (handed to a new subscription)
			// of a locker already offline changes nothing: not worth the
			// broker read staleWill makes (one per offline locker at every
			// instance's start).
			if c.retained && m.offlineOnRecord(ctx, c.id) {
				return
			}
			switch m.staleWill(ctx, c.id) {
			case verdictApply:
				m.markOffline(ctx, []SessionEnd{{ID: c.id, Reason: "will", At: c.at}})
			case verdictLeave:
				leave = true
			}
			return
		}
		switch m.staleBirth(ctx, c.id, p, c.payload, c.at, c.retained) {
		case verdictKnown:
			m.m.knownBirths.Inc()
			return
		case verdictStale:
			return
		case verdictLeave:
			leave = true
			return
		}
		// No session events from an external broker: the birth starts the
		// session.
		m.startFromBirth(ctx, birth{id: c.id, p: p, at: c.at}, c.retained)
	case ctrlResend:
		m.deliverOpen(ctx, c.id)
	case ctrlResult:
		r, err := protocol.Decode[protocol.CommandResult](c.payload)
		if err != nil {
			m.dropInvalid(protocol.ChanCmdResult, c.id, err)
			return
		}
		var cmd *Command
		done := m.completingStart(r.ID)
		err = m.retry(ctx, "command_result", func(ctx context.Context) (err error) {
			cmd, err = m.store.CompleteCommand(ctx, c.id, r.ID, r.Status, r.Error, c.at)
			return err
		})
		if err != nil {
			// Not recorded here, or not known to be: another instance's
			// answer, or a write that may have committed, whose
			// notification completingStart had left out. Waiters read the
			// command again.
			done()
			m.notify(r.ID)
		} else {
			defer done() // after finished has woken the waiters
		}
		if errors.Is(err, ErrNotFound) {
			// A repeat of an answer already recorded, or a command that is not
			// this locker's: harmless, but counted.
			m.m.dropped.WithLabelValues(string(protocol.ChanCmdResult), "unknown_or_repeated").Inc()
			return
		}
		if err != nil {
			m.log.Error("record command result", "locker", c.id, "command", r.ID, "err", err)
			return
		}
		// Observed before waiters wake, so a caller that saw the answer sees it counted.
		m.m.cmdDuration.WithLabelValues(cmd.Type).Observe(c.at.Sub(cmd.CreatedAt).Seconds())
		if cmd.LateAnswer {
			// Counted when it was ended (sweep, withdrawal): once more
			// here would count one command twice.
			m.m.lateAnswers.WithLabelValues(cmd.Type, cmd.Status).Inc()
			m.wake(cmd.ID, cmd)
			if cmd.Status == CmdOK && m.opts.CommandFinished != nil {
				m.opts.CommandFinished(ctx, cmd) // what was told of its end may be withdrawn
			}
			return
		}
		m.finished(ctx, cmd)
	case ctrlFwStatus:
		st, err := protocol.Decode[protocol.FwStatus](c.payload)
		if err != nil {
			m.dropInvalid(protocol.ChanFwStatus, c.id, err)
			return
		}
		if m.opts.Firmware == nil {
			return
		}
		// Tried again as the other reports are: a lost "failed" would
		// otherwise be noticed only by the job's step timeout, and the
		// rollout's failure threshold would count it late.
		err = m.retry(ctx, "fw_status", func(ctx context.Context) error { return m.opts.Firmware.JobStatus(ctx, c.id, st, c.at) })
		switch {
		case errors.Is(err, ErrInvalid):
			m.dropInvalid(protocol.ChanFwStatus, c.id, err)
		case err != nil:
			m.log.Error("record firmware report", "locker", c.id, "job", st.Job, "state", st.State, "err", err)
		}
	}
}

// syncDevice delivers what a locker must hold after a (re)connect: its
// retained creds, config and firmware job. Open commands follow its birth.
//
// The contract guarantees this after every (re)connect, and after a restart
// the embedded broker holds nothing retained: a failure is tried again
// (backing off, as the control shard's other writes are) until it passes
// or the manager stops, not only logged.
func (m *Manager) syncDevice(ctx context.Context, id string) {
	err := m.retry(ctx, "publish_retained", func(ctx context.Context) error { return m.PublishRetained(ctx, id) })
	switch {
	case errors.Is(err, ErrBusGone):
		m.log.Info("retained state not published: the broker has closed; it goes out when the locker next connects", "locker", id)
	case err != nil:
		m.log.Error("publish retained state", "locker", id, "err", err)
	}
}

// republishPage is how many lockers republishAll reads at a time.
const republishPage = 500

// republishAll publishes the retained state of every enabled locker
// (Options.RepublishAtStart), a page at a time, until done or ctx ends,
// logging its progress. A locker it does not reach (the gateway stopped
// first) gets its state at its next connect, as always.
func (m *Manager) republishAll(ctx context.Context) {
	start, logged := time.Now(), time.Now()
	m.log.Info("publishing every locker's retained state and configuration (their sessions outlive the restart)", "config_version", m.opts.Config.Version)
	published := 0
	for after := ""; ; {
		// Ids alone: a locker's row (its latest health, its recent
		// connects counted) is not needed here, for a whole fleet.
		var ids []string
		err := m.retry(ctx, "list_lockers", func(ctx context.Context) (err error) {
			ids, err = m.store.EnabledLockerIDs(ctx, after, republishPage)
			return err
		})
		if err != nil {
			m.log.Warn("retained state not published to every locker; the rest get it when they next connect",
				"published", published, "after", after, "err", err)
			return
		}
		if len(ids) > 0 {
			m.syncDevices(ctx, ids)
		}
		if ctx.Err() != nil {
			m.log.Info("retained state publish stopped by the shutdown; the rest get it when they next connect", "published", published)
			return
		}
		published += len(ids)
		if len(ids) < republishPage {
			break
		}
		after = ids[len(ids)-1]
		if time.Since(logged) > 10*time.Second {
			m.log.Info("publishing every locker's retained state", "published", published)
			logged = time.Now()
		}
	}
	m.log.Info("every locker's retained state published", "lockers", published, "took", time.Since(start).Round(time.Millisecond))
}

// syncDevices is syncDevice for many lockers: their retained state is read
// in one round trip per publish lock they share. A locker whose state could
// not be read or published so is synced alone (syncDevice), after.
func (m *Manager) syncDevices(ctx context.Context, ids []string) {
	if len(ids) == 1 {
		m.syncDevice(ctx, ids[0])
		return
	}
	byLock := make(map[int][]string)
	for _, id := range ids {
		i := shard(id, len(m.publishMu))
		byLock[i] = append(byLock[i], id)
	}
	var alone []string
	for _, i := range slices.Sorted(maps.Keys(byLock)) {
		alone = append(alone, m.publishRetainedGroup(ctx, i, byLock[i])...)
	}
	for _, id := range alone {
		m.syncDevice(ctx, id)
	}
}

// publishRetainedGroup publishes the retained state of ids, lockers that
// share publish lock i, and returns those it could not.
func (m *Manager) publishRetainedGroup(ctx context.Context, i int, ids []string) (failed []string) {
	unlock, err := m.lockSlot(ctx, i, ids[0])
	if err != nil {
		return ids
	}
	defer unlock()
	start := time.Now()
	rs, err := m.store.RetainedMany(ctx, ids)
	m.m.dbWrite.WithLabelValues("publish_retained").Observe(time.Since(start).Seconds())
	if err != nil {
		if ctx.Err() == nil {
			m.m.dbErrors.WithLabelValues("publish_retained").Inc()
			m.log.Warn("read retained state; reading locker by locker", "lockers", len(ids), "first", ids[0], "err", err)
		}
		return ids
	}
	published := make(map[string]int64, len(ids))
	for k, id := range ids {
		r := rs[id]
		if r == nil {
			failed = append(failed, id) // gone: syncDevice reports it
			continue
		}
		if err := m.publishState(ctx, id, r); err != nil {
			failed = append(failed, ids[k:]...)
			break
		}
		published[id] = r.Creds.Version
	}
	// Those published, also when a publish after them failed.
	if err := m.catchUpCreds(ctx, published); err != nil && !errors.Is(err, ErrBusGone) {
		// Published as read; the census finds any locker left behind.
		m.log.Warn("credential sets not checked against newer ones after publishing", "lockers", len(published), "first", ids[0], "err", err)
	}
	return failed
}

// deliverOpen sends a locker its open commands. Sent commands are sent again
// with the same id: the device runs each id once and repeats its answer, so a
// message lost around a disconnect or a gateway restart is recovered without
// a second effect.
func (m *Manager) deliverOpen(ctx context.Context, ids ...string) {
	cmds, err := m.store.OpenCommands(ctx, ids, m.now())
	if err != nil {
		m.log.Error("load open commands", "lockers", len(ids), "first", ids[0], "err", err)
		return
	}
	for i := range cmds {
		m.deliver(ctx, &cmds[i])
	}
}

// EventSink consumes new device events after they were stored.
type EventSink interface {
	// Wants reports whether event e has effects for it to apply: such
	// events are kept in the store's outbox until it has applied them, and
	// offered again after a crash or a failure.
	Wants(e *protocol.Event) bool
	// DeviceEvents applies a locker's new events, in order, and returns how
	// many it applied (or found applied already); the events after those
	// are offered again later (replayEvents). An event offered again may
	// have been applied already: applying one must be idempotent.
	DeviceEvents(ctx context.Context, events []EventRecord) int
}

// PublishCreds republishes a locker's retained credential set (after any
// change: the protocol wants it on the locker within a second).
func (m *Manager) PublishCreds(ctx context.Context, id string) error {
	// Read and publish under the locker's lock so two changes cannot
	// publish their sets in the wrong order (retained: the last one wins).
	unlock, err := m.lockLocker(ctx, id)
	if err != nil {
		return err
	}
	defer unlock()
	r, err := m.store.Retained(ctx, id)
	if err != nil {
		return err
	}
	if err := m.bus.Publish(ctx, protocol.Topic(id, protocol.ChanCreds), protocol.Encode(r.Creds), 1, true); err != nil {
		return err
	}
	return m.catchUpCreds(ctx, map[string]int64{id: r.Creds.Version})
}

// maxCredsCatchUp bounds how many newer sets catchUpCreds publishes to a
// locker after one: a locker whose set keeps changing gets the latest from
// the instance that changed it.
const maxCredsCatchUp = 3

// catchUpCreds, with SharedPublish, reads the credential-set versions of
// the lockers of published (id: the version just published to it) and
// publishes each set that is newer, reading again after each round, until
// none is. Under this instance's publish lock, another instance may have
// published a newer set between this one's read and its publish, which the
// older one then replaced at the broker (retained: the last one wins) and
// at the locker, whose ack of the newer set, stored after that of the
// older, would then read as current for good, while it holds codes since
// cancelled, used or rotated. Reading again after each publish closes that:
// the instance that publishes last has read, after it, that nothing newer
// was committed, and a set committed after that read is published by its
// committer. Past maxCredsCatchUp rounds (a set changing faster than it is
// published) it logs and leaves the rest to the committers.
func (m *Manager) catchUpCreds(ctx context.Context, published map[string]int64) error {
	if !m.opts.SharedPublish || len(published) == 0 {
		return nil
	}
	for round := 0; ; round++ {
		ids := slices.Sorted(maps.Keys(published))
		versions, err := m.store.CredsVersions(ctx, ids)
		if err != nil {
			return fmt.Errorf("read credential-set versions again after publishing them: %w", err)
		}
		moved := slices.DeleteFunc(ids, func(id string) bool { v, ok := versions[id]; return !ok || v <= published[id] })
		if len(moved) == 0 {
			return nil
		}
		if round == maxCredsCatchUp {
			m.log.Warn("credential sets still changing after catching up with them; their committers publish the newest",
				"lockers", len(moved), "first", moved[0], "rounds", round)
			return nil
		}
		rs, err := m.store.RetainedMany(ctx, moved)
		if err != nil {
			return fmt.Errorf("read newer credential sets: %w", err)
		}
		newer := make(map[string]int64, len(moved))
		for _, id := range moved {
			r := rs[id]
			if r == nil || r.Creds.Version <= published[id] {
				continue
			}
			if err := m.bus.Publish(ctx, protocol.Topic(id, protocol.ChanCreds), protocol.Encode(r.Creds), 1, true); err != nil {
				return err
			}
			m.m.credsCaughtUp.Inc()
			newer[id] = r.Creds.Version
		}
		published = newer
	}
}

// PublishRetained publishes a locker's retained creds, config and fw/job.
func (m *Manager) PublishRetained(ctx context.Context, id string) error {
	unlock, err := m.lockLocker(ctx, id)
	if err != nil {
		return err
	}
	defer unlock()
	r, err := m.store.Retained(ctx, id)
	if err != nil {
		return err
	}
	if err := m.publishState(ctx, id, r); err != nil {
		return err
	}
	return m.catchUpCreds(ctx, map[string]int64{id: r.Creds.Version})
}

// publishState publishes r, a locker's retained state, under its publish
// lock.
func (m *Manager) publishState(ctx context.Context, id string, r *Retained) error {
	// The version is the locker's (bumped in the store) or the gateway's
	// configuration's, whichever is newer: a configuration changed across
	// a restart goes out under a newer version than the one it replaces.
	r.Config.Version = max(r.Config.Version, m.opts.Config.Version)
	r.Config.HealthIntervalS = m.opts.Config.HealthIntervalS
	r.Config.DoorAjarS = m.opts.Config.DoorAjarS
	r.Config.Lockout = m.opts.Config.Lockout
	var job []byte
	if r.FwJob != nil {
		job = protocol.Encode(r.FwJob)
	}
	for _, p := range []struct {
		ch      protocol.Channel
		payload []byte
	}{
		{protocol.ChanCreds, protocol.Encode(r.Creds)},
		{protocol.ChanConfig, protocol.Encode(r.Config)},
		{protocol.ChanFwJob, job},
	} {
		if err := m.bus.Publish(ctx, protocol.Topic(id, p.ch), p.payload, 1, true); err != nil {
			return fmt.Errorf("publish %s: %w", p.ch, err)
		}
	}
	return nil
}
