-- A tamper or a code lockout reported again while its alert is open adds to
-- that alert (repeats, last_raised_at, the latest detail) instead of opening
-- another, as the stateful kinds already did: a locker that reports one
-- tamper 200 times is one alert for staff, not 200. A stateful alert reported
-- again (a door still ajar) takes the latest detail the same way.
ALTER TABLE alerts ADD COLUMN IF NOT EXISTS repeats int NOT NULL DEFAULT 0,
	ADD COLUMN IF NOT EXISTS last_raised_at timestamptz;
-- A replayed report is recognised by its time (raiseAlertSQL).
CREATE INDEX IF NOT EXISTS alerts_last_raised ON alerts (device_id, last_raised_at) WHERE last_raised_at IS NOT NULL;
-- Open tamper and lockout alerts of one locker and compartment from before
-- are folded into the newest, which counts them as repeats: the older ones
-- are cleared by the migration.
UPDATE alerts a SET repeats = a.repeats + (SELECT count(*) FROM alerts b WHERE b.cleared_at IS NULL AND b.device_id = a.device_id
		AND b.kind = a.kind AND coalesce(b.compartment, 0) = coalesce(a.compartment, 0) AND b.id < a.id)
WHERE a.cleared_at IS NULL AND a.kind IN ('tamper', 'code_lockout') AND NOT EXISTS (
	SELECT 1 FROM alerts b WHERE b.cleared_at IS NULL AND b.device_id = a.device_id AND b.kind = a.kind
		AND coalesce(b.compartment, 0) = coalesce(a.compartment, 0) AND b.id > a.id);
UPDATE alerts a SET cleared_at = now(), cleared_by = 'migration'
WHERE a.cleared_at IS NULL AND a.kind IN ('tamper', 'code_lockout') AND EXISTS (
	SELECT 1 FROM alerts b WHERE b.cleared_at IS NULL AND b.device_id = a.device_id AND b.kind = a.kind
		AND coalesce(b.compartment, 0) = coalesce(a.compartment, 0) AND b.id > a.id);
DROP INDEX IF EXISTS alerts_open;
CREATE UNIQUE INDEX alerts_open ON alerts (device_id, kind, coalesce(compartment, 0))
	WHERE cleared_at IS NULL AND kind IN ('door_ajar', 'on_battery', 'door_fault', 'clock_skew', 'tamper', 'code_lockout');
