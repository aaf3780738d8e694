-- A receiver that does not answer (a timeout, a refused connection, a 5xx
-- or 429) now holds every pending delivery of its webhook until held_until,
-- growing with failing, its attempts failed in a row: each pickup's events
-- are a delivery of their own, so a dead receiver used to take a worker for
-- a whole timeout per event and could starve every other webhook's
-- deliveries. An answered attempt sets failing back to 0 and lifts the hold.
ALTER TABLE webhooks ADD COLUMN failing int NOT NULL DEFAULT 0,
    ADD COLUMN held_until timestamptz NOT NULL DEFAULT '-infinity';
