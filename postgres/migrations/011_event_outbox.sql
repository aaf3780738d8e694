-- Device events whose effects (the pickup workflow: a code used, a door
-- closed) are not applied yet. A row is written with its event, in the same
-- transaction, and deleted once the effect is applied; what a crash or a
-- failed step leaves behind is offered again (fleet.Manager.replayEvents).
-- Without it a crash between storing a batch and applying it lost the
-- effect for good: the locker's resend is a duplicate by then.
CREATE TABLE event_outbox (
    device_id   text NOT NULL,
    event_id    text NOT NULL,
    received_at timestamptz NOT NULL,
    ts          timestamptz NOT NULL,
    type        text NOT NULL,
    compartment int,
    body        jsonb NOT NULL,
    -- A replay claims a row until then, so two gateway instances (or two
    -- censuses) do not offer it at once.
    claimed_until timestamptz,
    PRIMARY KEY (device_id, event_id)
);
CREATE INDEX event_outbox_received ON event_outbox (received_at);
