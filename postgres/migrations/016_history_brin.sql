-- History older than --history-retention-days is pruned hourly in batches
-- (PruneHistory). These tables grow in time order, so a BRIN index finds the
-- old rows without a scan of the table and costs almost nothing per insert.
CREATE INDEX presence_log_ts_brin ON presence_log USING brin (ts);
CREATE INDEX alerts_cleared_brin ON alerts USING brin (cleared_at);
CREATE INDEX commands_created_brin ON commands USING brin (created_at);
CREATE INDEX webhook_deliveries_created_brin ON webhook_deliveries USING brin (created_at);
CREATE INDEX idempotency_created_brin ON idempotency USING brin (created_at);
