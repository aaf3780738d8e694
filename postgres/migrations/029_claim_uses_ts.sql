-- Claim uses (every provisioning request, refused ones included: an
-- expired claim's holder can send one per connection) are pruned with the
-- other history past --history-retention-days, walking this index.
CREATE INDEX claim_uses_ts ON claim_uses (ts);
