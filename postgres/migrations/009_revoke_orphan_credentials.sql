-- Before 008 a pickup could end while its credential was being replaced,
-- leaving an active credential that opens no live pickup: its compartment
-- may hold the next order. Since then none is left (a pickup that ends
-- releases its credential); revoke those from before, and have their
-- lockers fetch the set again.
WITH orphans AS (
    UPDATE credentials c SET state = 'revoked'
    WHERE c.state = 'active'
      AND NOT EXISTS (SELECT 1 FROM pickups p WHERE p.device_id = c.device_id AND p.credential_id = c.id
                      AND p.state IN ('staging', 'ready'))
    RETURNING c.device_id)
UPDATE devices SET creds_version = creds_version + 1 WHERE id IN (SELECT device_id FROM orphans);
