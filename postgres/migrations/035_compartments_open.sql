-- door_at: when the door event the compartment's door state came from
-- arrived (the gateway's clock; updated_at also moves with in_service).
-- compartments_open: the compartments whose door the locker last reported
-- open, by door_at, for the gateway's own door-ajar check
-- (DB.RaiseDoorsLeftOpen, at every census): a locker that sends no
-- door_ajar, or goes silent with a door open, still raises one. Doors open
-- before this migration count from their last change.
ALTER TABLE compartments ADD COLUMN IF NOT EXISTS door_at timestamptz;
UPDATE compartments SET door_at = updated_at WHERE door = 'open' AND door_at IS NULL;
CREATE INDEX IF NOT EXISTS compartments_open ON compartments (door_at) WHERE door = 'open';
