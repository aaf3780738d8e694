package firmware

import (
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/protocol"
)

// Options configure an Engine.
type Options struct {
	Store Store
	Fleet Fleet
	// Key signs images (the gateway's Ed25519 firmware key).
	Key ed25519.PrivateKey
	// URLKey signs download URLs (see DeriveURLKey).
	URLKey []byte
	// BaseURL returns the gateway's HTTP base URL as lockers reach it,
	// e.g. https://gw.example; called when a job is handed out.
	BaseURL func() string
	// Dir holds the images (DataDir/firmware).
	Dir string
	// MaxImageSize bounds an upload. Default DefaultMaxImageSize.
	MaxImageSize int64
	// MaxUploads bounds the uploads in progress at once (each streams up
	// to MaxImageSize to disk); one more is refused with ErrUploadsBusy.
	// Default DefaultMaxUploads.
	MaxUploads int
	// URLTTL is how long a job's download URL stays valid. Default 48h.
	// A handed-out job's URL is signed afresh when less than half of it is
	// left (and its locker's fw/job republished), so a locker never holds
	// or gets an expired one while the engine runs.
	URLTTL time.Duration
	// Tick is how often rollouts are stepped (hand-out, waves, timeouts);
	// reports that may change a wave wake the engine at once. Default 100ms.
	Tick time.Duration
	// GaugeInterval is how often the gauges are refreshed. Default 2s.
	GaugeInterval time.Duration
	Registerer    prometheus.Registerer
	Logger        *slog.Logger
	// Now is the clock; default time.Now.
	Now func() time.Time
}

// Engine runs rollouts. It implements fleet.FirmwareTracker.
type Engine struct {
	store Store
	fleet Fleet
	opts  Options
	log   *slog.Logger
	m     *metrics
	now   func() time.Time
	wake  chan struct{}

	artifacts sync.Map // id → *Artifact; artifacts never change
	zones     sync.Map // name → *time.Location

	// uploads holds a token per upload in progress (MaxUploads).
	uploads chan struct{}

	// dirty is set when something may let a rollout move (a job finished,
	// a locker came back, a job went out); a clean engine steps rollouts
	// once a second only. lastStep, lastSweep and lastRefresh belong to Tick.
	dirty                            atomic.Bool
	lastStep, lastSweep, lastRefresh time.Time

	errMu      sync.Mutex
	lastErrLog map[string]time.Time

	gates pendingGates
}

var _ fleet.FirmwareTracker = (*Engine)(nil)

// pendingGates counts, per rollout, the failures this instance recorded
// whose gate check (checkGate, a second transaction) has not run yet: a
// resume waits for them, so that it is not refused for a crossing about
// to be shown (Resume).
type pendingGates struct {
	mu   sync.Mutex
	n    map[string]int
	zero map[string]chan struct{} // closed when the rollout's count is back at 0
}

// add counts one failure of rollout id on its way to its gate check; done
// uncounts it.
func (p *pendingGates) add(id string) (done func()) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.n == nil {
		p.n, p.zero = map[string]int{}, map[string]chan struct{}{}
	}
	if p.n[id] == 0 {
		p.zero[id] = make(chan struct{})
	}
	p.n[id]++
	var once sync.Once
	return func() {
		once.Do(func() {
			p.mu.Lock()
			defer p.mu.Unlock()
			if p.n[id]--; p.n[id] == 0 {
				close(p.zero[id])
				delete(p.n, id)
				delete(p.zero, id)
			}
		})
	}
}

// pending reports whether rollout id has a failure on its way to its gate
// check.
func (p *pendingGates) pending(id string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.n[id] > 0
}

// wait waits until rollout id has no failure on its way to its gate check,
// for at most d (a check stuck on the database must not hold a resume).
func (p *pendingGates) wait(ctx context.Context, id string, d time.Duration) {
	p.mu.Lock()
	ch := p.zero[id]
	p.mu.Unlock()
	if ch == nil {
		return
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ch:
	case <-t.C:
	case <-ctx.Done():
	}
}

