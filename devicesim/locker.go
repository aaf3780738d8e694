package devicesim

import (
	"context"
	crand "crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"

	"github.com/lockergate/lockergate/protocol"
)

// Locker is one simulated locker unit.
type Locker struct {
	f      *Fleet
	index  int
	serial string
	model  Model

	kick   chan struct{} // wakes run after Disconnect/Reconnect (buffer 1)
	in     inbox         // gateway → device messages, in arrival order
	jitter *rand.Rand    // owned by run

	connected atomic.Bool // written under mu

	mu sync.Mutex
	// Connection.
	ident         Identity
	hasIdent      bool
	running       bool // run was started
	stopped       bool // fleet closed
	wantUp        bool // false while held down by Disconnect
	sess          *session
	cancelAttempt context.CancelFunc
	lastErr       error
	permErr       error
	changed       chan struct{} // closed and replaced on connection state changes
	offline       []outMsg      // events and results waiting for a connection
	// Boot.
	bootID       string
	bootAt       time.Time
	seq          int64 // health messages since boot
	eventSeq     int64
	rebootReason string
	// Device.
	comps       []*compartment
	cfg         settings
	creds       protocol.CredSet
	haveCreds   bool
	used        map[string]bool // credential ids used at the keypad
	failures    []time.Time     // rejected codes in the lockout window
	lockedUntil time.Time
	fwJob       *protocol.FwJob
	results     map[string]protocol.CommandResult // answers by command id (bounded)
	resultOrder []string
	runs        map[string]int
	decide      *rand.Rand
	sensor      *rand.Rand
	baseTempC   float64
	baseRSSI    int
}

// settings are the parts of config the locker applies.
type settings struct {
	version        int64
	healthInterval time.Duration // 0: Options.HealthInterval
	doorAjar       time.Duration
	lockout        protocol.Lockout
}

type inMsg struct {
	topic   string
	payload []byte
}

// outMsg is one publish. queue marks messages the gateway must eventually
// see (events, command results): kept while offline and resent after a failed
// delivery, at least once like QoS 1.
type outMsg struct {
	topic   string
	payload []byte
	qos     byte
	retain  bool
	queue   bool
	tries   int
}

func newLocker(f *Fleet, index int) *Locker {
	o := &f.opts
	decide := newRand(o.Seed, index, streamDecide)
	model := o.Models[decide.IntN(len(o.Models))]
	l := &Locker{
		f:         f,
		index:     index,
		serial:    serialOf(o.SerialPrefix, index),
		model:     model,
		kick:      make(chan struct{}, 1),
		in:        inbox{ready: make(chan struct{}, 1), dropped: &f.c.dropped},
		jitter:    newRand(o.Seed, index, streamJitter),
		changed:   make(chan struct{}),
		cfg:       settings{doorAjar: 120 * time.Second, lockout: protocol.DefaultLockout},
		used:      map[string]bool{},
		results:   map[string]protocol.CommandResult{},
		runs:      map[string]int{},
		decide:    decide,
		sensor:    newRand(o.Seed, index, streamSensor),
		baseTempC: 18 + 6*decide.Float64(),
		baseRSSI:  -50 - decide.IntN(35),
	}
	for _, spec := range model.Compartments {
		l.comps = append(l.comps, &compartment{spec: spec, inService: true})
	}
	if id, ok := o.Identities[l.serial]; ok && id.DeviceID != "" {
		l.ident, l.hasIdent = id, true
	}
	return l
}

// Serial returns the locker's serial number.
func (l *Locker) Serial() string { return l.serial }

// Index returns the locker's index in the seeded fleet.
func (l *Locker) Index() int { return l.index }

// Model returns the locker's model.
func (l *Locker) Model() Model { return l.model }

// DeviceID returns the device id, "" until provisioned.
func (l *Locker) DeviceID() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.ident.DeviceID
}

// Identity returns the provisioned identity; ok is false before provisioning.
func (l *Locker) Identity() (id Identity, ok bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.ident, l.hasIdent
}

// Connected reports whether the locker is connected as itself and the broker
// has acknowledged its birth.
func (l *Locker) Connected() bool { return l.connected.Load() }

