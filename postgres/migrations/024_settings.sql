-- Gateway-wide settings kept across restarts. locker_config is the lockers'
-- configuration (protocol v1 config, its version left out) and the version it
-- goes out under: a start that brings a different configuration bumps it, so
-- every locker applies the change (LockerConfig).
CREATE TABLE IF NOT EXISTS settings (
    name       text PRIMARY KEY,
    value      jsonb NOT NULL,
    version    bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