// New returns an Engine; call Run to start it.
func New(o Options) (*Engine, error) {
	if o.Store == nil || o.Fleet == nil {
		return nil, errors.New("firmware: Store and Fleet are required")
	}
	if len(o.Key) != ed25519.PrivateKeySize || len(o.URLKey) < 16 || o.Dir == "" {
		return nil, errors.New("firmware: Key, URLKey and Dir are required")
	}
	if o.MaxImageSize <= 0 {
		o.MaxImageSize = DefaultMaxImageSize
	}
	if o.MaxUploads <= 0 {
		o.MaxUploads = DefaultMaxUploads
	}
	if o.URLTTL <= 0 {
		o.URLTTL = 48 * time.Hour
	}
	if o.Tick <= 0 {
		o.Tick = 100 * time.Millisecond
	}
	if o.GaugeInterval <= 0 {
		o.GaugeInterval = 2 * time.Second
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	return &Engine{store: o.Store, fleet: o.Fleet, opts: o, log: o.Logger, m: newMetrics(o.Registerer), now: o.Now,
		wake: make(chan struct{}, 1), uploads: make(chan struct{}, o.MaxUploads), lastErrLog: map[string]time.Time{}}, nil
}

// Run steps rollouts until ctx ends. On start it removes what uploads cut
// short by a crash left in the firmware directory, renews the payloads
// that expired while the gateway was down, and re-publishes jobs that were
// handed out but not reported on: a crash between recording a job as sent
// and publishing it must not leave a locker without it (lockers ignore a
// job id they already run).
func (e *Engine) Run(ctx context.Context) error {
	e.removeLeftovers()
	tidy := time.NewTicker(leftoverIdle)
	defer tidy.Stop()
	e.lastRefresh = e.now()
	if e.refresh(ctx, e.lastRefresh) {
		e.lastRefresh = e.lastRefresh.Add(idleEvery - refreshEvery) // more are due
	}
	ids, err := e.store.SentDevices(ctx)
	if err != nil {
		e.fail("republish", err)
	}
	for _, id := range ids {
		e.publish(ctx, id)
	}
	tick := time.NewTicker(e.opts.Tick)
	defer tick.Stop()
	gauges := time.NewTicker(e.opts.GaugeInterval)
	defer gauges.Stop()
	e.refreshGauges(ctx)
	for {
		e.Tick(ctx)
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		case <-e.wake:
		case <-gauges.C:
			e.refreshGauges(ctx)
		case <-tidy.C:
			e.removeLeftovers()
		}
	}
}

// idleEvery is how often rollouts are stepped and jobs swept when nothing
// in this process signalled a change (another gateway instance's reports
// are noticed at this pace).
const idleEvery = time.Second

// refreshEvery is how often handed-out jobs are checked for a payload due
// for renewal (URL half expired, install window closed); refreshBatch
// bounds the renewals of one pass (each is an update and a republish of the
// locker's retained state), and a full pass is followed by the next one a
// second later. A wave handed out at once falls due at once a day later.
const (
	refreshEvery = 10 * time.Second
	refreshBatch = 500
)

// Tick times out overdue jobs (once a second), renews payloads (every
// refreshEvery) and steps every running and paused rollout (a paused one
// ends at its deadline, and shows the gates crossed while it is paused):
// at once after a change, else once a second. Run calls it.
func (e *Engine) Tick(ctx context.Context) {
	now := e.now()
	if now.Sub(e.lastSweep) >= idleEvery {
		e.lastSweep = now
		e.sweep(ctx, now)
	}
	if now.Sub(e.lastRefresh) >= refreshEvery {
		e.lastRefresh = now
		if e.refresh(ctx, now) {
			e.lastRefresh = now.Add(idleEvery - refreshEvery) // more are due
		}
	}
	if !e.dirty.Swap(false) && now.Sub(e.lastStep) < idleEvery {
		return
	}
	e.lastStep = now
	ids, err := e.store.LiveRollouts(ctx)
	if err != nil {
		if ctx.Err() == nil {
			e.fail("list_rollouts", err)
		}
		return
	}
	for _, id := range ids {
		more, err := e.step(ctx, id)
		if err != nil && ctx.Err() == nil {
			e.fail("step", fmt.Errorf("rollout %s: %w", id, err))
		}
		if more {
			e.dirty.Store(true)
		}
	}
}

// kick marks the engine dirty and wakes Run for an early step.
func (e *Engine) kick() {
	e.dirty.Store(true)
	select {
	case e.wake <- struct{}{}:
	default:
	}
}

