-- Pickups (the handoff), offline pickup credentials, and the webhook outbox.

CREATE TABLE pickups (
    id            text PRIMARY KEY,
    site          text NOT NULL REFERENCES sites (id),
    order_ref     text NOT NULL,
    platform      text NOT NULL DEFAULT '',
    recipient     jsonb NOT NULL DEFAULT '{}',
    size          text NOT NULL,
    zone          text NOT NULL,
    device_id     text NOT NULL REFERENCES devices (id),
    compartment   int NOT NULL,
    state         text NOT NULL CHECK (state IN ('staging', 'ready', 'picked_up', 'expired', 'cancelled')),
    expires_at    timestamptz NOT NULL,
    credential_id text,
    command_id    text,
    created_by    text NOT NULL,
    created_at    timestamptz NOT NULL,
    ready_at      timestamptz,
    done_at       timestamptz,
    UNIQUE (site, platform, order_ref)
);
-- A compartment holds at most one live pickup: concurrent allocations that
-- pick the same compartment fail here and retry.
CREATE UNIQUE INDEX pickups_live_compartment ON pickups (device_id, compartment) WHERE state IN ('staging', 'ready');
CREATE INDEX pickups_site_state ON pickups (site, state, id);
CREATE INDEX pickups_expiry ON pickups (expires_at) WHERE state IN ('staging', 'ready');

CREATE TABLE pickup_transitions (
    pickup_id  text NOT NULL REFERENCES pickups (id),
    ts         timestamptz NOT NULL,
    from_state text NOT NULL,
    to_state   text NOT NULL,
    actor      text NOT NULL,
    detail     text NOT NULL DEFAULT ''
);
CREATE INDEX pickup_transitions_pickup ON pickup_transitions (pickup_id, ts);

-- Codes are never stored: they derive from the credential id and the
-- gateway's master key. The locker gets HMACs under its cred_key.
CREATE TABLE credentials (
    id           text PRIMARY KEY,
    device_id    text NOT NULL REFERENCES devices (id),
    pin_mac      text,
    qr_mac       text,
    compartments int[] NOT NULL,
    not_after    timestamptz NOT NULL,
    state        text NOT NULL CHECK (state IN ('active', 'used', 'revoked', 'expired')),
    created_at   timestamptz NOT NULL,
    used_at      timestamptz
);
-- A PIN is unique among the active credentials of a locker.
CREATE UNIQUE INDEX credentials_active_pin ON credentials (device_id, pin_mac) WHERE state = 'active';
CREATE INDEX credentials_active ON credentials (device_id) WHERE state = 'active';

CREATE TABLE webhooks (
    id         text PRIMARY KEY,
    token_id   text NOT NULL,
    role       text NOT NULL,
    site       text NOT NULL DEFAULT '',
    platform   text NOT NULL DEFAULT '',
    url        text NOT NULL,
    events     text[] NOT NULL,
    secret_enc bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    deleted_at timestamptz
);

CREATE TABLE webhook_deliveries (
    seq           bigserial PRIMARY KEY,
    webhook_id    text NOT NULL REFERENCES webhooks (id),
    event_id      text NOT NULL,
    type          text NOT NULL,
    subject       text NOT NULL,
    body          jsonb NOT NULL,
    state         text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts      int NOT NULL DEFAULT 0,
    next_attempt  timestamptz NOT NULL,
    leased_until  timestamptz NOT NULL DEFAULT '-infinity',
    last_status   int,
    last_error    text NOT NULL DEFAULT '',
    created_at    timestamptz NOT NULL,
    delivered_at  timestamptz,
    UNIQUE (webhook_id, event_id)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt) WHERE state = 'pending';
CREATE INDEX webhook_deliveries_subject ON webhook_deliveries (webhook_id, subject, seq) WHERE state = 'pending';

CREATE TABLE webhook_attempts (
    delivery_seq bigint NOT NULL REFERENCES webhook_deliveries (seq),
    ts           timestamptz NOT NULL,
    status       int,
    error        text NOT NULL DEFAULT '',
    duration_ms  double precision NOT NULL
);
CREATE INDEX webhook_attempts_delivery ON webhook_attempts (delivery_seq, ts);
