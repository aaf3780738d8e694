package postgres

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/lockergate/lockergate/firmware"
	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/protocol"
)

var _ firmware.Store = (*DB)(nil)

// fwActive is firmware.ActiveStates as SQL.
const fwActive = `('sent', 'downloading', 'verifying', 'installing', 'rebooting')`

// --- artifacts

const fwArtifactCols = `id, model, version, size, sha256, sig, file, created_at, created_by`

func scanArtifact(row pgx.Row) (*firmware.Artifact, error) {
	var a firmware.Artifact
	err := row.Scan(&a.ID, &a.Model, &a.Version, &a.Size, &a.SHA256, &a.Sig, &a.File, &a.CreatedAt, &a.CreatedBy)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, fleet.ErrNotFound
	}
	return &a, err
}

// CreateArtifact implements firmware.Store.
func (db *DB) CreateArtifact(ctx context.Context, a *firmware.Artifact) error {
	_, err := db.pool.Exec(ctx, `INSERT INTO firmware (`+fwArtifactCols+`) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)`,
		a.ID, a.Model, a.Version, a.Size, a.SHA256, a.Sig, a.File, a.CreatedAt, a.CreatedBy)
	if isUniqueViolation(err) {
		return fmt.Errorf("%w: model %s already has firmware %s", fleet.ErrConflict, a.Model, a.Version)
	}
	return err
}

// GetArtifact implements firmware.Store.
func (db *DB) GetArtifact(ctx context.Context, id string) (*firmware.Artifact, error) {
	return scanArtifact(db.pool.QueryRow(ctx, `SELECT `+fwArtifactCols+` FROM firmware WHERE id = $1`, id))
}

// FindArtifact implements firmware.Store. Versions are compared in Go, as
// semantic versions: uploads store them canonically, but images uploaded
// before that may spell one otherwise ("v1.5"). A model has few images.
func (db *DB) FindArtifact(ctx context.Context, model, version string) (*firmware.Artifact, error) {
	rows, err := db.pool.Query(ctx, `SELECT `+fwArtifactCols+` FROM firmware WHERE model = $1 ORDER BY created_at, id`, model)
	if err != nil {
		return nil, err
	}
	all, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (*firmware.Artifact, error) { return scanArtifact(row) })
	if err != nil {
		return nil, err
	}
	for _, a := range all {
		if firmware.SameVersion(a.Version, version) {
			return a, nil
		}
	}
	return nil, fleet.ErrNotFound
}

// ListArtifacts implements firmware.Store.
func (db *DB) ListArtifacts(ctx context.Context, after string, n int) ([]firmware.Artifact, error) {
	rows, err := db.pool.Query(ctx, `SELECT `+fwArtifactCols+` FROM firmware WHERE id > $1 ORDER BY id LIMIT $2`, after, limit(n))
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(row pgx.CollectableRow) (firmware.Artifact, error) {
		a, err := scanArtifact(row)
		if err != nil {
			return firmware.Artifact{}, err
		}
		return *a, nil
	})
}

// --- rollouts

const fwRolloutCols = `id, firmware_id, version, model, selector, waves, wave_sizes, max_failure_pct, min_per_wave,
	rate_per_min, deadline, step_timeout_s, failure_action, retries, retry_on, install_window, force, status, wave,
	gate_from, tat, reason, created_by, created_at, updated_at, finished_at`

func scanRollout(row pgx.Row) (*firmware.Rollout, error) {
	var r firmware.Rollout
	var sel []byte
	var tat *time.Time
	err := row.Scan(&r.ID, &r.Firmware, &r.Version, &r.Model, &sel, &r.Waves, &r.WaveSizes, &r.MaxFailurePct,
		&r.MinPerWave, &r.RatePerMin, &r.Deadline, &r.StepTimeoutS, &r.FailureAction, &r.Retries, &r.RetryOn,
		&r.Window, &r.Force, &r.Status, &r.Wave, &r.GateFrom, &tat, &r.Reason, &r.CreatedBy, &r.CreatedAt,
		&r.UpdatedAt, &r.FinishedAt)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, fleet.ErrNotFound
	}
	if err != nil {
		return nil, err
	}
	if tat != nil {
		r.TAT = *tat
	}
	if err := json.Unmarshal(sel, &r.Selector); err != nil {
		return nil, fmt.Errorf("rollout %s selector: %w", r.ID, err)
	}
	return &r, nil
}

