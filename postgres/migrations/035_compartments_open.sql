-- compartments_open: the compartments whose door the locker last reported
-- open, by when that report arrived (updated_at), for the gateway's own
-- door-ajar check (DB.RaiseDoorsLeftOpen, at every census): a locker that
-- sends no door_ajar, or goes silent with a door open, still raises one.
CREATE INDEX IF NOT EXISTS compartments_open ON compartments (updated_at) WHERE door = 'open';
