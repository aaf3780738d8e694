-- born_at: when a locker's latest birth was recorded. A firmware job is handed
-- out only once the birth of the locker's current session is in
-- (born_at >= connected_at): before it, the model and version the job is
-- checked against are the previous session's, and a board replaced by one of
-- another model would be sent an image it cannot run. Lockers online at the
-- upgrade are taken as born at their session's start. Adding a nullable
-- column rewrites nothing; the UPDATE touches each row once.
ALTER TABLE devices ADD COLUMN IF NOT EXISTS born_at timestamptz;
-- birth_ts: that birth's own ts (the locker's clock; NULL when it had none).
-- A copy of the birth a session is recorded from (a retained one a broker
-- hands a new subscription, the same one delivered twice) is known by it and
-- boot_id, and starts no second session.
ALTER TABLE devices ADD COLUMN IF NOT EXISTS birth_ts timestamptz;
UPDATE devices SET born_at = connected_at WHERE born_at IS NULL AND connected_at IS NOT NULL;
-- The ts of the births recorded before: their arrival plus the offset they
-- gave (to within 2 ms: the offset was kept in whole milliseconds).
UPDATE devices SET birth_ts = date_trunc('milliseconds', connected_at + clock_offset_ms * interval '1 millisecond')
    WHERE birth_ts IS NULL AND connected_at IS NOT NULL AND clock_offset_ms IS NOT NULL;
