package firmware

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/lockergate/lockergate/fleet"
)

// Defaults of a rollout spec.
var (
	DefaultWaves         = []int{1, 10, 50, 100}
	DefaultMaxFailurePct = 5.0
)

// Rollout spec defaults and bounds.
const (
	DefaultRatePerMin   = 600
	DefaultStepTimeoutS = 600
	MaxRetries          = 10
	maxListedLockers    = 20000 // ids in selector.lockers; a request body is at most 1 MiB
)

// normalize fills defaults into s and checks it.
func (s *Spec) normalize(now time.Time) error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: %s", fleet.ErrInvalid, fmt.Sprintf(format, args...))
	}
	if s.Firmware == "" {
		return bad("firmware is required")
	}
	for _, name := range s.explicit {
		if name == "waves" {
			return bad("waves must not be empty: leave it out for the default %v", DefaultWaves)
		}
		return bad("%s must be 1 or more: leave it out for the default", name)
	}
	if len(s.Waves) == 0 {
		s.Waves = slices.Clone(DefaultWaves)
	}
	if err := ValidateWaves(s.Waves); err != nil {
		return bad("%v", err)
	}
	if s.MaxFailurePct == nil {
		v := DefaultMaxFailurePct
		s.MaxFailurePct = &v
	}
	if p := *s.MaxFailurePct; !(p >= 0 && p <= 100) {
		return bad("max_failure_pct must be 0..100")
	}
	if s.MinPerWave == 0 {
		s.MinPerWave = 1
	}
	if s.MinPerWave < 1 {
		return bad("min_per_wave must be 1 or more")
	}
	if s.RatePerMin == 0 {
		s.RatePerMin = DefaultRatePerMin
	}
	if s.RatePerMin < 1 || s.RatePerMin > 600000 {
		return bad("rate_per_min must be 1..600000")
	}
	if s.Deadline != nil && !s.Deadline.After(now) {
		return bad("deadline must be in the future")
	}
	if s.StepTimeoutS == 0 {
		s.StepTimeoutS = DefaultStepTimeoutS
	}
	if s.StepTimeoutS < 1 || s.StepTimeoutS > 7*86400 {
		return bad("step_timeout_s must be 1..604800")
	}
	switch s.FailureAction {
	case "":
		s.FailureAction = ActionPause
	case ActionPause, ActionAbort:
	default:
		return bad("failure_action must be pause or abort")
	}
	if s.Retries < 0 || s.Retries > MaxRetries {
		return bad("retries must be 0..%d", MaxRetries)
	}
	if s.Retries > 0 && len(s.RetryOn) == 0 {
		s.RetryOn = slices.Clone(DefaultRetryOn)
	}
	for _, k := range s.RetryOn {
		if !slices.Contains(RetryKinds, k) {
			return bad("retry_on %q: want some of %s", k, strings.Join(RetryKinds, ", "))
		}
	}
	if s.RetryOn == nil {
		s.RetryOn = []string{}
	}
	if s.Window != "" {
		w, err := ParseWindow(s.Window)
		if err != nil {
			return bad("%v", err)
		}
		s.Window = w.String()
	}
	if len(s.Selector.Lockers) > maxListedLockers {
		return bad("selector.lockers: at most %d", maxListedLockers)
	}
	if s.Selector.Lockers == nil {
		s.Selector.Lockers = []string{}
	}
	return nil
}

// Status is a rollout with its progress, as the API shows it.
type Status struct {
	Rollout
	// CurrentWave is 1-based.
	CurrentWave int            `json:"current_wave"`
	Targets     int            `json:"targets"`
	Counts      map[string]int `json:"counts"`
	Skipped     map[string]int `json:"skipped"`
	WaveStatus  []WaveStatus   `json:"wave_status"`
	// WrongModel counts lockers the selector matched that are of another
	// model (only in the answer to a create; they get no job).
	WrongModel int `json:"wrong_model,omitempty"`
	// Waiting counts, for a running or paused rollout, the queued jobs of
	// the waves begun whose locker cannot take them now, by why (Wait*):
	// what keeps a rollout from moving when nothing fails.
	Waiting map[string]int `json:"waiting,omitempty"`
}

