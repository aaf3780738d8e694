-- Alerts can be cleared by hand through the API (POST /v1/alerts/{id}/clear):
-- who did it is kept with the alert (and in the audit log). Stores list their
-- site's alerts newest first.
ALTER TABLE alerts ADD COLUMN cleared_by text NOT NULL DEFAULT '';
CREATE INDEX alerts_device_id ON alerts (device_id, id);