// fail counts an error and logs it, at most every 5 s per operation so a
// database outage does not flood the log at the tick rate.
func (e *Engine) fail(op string, err error) {
	e.m.errors.WithLabelValues(op).Inc()
	e.errMu.Lock()
	last := e.lastErrLog[op]
	now := time.Now()
	quiet := now.Sub(last) < 5*time.Second
	if !quiet {
		e.lastErrLog[op] = now
	}
	e.errMu.Unlock()
	if !quiet {
		e.log.Error("firmware engine", "op", op, "err", err)
	}
}

func (e *Engine) refreshGauges(ctx context.Context) {
	g, err := e.store.Gauges(ctx)
	if err != nil {
		if ctx.Err() == nil {
			e.fail("gauges", err)
		}
		return
	}
	e.m.set(g)
}

// publish re-publishes a locker's retained state so its fw/job follows the
// job's new state (a new job, or none).
func (e *Engine) publish(ctx context.Context, id string) {
	if err := e.fleet.PublishRetained(ctx, id); err != nil && ctx.Err() == nil {
		// The locker gets it on its next connect (retained state is
		// re-published then), so this is not lost, only late.
		e.fail("publish", fmt.Errorf("locker %s: %w", id, err))
	}
}

func (e *Engine) audit(ctx context.Context, entries ...fleet.AuditEntry) {
	for _, a := range entries {
		if a.Actor == "" {
			a.Actor = "system"
		}
		if err := e.store.Audit(ctx, a); err != nil {
			e.fail("audit", err)
		}
	}
}

// jobID names attempt of the job at seq in rollout: readable, unique, and
// within the protocol's 64-byte id alphabet.
func jobID(rollout string, seq, attempt int) string {
	return rollout + "." + strconv.Itoa(seq) + "." + strconv.Itoa(attempt)
}

func (e *Engine) artifact(ctx context.Context, id string) (*Artifact, error) {
	if a, ok := e.artifacts.Load(id); ok {
		return a.(*Artifact), nil
	}
	a, err := e.store.GetArtifact(ctx, id)
	if err != nil {
		return nil, err
	}
	e.artifacts.Store(id, a)
	return a, nil
}

func (e *Engine) zone(name string) *time.Location {
	if l, ok := e.zones.Load(name); ok {
		return l.(*time.Location)
	}
	loc := fleet.SiteLocation(name)
	e.zones.Store(name, loc)
	return loc
}

// DefaultJobDeadline is the deadline a job of a rollout without one gets,
// from when it is handed out: protocol-v1's job always has a deadline, and
// one this far off leaves the gateway's step timeouts to judge a job that
// stalls.
const DefaultJobDeadline = 30 * 24 * time.Hour

// payload builds the fw/job a locker receives for j, with a download URL
// signed for this job, and says when it must be renewed.
func (e *Engine) payload(ctx context.Context, r *Rollout, j *Job, now time.Time) (*protocol.FwJob, time.Time, error) {
	a, err := e.artifact(ctx, r.Firmware)
	if err != nil {
		return nil, time.Time{}, err
	}
	fj := &protocol.FwJob{Job: j.JobID, Version: a.Version, Size: a.Size, SHA256: a.SHA256, Sig: a.Sig,
		Deadline: protocol.T(now.Add(DefaultJobDeadline))}
	if r.Deadline != nil {
		fj.Deadline = protocol.T(*r.Deadline)
	}
	if r.Force {
		from := j.FromFW
		if j.LockerFW != "" {
			from = j.LockerFW // what it runs now
		}
		if c, err := CompareVersions(from, a.Version); err != nil || c > 0 {
			fj.Downgrade = true
		}
	}
	next, err := e.renew(fj, r, j, now)
	return fj, next, err
}

// renew signs fj's download URL afresh and sets its install window to the
// occurrence open at now or the next one; everything else, the job id
// included, stays. It returns when fj must be renewed again: when half of
// the URL's validity is left, or when the window closes.
func (e *Engine) renew(fj *protocol.FwJob, r *Rollout, j *Job, now time.Time) (time.Time, error) {
	fj.URL = e.DownloadURL(r.Firmware, j.JobID, now.Add(e.opts.URLTTL))
	next := now.Add(e.opts.URLTTL / 2)
	if r.Window != "" {
		w, err := ParseWindow(r.Window)
		if err != nil {
			return time.Time{}, err
		}
		open, close := w.Next(now, e.zone(j.TZ))
		fj.InstallAfter, fj.InstallBefore = protocol.T(open), protocol.T(close)
		if close.Before(next) {
			next = close
		}
	}
	return next.UTC(), nil
}

