-- born_at: when a locker's latest birth was recorded. A firmware job is handed
-- out only once the birth of the locker's current session is in
-- (born_at >= connected_at): before it, the model and version the job is
-- checked against are the previous session's, and a board replaced by one of
-- another model would be sent an image it cannot run. Lockers online at the
-- upgrade are taken as born at their session's start. Adding a nullable
-- column rewrites nothing; the UPDATE touches each row once.
ALTER TABLE devices ADD COLUMN IF NOT EXISTS born_at timestamptz;
UPDATE devices SET born_at = connected_at WHERE born_at IS NULL AND connected_at IS NOT NULL;
