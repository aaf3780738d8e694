-- Firmware artifacts, rollouts and per-locker jobs (issue 6, docs/firmware.md).

-- Images live on disk under <data-dir>/firmware/<file>; this is their record.
CREATE TABLE firmware (
    id         text PRIMARY KEY,
    model      text NOT NULL,
    version    text NOT NULL,
    size       bigint NOT NULL CHECK (size > 0),
    sha256     text NOT NULL,
    sig        text NOT NULL,
    file       text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    created_by text NOT NULL DEFAULT '',
    UNIQUE (model, version)
);

CREATE TABLE rollouts (
    id              text PRIMARY KEY,
    firmware_id     text NOT NULL REFERENCES firmware (id),
    version         text NOT NULL,
    model           text NOT NULL,
    selector        jsonb NOT NULL,
    waves           int[] NOT NULL,          -- cumulative percentages
    wave_sizes      int[] NOT NULL,          -- jobs per wave, fixed at creation
    max_failure_pct double precision NOT NULL,
    min_per_wave    int NOT NULL,
    rate_per_min    int NOT NULL,
    deadline        timestamptz,
    step_timeout_s  int NOT NULL,
    failure_action  text NOT NULL CHECK (failure_action IN ('pause', 'abort')),
    retries         int NOT NULL,
    retry_on        text[] NOT NULL,
    install_window  text NOT NULL DEFAULT '',
    force           boolean NOT NULL DEFAULT false,
    status          text NOT NULL CHECK (status IN ('running', 'paused', 'aborted', 'completed', 'cancelled')),
    wave            int NOT NULL DEFAULT 0,  -- current wave, 0-based
    gate_from       int NOT NULL DEFAULT 0,  -- first wave still gated
    tat             timestamptz,             -- rate limiter: when the next job is due
    reason          text NOT NULL DEFAULT '',
    created_by      text NOT NULL DEFAULT '',
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL,
    finished_at     timestamptz
);
CREATE INDEX rollouts_live ON rollouts (status) WHERE status IN ('running', 'paused');

-- One row per targeted locker; job_id is the wire id of the current attempt.
CREATE TABLE fw_jobs (
    rollout_id text NOT NULL REFERENCES rollouts (id),
    device_id  text NOT NULL REFERENCES devices (id),
    job_id     text NOT NULL UNIQUE,
    wave       int NOT NULL,                 -- -1 for skipped lockers
    seq        int NOT NULL,
    state      text NOT NULL CHECK (state IN ('queued', 'sent', 'downloading', 'verifying', 'installing',
        'rebooting', 'succeeded', 'failed', 'rejected', 'timed_out', 'cancelled', 'skipped')),
    error      text NOT NULL DEFAULT '',
    attempt    int NOT NULL,
    from_fw    text NOT NULL,
    version    text NOT NULL,
    tz         text NOT NULL DEFAULT 'UTC',
    progress   real,
    payload    jsonb,                        -- the fw/job as handed out
    sent_at    timestamptz,
    updated_at timestamptz NOT NULL,
    done_at    timestamptz,
    PRIMARY KEY (rollout_id, device_id)
);
-- Few indexes: every state change rewrites the row in each index whose
-- predicate the new state matches (docs/firmware.md, benchmarks). Per-rollout
-- scans use the primary key's rollout_id prefix.
CREATE INDEX fw_jobs_queued ON fw_jobs (rollout_id, wave, seq) WHERE state = 'queued';
-- At most one job per locker is on its fw/job at a time, across rollouts.
CREATE UNIQUE INDEX fw_jobs_active ON fw_jobs (device_id)
    WHERE state IN ('sent', 'downloading', 'verifying', 'installing', 'rebooting');

-- Earlier attempts of retried jobs.
CREATE TABLE fw_job_attempts (
    job_id     text PRIMARY KEY,
    rollout_id text NOT NULL,
    device_id  text NOT NULL,
    attempt    int NOT NULL,
    state      text NOT NULL,
    error      text NOT NULL DEFAULT '',
    sent_at    timestamptz,
    done_at    timestamptz NOT NULL
);
CREATE INDEX fw_job_attempts_rollout ON fw_job_attempts (rollout_id, device_id);
