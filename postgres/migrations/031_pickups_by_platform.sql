-- A platform's pickup list (GET /v1/pickups with a platform token: its own,
-- by id, maybe of one state) found them by scanning the whole table, which
-- keeps every pickup: 0.3-1.3 s a request at 3 million pickups, on the
-- connection pool the fleet uses. Stores already had (site, state, id).
-- Built inside the migration's transaction, which holds pickup writes until
-- it ends (seconds for a few million rows; docs/operations.md).
CREATE INDEX IF NOT EXISTS pickups_platform ON pickups (platform, id);
CREATE INDEX IF NOT EXISTS pickups_platform_state ON pickups (platform, state, id);
