-- Stateful alerts (a door left ajar, running on battery, a failing door) are
-- open at most once per locker, kind and compartment until cleared.
CREATE UNIQUE INDEX alerts_open ON alerts (device_id, kind, coalesce(compartment, 0))
    WHERE cleared_at IS NULL AND kind IN ('door_ajar', 'on_battery', 'door_fault');
CREATE INDEX alerts_open_kind ON alerts (kind) WHERE cleared_at IS NULL;