// BootID returns the id of the current boot ("" before the first).
func (l *Locker) BootID() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.bootID
}

// LastError returns the last connection error, nil after a successful connect.
func (l *Locker) LastError() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.lastErr
}

// CredsVersion returns the version of the applied credential set (0 before any).
func (l *Locker) CredsVersion() int64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.creds.Version
}

// ConfigVersion returns the version of the applied config (0 before any).
func (l *Locker) ConfigVersion() int64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.cfg.version
}

// FwJob returns the stored firmware job, nil if none.
func (l *Locker) FwJob() *protocol.FwJob {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.fwJob == nil {
		return nil
	}
	j := *l.fwJob
	return &j
}

// CommandsRun returns how many times the command with id ran its effect.
func (l *Locker) CommandsRun(id string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.runs[id]
}

// Disconnect simulates abrupt network loss: the TCP connection is shut down
// without an MQTT DISCONNECT, so the broker publishes the Last Will. The
// locker stays down (the keypad keeps working, events queue) until Reconnect.
func (l *Locker) Disconnect() {
	l.mu.Lock()
	l.wantUp = false
	s := l.sess
	l.dropSessionLocked(s, false)
	cancel := l.cancelAttempt
	l.mu.Unlock()
	if cancel != nil {
		cancel()
	}
	if s != nil {
		s.abort()
	}
	l.wake()
}

// Reconnect lets a locker held down by Disconnect (or stopped by a refusal)
// connect again and waits until it is connected or ctx ends.
func (l *Locker) Reconnect(ctx context.Context) error {
	l.mu.Lock()
	if l.stopped {
		l.mu.Unlock()
		return ErrClosed
	}
	if !l.running {
		l.mu.Unlock()
		return ErrNotStarted
	}
	l.wantUp = true
	l.permErr = nil
	l.notifyLocked()
	l.mu.Unlock()
	l.wake()
	return l.waitConnected(ctx)
}

// waitConnected waits until the locker is connected as itself, has failed for
// good, or ctx ends.
func (l *Locker) waitConnected(ctx context.Context) error {
	for {
		l.mu.Lock()
		switch {
		case l.connected.Load():
			l.mu.Unlock()
			return nil
		case l.stopped:
			l.mu.Unlock()
			return ErrClosed
		case !l.running:
			l.mu.Unlock()
			return ErrNotStarted
		case l.permErr != nil:
			err := l.permErr
			l.mu.Unlock()
			return err
		case !l.wantUp:
			l.mu.Unlock()
			return ErrDisconnected
		}
		ch := l.changed
		l.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			if last := l.LastError(); last != nil {
				return fmt.Errorf("%w (last error: %v)", ctx.Err(), last)
			}
			return ctx.Err()
		}
	}
}

func (l *Locker) wake() {
	select {
	case l.kick <- struct{}{}:
	default:
	}
}

func (l *Locker) notifyLocked() {
	close(l.changed)
	l.changed = make(chan struct{})
}

// powerOn starts the first boot; called by Start before run.
func (l *Locker) powerOn() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.running, l.wantUp = true, true
	l.newBootLocked()
}

func (l *Locker) newBootLocked() {
	var b [8]byte
	_, _ = crand.Read(b[:]) // never fails (crypto/rand, Go ≥1.24)
	l.bootID = hex.EncodeToString(b[:])
	l.bootAt = l.f.now()
	l.seq, l.eventSeq = 0, 0
}

// stop ends the locker's life with the fleet: no more sends, no timers.
func (l *Locker) stop() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.stopped = true
	for _, c := range l.comps {
		c.stopTimers()
	}
	l.notifyLocked()
}

func (l *Locker) shouldConnect() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.wantUp && l.permErr == nil && !l.stopped
}

// Why serve returned.
type ending int

const (
	endLost ending = iota // connection lost, or Disconnect
	endReboot
	endStop
)

var errGoneDown = errors.New("disconnected or closed while connecting")

// A session that lasted this long resets the reconnect back-off; shorter
// ones (accepted, then kicked) keep it growing.
const stableSession = 30 * time.Second

