// Package firmware is the firmware domain of Lockergate: signed artifacts,
// rollouts in gated waves, and per-locker jobs. Its Engine implements
// fleet.FirmwareTracker: it hands jobs out on the retained fw/job topic (via
// Fleet.PublishRetained), follows fw/status reports and births, and pauses or
// aborts a rollout as soon as a wave's failures cross the threshold. All state
// lives in the Store (PostgreSQL), so a restarted gateway resumes where it was.
package firmware

import (
	"context"
	"encoding/json"
	"slices"
	"strings"
	"time"

	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/protocol"
)

// Job states: protocol-v1.md's device states plus the gateway's own.
const (
	StateQueued      = "queued" // in a rollout, not handed out yet
	StateSent        = "sent"   // on the locker's fw/job, no report yet
	StateDownloading = protocol.FwDownloading
	StateVerifying   = protocol.FwVerifying
	StateInstalling  = protocol.FwInstalling
	StateRebooting   = protocol.FwRebooting
	StateSucceeded   = protocol.FwSucceeded // confirmed by a birth on the new version
	StateFailed      = protocol.FwFailed
	StateRejected    = protocol.FwRejected
	StateTimedOut    = "timed_out" // no progress within the step timeout, or past the deadline
	StateCancelled   = "cancelled"
	StateSkipped     = "skipped" // matched the selector but not updated (Error says why)
)

// States lists every job state in life-cycle order (for displays).
var States = []string{StateQueued, StateSent, StateDownloading, StateVerifying, StateInstalling, StateRebooting,
	StateSucceeded, StateFailed, StateRejected, StateTimedOut, StateCancelled, StateSkipped}

// ActiveStates are the states of a job that is on a locker's fw/job.
var ActiveStates = []string{StateSent, StateDownloading, StateVerifying, StateInstalling, StateRebooting}

// PendingStates are active states a cancel withdraws; installing and
// rebooting jobs are left to finish.
var PendingStates = []string{StateSent, StateDownloading, StateVerifying}

// FailureStates count against a wave's failure threshold.
var FailureStates = []string{StateFailed, StateRejected, StateTimedOut}

// IsActive reports whether s is an active state.
func IsActive(s string) bool { return slices.Contains(ActiveStates, s) }

// IsFailure reports whether s counts as a failure.
func IsFailure(s string) bool { return slices.Contains(FailureStates, s) }

// IsFinal reports whether a job in s is done (success, failure, cancelled or skipped).
func IsFinal(s string) bool {
	return s == StateSucceeded || s == StateCancelled || s == StateSkipped || IsFailure(s)
}

// stage orders the active states: devices only move forward.
func stage(s string) int { return slices.Index(ActiveStates, s) }

// Failure kinds: the protocol's fw/status errors plus "timeout".
const (
	KindDownload  = "download"
	KindChecksum  = "checksum"
	KindSignature = "signature"
	KindInstall   = "install"
	KindBoot      = "boot"
	KindDeadline  = "deadline"
	KindTimeout   = "timeout"
	// KindUnknown is a locker's failed report without an error. It, and
	// any error outside the contract's kinds (DeviceKinds), is never
	// retried.
	KindUnknown = "unknown"
)

// DeviceKinds are the failure kinds a locker reports (fw/status error).
var DeviceKinds = []string{KindDownload, KindChecksum, KindSignature, KindInstall, KindBoot, KindDeadline}

// RetryKinds are the failure kinds a rollout may retry.
var RetryKinds = []string{KindDownload, KindChecksum, KindSignature, KindInstall, KindBoot, KindTimeout}

// DefaultRetryOn is what retries apply to when retry_on is not given.
var DefaultRetryOn = []string{KindDownload, KindTimeout}

// Reasons a targeted locker is skipped: at creation, or when its job is
// about to be handed out (the locker changed since) and, for a replaced
// board, at the replacement.
const (
	SkipUpToDate     = "up_to_date"       // already runs the version
	SkipDowngrade    = "downgrade"        // runs a newer version and force is off
	SkipVersion      = "unknown_version"  // runs a version that does not parse; force to include it
	SkipBusy         = "in_other_rollout" // has an unfinished job of another live rollout
	SkipDisabled     = "disabled"         // disabled by an operator: it cannot connect to take a job
	SkipModelChanged = "model_changed"    // reports another model than the image's now
	SkipReplaced     = "replaced"         // its board was replaced (re-provisioned) while the job was open
)

