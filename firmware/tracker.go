package firmware

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/protocol"
)

// JobStatus implements fleet.FirmwareTracker: it applies a locker's
// fw/status report. Devices move forward only (a repeated or late report of
// an earlier step changes nothing); "succeeded" is left to the birth; a
// failure or rejection ends the attempt and is checked against the gate.
// It returns the database's error when the report was not recorded (the
// caller tries again); what follows a recorded report (the gate, the
// locker's job) reports its own errors, and the engine's ticks catch up.
func (e *Engine) JobStatus(ctx context.Context, deviceID string, st *protocol.FwStatus, at time.Time) error {
	switch st.State {
	case StateDownloading, StateVerifying, StateInstalling, StateRebooting:
		// Any report, even a repeated step, is progress for the step timeout.
		from := ActiveStates[:stage(st.State)+1]
		if st.State == StateInstalling || st.State == StateRebooting {
			// A cancel that crossed the locker's "installing" on the way
			// came too late: the locker installs anyway (docs/firmware.md),
			// so the job follows it to its real outcome.
			from = append(slices.Clone(from), StateCancelled)
		}
		j, err := e.store.Apply(ctx, Transition{DeviceID: deviceID, JobID: st.Job, From: from,
			To: st.State, Progress: st.Progress, At: at})
		if err != nil {
			return e.reportFailed(fmt.Sprintf("record %s of job %s", st.State, st.Job), err)
		}
		e.counted(j != nil)
	case StateFailed, StateRejected:
		kind := st.Error
		if kind == "" && st.State == StateFailed {
			kind = KindUnknown // a failure that does not say which
		}
		return e.failJob(ctx, deviceID, st.Job, st.State, kind, at)
	case StateSucceeded:
		return e.succeeded(ctx, deviceID, st.Job, at)
	}
	return nil
}

// reportFailed counts a report not recorded and returns err, wrapped with
// what failed, for the caller's retry, which logs it.
func (e *Engine) reportFailed(what string, err error) error {
	e.m.errors.WithLabelValues("report").Inc()
	return fmt.Errorf("%s: %w", what, err)
}

// succeeded takes a locker's "succeeded" report. The birth on the new
// version is the confirmation and normally settled the job already; but
// reports queued across the reboot arrive after the birth, so a job still
// open (or a cancel the install overtook, or a step timeout a long reboot
// overtook) succeeds here when the birth the gateway recorded shows the
// job's version.
func (e *Engine) succeeded(ctx context.Context, deviceID, wireID string, at time.Time) error {
	j, err := e.store.GetJob(ctx, deviceID, wireID)
	if errors.Is(err, fleet.ErrNotFound) {
		e.counted(false)
		return nil
	}
	if err != nil {
		return e.reportFailed("read job "+wireID, err)
	}
	if !IsActive(j.State) && !((j.State == StateCancelled || j.State == StateTimedOut) && j.SentAt != nil) {
		e.counted(false) // settled by the birth
		return nil
	}
	fw, err := e.store.RunningVersion(ctx, deviceID)
	if err != nil {
		return e.reportFailed("read the version of locker "+deviceID, err)
	}
	if !SameVersion(fw, j.Version) {
		e.counted(false) // not confirmed by a birth: the timeout will judge it
		return nil
	}
	nj, err := e.store.Apply(ctx, Transition{DeviceID: deviceID, JobID: wireID, From: []string{j.State}, To: StateSucceeded, At: at})
	if err != nil {
		return e.reportFailed("record succeeded of job "+wireID, err)
	}
	e.counted(nj != nil)
	if nj != nil {
		e.finished(ctx, nj, nil, IsActive(j.State), at)
	}
	return nil
}

func (e *Engine) counted(applied bool) {
	if applied {
		e.m.reports.WithLabelValues("applied").Inc()
	} else {
		e.m.reports.WithLabelValues("ignored").Inc()
	}
}

// Booted is BootedMany for one locker's birth.
func (e *Engine) Booted(ctx context.Context, deviceID, fw string, at time.Time) {
	e.BootedMany(ctx, []fleet.Boot{{DeviceID: deviceID, FW: fw, At: at}})
}

// BootedMany implements fleet.FirmwareTracker, for the births of distinct
// lockers, their jobs read in one round trip (a reconnect storm brings
// thousands of births). A birth on the job's version is the job's success;
// a birth on any other version after "rebooting" is a failed boot. A birth
// on the version of a job that timed out (a reboot that outlasted the step
// timeout) or waits queued (re-queued after such a timeout, or a locker
// updated by other means) settles that job too: the locker would ignore
// the job, and it would time out again. Births also wake the engine: a
// locker that comes back may have a queued job waiting for it.
func (e *Engine) BootedMany(ctx context.Context, boots []fleet.Boot) {
	defer e.kick()
	ids := make([]string, len(boots))
	for i, b := range boots {
		ids[i] = b.DeviceID
	}
	jobs, err := e.store.BirthJobs(ctx, ids)
	if err != nil {
		e.fail("birth", err)
		return
	}
	for _, b := range boots {
		if lj, ok := jobs[b.DeviceID]; ok {
			e.booted(ctx, b.DeviceID, b.FW, b.At, lj.Active, lj.Settleable)
		}
	}
}

