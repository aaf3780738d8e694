package devicesim

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"
)

// Fleet runs many simulated lockers against one broker.
type Fleet struct {
	opts    Options
	log     *slog.Logger
	lim     *limiter
	now     func() time.Time
	place   *placement
	lockers []*Locker
	c       counters

	mu      sync.Mutex
	byID    map[string]*Locker
	started bool
	closed  bool
	cancel  context.CancelFunc
	// Scenario time (fault.go).
	epoch        time.Time // when Start began: scenario time 0
	restarts     []GatewayRestart
	restartNext  int
	restartTimer *time.Timer
	hooks        sync.WaitGroup // GatewayRestart calls

	closing   atomic.Bool    // set first thing in Close: failures after it are not errors
	wg        sync.WaitGroup // locker goroutines
	tokens    sync.WaitGroup // publish watchers
	stopping  chan struct{}
	closeOnce sync.Once
}

// NewFleet checks opts and builds the lockers; nothing connects before Start.
func NewFleet(opts Options) (*Fleet, error) {
	opts.setDefaults()
	if err := opts.validate(); err != nil {
		return nil, err
	}
	f := &Fleet{
		opts:     opts,
		log:      opts.Logger,
		lim:      newLimiter(opts.ConnectRate),
		now:      time.Now,
		place:    newPlacement(&opts),
		byID:     map[string]*Locker{},
		stopping: make(chan struct{}),
	}
	f.lockers = make([]*Locker, opts.Lockers)
	needClaim := 0
	for i := range f.lockers {
		l := newLocker(f, opts.FirstIndex+i)
		l.setupSim(f.place.sites[f.place.site(i)])
		f.lockers[i] = l
		if l.hasIdent {
			f.byID[l.ident.DeviceID] = l
		} else if l.claimToken() == "" {
			needClaim++
		}
	}
	if needClaim > 0 {
		return nil, fmt.Errorf("devicesim: options: %d lockers have no identity and there is no claim token for them", needClaim)
	}
	return f, nil
}

// Options returns the options in effect (defaults applied).
func (f *Fleet) Options() Options { return f.opts }

// Start provisions (where needed) and connects every locker, at most
// ConnectRate new connections per second. It returns when all are connected
// as themselves, or when ctx ends, with a *StartError naming how many failed
// and why. Lockers live on after Start returns, until Close; ctx only bounds
// the wait.
func (f *Fleet) Start(ctx context.Context) error {
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		return ErrClosed
	}
	if f.started {
		f.mu.Unlock()
		return errors.New("devicesim: fleet already started")
	}
	f.started = true
	rctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	f.cancel = cancel
	f.epoch = time.Now()
	f.wg.Add(len(f.lockers))
	for _, l := range f.lockers {
		l.powerOn()
		go l.run(rctx)
		l.armFaults()
	}
	f.armRestartsLocked(rctx)
	f.mu.Unlock()

	begin := time.Now()
	failed := map[string]error{}
	for _, l := range f.lockers {
		if err := l.waitConnected(ctx); err != nil {
			failed[l.serial] = err
		}
	}
	if len(failed) > 0 {
		return &StartError{Total: len(f.lockers), Failed: failed}
	}
	f.log.Info("fleet connected", "lockers", len(f.lockers), "took", time.Since(begin).Round(time.Millisecond))
	return nil
}

// Lockers returns the lockers in index order.
func (f *Fleet) Lockers() []*Locker { return append([]*Locker(nil), f.lockers...) }

// Locker returns the locker with deviceID, nil if unknown.
func (f *Fleet) Locker(deviceID string) *Locker {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.byID[deviceID]
}

func (f *Fleet) register(l *Locker, deviceID string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.byID[deviceID] = l
}

// Stats returns the fleet's counters.
func (f *Fleet) Stats() Stats { return f.c.snapshot(len(f.lockers)) }

// Close disconnects every locker cleanly (DISCONNECT, so no Last Will) and
// stops all goroutines before it returns. It is idempotent.
func (f *Fleet) Close() {
	f.closeOnce.Do(func() {
		f.closing.Store(true)
		f.mu.Lock()
		f.closed = true
		cancel := f.cancel
		if f.restartTimer != nil {
			f.restartTimer.Stop()
		}
		f.mu.Unlock()
		for _, l := range f.lockers {
			l.stop()
			l.stopSim()
		}
		if cancel != nil {
			cancel()
		}
		f.hooks.Wait()
		f.wg.Wait()
		close(f.stopping)
		f.tokens.Wait()
	})
}
