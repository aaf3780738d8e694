-- A locker that was offline reports its events when it reconnects. A driver
-- who collected an order with its code before the pickup expired, while the
-- locker was offline, is then reported after the gateway expired it: the
-- door's closing has no live pickup to end and looks for the compartment's
-- last pickup before it (LateCollectionAt). Pickups are kept for good, so
-- that read needs an index of its own.
CREATE INDEX pickups_compartment ON pickups (device_id, compartment, created_at);
-- collected_at is when the gateway learnt that such a pickup's code opened
-- its compartment before expires_at (UseExpiredCredential), collected_ts
-- the time of that use by the locker's clock: the door's first closing
-- after it, by the same clock, decides whether it was picked up. A verdict
-- of "not taken" empties collected_ts (JudgeLateCollection).
ALTER TABLE pickups ADD COLUMN collected_at timestamptz, ADD COLUMN collected_ts timestamptz;
