-- last_used_at: when an API token was last accepted, to within a minute (the
-- API records a use when its cached check of the token runs out and the
-- recorded one is a minute old or more), so that an access review can find
-- tokens nobody uses. NULL: not used since this column was added. Adding a
-- nullable column rewrites nothing.
ALTER TABLE tokens ADD COLUMN IF NOT EXISTS last_used_at timestamptz;