// refresh renews the payloads of handed-out jobs that are due (a URL half
// expired, an install window closed) and republishes their lockers'
// retained state, so that the broker's retained fw/job, and what a locker
// gets on its next connect, carry a valid URL and the window's next times.
// A locker running the job ignores the repeat of its id. It reports
// whether the pass was full (more may be due).
func (e *Engine) refresh(ctx context.Context, now time.Time) (full bool) {
	due, err := e.store.Refreshable(ctx, now, refreshBatch)
	if err != nil {
		if ctx.Err() == nil {
			e.fail("refresh", err)
		}
		return false
	}
	var renewed []Job
	for _, s := range due {
		fj := *s.Payload
		next, err := e.renew(&fj, s.Rollout, &s.Job, now)
		if err != nil {
			e.fail("refresh", fmt.Errorf("job %s: %w", s.Job.JobID, err))
			continue
		}
		ok, err := e.store.RefreshPayload(ctx, s.Job.DeviceID, s.Job.JobID, &fj, next)
		if err != nil {
			e.fail("refresh", err)
			continue
		}
		if ok {
			renewed = append(renewed, s.Job)
		}
	}
	e.publishJobs(ctx, renewed)
	return len(due) == refreshBatch
}

// handOut checks a job again as it is about to go out, against its locker
// as it is now: a locker disabled or of another model since the rollout was
// created does not get it, and one that runs the version already has what
// the job would give it. Such a job ends (final state and error set on j,
// true returned) instead of going out; none of these counts as a failure.
func handOut(r *Rollout, j *Job) (ended bool) {
	switch {
	case j.LockerDisabled:
		j.State, j.Error = StateSkipped, SkipDisabled
	case j.LockerModel != r.Model:
		j.State, j.Error = StateSkipped, SkipModelChanged
	case SameVersion(j.LockerFW, r.Version):
		// A retry of a job handed out before: the earlier attempt
		// installed after all (a birth the engine missed, or one that came
		// after the step timeout). Otherwise the locker was updated by
		// other means while the job waited.
		j.State, j.Error = StateSkipped, SkipUpToDate
		if j.Attempt > 1 {
			j.State, j.Error = StateSucceeded, ""
		}
	case !r.Force && newer(j.LockerFW, r.Version):
		j.State, j.Error = StateSkipped, SkipDowngrade // it would refuse it
	default:
		return false
	}
	return true
}

// newer reports whether version a is newer than b (false when either does
// not parse).
func newer(a, b string) bool {
	c, err := CompareVersions(a, b)
	return err == nil && c > 0
}

// waves tallies counts per wave.
type waves []map[string]int

// acceptedKey counts, in a wave's tally, its failures a resume accepted
// (counted in their states too).
const acceptedKey = "gate_accepted"

func tally(counts []Count, n int) (w waves, all map[string]int) {
	w = make(waves, n)
	for i := range w {
		w[i] = map[string]int{}
	}
	all = map[string]int{}
	for _, c := range counts {
		if c.Wave >= 0 && c.Wave < n {
			w[c.Wave][c.State] += c.N
			if c.Accepted && IsFailure(c.State) {
				w[c.Wave][acceptedKey] += c.N
			}
		}
		all[c.State] += c.N
	}
	return w, all
}

// gated is the number of wave i's failures its gate counts: those no
// resume accepted.
func gated(w waves, i int) int {
	return sumStates(w[i], FailureStates) - w[i][acceptedKey]
}

func sumStates(m map[string]int, states []string) int {
	n := 0
	for _, s := range states {
		n += m[s]
	}
	return n
}

// waveSize is the number of a wave's jobs that count: its size less those
// skipped when they were about to go out (their locker changed since the
// rollout was created: see handOut).
func waveSize(r *Rollout, w waves, i int) int {
	return r.WaveSizes[i] - w[i][StateSkipped]
}

// gateReason is the reason of a stop for wave's failures (failed: those
// its gate counts; accepted: those a resume accepted before).
func gateReason(r *Rollout, wave, failed, accepted, size int) string {
	reason := fmt.Sprintf("%s%d of %d jobs failed (%.1f%%)", gatePrefix(wave), failed, size, float64(failed)*100/float64(size))
	if accepted > 0 {
		reason += fmt.Sprintf(" beyond the %d a resume accepted", accepted)
	}
	return reason + fmt.Sprintf(", over max_failure_pct %g", r.MaxFailurePct)
}