// Why a queued job of a wave under way waits for its locker (Status.Waiting):
// it goes out when the locker can take it, while the rollout runs.
const (
	WaitOffline  = "offline"   // the locker is not connected
	WaitNoBirth  = "no_birth"  // connected, the birth of its session not recorded (none sent, or on its way)
	WaitDoorOpen = "door_open" // a compartment door is not closed (staff loading, a pickup under way)
	WaitOtherJob = "other_job" // another rollout's job is on the locker
)

// Rollout statuses.
const (
	Running   = "running"
	Paused    = "paused"
	Aborted   = "aborted"
	Completed = "completed"
	Cancelled = "cancelled"
)

// Statuses lists the rollout statuses.
var Statuses = []string{Running, Paused, Aborted, Completed, Cancelled}

// Failure actions.
const (
	ActionPause = "pause"
	ActionAbort = "abort"
)

// Artifact is an uploaded firmware image, signed by the gateway.
type Artifact struct {
	ID        string    `json:"id"`
	Model     string    `json:"model"`
	Version   string    `json:"version"`
	Size      int64     `json:"size"`
	SHA256    string    `json:"sha256"`
	Sig       string    `json:"sig"`
	CreatedAt time.Time `json:"created_at"`
	CreatedBy string    `json:"created_by"`
	// File is the image's file name in the firmware directory.
	File string `json:"-"`
}

// Selector picks a rollout's lockers; empty fields match everything. The
// model is always the artifact's.
type Selector struct {
	Site    string   `json:"site"`
	Model   string   `json:"model"`
	FW      string   `json:"fw"`
	Lockers []string `json:"lockers"`
}

// Spec is what an operator asks for when creating a rollout.
type Spec struct {
	Firmware      string     `json:"firmware"`
	Selector      Selector   `json:"selector"`
	Waves         []int      `json:"waves"`
	MaxFailurePct *float64   `json:"max_failure_pct"`
	MinPerWave    int        `json:"min_per_wave"`
	RatePerMin    int        `json:"rate_per_min"`
	Deadline      *time.Time `json:"deadline"`
	StepTimeoutS  int        `json:"step_timeout_s"`
	FailureAction string     `json:"failure_action"`
	Retries       int        `json:"retries"`
	RetryOn       []string   `json:"retry_on"`
	Window        string     `json:"window"`
	Force         bool       `json:"force"`

	// explicit names the fields of zeroSets a JSON body set to 0 (or
	// waves to []) rather than leaving out: out of range, not the
	// default (UnmarshalJSON, normalize).
	explicit []string
}

// zeroSets are the Spec fields whose zero value stands for "the default"
// in Go, and is out of range when a request writes it.
var zeroSets = []string{"waves", "min_per_wave", "rate_per_min", "step_timeout_s"}

// UnmarshalJSON decodes a spec, noting the fields of zeroSets a body set
// to their zero value (0, or [] for waves), which normalize refuses: a
// body that asks for rate_per_min 0 (or a step timeout of 0) does not mean
// the default, and is not given it silently.
func (s *Spec) UnmarshalJSON(b []byte) error {
	type plain Spec
	if err := json.Unmarshal(b, (*plain)(s)); err != nil {
		return err
	}
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(b, &raw); err != nil {
		return err
	}
	s.explicit = nil
	zero := map[string]bool{"waves": len(s.Waves) == 0, "min_per_wave": s.MinPerWave == 0,
		"rate_per_min": s.RatePerMin == 0, "step_timeout_s": s.StepTimeoutS == 0}
	for _, name := range zeroSets {
		if zero[name] && written(raw, name) {
			s.explicit = append(s.explicit, name)
		}
	}
	return nil
}

