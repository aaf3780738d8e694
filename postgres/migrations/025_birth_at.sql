-- born_at: when a locker's latest birth was recorded. A firmware job is handed
-- out only once the birth of the locker's current session is in
-- (born_at >= connected_at): before it, the model and version the job is
-- checked against are the previous session's, and a board replaced by one of
-- another model would be sent an image it cannot run. Lockers with a session
-- at the upgrade are taken as born at its start.
--
-- birth_ts: that birth's own ts (the locker's clock; NULL when it had none).
-- A copy of the birth a session is recorded from (a retained one a broker
-- hands a new subscription, the same one delivered twice) is known by it and
-- boot_id, and starts no second session. For births recorded before: their
-- arrival plus the offset they gave (to within 2 ms: the offset was kept in
-- whole milliseconds).
--
-- Adding nullable columns rewrites nothing; the one UPDATE writes each row
-- that had a session once, under the ALTER's lock, held to the migration's
-- commit (devices is locked that long: seconds for a large fleet).
ALTER TABLE devices ADD COLUMN IF NOT EXISTS born_at timestamptz,
    ADD COLUMN IF NOT EXISTS birth_ts timestamptz;
UPDATE devices SET born_at = connected_at,
        birth_ts = date_trunc('milliseconds', connected_at + clock_offset_ms * interval '1 millisecond')
    WHERE born_at IS NULL AND connected_at IS NOT NULL;