// waveGate judges wave's gate by the tally w: the failures it counts,
// whether they crossed it, and its reason.
func waveGate(r *Rollout, w waves, wave int) (gate string, failed int, crossed bool) {
	failed, size := gated(w, wave), waveSize(r, w, wave)
	return gateReason(r, wave, failed, w[wave][acceptedKey], size), failed, Crossed(failed, size, r.MaxFailurePct)
}

// gatePrefix starts the reason of every stop by a wave's gate.
func gatePrefix(wave int) string { return fmt.Sprintf("wave %d: ", wave+1) }

// A stopped rollout's reason names the crossings it shows, one gate
// reason per wave, joined by "; ", then, for one an operator paused,
// " while paused by …": withGate and shownGate read and write it.

// splitReason splits reason into its gate reasons and the rest.
func splitReason(reason string) (gates []string, rest string) {
	if !strings.HasPrefix(reason, "wave ") {
		return nil, reason
	}
	head := reason
	if i := strings.Index(reason, " while "); i >= 0 {
		head, rest = reason[:i], reason[i:]
	}
	return strings.Split(head, "; "), rest
}

// shownGate returns the gate reason of wave that reason shows ("" none).
func shownGate(reason string, wave int) string {
	gates, _ := splitReason(reason)
	for _, g := range gates {
		if strings.HasPrefix(g, gatePrefix(wave)) {
			return g
		}
	}
	return ""
}

// withGate returns reason showing gate, wave's gate reason, in place of
// the one it showed for wave before, or first.
func withGate(reason string, wave int, gate string) string {
	gates, rest := splitReason(reason)
	if gates == nil {
		if reason == "" {
			return gate
		}
		return gate + " while " + reason
	}
	for k, g := range gates {
		if strings.HasPrefix(g, gatePrefix(wave)) {
			gates[k] = gate
			return strings.Join(gates, "; ") + rest
		}
	}
	return strings.Join(append([]string{gate}, gates...), "; ") + rest
}

// onCrossing stops rollout r when its wave crossed its gate by the tally w:
// a running one pauses or aborts (its failure action); a paused one (by an
// operator, or by a gate) is aborted when that is its failure action, or
// else stays paused with the wave's gate reason shown as the counts are
// now, so that whoever resumes it sees the failures they accept. changed:
// r changed (save it); false when the wave did not cross.
func (e *Engine) onCrossing(ctx context.Context, tx StepTx, r *Rollout, w waves, wave int, now time.Time) (cancelled []Job, note fleet.AuditEntry, changed bool, err error) {
	gate, _, crossed := waveGate(r, w, wave)
	if !crossed {
		return nil, fleet.AuditEntry{}, false, nil
	}
	switch {
	case r.Status == Running:
		cancelled, note, err = e.stop(ctx, tx, r, gate, now)
		return cancelled, note, true, err
	case r.Status == Paused && r.FailureAction == ActionAbort:
		cancelled, note, err = e.stop(ctx, tx, r, withGate(r.Reason, wave, gate), now)
		return cancelled, note, true, err
	case r.Status == Paused && shownGate(r.Reason, wave) != gate:
		// Shown with the counts as they are now: a resume accepts what
		// the status says, no more (Resume).
		r.Reason = withGate(r.Reason, wave, gate)
		return nil, fleet.AuditEntry{Action: gateRecorded, Detail: map[string]any{"rollout": r.ID, "reason": r.Reason}}, true, nil
	}
	return nil, fleet.AuditEntry{}, false, nil
}

// gateRecorded is the audit action of a crossing recorded on a paused
// rollout (onCrossing): nothing stopped.
const gateRecorded = "rollout.gate"

// stop pauses or aborts a running rollout (by its failure action), or
// aborts a paused one whose failure action that is; an abort
// withdraws queued and pending jobs like a cancel.
func (e *Engine) stop(ctx context.Context, tx StepTx, r *Rollout, reason string, now time.Time) ([]Job, fleet.AuditEntry, error) {
	r.Reason = reason
	note := fleet.AuditEntry{Action: "rollout.pause", Detail: map[string]any{"rollout": r.ID, "reason": reason}}
	if r.FailureAction != ActionAbort {
		r.Status = Paused
		return nil, note, nil
	}
	r.Status, r.FinishedAt = Aborted, &now
	note.Action = "rollout.abort"
	cancelled, err := tx.Cancel(ctx, append([]string{StateQueued}, PendingStates...), now)
	return cancelled, note, err
}

