-- sealed: the secrets an Idempotency-Key's first answer held (a webhook's
-- secret, a credential's code and QR; never a token, shown once), sealed
-- with a key derived from the gateway's master key (which is not in the
-- database), so that a replay within fleet.ReplaySecretsFor of the first
-- answer repeats them. The response column never holds them. Wiped once
-- that time has passed (DB.WipeReplaySecrets, hourly); the partial index
-- finds the rows to wipe.
ALTER TABLE idempotency ADD COLUMN IF NOT EXISTS sealed bytea;
CREATE INDEX IF NOT EXISTS idempotency_sealed ON idempotency (created_at) WHERE sealed IS NOT NULL;