// WaveStatus is one wave's progress.
type WaveStatus struct {
	Wave       int            `json:"wave"` // 1-based
	Percent    int            `json:"percent"`
	Size       int            `json:"size"`
	State      string         `json:"state"` // pending, running, done
	Counts     map[string]int `json:"counts"`
	Failed     int            `json:"failed"`
	FailurePct float64        `json:"failure_pct"`
}

// Create starts a rollout of spec. Lockers of other models are never
// targeted; lockers on the version or disabled are skipped, and so are
// downgrades unless spec.Force. It is fleet.ErrUnprocessable when no locker
// is left to update.
func (e *Engine) Create(ctx context.Context, spec Spec, actor string) (*Status, error) {
	now := e.now().UTC().Truncate(time.Microsecond) // as stored
	if err := spec.normalize(now); err != nil {
		return nil, err
	}
	a, err := e.store.GetArtifact(ctx, spec.Firmware)
	if errors.Is(err, fleet.ErrNotFound) {
		return nil, fmt.Errorf("%w: no firmware %s", fleet.ErrUnprocessable, spec.Firmware)
	}
	if err != nil {
		return nil, err
	}
	if spec.Selector.Model != "" && spec.Selector.Model != a.Model {
		return nil, fmt.Errorf("%w: firmware %s is for model %s, not %s", fleet.ErrUnprocessable, a.ID, a.Model, spec.Selector.Model)
	}
	spec.Selector.Model = a.Model
	target, err := ParseVersion(a.Version)
	if err != nil {
		return nil, err
	}
	sel := spec.Selector
	sel.Model = "" // all models, to count the wrong ones
	targets, err := e.store.Targets(ctx, sel)
	if err != nil {
		return nil, err
	}
	if len(sel.Lockers) > 0 {
		found := make(map[string]bool, len(targets))
		for _, t := range targets {
			found[t.DeviceID] = true
		}
		var missing []string
		for _, id := range sel.Lockers {
			if !found[id] {
				missing = append(missing, id)
			}
		}
		if len(missing) > 0 {
			if len(missing) > 5 {
				missing = append(missing[:5], "...")
			}
			return nil, fmt.Errorf("%w: selector.lockers: unknown or not matching the other fields: %s", fleet.ErrUnprocessable, strings.Join(missing, ", "))
		}
	}

	r := &Rollout{
		ID: fleet.NewID("ro"), Firmware: a.ID, Version: a.Version, Model: a.Model, Selector: spec.Selector,
		Waves: spec.Waves, MaxFailurePct: *spec.MaxFailurePct, MinPerWave: spec.MinPerWave, RatePerMin: spec.RatePerMin,
		Deadline: spec.Deadline, StepTimeoutS: spec.StepTimeoutS, FailureAction: spec.FailureAction,
		Retries: spec.Retries, RetryOn: spec.RetryOn, Window: spec.Window, Force: spec.Force,
		Status: Running, CreatedBy: actor, CreatedAt: now, UpdatedAt: now,
	}
	var update []string
	byID := map[string]Target{}
	var skipped []Job
	wrongModel := 0
	skip := func(t Target, why string) {
		skipped = append(skipped, Job{DeviceID: t.DeviceID, State: StateSkipped, Error: why, FromFW: t.FW, TZ: t.TZ})
	}
	for _, t := range targets {
		if t.Model != a.Model {
			wrongModel++
			continue
		}
		if t.Disabled {
			skip(t, SkipDisabled) // it cannot connect: its job would never go out
			continue
		}
		if t.Busy {
			skip(t, SkipBusy)
			continue
		}
		v, err := ParseVersion(t.FW)
		switch {
		case err != nil && !spec.Force:
			skip(t, SkipVersion)
			continue
		case err == nil && v.Compare(target) == 0:
			skip(t, SkipUpToDate)
			continue
		case err == nil && v.Compare(target) > 0 && !spec.Force:
			skip(t, SkipDowngrade)
			continue
		}
		update = append(update, t.DeviceID)
		byID[t.DeviceID] = t
	}
	if len(update) == 0 {
		why := map[string]int{}
		for _, j := range skipped {
			why[j.Error]++
		}
		var reasons []string
		for _, k := range slices.Sorted(maps.Keys(why)) {
			reasons = append(reasons, fmt.Sprintf("%d %s", why[k], k))
		}
		if len(reasons) == 0 {
			reasons = []string{"none"}
		}
		return nil, fmt.Errorf("%w: no locker to update (%d matched of model %s; skipped: %s; other models: %d)",
			fleet.ErrUnprocessable, len(targets)-wrongModel, a.Model, strings.Join(reasons, ", "), wrongModel)
	}
	r.WaveSizes = WaveSizes(len(update), r.Waves, r.MinPerWave)
	jobs := make([]Job, 0, len(update)+len(skipped))
	seq, wave, inWave := 0, 0, 0
	for _, id := range order(r.ID, update) {
		for inWave >= r.WaveSizes[wave] {
			wave, inWave = wave+1, 0
		}
		t := byID[id]
		jobs = append(jobs, Job{RolloutID: r.ID, DeviceID: id, JobID: jobID(r.ID, seq, 1), Wave: wave, Seq: seq,
			State: StateQueued, Attempt: 1, FromFW: t.FW, Version: a.Version, TZ: t.TZ, UpdatedAt: now})
		seq++
		inWave++
	}
	for _, j := range skipped {
		j.RolloutID, j.JobID, j.Wave, j.Seq, j.Attempt, j.Version, j.UpdatedAt = r.ID, jobID(r.ID, seq, 0), -1, seq, 0, a.Version, now
		j.DoneAt = &now
		jobs = append(jobs, j)
		seq++
	}
	if err := e.store.CreateRollout(ctx, r, jobs); err != nil {
		return nil, err
	}
	e.audit(ctx, fleet.AuditEntry{Actor: actor, Action: "rollout.create", Detail: map[string]any{
		"rollout": r.ID, "firmware": a.ID, "version": a.Version, "model": a.Model, "jobs": len(update),
		"skipped": len(skipped), "waves": r.Waves, "wave_sizes": r.WaveSizes}})
	e.log.Info("rollout created", "rollout", r.ID, "firmware", a.ID, "version", a.Version, "jobs", len(update), "waves", r.WaveSizes)
	e.kick()
	st, err := e.Status(ctx, r.ID)
	if err != nil {
		return nil, err
	}
	st.WrongModel = wrongModel
	return st, nil
}