// run is the locker's goroutine: connect (provisioning first if needed), serve
// the session, and after an unexpected loss reconnect with capped exponential
// back-off and full jitter, until the fleet closes.
func (l *Locker) run(ctx context.Context) {
	defer l.f.wg.Done()
	log := l.f.log.With("serial", l.serial)
	attempt := 0
	var delay time.Duration
	for ctx.Err() == nil {
		if !l.shouldConnect() {
			delay = 0 // Reconnect connects at once
			select {
			case <-l.kick:
				continue
			case <-ctx.Done():
				return
			}
		}
		if delay > 0 {
			t := time.NewTimer(delay)
			delay = 0
			select {
			case <-t.C:
			case <-l.kick: // Disconnect or Reconnect: decide again
				t.Stop()
				continue
			case <-ctx.Done():
				t.Stop()
				return
			}
		}
		actx, cancel := context.WithCancel(ctx)
		l.mu.Lock()
		l.cancelAttempt = cancel
		l.mu.Unlock()
		s, err := l.establish(actx)
		if err == nil {
			err = l.announce(actx, s)
		}
		l.mu.Lock()
		l.cancelAttempt = nil
		l.mu.Unlock()
		cancel()
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			if !l.shouldConnect() { // Disconnect interrupted the attempt
				continue
			}
			l.fail(err)
			if permanent(err) {
				log.Warn("locker gives up until Reconnect", "err", err)
				continue
			}
			delay = backoff(l.jitter, attempt, l.f.opts.RetryBase, l.f.opts.RetryMax)
			attempt++
			log.Debug("connect failed", "err", err, "retry_in", delay)
			continue
		}
		up := time.Now()
		switch l.serve(ctx, s) {
		case endStop:
			return
		case endReboot:
			l.mu.Lock()
			l.newBootLocked()
			l.rebootReason = "command"
			l.mu.Unlock()
			attempt = 0
		case endLost:
			if time.Since(up) >= stableSession {
				attempt = 0
			}
			delay = backoff(l.jitter, attempt, l.f.opts.RetryBase, l.f.opts.RetryMax)
			attempt++
			log.Debug("connection lost", "err", s.lostReason(), "retry_in", delay)
		}
	}
}

func (l *Locker) fail(err error) {
	l.f.c.connectFailures.Add(1)
	l.mu.Lock()
	defer l.mu.Unlock()
	l.lastErr = err
	if permanent(err) {
		l.permErr = err
	}
	l.notifyLocked()
}

// establish provisions the locker if it has no identity, then connects as
// itself and subscribes to its gateway → device topics.
func (l *Locker) establish(ctx context.Context) (*session, error) {
	id, ok := l.Identity()
	if !ok {
		var err error
		if id, err = l.provision(ctx); err != nil {
			return nil, fmt.Errorf("provision: %w", err)
		}
		l.mu.Lock()
		l.ident, l.hasIdent = id, true
		l.mu.Unlock()
		l.f.register(l, id.DeviceID)
		l.f.c.provisioned.Add(1)
		l.f.log.Debug("provisioned", "serial", l.serial, "device_id", id.DeviceID)
	}
	if err := l.f.lim.wait(ctx); err != nil {
		return nil, err
	}
	s, err := dialSession(ctx, sessionConfig{
		broker:    l.f.opts.Broker,
		tls:       l.f.opts.TLSConfig,
		clientID:  id.DeviceID,
		user:      id.DeviceID,
		password:  id.Password,
		willTopic: protocol.Topic(id.DeviceID, protocol.ChanPresence),
		will:      protocol.Encode(protocol.Presence{Online: false}),
		keepAlive: l.f.opts.KeepAlive,
		timeout:   l.f.opts.ConnectTimeout,
		onMessage: l.in.push,
	})
	if err != nil {
		return nil, fmt.Errorf("connect as %s: %w", id.DeviceID, err)
	}
	// Subscribe before the birth so whatever the gateway sends in answer to
	// the birth (retained state, pending commands) reaches this session.
	err = s.subscribe(ctx,
		protocol.Topic(id.DeviceID, protocol.ChanCmd),
		protocol.Topic(id.DeviceID, protocol.ChanCreds),
		protocol.Topic(id.DeviceID, protocol.ChanConfig),
		protocol.Topic(id.DeviceID, protocol.ChanFwJob))
	if err != nil {
		s.closeClean()
		return nil, err
	}
	return s, nil
}

