-- Provisioning looks up a locker's claim uses by device (the delivered
-- mark of its latest registration, and that registration itself): without
-- this index each lookup read the whole table, while the claim's row is
-- locked.
CREATE INDEX claim_uses_device ON claim_uses (device_id, ts) WHERE device_id IS NOT NULL;