// step advances one running rollout: gates, deadline, waves, hand-out and
// completion, under the rollout's row lock; of a paused one, it shows the
// gates crossed and ends it at its deadline. Locker notifications follow the
// commit. more reports whether the next tick should step it again (jobs
// went out, or wait for the rate limit).
func (e *Engine) step(ctx context.Context, id string) (more bool, err error) {
	var sent, settled, cancelled []Job
	var notes []fleet.AuditEntry
	var crossedAt time.Time
	err = e.store.Step(ctx, id, func(tx StepTx) error {
		sent, settled, cancelled, notes, crossedAt, more = nil, nil, nil, nil, time.Time{}, false
		r := tx.Rollout()
		if r.Status != Running && r.Status != Paused {
			return nil
		}
		before := *r
		counts, err := tx.Counts(ctx)
		if err != nil {
			return err
		}
		// Read the clock after the counts, so that what they include
		// happened before the times this step records.
		now := e.now().UTC()
		w, all := tally(counts, len(r.WaveSizes))
		last := len(r.WaveSizes) - 1

		// Gates are checked on every failure as it arrives; this catches
		// a failure this step saw first (or a wave that shrank: a locker
		// disabled, its job skipped). A running rollout stops at the first
		// wave crossed; a paused one shows every crossing as it is now.
		if !r.pastDeadline(now) {
			for i := r.GateFrom; i <= r.Wave && i < len(w); i++ {
				wasRunning := r.Status == Running
				c, note, changed, err := e.onCrossing(ctx, tx, r, w, i, now)
				if err != nil {
					return err
				}
				if !changed {
					continue
				}
				cancelled, notes = append(cancelled, c...), append(notes, note)
				if wasRunning { // a stop: the gate's latency
					crossedAt = lastFailure(counts, i)
				}
				if r.Status != Paused || wasRunning {
					break
				}
			}
			if len(notes) > 0 {
				return tx.Save(ctx)
			}
		}
		if r.Status == Paused && !r.pastDeadline(now) {
			return nil // a paused rollout moves only to end at its deadline
		}
		unfinished := all[StateQueued] + sumStates(all, ActiveStates)
		if r.pastDeadline(now) {
			// The sweep times out what is left, queued jobs too; once
			// nothing is left the rollout ends. A step can come first (the
			// sweep runs once a second, a step at any change): a rollout
			// ended then would keep its queued jobs queued for good, and
			// read "completed" although they never ran.
			if unfinished > 0 {
				return nil
			}
			// A paused rollout ends too: its deadline is when it stops
			// trying, whoever paused it.
			paused := r.Status == Paused
			r.FinishedAt = &now
			r.Status = Completed
			if n := all[StateTimedOut]; n > 0 {
				reason := fmt.Sprintf("deadline passed with %d jobs timed out", n)
				if paused && r.Reason != "" {
					reason += " (paused: " + r.Reason + ")"
				}
				r.Status, r.Reason = Aborted, reason
			}
			notes = append(notes, fleet.AuditEntry{Action: "rollout." + r.Status, Detail: map[string]any{"rollout": r.ID, "reason": r.Reason}})
			return tx.Save(ctx)
		}

		for r.Wave < last {
			done, err := e.waveDone(ctx, tx, r, w[r.Wave])
			if err != nil {
				return err
			}
			if !done {
				break
			}
			r.Wave++
			notes = append(notes, fleet.AuditEntry{Action: "rollout.wave", Detail: map[string]any{
				"rollout": r.ID, "wave": r.Wave + 1, "size": r.WaveSizes[r.Wave]}})
		}

		rt := newRate(r.RatePerMin, e.opts.Tick)
		if n := rt.budget(r.TAT, now); n > 0 && all[StateQueued] > 0 {
			taken, err := tx.Dispatch(ctx, r.Wave, n, now, func(j *Job) (*protocol.FwJob, error) {
				if handOut(r, j) {
					return nil, nil
				}
				p, next, err := e.payload(ctx, r, j, now)
				j.RefreshAt = &next
				return p, err
			})
			if err != nil {
				return err
			}
			for _, j := range taken {
				if j.State == StateSent {
					sent = append(sent, j)
				} else {
					settled = append(settled, j)
				}
			}
			r.TAT = rt.take(r.TAT, now, len(sent))
			more = len(taken) > 0
		} else if all[StateQueued] > 0 {
			more = true // held by the rate limit
		}
		if r.Wave == last && unfinished-len(settled) == 0 {
			r.Status, r.FinishedAt = Completed, &now
			notes = append(notes, fleet.AuditEntry{Action: "rollout.completed", Detail: map[string]any{
				"rollout": r.ID, "succeeded": all[StateSucceeded], "failed": sumStates(all, FailureStates)}})
		}
		if changed(&before, r) {
			return tx.Save(ctx)
		}
		return nil
	})
	if err != nil {
		return false, err
	}
	if !crossedAt.IsZero() {
		e.m.gateLatency.Observe(e.now().Sub(crossedAt).Seconds())
	}
	for _, j := range settled {
		e.m.finished.WithLabelValues(j.State).Inc()
	}
	e.publishJobs(ctx, sent)
	e.withdraw(ctx, cancelled)
	e.audit(ctx, notes...)
	return more || len(notes) > 0, nil
}