// Status returns a rollout with counts per wave and state.
func (e *Engine) Status(ctx context.Context, id string) (*Status, error) {
	r, err := e.store.GetRollout(ctx, id)
	if err != nil {
		return nil, err
	}
	counts, err := e.store.Counts(ctx, id)
	if err != nil {
		return nil, err
	}
	st := status(r, counts)
	if (r.Status == Running || r.Status == Paused) && st.Counts[StateQueued] > 0 {
		if st.Waiting, err = e.store.Waiting(ctx, r); err != nil {
			return nil, err
		}
	}
	return st, nil
}

func status(r *Rollout, counts []Count) *Status {
	st := &Status{Rollout: *r, CurrentWave: r.Wave + 1, Counts: map[string]int{}, Skipped: map[string]int{}}
	w, all := tally(counts, len(r.WaveSizes))
	for _, s := range States {
		if s != StateSkipped {
			st.Counts[s] = all[s]
		}
	}
	for _, c := range counts {
		if c.State == StateSkipped {
			st.Skipped[c.Reason] += c.N
		} else {
			st.Targets += c.N
		}
	}
	for i, size := range r.WaveSizes {
		ws := WaveStatus{Wave: i + 1, Percent: r.Waves[i], Size: size, Counts: map[string]int{}, Failed: sumStates(w[i], FailureStates)}
		for _, s := range States {
			if s != StateSkipped {
				ws.Counts[s] = w[i][s]
			}
		}
		if n := waveSize(r, w, i); n > 0 {
			ws.FailurePct = float64(ws.Failed) * 100 / float64(n)
		}
		switch {
		case i < r.Wave:
			ws.State = "done"
		case i == r.Wave && r.Status == Running:
			ws.State = "running"
		case i == r.Wave:
			ws.State = r.Status
		default:
			ws.State = "pending"
		}
		st.WaveStatus = append(st.WaveStatus, ws)
	}
	return st
}

