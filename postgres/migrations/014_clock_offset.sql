-- A locker judges pickup codes' not_after and commands' expires_at by its
-- own clock. Its birth's offset from the gateway's clock is kept, and a
-- clock too far off raises a clock_skew alert that clears when a later
-- birth is within the bound: a stateful kind, one open per locker.
ALTER TABLE devices ADD COLUMN clock_offset_ms bigint;
DROP INDEX alerts_open;
CREATE UNIQUE INDEX alerts_open ON alerts (device_id, kind, coalesce(compartment, 0))
    WHERE cleared_at IS NULL AND kind IN ('door_ajar', 'on_battery', 'door_fault', 'clock_skew');
