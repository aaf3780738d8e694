-- compartment_clears: the credential-set version from which no code of an
-- order that ended in a compartment opens it. A locker validates codes
-- from the last set it applied, so until it acknowledges that version
-- (devices.creds_acked) a cancelled or expired order's code may still open
-- the compartment: allocation gives it no new order until then. One row a
-- compartment, written under the locker's advisory lock only (pickup
-- Transition, RotateCredentials), so no ingest write waits on it; a row
-- whose version the locker acknowledged is spent and stays until the next
-- order there ends.
CREATE TABLE IF NOT EXISTS compartment_clears (
    device_id text NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    n         int NOT NULL,
    version   bigint NOT NULL,
    PRIMARY KEY (device_id, n)
);

-- Orders ended before this migration left no row: every compartment of a
-- locker that has not acknowledged its current set waits for it (an online
-- locker acknowledges within a second of the gateway's start, which
-- republishes every set). A locker at version 0 never held a code.
INSERT INTO compartment_clears (device_id, n, version)
SELECT c.device_id, c.n, d.creds_version FROM compartments c JOIN devices d ON d.id = c.device_id
WHERE d.creds_acked < d.creds_version AND d.creds_version > 0
ON CONFLICT (device_id, n) DO NOTHING;