// announce publishes the birth and waits for the broker to acknowledge it;
// only then is the locker connected: the reboot event and everything queued
// offline follow, in order, and anything sent meanwhile was queued behind them.
func (l *Locker) announce(ctx context.Context, s *session) error {
	l.mu.Lock()
	if !l.wantUp || l.stopped {
		l.mu.Unlock()
		l.discard(s)
		return errGoneDown
	}
	birth := protocol.Presence{Online: true, TS: wireTime(l.f.now()), FW: l.f.opts.FW, Model: l.model.Name, BootID: l.bootID}
	tok := s.cl.Publish(l.topic(protocol.ChanPresence), 1, true, protocol.Encode(birth))
	l.mu.Unlock()
	// Safe to wait: paho's dispatch goroutine never blocks on this locker.
	if err := waitToken(ctx, tok, l.f.opts.ConnectTimeout); err != nil {
		l.discard(s)
		return fmt.Errorf("birth: %w", err)
	}
	l.f.c.published.Add(1)

	l.mu.Lock()
	if !l.wantUp || l.stopped {
		l.mu.Unlock()
		l.discard(s)
		return errGoneDown
	}
	defer l.mu.Unlock()
	l.sess = s
	if l.rebootReason != "" {
		l.emitLocked(protocol.Event{Type: protocol.EventReboot, Reason: l.rebootReason})
		l.rebootReason = ""
	}
	queued := l.offline
	l.offline = nil
	for _, m := range queued {
		l.sendLocked(m)
	}
	l.lastErr = nil
	l.connected.Store(true)
	l.f.c.connected.Add(1)
	l.f.c.connects.Add(1)
	l.notifyLocked()
	return nil
}

// discard ends a session that never became the locker's: as network loss
// if Disconnect asked for it, cleanly otherwise (closing, broker too slow).
func (l *Locker) discard(s *session) {
	l.mu.Lock()
	held := !l.wantUp && !l.stopped
	l.mu.Unlock()
	if held {
		s.abort()
		return
	}
	s.closeClean()
}

// dropSessionLocked forgets s if it is the current session.
func (l *Locker) dropSessionLocked(s *session, lost bool) {
	if s == nil || l.sess != s {
		return
	}
	l.sess = nil
	if l.connected.Swap(false) {
		l.f.c.connected.Add(-1)
	}
	if lost && l.wantUp && !l.stopped {
		l.f.c.connectionsLost.Add(1)
	}
	l.notifyLocked()
}

// serve runs one session until it ends.
func (l *Locker) serve(ctx context.Context, s *session) ending {
	health := time.NewTimer(0) // the first health right after connecting
	defer health.Stop()
	if l.healthInterval() < 0 {
		health.Stop()
	}
	for {
		select {
		case <-ctx.Done():
			l.mu.Lock()
			l.dropSessionLocked(s, false)
			l.mu.Unlock()
			s.closeClean()
			return endStop
		case <-s.lost:
			l.mu.Lock()
			l.dropSessionLocked(s, true)
			l.mu.Unlock()
			return endLost
		case <-l.in.ready:
			msgs := l.in.take()
			for i, m := range msgs {
				switch l.handle(m) {
				case actReboot:
					l.in.unshift(msgs[i+1:]) // handled after the reboot
					l.mu.Lock()
					l.dropSessionLocked(s, false)
					l.mu.Unlock()
					s.closeClean()
					return endReboot
				case actRescheduleHealth:
					health.Stop()
					if d := l.healthInterval(); d >= 0 {
						health.Reset(d)
					}
				}
			}
		case <-health.C:
			l.sendHealth()
			if d := l.healthInterval(); d >= 0 {
				health.Reset(d)
			}
		}
	}
}