// written reports whether raw has a value other than null for name,
// matched as encoding/json matches names: in any case.
func written(raw map[string]json.RawMessage, name string) bool {
	for k, v := range raw {
		if strings.EqualFold(k, name) && string(v) != "null" {
			return true
		}
	}
	return false
}

// Rollout is a firmware rollout. Spec fields are fixed at creation; the
// rest is the engine's progress.
type Rollout struct {
	ID            string     `json:"id"`
	Firmware      string     `json:"firmware"`
	Version       string     `json:"version"`
	Model         string     `json:"model"`
	Selector      Selector   `json:"selector"`
	Waves         []int      `json:"waves"`
	WaveSizes     []int      `json:"wave_sizes"`
	MaxFailurePct float64    `json:"max_failure_pct"`
	MinPerWave    int        `json:"min_per_wave"`
	RatePerMin    int        `json:"rate_per_min"`
	Deadline      *time.Time `json:"deadline"`
	StepTimeoutS  int        `json:"step_timeout_s"`
	FailureAction string     `json:"failure_action"`
	Retries       int        `json:"retries"`
	RetryOn       []string   `json:"retry_on"`
	Window        string     `json:"window"`
	Force         bool       `json:"force"`

	Status string `json:"status"`
	// Wave is the 0-based index of the current wave (the API shows it 1-based).
	Wave int `json:"-"`
	// GateFrom is the first wave whose gate is still checked (set by
	// resumes before migration 033, which flags the failures a resume
	// accepts on their jobs instead; 0 since).
	GateFrom int `json:"-"`
	// TAT is the rate limiter's state: when the next job is due.
	TAT        time.Time  `json:"-"`
	Reason     string     `json:"reason"`
	CreatedBy  string     `json:"created_by"`
	CreatedAt  time.Time  `json:"created_at"`
	UpdatedAt  time.Time  `json:"updated_at"`
	FinishedAt *time.Time `json:"finished_at"`
}

// StepTimeout is how long a job may go without progress.
func (r *Rollout) StepTimeout() time.Duration { return time.Duration(r.StepTimeoutS) * time.Second }

// pastDeadline reports whether the rollout's deadline has passed at now.
func (r *Rollout) pastDeadline(now time.Time) bool {
	return r.Deadline != nil && !now.Before(*r.Deadline)
}

// Job is one locker's part in a rollout. JobID is the wire id of the
// current attempt; each retry gets a new one.
type Job struct {
	RolloutID string     `json:"rollout"`
	DeviceID  string     `json:"locker"`
	JobID     string     `json:"job"`
	Wave      int        `json:"wave"` // 0-based; -1 for skipped lockers
	Seq       int        `json:"seq"`
	State     string     `json:"state"`
	Error     string     `json:"error,omitempty"`
	Attempt   int        `json:"attempt"`
	FromFW    string     `json:"from_fw"`
	Version   string     `json:"version"`
	Progress  *float64   `json:"progress,omitempty"`
	TZ        string     `json:"-"`
	SentAt    *time.Time `json:"sent_at,omitempty"`
	UpdatedAt time.Time  `json:"updated_at"`
	DoneAt    *time.Time `json:"done_at,omitempty"`

	// The locker as it is when Dispatch takes the job (set by Dispatch
	// only): what the hand-out checks again.
	LockerFW, LockerModel string `json:"-"`
	LockerDisabled        bool   `json:"-"`
	// RefreshAt is when the payload's signed URL or install window must be
	// renewed; Dispatch's payload function sets it.
	RefreshAt *time.Time `json:"-"`
}

// Target is a locker a selector matched.
type Target struct {
	DeviceID string
	Model    string
	FW       string
	TZ       string // the site's IANA time zone
	// Busy is set when the locker has an unfinished job in another live rollout.
	Busy bool
	// Disabled is set when an operator disabled the locker.
	Disabled bool
}

// Count is how many jobs of a wave are in a state (for skipped jobs, with
// one reason).
type Count struct {
	Wave   int
	State  string
	Reason string // skipped jobs only
	// Accepted: failures a resume accepted (AcceptFailures), which their
	// wave's gate no longer counts.
	Accepted bool
	N        int
	Last     time.Time // the latest change among them
}