// List returns rollouts, newest first, without per-wave counts.
func (e *Engine) List(ctx context.Context, after string, limit int) ([]Status, error) {
	rs, err := e.store.ListRollouts(ctx, after, limit)
	if err != nil {
		return nil, err
	}
	out := make([]Status, len(rs))
	for i, r := range rs {
		// Its targets are its waves' jobs; counts per state and wave are
		// read by id (Status), left empty here rather than null.
		out[i] = Status{Rollout: r, CurrentWave: r.Wave + 1, Counts: map[string]int{}, Skipped: map[string]int{},
			WaveStatus: []WaveStatus{}}
		for _, n := range r.WaveSizes {
			out[i].Targets += n
		}
	}
	return out, nil
}

// Jobs lists a rollout's jobs.
func (e *Engine) Jobs(ctx context.Context, id string, f JobFilter) ([]Job, error) {
	if _, err := e.store.GetRollout(ctx, id); err != nil {
		return nil, err
	}
	return e.store.ListJobs(ctx, id, f)
}

// conflict is a request the rollout's status does not allow.
func conflict(r *Rollout, what string) error {
	return fmt.Errorf("%w: rollout %s is %s: cannot %s", fleet.ErrConflict, r.ID, r.Status, what)
}

// operate runs an operator action on a locked rollout, then notifies
// lockers of withdrawn jobs, audits and wakes the engine.
func (e *Engine) operate(ctx context.Context, id, actor, action string, f func(tx StepTx, r *Rollout, now time.Time) ([]Job, error)) (*Status, error) {
	var cancelled []Job
	var detail map[string]any
	err := e.store.Update(ctx, id, func(tx StepTx) error {
		r := tx.Rollout()
		now := e.now().UTC()
		var err error
		if cancelled, err = f(tx, r, now); err != nil {
			return err
		}
		detail = map[string]any{"rollout": r.ID, "status": r.Status}
		return tx.Save(ctx)
	})
	if err != nil {
		return nil, err
	}
	e.withdraw(ctx, cancelled)
	e.audit(ctx, fleet.AuditEntry{Actor: actor, Action: "rollout." + action, Detail: detail})
	e.kick()
	return e.Status(ctx, id)
}

// Pause stops handing out jobs; jobs on lockers carry on.
func (e *Engine) Pause(ctx context.Context, id, actor string) (*Status, error) {
	return e.operate(ctx, id, actor, "pause", func(tx StepTx, r *Rollout, now time.Time) ([]Job, error) {
		if r.Status != Running {
			return nil, conflict(r, "pause")
		}
		r.Status, r.Reason = Paused, "paused by "+actor
		return nil, nil
	})
}

// Resume continues a paused rollout. Resuming accepts the failures of each
// wave whose gate they crossed as its status shows them (flagged on their
// jobs): its gate then counts only the failures after them, so the rest of
// the wave is gated again. A crossing the status does not show as it is
// now (crossed, or grown, while the rollout is paused, and being
// recorded) is a conflict: the operator reads the status and resumes
// again. Failures this instance is recording are waited for (up to 5 s in
// all), before and again after a crossing not shown, so that one recorded
// at the same moment is shown, not refused: a failure stored before the
// resume read the counts was counted pending before it was stored, and
// its gate check waits for the resume's lock.
func (e *Engine) Resume(ctx context.Context, id, actor string) (*Status, error) {
	deadline := time.Now().Add(5 * time.Second)
	for {
		e.gates.wait(ctx, id, time.Until(deadline))
		st, err := e.resume(ctx, id, actor)
		var ns notShownError
		if !errors.As(err, &ns) || !e.gates.pending(id) || time.Until(deadline) <= 0 || ctx.Err() != nil {
			return st, err
		}
	}
}