// CreateRollout implements firmware.Store.
func (db *DB) CreateRollout(ctx context.Context, r *firmware.Rollout, jobs []firmware.Job) error {
	sel, err := json.Marshal(r.Selector)
	if err != nil {
		return err
	}
	return pgx.BeginFunc(ctx, db.pool, func(tx pgx.Tx) error {
		_, err := tx.Exec(ctx, `INSERT INTO rollouts (`+fwRolloutCols+`) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10,
			$11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24, $25, $26)`,
			r.ID, r.Firmware, r.Version, r.Model, sel, r.Waves, r.WaveSizes, r.MaxFailurePct, r.MinPerWave,
			r.RatePerMin, r.Deadline, r.StepTimeoutS, r.FailureAction, r.Retries, r.RetryOn, r.Window, r.Force,
			r.Status, r.Wave, r.GateFrom, fwNullTime(r.TAT), r.Reason, r.CreatedBy, r.CreatedAt, r.UpdatedAt, r.FinishedAt)
		if err != nil {
			return fmt.Errorf("insert rollout: %w", err)
		}
		_, err = tx.CopyFrom(ctx, pgx.Identifier{"fw_jobs"},
			[]string{"rollout_id", "device_id", "job_id", "wave", "seq", "state", "error", "attempt", "from_fw", "version", "tz", "updated_at", "done_at"},
			pgx.CopyFromSlice(len(jobs), func(i int) ([]any, error) {
				j := &jobs[i]
				return []any{j.RolloutID, j.DeviceID, j.JobID, j.Wave, j.Seq, j.State, j.Error, j.Attempt, j.FromFW, j.Version, j.TZ, j.UpdatedAt, j.DoneAt}, nil
			}))
		if err != nil {
			return fmt.Errorf("insert jobs: %w", err)
		}
		return nil
	})
}

func fwNullTime(t time.Time) *time.Time {
	if t.IsZero() {
		return nil
	}
	return &t
}

// GetRollout implements firmware.Store.
func (db *DB) GetRollout(ctx context.Context, id string) (*firmware.Rollout, error) {
	return scanRollout(db.pool.QueryRow(ctx, `SELECT `+fwRolloutCols+` FROM rollouts WHERE id = $1`, id))
}

// ListRollouts implements firmware.Store: newest first; after is the id of
// the last rollout of the previous page.
func (db *DB) ListRollouts(ctx context.Context, after string, n int) ([]firmware.Rollout, error) {
	rows, err := db.pool.Query(ctx, `SELECT `+fwRolloutCols+` FROM rollouts
		WHERE $1 = '' OR (created_at, id) < (SELECT created_at, id FROM rollouts WHERE id = $1)
		ORDER BY created_at DESC, id DESC LIMIT $2`, after, limit(n))
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(row pgx.CollectableRow) (firmware.Rollout, error) {
		r, err := scanRollout(row)
		if err != nil {
			return firmware.Rollout{}, err
		}
		return *r, nil
	})
}

// LiveRollouts implements firmware.Store.
func (db *DB) LiveRollouts(ctx context.Context) ([]string, error) {
	rows, err := db.pool.Query(ctx, `SELECT id FROM rollouts
		WHERE status IN ('running', 'paused') ORDER BY created_at`)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, pgx.RowTo[string])
}

type fwQuerier interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

func fwCounts(ctx context.Context, q fwQuerier, id string) ([]firmware.Count, error) {
	rows, err := q.Query(ctx, `SELECT wave, state, CASE WHEN state = 'skipped' THEN error ELSE '' END, gate_accepted, count(*), max(updated_at)
		FROM fw_jobs WHERE rollout_id = $1 GROUP BY 1, 2, 3, 4`, id)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(row pgx.CollectableRow) (firmware.Count, error) {
		var c firmware.Count
		err := row.Scan(&c.Wave, &c.State, &c.Reason, &c.Accepted, &c.N, &c.Last)
		return c, err
	})
}

// Counts implements firmware.Store.
func (db *DB) Counts(ctx context.Context, id string) ([]firmware.Count, error) {
	return fwCounts(ctx, db.pool, id)
}

// Waiting implements firmware.Store: the queued jobs that fwReady leaves
// out for their locker, by the first reason that holds. The jobs whose
// locker can take them group under NULL, skipped here: a filter on the
// reason in SQL has the planner work the reason out twice (each a scan of
// every compartment once the rollout is large).
func (db *DB) Waiting(ctx context.Context, r *firmware.Rollout) (map[string]int, error) {
	var cases strings.Builder
	for _, w := range fwWaits {
		fmt.Fprintf(&cases, " WHEN %s THEN '%s'", w.cond, w.why)
	}
	rows, err := db.pool.Query(ctx, `SELECT why, count(*) FROM (
			SELECT CASE`+cases.String()+` END AS why
			FROM fw_jobs j JOIN devices d ON d.id = j.device_id
			WHERE j.rollout_id = $1 AND j.wave <= $2 AND j.state = 'queued' AND NOT d.disabled AND d.model = $3) w
		GROUP BY why`, r.ID, r.Wave, r.Model)
	if err != nil {
		return nil, err
	}
	out := map[string]int{}
	var why *string
	var n int
	_, err = pgx.ForEachRow(rows, []any{&why, &n}, func() error {
		if why != nil {
			out[*why] = n
		}
		return nil
	})
	return out, err
}