// JobFilter selects jobs of a rollout.
type JobFilter struct {
	State string
	Wave  *int // 0-based
	After string
	Limit int
}

// Transition moves one job, if it is still in one of From.
type Transition struct {
	RolloutID, DeviceID, JobID string
	From                       []string
	To                         string
	Error                      string
	Progress                   *float64
	At                         time.Time
	// RetryJobID, when set on a move to a failure, re-queues the job as a
	// new attempt with this id instead; the failed attempt is kept in history.
	RetryJobID string
}

// Stale is a job with its rollout, for the sweeps: an active or queued job
// that may be overdue, or a handed-out one whose payload is due for renewal.
type Stale struct {
	Job     Job
	Rollout *Rollout
	// Payload is the job's fw/job as stored (Refreshable only).
	Payload *protocol.FwJob
}

// Gauges are the figures behind the firmware gauges.
type Gauges struct {
	Jobs         map[string]int // jobs of live (running, paused) rollouts by state
	Rollouts     map[string]int // rollouts by status
	MaxWave      int            // highest current wave (1-based) of running rollouts
	FailureRatio float64        // highest failures/finished of live rollouts
}

// LockerJobs is what a locker's birth may settle (Store.BirthJobs).
type LockerJobs struct {
	Active     *Job  // nil: none
	Settleable []Job // queued and timed out
}

// Store keeps artifacts, rollouts and jobs. The PostgreSQL implementation
// lives in package postgres; every method is safe for concurrent use.
type Store interface {
	// CreateArtifact stores a; fleet.ErrConflict when the model has the version.
	CreateArtifact(ctx context.Context, a *Artifact) error
	// GetArtifact returns an artifact, or fleet.ErrNotFound.
	GetArtifact(ctx context.Context, id string) (*Artifact, error)
	// FindArtifact returns the artifact of a model and version, compared as
	// semantic versions ("v1.5" finds 1.5.0), or fleet.ErrNotFound.
	FindArtifact(ctx context.Context, model, version string) (*Artifact, error)
	// ListArtifacts returns artifacts ordered by id, after after.
	ListArtifacts(ctx context.Context, after string, limit int) ([]Artifact, error)

	// Targets returns the lockers sel matches (of any model: the engine
	// filters), ordered by id.
	Targets(ctx context.Context, sel Selector) ([]Target, error)
	// CreateRollout stores a rollout and its jobs in one transaction.
	CreateRollout(ctx context.Context, r *Rollout, jobs []Job) error
	// GetRollout returns a rollout, or fleet.ErrNotFound.
	GetRollout(ctx context.Context, id string) (*Rollout, error)
	// ListRollouts returns rollouts newest first, after the rollout id after.
	ListRollouts(ctx context.Context, after string, limit int) ([]Rollout, error)
	// LiveRollouts returns the ids of the rollouts a step may move at now:
	// running and paused ones (a paused one ends at its deadline, and a
	// gate crossed while it is paused is recorded on it).
	LiveRollouts(ctx context.Context) ([]string, error)
	// Counts returns a rollout's jobs per wave and state.
	Counts(ctx context.Context, id string) ([]Count, error)
	// Waiting counts the queued jobs of rollout r's waves up to its
	// current one whose locker cannot take them now, by why (Wait*).
	Waiting(ctx context.Context, r *Rollout) (map[string]int, error)
	// WaveFailures returns the failures of one wave its gate counts (not
	// accepted by a resume) and its size.
	WaveFailures(ctx context.Context, id string, wave int) (failed, size int, err error)
	// ListJobs returns a rollout's jobs ordered by locker id.
	ListJobs(ctx context.Context, id string, f JobFilter) ([]Job, error)

	// Step runs f with the rollout's row locked, in one transaction.
	Step(ctx context.Context, id string, f func(tx StepTx) error) error
	// Update runs f with the rollout's row locked, in one transaction, for
	// operator actions (pause, resume, cancel, retry).
	Update(ctx context.Context, id string, f func(tx StepTx) error) error

	// GetJob returns a locker's job by wire id, or fleet.ErrNotFound.
	GetJob(ctx context.Context, deviceID, jobID string) (*Job, error)
	// JobState returns the state of the job one of whose attempts has
	// wire id jobID (the current one, or one retried since), or
	// fleet.ErrNotFound.
	JobState(ctx context.Context, jobID string) (string, error)
	// BirthJobs returns, in one read, what the births of lockers may
	// settle: each one's active job and its queued and timed-out jobs (a
	// success that came after the timeout). Lockers with none are missing
	// from the map.
	BirthJobs(ctx context.Context, deviceIDs []string) (map[string]LockerJobs, error)
	// RunningVersion returns the version of the locker's last birth.
	RunningVersion(ctx context.Context, deviceID string) (string, error)
	// Apply makes a transition; it returns the job as it is afterwards, or
	// nil when the job was not in one of t.From (nothing changed).
	Apply(ctx context.Context, t Transition) (*Job, error)
	// Stale returns jobs of live rollouts that may be overdue at now: active
	// ones silent for longer than their rollout's step timeout, and queued
	// or active ones of rollouts past their deadline.
	Stale(ctx context.Context, now time.Time) ([]Stale, error)
	// Refreshable returns up to n handed-out jobs (sent, downloading,
	// verifying) whose payload is due for renewal at now (RefreshAt), the
	// longest due first, with the payload.
	Refreshable(ctx context.Context, now time.Time, n int) ([]Stale, error)
	// RefreshPayload replaces the payload of a job still handed out under
	// jobID (nothing else changes, the step timeout's clock included); it
	// reports whether it did.
	RefreshPayload(ctx context.Context, deviceID, jobID string, p *protocol.FwJob, next time.Time) (bool, error)
	// SentDevices returns lockers with a job handed out but not reported on.
	SentDevices(ctx context.Context) ([]string, error)
	// Gauges returns the figures of the firmware gauges.
	Gauges(ctx context.Context) (*Gauges, error)

	// Audit appends to the audit log.
	Audit(ctx context.Context, e fleet.AuditEntry) error
}

