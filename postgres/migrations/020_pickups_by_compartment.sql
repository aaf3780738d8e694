-- A closing with no live pickup to end looks for the compartment's last
-- pickup before it (LateCollectionAt): an expired one whose code, the
-- locker reported late, opened it in time. Pickups are kept for good, so
-- that read needs an index of its own.
CREATE INDEX IF NOT EXISTS pickups_compartment ON pickups (device_id, compartment, created_at);