// booted is Booted for one locker, with its jobs read.
func (e *Engine) booted(ctx context.Context, deviceID, fw string, at time.Time, j *Job, late []Job) {
	// One install, one success: the active job on the version, else the
	// late job on it handed out last (installInOf).
	credit := installInOf(fw, j, late)
	switch {
	case j != nil && SameVersion(fw, j.Version):
		// After the late jobs on the version (an earlier rollout's queued
		// job for it, say): while j is active none of them can be handed
		// out (one active job per locker), so none is sent the version the
		// locker runs.
		defer e.bootSucceeded(ctx, j, at)
	case j != nil && j.State == StateRebooting:
		// A retry it queues is for the version that did not boot, which
		// the loop below would skip: the jobs read before serve.
		if err := e.failJob(ctx, deviceID, j.JobID, StateFailed, KindBoot, at); err != nil {
			// Counted as a report not recorded (reportFailed); the step
			// timeout ends the job instead.
			e.log.Error("firmware engine: boot failure not recorded", "locker", deviceID, "job", j.JobID, "err", err)
		}
	}
	for i := range late {
		j := &late[i]
		if !SameVersion(fw, j.Version) || (j.State == StateTimedOut && j != credit) {
			// Another version; or a timeout the install is not credited
			// to (never handed out, or another job's install).
			continue
		}
		t := Transition{DeviceID: deviceID, JobID: j.JobID, From: []string{j.State}, To: StateSucceeded, At: at}
		if j != credit {
			// Never handed out (updated by other means, as at creation),
			// or a retry of an attempt that is not the install's.
			t.To, t.Error = StateSkipped, SkipUpToDate
		}
		nj, err := e.store.Apply(ctx, t)
		if err != nil {
			e.fail("birth", err)
			continue
		}
		if nj == nil && j.State == StateQueued {
			// Handed out meanwhile: the birth confirms it like any other.
			cur, err := e.store.GetJob(ctx, deviceID, j.JobID)
			switch {
			case err == nil && IsActive(cur.State):
				e.bootSucceeded(ctx, cur, at)
			case err != nil && !errors.Is(err, fleet.ErrNotFound):
				// Not confirmed: its succeeded report or its step
				// timeout judges it.
				e.fail("birth", fmt.Errorf("read job %s: %w", j.JobID, err))
			}
			continue
		}
		e.counted(nj != nil)
		if nj != nil {
			e.finished(ctx, nj, nil, false, at)
		}
	}
}

// installInOf is the job a birth on fw credits with the install: the
// active job j when it is for fw; otherwise the late job (timed out or
// queued, none active) for fw handed out last: a queued retry (its
// earlier attempt went out in the locker's live rollout; a locker is in
// one at a time), else the timed-out job sent last (a reboot that
// outlasted its step timeout, or whose birth was missed). nil: none (no
// job for fw was handed out: the locker was updated by other means).
// Only one is credited: crediting every job for the version would count
// one install as a success in each rollout that ever sent it (one that
// timed out at a deadline while downloading, and a later rollout's that
// installed).
func installInOf(fw string, j *Job, late []Job) *Job {
	if j != nil && SameVersion(fw, j.Version) {
		return j
	}
	var credit *Job
	for i := range late {
		l := &late[i]
		switch {
		case !SameVersion(fw, l.Version):
		case l.State == StateQueued && l.Attempt > 1:
			return l
		case l.State == StateTimedOut && l.SentAt != nil && (credit == nil || l.SentAt.After(*credit.SentAt)):
			credit = l
		}
	}
	return credit
}

// bootSucceeded settles an active job a birth on its version confirmed.
func (e *Engine) bootSucceeded(ctx context.Context, j *Job, at time.Time) {
	nj, err := e.store.Apply(ctx, Transition{DeviceID: j.DeviceID, JobID: j.JobID, From: ActiveStates, To: StateSucceeded, At: at})
	if err != nil {
		e.fail("birth", err)
		return
	}
	e.counted(nj != nil)
	if nj != nil {
		e.finished(ctx, nj, nil, true, at)
	}
}

// failJob ends the attempt of a job a locker failed (its report, or a boot
// on the old version) or rejected, or re-queues it as a new attempt when
// the rollout retries that kind. Only the contract's kinds (DeviceKinds)
// are retried: "timeout" is the gateway's own (the sweep's), not a
// locker's to claim, and any other error is one no retry_on can name.
func (e *Engine) failJob(ctx context.Context, deviceID, wireID, state, kind string, at time.Time) error {
	j, err := e.store.GetJob(ctx, deviceID, wireID)
	if errors.Is(err, fleet.ErrNotFound) {
		e.counted(false)
		return nil
	}
	if err != nil {
		return e.reportFailed("read job "+wireID, err)
	}
	if !IsActive(j.State) {
		e.counted(false) // a repeat, or a report on a job that already ended
		return nil
	}
	r, err := e.store.GetRollout(ctx, j.RolloutID)
	if err != nil {
		return e.reportFailed("read rollout "+j.RolloutID, err)
	}
	t := Transition{DeviceID: deviceID, JobID: wireID, From: ActiveStates, To: state, Error: kind, At: at}
	if state == StateFailed && slices.Contains(DeviceKinds, kind) && retryable(r, kind, j.Attempt, e.now()) {
		t.RetryJobID = jobID(r.ID, j.Seq, j.Attempt+1)
	}
	defer e.gates.add(r.ID)() // until its gate is checked (finished)
	nj, err := e.store.Apply(ctx, t)
	if err != nil {
		return e.reportFailed(fmt.Sprintf("record %s of job %s", state, wireID), err)
	}
	e.counted(nj != nil)
	if nj != nil {
		e.finished(ctx, nj, r, true, at)
	}
	return nil
}