// WaveFailures implements firmware.Store. The size leaves out jobs skipped
// at hand-out (their locker changed since the rollout was created).
func (db *DB) WaveFailures(ctx context.Context, id string, wave int) (failed, size int, err error) {
	err = db.pool.QueryRow(ctx, `SELECT count(*) FILTER (WHERE state IN ('failed', 'rejected', 'timed_out') AND NOT gate_accepted),
			count(*) FILTER (WHERE state <> 'skipped')
		FROM fw_jobs WHERE rollout_id = $1 AND wave = $2`, id, wave).Scan(&failed, &size)
	return failed, size, err
}

// Targets implements firmware.Store. A locker is busy when another live
// rollout has an unfinished job for it, or any job of it is on its fw/job.
// The selector's fw is compared as a version (firmware.SameVersion: v1.4.2
// selects lockers that report 1.4.2), so it is judged here, not in SQL.
func (db *DB) Targets(ctx context.Context, sel firmware.Selector) ([]firmware.Target, error) {
	lockers := sel.Lockers
	if lockers == nil {
		lockers = []string{}
	}
	rows, err := db.pool.Query(ctx, `
		WITH busy AS (
			SELECT device_id FROM fw_jobs WHERE state IN `+fwActive+`
			UNION
			SELECT j.device_id FROM rollouts r JOIN fw_jobs j ON j.rollout_id = r.id
			WHERE r.status IN ('running', 'paused') AND j.state = 'queued')
		SELECT d.id, d.model, d.fw, s.timezone, b.device_id IS NOT NULL, d.disabled
		FROM devices d JOIN sites s ON s.id = d.site LEFT JOIN busy b ON b.device_id = d.id
		WHERE ($1 = '' OR d.site = $1) AND ($2 = '' OR d.model = $2)
			AND (cardinality($3::text[]) = 0 OR d.id = ANY($3))
		ORDER BY d.id`, sel.Site, sel.Model, lockers)
	if err != nil {
		return nil, err
	}
	ts, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (firmware.Target, error) {
		var t firmware.Target
		err := row.Scan(&t.DeviceID, &t.Model, &t.FW, &t.TZ, &t.Busy, &t.Disabled)
		return t, err
	})
	if err != nil || sel.FW == "" {
		return ts, err
	}
	return slices.DeleteFunc(ts, func(t firmware.Target) bool { return !firmware.SameVersion(t.FW, sel.FW) }), nil
}

// --- jobs

const fwJobCols = `rollout_id, device_id, job_id, wave, seq, state, error, attempt, from_fw, version, tz, progress,
	sent_at, updated_at, done_at`

func scanFwJob(row pgx.Row) (*firmware.Job, error) {
	var j firmware.Job
	err := row.Scan(&j.RolloutID, &j.DeviceID, &j.JobID, &j.Wave, &j.Seq, &j.State, &j.Error, &j.Attempt, &j.FromFW,
		&j.Version, &j.TZ, &j.Progress, &j.SentAt, &j.UpdatedAt, &j.DoneAt)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, fleet.ErrNotFound
	}
	return &j, err
}

func collectFwJobs(rows pgx.Rows, err error) ([]firmware.Job, error) {
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(row pgx.CollectableRow) (firmware.Job, error) {
		j, err := scanFwJob(row)
		if err != nil {
			return firmware.Job{}, err
		}
		return *j, nil
	})
}

// ListJobs implements firmware.Store.
func (db *DB) ListJobs(ctx context.Context, id string, f firmware.JobFilter) ([]firmware.Job, error) {
	return collectFwJobs(db.pool.Query(ctx, `SELECT `+fwJobCols+` FROM fw_jobs
		WHERE rollout_id = $1 AND ($2 = '' OR state = $2) AND ($3::int IS NULL OR wave = $3) AND device_id > $4
		ORDER BY device_id LIMIT $5`, id, f.State, f.Wave, f.After, limit(f.Limit)))
}