// inbox queues gateway → device messages for the locker's goroutine. push
// never blocks, so paho's dispatch goroutine (and with it PUBACKs and
// PINGRESPs) never waits for the locker.
type inbox struct {
	mu      sync.Mutex
	q       []inMsg
	ready   chan struct{} // buffer 1: something is queued
	dropped *atomic.Uint64
}

// maxInbox bounds a locker's unprocessed messages; beyond it they are dropped
// and counted.
const maxInbox = 4096

func (b *inbox) push(topic string, payload []byte) {
	b.mu.Lock()
	if len(b.q) >= maxInbox {
		b.mu.Unlock()
		b.dropped.Add(1)
		return
	}
	b.q = append(b.q, inMsg{topic: topic, payload: payload})
	b.mu.Unlock()
	select {
	case b.ready <- struct{}{}:
	default:
	}
}

func (b *inbox) take() []inMsg {
	b.mu.Lock()
	defer b.mu.Unlock()
	q := b.q
	b.q = nil
	return q
}

// unshift puts msgs back in front of anything queued since.
func (b *inbox) unshift(msgs []inMsg) {
	if len(msgs) == 0 {
		return
	}
	b.mu.Lock()
	b.q = append(append([]inMsg(nil), msgs...), b.q...)
	b.mu.Unlock()
	select {
	case b.ready <- struct{}{}:
	default:
	}
}

func (l *Locker) topic(c protocol.Channel) string { return protocol.Topic(l.ident.DeviceID, c) }

// emitLocked publishes a device event, minting its id.
func (l *Locker) emitLocked(e protocol.Event) {
	l.eventSeq++
	e.ID = fmt.Sprintf("e-%s-%d", l.bootID, l.eventSeq)
	e.TS = wireTime(l.f.now())
	l.sendLocked(outMsg{topic: l.topic(protocol.ChanEvents), payload: protocol.Encode(e), qos: 1, queue: true})
}

// sendLocked hands m to paho, or queues it while offline. Holding mu keeps
// the order of messages equal to the order of state changes; paho's Publish
// returns once its writer took the packet (at most writeTimeout).
func (l *Locker) sendLocked(m outMsg) {
	if l.stopped {
		return
	}
	if l.sess == nil {
		if m.queue {
			l.enqueueLocked(m)
		}
		return
	}
	s := l.sess
	tok := s.cl.Publish(m.topic, m.qos, m.retain, m.payload)
	l.f.watch(tok, func(err error) {
		l.f.log.Debug("publish failed", "serial", l.serial, "topic", m.topic, "err", err)
		l.sendFailed(s, m, err)
	})
}

func (l *Locker) enqueueLocked(m outMsg) {
	if len(l.offline) >= l.f.opts.OfflineQueue {
		l.offline = l.offline[1:]
		l.f.c.dropped.Add(1)
	}
	l.offline = append(l.offline, m)
}

// sendFailed resends a message the gateway must see: now on a newer session,
// or when the next one comes up.
func (l *Locker) sendFailed(failed *session, m outMsg, err error) {
	if !m.queue {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.stopped {
		return
	}
	m.tries++
	if m.tries > maxSendRetries {
		l.f.c.dropped.Add(1)
		l.f.log.Debug("giving up on message", "serial", l.serial, "topic", m.topic, "err", err)
		return
	}
	if l.sess != nil && l.sess != failed {
		l.sendLocked(m)
		return
	}
	l.enqueueLocked(m)
}

// watch counts the outcome of a publish without blocking the caller; onErr
// runs if it fails while the fleet is open.
func (f *Fleet) watch(tok mqtt.Token, onErr func(error)) {
	f.tokens.Add(1)
	go func() {
		defer f.tokens.Done()
		t := time.NewTimer(ackTimeout)
		defer t.Stop()
		var err error
		select {
		case <-tok.Done():
			if err = tok.Error(); err == nil {
				f.c.published.Add(1)
				return
			}
		case <-t.C:
			err = errors.New("no acknowledgement")
		case <-f.stopping:
			return
		}
		if f.closing.Load() {
			return
		}
		f.c.publishErrors.Add(1)
		onErr(err)
	}()
}

func wireTime(t time.Time) protocol.Time { return protocol.T(t.Truncate(time.Millisecond)) }
