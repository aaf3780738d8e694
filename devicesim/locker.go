package devicesim

import (
	"context"
	crand "crypto/rand"
	"encoding/hex"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"time"

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

	x  lockerSim // scenario: site, clock skew, faults (fault.go)
	fw fwState   // firmware updater (firmware.go)
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
	model := f.pickModel(index, decide)
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

// Model returns the locker's model (a copy: the layout is fixed hardware).
func (l *Locker) Model() Model {
	return Model{Name: l.model.Name, Compartments: slices.Clone(l.model.Compartments)}
}

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

// HasCredential reports whether the applied credential set holds
// credential id: an entry with that id, or one of its forms (the gateway
// sends a pickup's code as id.p and id.q, a PIN and a QR entry).
func (l *Locker) HasCredential(id string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.ContainsFunc(l.creds.Creds, func(c protocol.Credential) bool {
		return c.ID == id || (len(c.ID) > len(id) && c.ID[len(id)] == '.' && c.ID[:len(id)] == id)
	})
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