// publishParallel bounds concurrent publishes of a step: each is a few
// queries and publishes, and a wave can hand out thousands of jobs.
const publishParallel = 8

// publishJobs publishes the fw/job of each job's locker, several at a time.
func (e *Engine) publishJobs(ctx context.Context, jobs []Job) {
	if len(jobs) <= 1 {
		for _, j := range jobs {
			e.publish(ctx, j.DeviceID)
		}
		return
	}
	sem := make(chan struct{}, publishParallel)
	var wg sync.WaitGroup
	for _, j := range jobs {
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			e.publish(ctx, j.DeviceID)
		}()
	}
	wg.Wait()
}

// lastFailure is when the latest failure of a wave was recorded: the report
// that crossed its threshold.
func lastFailure(counts []Count, wave int) time.Time {
	var t time.Time
	for _, c := range counts {
		if c.Wave == wave && IsFailure(c.State) && c.Last.After(t) {
			t = c.Last
		}
	}
	return t
}

func changed(a, b *Rollout) bool {
	return a.Status != b.Status || a.Wave != b.Wave || a.GateFrom != b.GateFrom || !a.TAT.Equal(b.TAT) || a.Reason != b.Reason
}

// waveDone reports whether the next wave may start after this one: nothing
// of it is on a locker, nothing of it could be handed out now, and enough
// of it finished to judge it (min_per_wave, or the whole wave if smaller).
// Jobs of lockers that are offline or busy do not hold the rollout: they
// are handed out when their locker can take them, while the rollout runs,
// and their failures still count against their wave.
func (e *Engine) waveDone(ctx context.Context, tx StepTx, r *Rollout, w map[string]int) (bool, error) {
	if sumStates(w, ActiveStates) > 0 {
		return false, nil
	}
	finished := w[StateSucceeded] + sumStates(w, FailureStates)
	// Jobs skipped at hand-out can give no result: they do not hold it.
	if finished < min(r.MinPerWave, r.WaveSizes[r.Wave]-w[StateSkipped]) {
		return false, nil
	}
	if w[StateQueued] == 0 {
		return true, nil
	}
	ready, err := tx.Ready(ctx, r.Wave)
	return ready == 0, err
}

// withdraw clears the fw/job of cancelled jobs that were on a locker.
func (e *Engine) withdraw(ctx context.Context, cancelled []Job) {
	var sent []Job
	for _, j := range cancelled {
		e.m.finished.WithLabelValues(StateCancelled).Inc()
		if j.SentAt != nil {
			sent = append(sent, j)
		}
	}
	e.publishJobs(ctx, sent)
}

// retryable reports whether a failure of kind on attempt gets another attempt.
func retryable(r *Rollout, kind string, attempt int, now time.Time) bool {
	if r.Status != Running || attempt > r.Retries || r.pastDeadline(now) {
		return false
	}
	for _, k := range r.RetryOn {
		if k == kind {
			return true
		}
	}
	return false
}