// GetJob implements firmware.Store.
func (db *DB) GetJob(ctx context.Context, deviceID, jobID string) (*firmware.Job, error) {
	j, err := scanFwJob(db.pool.QueryRow(ctx, `SELECT `+fwJobCols+` FROM fw_jobs WHERE job_id = $1 AND device_id = $2`, jobID, deviceID))
	return j, dataError(err) // a job id from a device that text cannot hold
}

// JobState implements firmware.Store: an earlier attempt's id answers its
// job's current state.
func (db *DB) JobState(ctx context.Context, jobID string) (string, error) {
	var state string
	err := db.pool.QueryRow(ctx, `SELECT state FROM fw_jobs WHERE job_id = $1
		UNION ALL
		SELECT j.state FROM fw_job_attempts a JOIN fw_jobs j USING (rollout_id, device_id) WHERE a.job_id = $1
		LIMIT 1`, jobID).Scan(&state)
	if errors.Is(err, pgx.ErrNoRows) {
		return "", fleet.ErrNotFound
	}
	return state, dataError(err) // an id text cannot hold
}

// BirthJobs implements firmware.Store.
func (db *DB) BirthJobs(ctx context.Context, deviceIDs []string) (map[string]firmware.LockerJobs, error) {
	jobs, err := collectFwJobs(db.pool.Query(ctx, `SELECT `+fwJobCols+` FROM fw_jobs
		WHERE device_id = ANY($1) AND (state IN `+fwActive+` OR state IN ('queued', 'timed_out')) ORDER BY device_id, rollout_id`, deviceIDs))
	if err != nil {
		return nil, err
	}
	out := make(map[string]firmware.LockerJobs)
	for i := range jobs {
		lj := out[jobs[i].DeviceID]
		if firmware.IsActive(jobs[i].State) {
			lj.Active = &jobs[i]
		} else {
			lj.Settleable = append(lj.Settleable, jobs[i])
		}
		out[jobs[i].DeviceID] = lj
	}
	return out, nil
}

// RunningVersion implements firmware.Store.
func (db *DB) RunningVersion(ctx context.Context, deviceID string) (string, error) {
	var fw string
	err := db.pool.QueryRow(ctx, `SELECT fw FROM devices WHERE id = $1`, deviceID).Scan(&fw)
	if errors.Is(err, pgx.ErrNoRows) {
		return "", fleet.ErrNotFound
	}
	return fw, err
}

// Apply implements firmware.Store.
func (db *DB) Apply(ctx context.Context, t firmware.Transition) (*firmware.Job, error) {
	final := firmware.IsFinal(t.To)
	var done *time.Time
	if final {
		done = &t.At
	}
	var j *firmware.Job
	var err error
	if t.RetryJobID == "" {
		j, err = scanFwJob(db.pool.QueryRow(ctx, applySQL, applyArgs(t, done)...))
	} else {
		j, err = db.applyRetry(ctx, t, done)
	}
	if errors.Is(err, fleet.ErrNotFound) {
		return nil, nil
	}
	if isUniqueViolation(err) {
		// The job cannot take the state while another of the locker's is
		// active (fw_jobs_active): a late report of a cancelled job after
		// the locker was handed another one. Nothing applied, for good; an
		// error here would be retried for ever by the report's caller.
		return nil, nil
	}
	return j, dataError(err)
}

// applySQL moves a job to its next state (Apply without a retry).
const applySQL = `UPDATE fw_jobs SET state = $4, error = $5,
		progress = CASE WHEN $4 = state THEN coalesce($6, progress) ELSE $6 END,
		updated_at = $7, done_at = $8
	WHERE job_id = $1 AND device_id = $2 AND state = ANY($3)
	RETURNING ` + fwJobCols

func applyArgs(t firmware.Transition, done *time.Time) []any {
	return []any{t.JobID, t.DeviceID, t.From, t.To, t.Error, t.Progress, t.At, done}
}

