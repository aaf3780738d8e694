-- History older than --history-retention-days is pruned hourly in batches
-- (PruneHistory), each batch walking on from where the last one stopped
-- through these indexes: no batch reads what an earlier one deleted.
CREATE INDEX presence_log_ts ON presence_log (ts);
CREATE INDEX alerts_cleared ON alerts (cleared_at) WHERE cleared_at IS NOT NULL;
CREATE INDEX commands_created ON commands (created_at);
CREATE INDEX webhook_deliveries_created ON webhook_deliveries (created_at);
CREATE INDEX idempotency_created ON idempotency (created_at);