// notShownError is a resume refused for a crossing the rollout's status
// does not show yet.
type notShownError struct{ error }

func (e notShownError) Unwrap() error { return e.error }

func (e *Engine) resume(ctx context.Context, id, actor string) (*Status, error) {
	return e.operate(ctx, id, actor, "resume", func(tx StepTx, r *Rollout, now time.Time) ([]Job, error) {
		if r.Status != Paused {
			return nil, conflict(r, "resume")
		}
		counts, err := tx.Counts(ctx)
		if err != nil {
			return nil, err
		}
		w, _ := tally(counts, len(r.WaveSizes))
		accept := map[int]int{}
		for i := r.GateFrom; i <= r.Wave && i < len(w); i++ {
			gate, failed, crossed := waveGate(r, w, i)
			if !crossed {
				continue
			}
			if shownGate(r.Reason, i) != gate {
				return nil, notShownError{fmt.Errorf("%w: rollout %s: %s, which its status does not show yet; read it, then resume again to accept those failures",
					fleet.ErrConflict, r.ID, gate)}
			}
			accept[i] = failed
		}
		for i, n := range accept {
			if err := tx.AcceptFailures(ctx, i, n); err != nil {
				return nil, err
			}
		}
		r.Status, r.Reason = Running, ""
		return nil, nil
	})
}

// Cancel ends a rollout: queued jobs are cancelled and pending ones
// (handed out, not installing yet) withdrawn from their lockers' fw/job;
// installing jobs finish.
func (e *Engine) Cancel(ctx context.Context, id, actor string) (*Status, error) {
	return e.operate(ctx, id, actor, "cancel", func(tx StepTx, r *Rollout, now time.Time) ([]Job, error) {
		if r.Status != Running && r.Status != Paused {
			return nil, conflict(r, "cancel")
		}
		r.Status, r.Reason, r.FinishedAt = Cancelled, "cancelled by "+actor, &now
		return tx.Cancel(ctx, append([]string{StateQueued}, PendingStates...), now)
	})
}

// RetryFailed gives failed and timed-out jobs of a paused, aborted or
// completed rollout a new attempt and runs the rollout again, and, of an
// aborted one, the jobs its abort cancelled (they never ran: the rollout
// would otherwise complete without them). Rejected jobs (the locker
// refused the job) are not retried. Every wave is gated again,
// on the counts after the re-queue: retries that fail again stop it again.
func (e *Engine) RetryFailed(ctx context.Context, id, actor string) (*Status, error) {
	return e.operate(ctx, id, actor, "retry_failed", func(tx StepTx, r *Rollout, now time.Time) ([]Job, error) {
		switch r.Status {
		case Paused, Aborted, Completed:
		default:
			return nil, conflict(r, "retry failed jobs")
		}
		if r.pastDeadline(now) {
			return nil, fmt.Errorf("%w: rollout %s is past its deadline", fleet.ErrConflict, r.ID)
		}
		states := []string{StateFailed, StateTimedOut}
		if r.Status == Aborted {
			// The abort cancelled what had not reached an installer: those
			// jobs never ran, and go out again with the rest.
			states = append(states, StateCancelled)
		}
		n, err := tx.Requeue(ctx, now, states, func(j *Job) string { return jobID(r.ID, j.Seq, j.Attempt+1) })
		if err != nil {
			return nil, err
		}
		if n == 0 {
			return nil, fmt.Errorf("%w: rollout %s has no failed, timed-out or (aborted) cancelled job", fleet.ErrConflict, r.ID)
		}
		r.Status, r.Reason, r.FinishedAt, r.GateFrom = Running, "", nil, 0
		return nil, nil
	})
}