// applyRetry applies a failure t that the caller found retryable: the
// failed attempt goes to history and the job is queued again under a new
// id, so the locker sees a new job. The rollout is read again under a
// share lock first (the order of Step and the operator actions, which lock
// it before its jobs): one cancelled, aborted or completed since the
// caller read it gets no retry, and the failure is recorded as final.
func (db *DB) applyRetry(ctx context.Context, t firmware.Transition, done *time.Time) (*firmware.Job, error) {
	var j *firmware.Job
	err := pgx.BeginFunc(ctx, db.pool, func(tx pgx.Tx) error {
		var live bool
		err := tx.QueryRow(ctx, `SELECT r.status IN ('running', 'paused') FROM rollouts r
			WHERE r.id = (SELECT rollout_id FROM fw_jobs WHERE job_id = $1 AND device_id = $2) FOR SHARE`, t.JobID, t.DeviceID).Scan(&live)
		if errors.Is(err, pgx.ErrNoRows) {
			return fleet.ErrNotFound
		}
		if err != nil {
			return err
		}
		if !live {
			j, err = scanFwJob(tx.QueryRow(ctx, applySQL, applyArgs(t, done)...))
			return err
		}
		j, err = scanFwJob(tx.QueryRow(ctx, `
			WITH old AS (
				SELECT rollout_id, device_id, job_id, attempt, sent_at FROM fw_jobs
				WHERE job_id = $1 AND device_id = $2 AND state = ANY($3) FOR UPDATE),
			arch AS (
				INSERT INTO fw_job_attempts (job_id, rollout_id, device_id, attempt, state, error, sent_at, done_at)
				SELECT job_id, rollout_id, device_id, attempt, $4, $5, sent_at, $6 FROM old)
			UPDATE fw_jobs j SET job_id = $7, state = 'queued', error = $5, attempt = j.attempt + 1, progress = NULL,
				payload = NULL, sent_at = NULL, done_at = NULL, updated_at = $6
			FROM old WHERE j.rollout_id = old.rollout_id AND j.device_id = old.device_id
			RETURNING `+fwPrefixed("j", fwJobCols), t.JobID, t.DeviceID, t.From, t.To, t.Error, t.At, t.RetryJobID))
		return err
	})
	return j, err
}

// fwPrefixed qualifies a column list with a table alias.
func fwPrefixed(alias, cols string) string {
	out := ""
	for i, c := range fwSplitCols(cols) {
		if i > 0 {
			out += ", "
		}
		out += alias + "." + c
	}
	return out
}

func fwSplitCols(cols string) []string {
	var out []string
	cur := ""
	for _, r := range cols {
		switch r {
		case ',':
			out = append(out, cur)
			cur = ""
		case ' ', '\n', '\t':
		default:
			cur += string(r)
		}
	}
	return append(out, cur)
}

// Stale implements firmware.Store.
func (db *DB) Stale(ctx context.Context, now time.Time) ([]firmware.Stale, error) {
	jobs, err := collectFwJobs(db.pool.Query(ctx, `
		SELECT `+fwPrefixed("j", fwJobCols)+` FROM fw_jobs j JOIN rollouts r ON r.id = j.rollout_id
		WHERE j.state IN `+fwActive+` AND j.updated_at < $1::timestamptz - make_interval(secs => r.step_timeout_s)
		UNION ALL
		SELECT `+fwPrefixed("j", fwJobCols)+` FROM fw_jobs j JOIN rollouts r ON r.id = j.rollout_id
		WHERE r.status IN ('running', 'paused') AND r.deadline <= $1::timestamptz
			AND (j.state = 'queued' OR (j.state IN `+fwActive+` AND j.updated_at >= $1::timestamptz - make_interval(secs => r.step_timeout_s)))`, now))
	if err != nil {
		return nil, err
	}
	out := make([]firmware.Stale, 0, len(jobs))
	rollouts := map[string]*firmware.Rollout{}
	for _, j := range jobs {
		r, ok := rollouts[j.RolloutID]
		if !ok {
			if r, err = db.GetRollout(ctx, j.RolloutID); err != nil {
				return nil, err
			}
			rollouts[j.RolloutID] = r
		}
		out = append(out, firmware.Stale{Job: j, Rollout: r})
	}
	return out, nil
}

// fwPending is firmware.PendingStates as SQL: the jobs whose payload a
// locker still uses (to download, or to wait for its window).
const fwPending = `('sent', 'downloading', 'verifying')`

// Refreshable implements firmware.Store. Jobs handed out before refresh_at
// existed have it set by the migration that added it, so they are renewed
// once too.
func (db *DB) Refreshable(ctx context.Context, now time.Time, n int) ([]firmware.Stale, error) {
	rows, err := db.pool.Query(ctx, `SELECT `+fwJobCols+`, payload FROM fw_jobs
		WHERE state IN `+fwPending+` AND refresh_at <= $1 AND payload IS NOT NULL
		ORDER BY refresh_at LIMIT $2`, now, n)
	if err != nil {
		return nil, err
	}
	type due struct {
		job     firmware.Job
		payload []byte
	}
	jobs, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (due, error) {
		var d due
		j := &d.job
		err := row.Scan(&j.RolloutID, &j.DeviceID, &j.JobID, &j.Wave, &j.Seq, &j.State, &j.Error, &j.Attempt, &j.FromFW,
			&j.Version, &j.TZ, &j.Progress, &j.SentAt, &j.UpdatedAt, &j.DoneAt, &d.payload)
		return d, err
	})
	if err != nil {
		return nil, err
	}
	out := make([]firmware.Stale, 0, len(jobs))
	rollouts := map[string]*firmware.Rollout{}
	for _, d := range jobs {
		r, ok := rollouts[d.job.RolloutID]
		if !ok {
			if r, err = db.GetRollout(ctx, d.job.RolloutID); err != nil {
				return nil, err
			}
			rollouts[d.job.RolloutID] = r
		}
		p := new(protocol.FwJob)
		if err := json.Unmarshal(d.payload, p); err != nil {
			return nil, fmt.Errorf("stored fw/job of %s: %w", d.job.JobID, err)
		}
		out = append(out, firmware.Stale{Job: d.job, Rollout: r, Payload: p})
	}
	return out, nil
}

