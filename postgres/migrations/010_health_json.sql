-- Health bodies were stored as jsonb, which PostgreSQL parses into its binary
-- form on every row: on the reference machine that was 3 of the 7 µs each
-- COPYed health row cost, and 3 of the 9 µs of each latest-health update.
-- The gateway has validated every body before it stores it and nothing in SQL
-- looks inside one, so json (checked, kept as sent) is enough. This rewrites
-- the health partitions once; see docs/operations.md (upgrading).
ALTER TABLE health ALTER COLUMN body TYPE json USING body::json;
ALTER TABLE devices ALTER COLUMN health TYPE json USING health::json;
