-- A locker may report a code's use with the door's opening (door_opened by
-- credential) before code_accepted, or instead of it. The opening then spends
-- the code (opened_ts: the opening's time by the locker's clock, the use's;
-- null for a code spent by code_accepted), and the code_accepted that follows
-- reports the same use (use_reported_at, when it arrived): it is neither a
-- second use nor a code that was not live.
ALTER TABLE credentials ADD COLUMN IF NOT EXISTS opened_ts timestamptz,
	ADD COLUMN IF NOT EXISTS use_reported_at timestamptz;