// RefreshPayload implements firmware.Store. updated_at stays: it is the
// step timeout's clock, which only the locker's reports move.
func (db *DB) RefreshPayload(ctx context.Context, deviceID, jobID string, p *protocol.FwJob, next time.Time) (bool, error) {
	tag, err := db.pool.Exec(ctx, `UPDATE fw_jobs SET payload = $3::jsonb, refresh_at = $4
		WHERE device_id = $1 AND job_id = $2 AND state IN `+fwPending, deviceID, jobID, string(protocol.Encode(p)), next)
	return tag.RowsAffected() == 1, err
}

// SentDevices implements firmware.Store.
func (db *DB) SentDevices(ctx context.Context) ([]string, error) {
	rows, err := db.pool.Query(ctx, `SELECT device_id FROM fw_jobs WHERE state = 'sent' ORDER BY device_id`)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, pgx.RowTo[string])
}

// Gauges implements firmware.Store.
func (db *DB) Gauges(ctx context.Context) (*firmware.Gauges, error) {
	g := &firmware.Gauges{Jobs: map[string]int{}, Rollouts: map[string]int{}}
	b := &pgx.Batch{}
	b.Queue(`SELECT j.state, count(*) FROM fw_jobs j JOIN rollouts r ON r.id = j.rollout_id
		WHERE r.status IN ('running', 'paused') GROUP BY j.state`).Query(func(rows pgx.Rows) error {
		return scanFwCounts(rows, g.Jobs)
	})
	b.Queue(`SELECT status, count(*) FROM rollouts GROUP BY status`).Query(func(rows pgx.Rows) error {
		return scanFwCounts(rows, g.Rollouts)
	})
	b.Queue(`SELECT coalesce(max(wave) + 1, 0) FROM rollouts WHERE status = 'running'`).QueryRow(func(row pgx.Row) error {
		return row.Scan(&g.MaxWave)
	})
	b.Queue(`SELECT coalesce(max(f), 0) FROM (
			SELECT count(*) FILTER (WHERE j.state IN ('failed', 'rejected', 'timed_out'))::float8
				/ nullif(count(*) FILTER (WHERE j.state IN ('succeeded', 'failed', 'rejected', 'timed_out')), 0) AS f
			FROM fw_jobs j JOIN rollouts r ON r.id = j.rollout_id
			WHERE r.status IN ('running', 'paused') GROUP BY j.rollout_id) s`).QueryRow(func(row pgx.Row) error {
		return row.Scan(&g.FailureRatio)
	})
	if err := db.pool.SendBatch(ctx, b).Close(); err != nil {
		return nil, err
	}
	return g, nil
}

func scanFwCounts(rows pgx.Rows, into map[string]int) error {
	for rows.Next() {
		var k string
		var n int
		if err := rows.Scan(&k, &n); err != nil {
			return err
		}
		into[k] = n
	}
	return rows.Err()
}

// --- steps

// Step implements firmware.Store. When another transaction (another
// gateway instance, an operator action) holds the rollout, this step is
// skipped: the next tick tries again.
func (db *DB) Step(ctx context.Context, id string, f func(firmware.StepTx) error) error {
	return db.lockRollout(ctx, id, "FOR UPDATE SKIP LOCKED", f)
}

// Update implements firmware.Store: like Step, but waits for the lock.
func (db *DB) Update(ctx context.Context, id string, f func(firmware.StepTx) error) error {
	return db.lockRollout(ctx, id, "FOR UPDATE", f)
}

func (db *DB) lockRollout(ctx context.Context, id, lock string, f func(firmware.StepTx) error) error {
	return pgx.BeginFunc(ctx, db.pool, func(tx pgx.Tx) error {
		r, err := scanRollout(tx.QueryRow(ctx, `SELECT `+fwRolloutCols+` FROM rollouts WHERE id = $1 `+lock, id))
		if errors.Is(err, fleet.ErrNotFound) && lock != "FOR UPDATE" {
			return nil // locked elsewhere (or gone)
		}
		if err != nil {
			return err
		}
		return f(&rolloutTx{tx: tx, r: r})
	})
}