// sweep times out jobs without progress within their step timeout (a job
// waiting for its maintenance window is measured from the window's opening),
// and every unfinished job of a live rollout past its deadline.
func (e *Engine) sweep(ctx context.Context, now time.Time) {
	stale, err := e.store.Stale(ctx, now)
	if err != nil {
		if ctx.Err() == nil {
			e.fail("sweep", err)
		}
		return
	}
	for _, s := range stale {
		r, j := s.Rollout, s.Job
		kind := KindTimeout
		if r.pastDeadline(now) && (r.Status == Running || r.Status == Paused) {
			kind = KindDeadline
		} else {
			start := j.UpdatedAt
			if r.Window != "" && j.State == StateVerifying {
				if w, err := ParseWindow(r.Window); err == nil {
					start = w.WaitStart(start, e.zone(j.TZ))
				}
			}
			if j.State == StateQueued || now.Sub(start) < r.StepTimeout() {
				continue
			}
		}
		t := Transition{DeviceID: j.DeviceID, JobID: j.JobID, From: []string{j.State}, To: StateTimedOut, Error: kind, At: now}
		if kind == KindTimeout && retryable(r, KindTimeout, j.Attempt, now) {
			t.RetryJobID = jobID(r.ID, j.Seq, j.Attempt+1)
		}
		e.timeOut(ctx, t, r, IsActive(j.State), now)
	}
}

// timeOut applies a job's timeout t (sweep), counted as a failure on its
// way to its gate check (pendingGates) until finished has checked it.
func (e *Engine) timeOut(ctx context.Context, t Transition, r *Rollout, wasActive bool, now time.Time) {
	defer e.gates.add(r.ID)()
	nj, err := e.store.Apply(ctx, t)
	if err != nil {
		e.fail("timeout", err)
		return
	}
	if nj != nil {
		e.finished(ctx, nj, r, wasActive, now)
	}
}

// finished follows up a job that left its active state: on a failure the
// gate of its wave is checked (r is the job's rollout; nil on a success),
// the locker's fw/job is cleared, after a success too (a retry goes out
// again as a new job; protocol v1: an empty retained payload is no job),
// and the engine is woken for the next step.
func (e *Engine) finished(ctx context.Context, j *Job, r *Rollout, wasActive bool, receivedAt time.Time) {
	if j.State == StateQueued {
		e.m.finished.WithLabelValues(StateFailed).Inc() // a failed attempt, retried
	} else {
		e.m.finished.WithLabelValues(j.State).Inc()
	}
	if IsFailure(j.State) && r != nil {
		e.checkGate(ctx, r, j.Wave, receivedAt) // first: stopping the rollout is what is urgent
	}
	if wasActive {
		// The locker's retained fw/job goes empty (no job to run), after a
		// success too: the contract's "empty retained payload = none".
		e.publish(ctx, j.DeviceID)
	}
	e.kick()
}

// checkGate pauses or aborts the rollout at once when wave's failures
// crossed the threshold, so that no further job is handed out.
func (e *Engine) checkGate(ctx context.Context, r *Rollout, wave int, receivedAt time.Time) {
	if wave < 0 || wave >= len(r.WaveSizes) {
		return
	}
	failed, size, err := e.store.WaveFailures(ctx, r.ID, wave)
	if err != nil {
		e.fail("gate", err)
		return
	}
	if !Crossed(failed, size, r.MaxFailurePct) {
		return
	}
	var cancelled []Job
	var note fleet.AuditEntry
	changed, wasRunning := false, false
	err = e.store.Update(ctx, r.ID, func(tx StepTx) error {
		cancelled, changed = nil, false
		cur := tx.Rollout()
		if wave < cur.GateFrom || cur.pastDeadline(e.now()) {
			return nil // past its deadline the rollout ends (step), not pauses
		}
		// Again under the lock: a resume may have accepted them since.
		counts, err := tx.Counts(ctx)
		if err != nil {
			return err
		}
		w, _ := tally(counts, len(cur.WaveSizes))
		wasRunning = cur.Status == Running
		if cancelled, note, changed, err = e.onCrossing(ctx, tx, cur, w, wave, e.now()); err != nil || !changed {
			return err
		}
		return tx.Save(ctx)
	})
	if err != nil {
		e.fail("gate", err)
		return
	}
	if !changed {
		return
	}
	if !wasRunning { // recorded on a paused rollout (or it aborted): no stop's latency
		e.log.Warn("rollout's failure threshold crossed while it is paused", "rollout", r.ID, "reason", note.Detail["reason"],
			"action", note.Action)
	} else {
		e.m.gateLatency.Observe(e.now().Sub(receivedAt).Seconds())
		e.log.Warn("rollout stopped by its failure threshold", "rollout", r.ID, "reason", note.Detail["reason"], "action", r.FailureAction)
	}
	e.withdraw(ctx, cancelled)
	e.audit(ctx, note)
}
