-- creds_not_applied: a locker that does not acknowledge its credential set
-- after the gateway republished it five times (fleet reconcileCreds), so
-- that codes minted since the last set it applied do not open it. One open
-- per locker, as the other stateful kinds: a later version it does not
-- acknowledge either adds to it. The gateway clears it when the locker
-- acknowledges its current set. No kind is open yet (new): recreating the
-- index reads the open alerts only.
DROP INDEX IF EXISTS alerts_open;
CREATE UNIQUE INDEX alerts_open ON alerts (device_id, kind, coalesce(compartment, 0))
	WHERE cleared_at IS NULL AND kind IN ('door_ajar', 'on_battery', 'door_fault', 'clock_skew', 'tamper', 'code_lockout',
		'creds_not_applied');