type rolloutTx struct {
	tx pgx.Tx
	r  *firmware.Rollout
}

func (s *rolloutTx) Rollout() *firmware.Rollout { return s.r }

func (s *rolloutTx) Save(ctx context.Context) error {
	r := s.r
	_, err := s.tx.Exec(ctx, `UPDATE rollouts SET status = $2, wave = $3, gate_from = $4, tat = $5, reason = $6,
		finished_at = $7, updated_at = now() WHERE id = $1`, r.ID, r.Status, r.Wave, r.GateFrom, fwNullTime(r.TAT), r.Reason, r.FinishedAt)
	return err
}

func (s *rolloutTx) Counts(ctx context.Context) ([]firmware.Count, error) {
	return fwCounts(ctx, s.tx, s.r.ID)
}

// fwReady is the condition for a queued job j (joined with its device d) to
// be taken by Dispatch now (modelParam is the query parameter holding the
// rollout's model): its locker can take it now, or never will (disabled, or
// of another model now: Dispatch ends those). A locker can take it once
// the birth of its current session is recorded (born_at, migration 025):
// until then its model and version are the last session's.
func fwReady(modelParam string) string {
	conds := make([]string, len(fwWaits))
	for i, w := range fwWaits {
		conds[i] = "(" + w.cond + ")"
	}
	return `j.state = 'queued' AND (d.disabled OR d.model <> ` + modelParam + ` OR NOT (` + strings.Join(conds, " OR ") + `))`
}

// fwWaits are the reasons a queued job j waits for its locker d (each
// never NULL), in the order Waiting names the first that holds: a locker
// for which none holds can take the job (fwReady).
var fwWaits = []struct{ why, cond string }{
	{firmware.WaitOffline, `NOT d.online`},
	{firmware.WaitNoBirth, `d.connected_at IS NOT NULL AND (d.born_at IS NULL OR d.born_at < d.connected_at)`},
	{firmware.WaitDoorOpen, `EXISTS (SELECT 1 FROM compartments c WHERE c.device_id = j.device_id AND c.door <> 'closed' AND NOT c.missing)`},
	{firmware.WaitOtherJob, `EXISTS (SELECT 1 FROM fw_jobs a WHERE a.device_id = j.device_id AND a.state IN ` + fwActive + `)`},
}

func (s *rolloutTx) Ready(ctx context.Context, wave int) (int, error) {
	var n int
	err := s.tx.QueryRow(ctx, `SELECT count(*) FROM fw_jobs j JOIN devices d ON d.id = j.device_id
		WHERE j.rollout_id = $1 AND j.wave = $2 AND `+fwReady("$3"), s.r.ID, wave, s.r.Model).Scan(&n)
	return n, err
}

