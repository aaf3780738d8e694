-- A compartment is not allocated to a pickup while an unlock of it may
-- still fire on the locker (Allocate): one unanswered, or withdrawn
-- unanswered (a cancelled pickup's staging unlock), until it expires.
CREATE INDEX IF NOT EXISTS commands_unlock_in_flight ON commands (device_id, compartment, expires_at)
	WHERE type = 'unlock' AND status IN ('pending', 'sent', 'timed_out');
