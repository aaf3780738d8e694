-- Lockergate schema v1. Applied once, inside a transaction, under an advisory lock.

CREATE TABLE sites (
    id         text PRIMARY KEY,
    name       text NOT NULL,
    timezone   text NOT NULL DEFAULT 'UTC',
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE tokens (
    id         text PRIMARY KEY,
    hash       bytea NOT NULL UNIQUE,
    role       text NOT NULL CHECK (role IN ('admin', 'operator', 'store', 'platform')),
    site       text REFERENCES sites (id),
    name       text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    created_by text NOT NULL DEFAULT '',
    revoked_at timestamptz,
    CHECK ((role = 'store') = (site IS NOT NULL))
);

CREATE TABLE claims (
    id             text PRIMARY KEY,
    hash           bytea NOT NULL UNIQUE,
    site           text NOT NULL REFERENCES sites (id),
    max_uses       int NOT NULL CHECK (max_uses > 0),
    uses           int NOT NULL DEFAULT 0,
    serial_pattern text NOT NULL DEFAULT '',
    expires_at     timestamptz NOT NULL,
    revoked_at     timestamptz,
    created_at     timestamptz NOT NULL DEFAULT now(),
    created_by     text NOT NULL DEFAULT ''
);

CREATE TABLE claim_uses (
    claim_id  text NOT NULL REFERENCES claims (id),
    ts        timestamptz NOT NULL DEFAULT now(),
    serial    text NOT NULL,
    device_id text,
    outcome   text NOT NULL
);
CREATE INDEX claim_uses_claim ON claim_uses (claim_id, ts);

CREATE TABLE devices (
    id                text PRIMARY KEY,
    serial            text NOT NULL UNIQUE,
    site              text NOT NULL REFERENCES sites (id),
    model             text NOT NULL,
    fw                text NOT NULL,
    secret_hash       bytea NOT NULL,
    key_gen           int NOT NULL DEFAULT 1,
    disabled          boolean NOT NULL DEFAULT false,
    replaceable       boolean NOT NULL DEFAULT false,
    online            boolean NOT NULL DEFAULT false,
    boot_id           text NOT NULL DEFAULT '',
    last_seen         timestamptz,
    connected_at      timestamptz,
    disconnected_at   timestamptz,
    disconnect_reason text NOT NULL DEFAULT '',
    connect_count     bigint NOT NULL DEFAULT 0,
    health            jsonb,
    health_at         timestamptz,
    health_seq        bigint NOT NULL DEFAULT 0,
    health_gaps       bigint NOT NULL DEFAULT 0,
    config_version    bigint NOT NULL DEFAULT 1,
    creds_version     bigint NOT NULL DEFAULT 0,
    creds_acked       bigint NOT NULL DEFAULT -1,
    created_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX devices_site ON devices (site);

CREATE TABLE compartments (
    device_id  text NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    n          int NOT NULL,
    size       text NOT NULL CHECK (size IN ('S', 'M', 'L', 'XL')),
    zone       text NOT NULL CHECK (zone IN ('ambient', 'chilled', 'heated')),
    in_service boolean NOT NULL DEFAULT true,
    occupied   boolean NOT NULL DEFAULT false,
    door       text NOT NULL DEFAULT 'closed',
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (device_id, n)
);

CREATE TABLE presence_log (
    device_id text NOT NULL,
    ts        timestamptz NOT NULL,
    online    boolean NOT NULL,
    reason    text NOT NULL DEFAULT ''
);
CREATE INDEX presence_log_device ON presence_log (device_id, ts);

-- Health and events are partitioned by the day the gateway received them
-- (device clocks may be skewed); old partitions are dropped for retention.
CREATE TABLE health (
    device_id   text NOT NULL,
    received_at timestamptz NOT NULL,
    ts          timestamptz NOT NULL,
    seq         bigint NOT NULL,
    body        jsonb NOT NULL
) PARTITION BY RANGE (received_at);
CREATE INDEX health_device ON health (device_id, received_at);
CREATE TABLE health_default PARTITION OF health DEFAULT;

CREATE TABLE events (
    device_id   text NOT NULL,
    event_id    text NOT NULL,
    received_at timestamptz NOT NULL,
    ts          timestamptz NOT NULL,
    type        text NOT NULL,
    compartment int,
    body        jsonb NOT NULL
) PARTITION BY RANGE (received_at);
CREATE INDEX events_device ON events (device_id, received_at);
CREATE TABLE events_default PARTITION OF events DEFAULT;

-- One row per (device, event id) ever recorded: MQTT repeats are dropped here.
CREATE TABLE event_ids (
    device_id   text NOT NULL,
    event_id    text NOT NULL,
    received_at timestamptz NOT NULL,
    PRIMARY KEY (device_id, event_id)
);

CREATE TABLE commands (
    id          text PRIMARY KEY,
    device_id   text NOT NULL REFERENCES devices (id),
    type        text NOT NULL,
    compartment int,
    reason      text NOT NULL DEFAULT '',
    in_service  boolean,
    status      text NOT NULL,
    error       text NOT NULL DEFAULT '',
    actor       text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL,
    sent_at     timestamptz,
    done_at     timestamptz
);
CREATE INDEX commands_open ON commands (device_id, created_at) WHERE status IN ('pending', 'sent');
CREATE INDEX commands_expiry ON commands (expires_at) WHERE status IN ('pending', 'sent');

CREATE TABLE alerts (
    id          bigserial PRIMARY KEY,
    device_id   text NOT NULL,
    kind        text NOT NULL,
    compartment int,
    detail      text NOT NULL DEFAULT '',
    raised_at   timestamptz NOT NULL DEFAULT now(),
    cleared_at  timestamptz
);
CREATE INDEX alerts_device ON alerts (device_id, raised_at);

CREATE TABLE audit (
    id      bigserial PRIMARY KEY,
    ts      timestamptz NOT NULL DEFAULT now(),
    actor   text NOT NULL,
    action  text NOT NULL,
    locker  text NOT NULL DEFAULT '',
    site    text NOT NULL DEFAULT '',
    detail  jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_ts ON audit (ts);
CREATE INDEX audit_locker ON audit (locker, ts);

CREATE TABLE idempotency (
    actor      text NOT NULL,
    key        text NOT NULL,
    route      text NOT NULL,
    body_hash  bytea NOT NULL,
    status     int NOT NULL,
    response   bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (actor, key)
);