func (s *rolloutTx) Dispatch(ctx context.Context, maxWave, n int, at time.Time, build func(*firmware.Job) (*protocol.FwJob, error)) ([]firmware.Job, error) {
	rows, err := s.tx.Query(ctx, `SELECT `+fwPrefixed("j", fwJobCols)+`, d.fw, d.model, d.disabled
		FROM fw_jobs j JOIN devices d ON d.id = j.device_id
		WHERE j.rollout_id = $1 AND j.wave <= $2 AND `+fwReady("$4")+`
		ORDER BY j.wave, j.seq LIMIT $3 FOR UPDATE OF j SKIP LOCKED`, s.r.ID, maxWave, n, s.r.Model)
	if err != nil {
		return nil, err
	}
	jobs, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (firmware.Job, error) {
		var j firmware.Job
		err := row.Scan(&j.RolloutID, &j.DeviceID, &j.JobID, &j.Wave, &j.Seq, &j.State, &j.Error, &j.Attempt, &j.FromFW,
			&j.Version, &j.TZ, &j.Progress, &j.SentAt, &j.UpdatedAt, &j.DoneAt, &j.LockerFW, &j.LockerModel, &j.LockerDisabled)
		return j, err
	})
	if err != nil || len(jobs) == 0 {
		return nil, err
	}
	var sent, sentPayloads, ended, endStates, endErrors []string
	var refresh []*time.Time
	for i := range jobs {
		j := &jobs[i]
		p, err := build(j)
		if err != nil {
			return nil, fmt.Errorf("job %s: %w", j.JobID, err)
		}
		if p == nil {
			if !firmware.IsFinal(j.State) {
				return nil, fmt.Errorf("job %s: neither handed out nor ended (state %q)", j.JobID, j.State)
			}
			ended, endStates, endErrors = append(ended, j.JobID), append(endStates, j.State), append(endErrors, j.Error)
			j.UpdatedAt, j.DoneAt = at, &at
			continue
		}
		sent, sentPayloads, refresh = append(sent, j.JobID), append(sentPayloads, string(protocol.Encode(p))), append(refresh, j.RefreshAt)
		j.State, j.Error, j.SentAt, j.UpdatedAt = firmware.StateSent, "", &at, at
	}
	if len(sent) > 0 {
		// A retry's error (why it was queued again) ends as it goes out.
		_, err = s.tx.Exec(ctx, `UPDATE fw_jobs j SET state = 'sent', error = '', payload = u.payload::jsonb, refresh_at = u.refresh_at,
				sent_at = $2, updated_at = $2
			FROM unnest($1::text[], $3::text[], $4::timestamptz[]) AS u(job_id, payload, refresh_at)
			WHERE j.job_id = u.job_id AND j.state = 'queued'`,
			sent, at, sentPayloads, refresh)
		if err != nil {
			return nil, err
		}
	}
	if len(ended) > 0 {
		_, err = s.tx.Exec(ctx, `UPDATE fw_jobs j SET state = u.state, error = u.error, updated_at = $2, done_at = $2
			FROM unnest($1::text[], $3::text[], $4::text[]) AS u(job_id, state, error)
			WHERE j.job_id = u.job_id AND j.state = 'queued'`,
			ended, at, endStates, endErrors)
		if err != nil {
			return nil, err
		}
	}
	return jobs, nil
}

func (s *rolloutTx) Cancel(ctx context.Context, from []string, at time.Time) ([]firmware.Job, error) {
	return collectFwJobs(s.tx.Query(ctx, `UPDATE fw_jobs SET state = 'cancelled', updated_at = $3, done_at = $3
		WHERE rollout_id = $1 AND state = ANY($2) RETURNING `+fwJobCols, s.r.ID, from, at))
}

func (s *rolloutTx) Requeue(ctx context.Context, at time.Time, states []string, newID func(*firmware.Job) string) (int, error) {
	jobs, err := collectFwJobs(s.tx.Query(ctx, `SELECT `+fwJobCols+` FROM fw_jobs
		WHERE rollout_id = $1 AND state = ANY($2) FOR UPDATE`, s.r.ID, states))
	if err != nil || len(jobs) == 0 {
		return 0, err
	}
	olds := make([]string, len(jobs))
	news := make([]string, len(jobs))
	for i := range jobs {
		olds[i], news[i] = jobs[i].JobID, newID(&jobs[i])
	}
	tag, err := s.tx.Exec(ctx, `
		WITH u AS (SELECT * FROM unnest($2::text[], $3::text[]) AS u(old, new)),
		arch AS (
			INSERT INTO fw_job_attempts (job_id, rollout_id, device_id, attempt, state, error, sent_at, done_at)
			SELECT j.job_id, j.rollout_id, j.device_id, j.attempt, j.state, j.error, j.sent_at, coalesce(j.done_at, $4)
			FROM fw_jobs j JOIN u ON u.old = j.job_id WHERE j.rollout_id = $1)
		UPDATE fw_jobs j SET job_id = u.new, state = 'queued', attempt = j.attempt + 1, progress = NULL, payload = NULL,
			sent_at = NULL, done_at = NULL, updated_at = $4
		FROM u WHERE j.job_id = u.old AND j.rollout_id = $1`, s.r.ID, olds, news, at)
	if err != nil {
		return 0, err
	}
	// Every wave is gated afresh: no failure stays accepted.
	_, err = s.tx.Exec(ctx, `UPDATE fw_jobs SET gate_accepted = false WHERE rollout_id = $1 AND gate_accepted`, s.r.ID)
	return int(tag.RowsAffected()), err
}

// AcceptFailures implements firmware.StepTx: the n earliest to fail (one
// that failed after the caller counted is left for the gate).
func (s *rolloutTx) AcceptFailures(ctx context.Context, wave, n int) error {
	_, err := s.tx.Exec(ctx, `UPDATE fw_jobs SET gate_accepted = true WHERE rollout_id = $1 AND device_id IN (
		SELECT device_id FROM fw_jobs WHERE rollout_id = $1 AND wave = $2 AND state IN ('failed', 'rejected', 'timed_out') AND NOT gate_accepted
		ORDER BY done_at, device_id LIMIT $3)`, s.r.ID, wave, n)
	return err
}
