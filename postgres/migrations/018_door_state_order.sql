-- Behind an external broker a locker's events can reach the database out of
-- the locker's order: the shared subscription hands them to several
-- instances (a locker back from an outage sends its queued events in a
-- burst), and events held in a crashed instance's session arrive when it
-- returns. There the compartment's door and occupancy follow the locker's
-- own clock: door_ts is the ts of the event the state came from, and an
-- older event is recorded but changes nothing (applyDoorSQL).
ALTER TABLE compartments ADD COLUMN door_ts timestamptz;