// StepTx is a rollout locked in a transaction.
type StepTx interface {
	// Rollout is the locked rollout; Save writes back its progress fields
	// (status, wave, gate, rate, reason, finished).
	Rollout() *Rollout
	Save(ctx context.Context) error
	// Counts returns the rollout's jobs per wave and state.
	Counts(ctx context.Context) ([]Count, error)
	// Ready counts the queued jobs of a wave whose locker can take a job
	// now (online, enabled, every door closed, no other active job), or
	// whose locker cannot take it at all (disabled, or of another model
	// than the rollout's): Dispatch settles those.
	Ready(ctx context.Context, wave int) (int, error)
	// Dispatch takes up to n ready jobs of waves up to maxWave, in wave and
	// sequence order, with their lockers as they are now (Job.Locker*),
	// and hands each out with the payload job makes: it becomes sent. When
	// job returns a nil payload, the job is not handed out but ends in the
	// final state (and error) job set on it. It returns the jobs taken, in
	// their new states.
	Dispatch(ctx context.Context, maxWave, n int, at time.Time, job func(*Job) (*protocol.FwJob, error)) ([]Job, error)
	// Cancel moves the rollout's jobs in one of from to cancelled and returns them.
	Cancel(ctx context.Context, from []string, at time.Time) ([]Job, error)
	// Requeue makes the jobs in one of states new queued attempts; newID
	// names each attempt. It returns how many.
	Requeue(ctx context.Context, at time.Time, states []string, newID func(j *Job) string) (int, error)
	// AcceptFailures flags n failed jobs of wave, not flagged yet, as
	// accepted (a resume): its gate no longer counts them. Requeue clears
	// every flag.
	AcceptFailures(ctx context.Context, wave, n int) error
}

// Fleet is what the engine needs of the fleet manager.
type Fleet interface {
	// PublishRetained re-publishes a locker's retained state, fw/job included.
	PublishRetained(ctx context.Context, id string) error
}

// FleetFunc adapts a function to Fleet.
type FleetFunc func(ctx context.Context, id string) error

// PublishRetained implements Fleet.
func (f FleetFunc) PublishRetained(ctx context.Context, id string) error { return f(ctx, id) }
