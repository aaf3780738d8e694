-- token: the id of the API token an audit entry's action was taken with
-- (empty for the gateway's own doings, a locker's, and entries from before
-- this migration). Token names need not be unique (a platform's tokens all
-- bear its name), so the actor ("role:name") alone may not tell who it was.
ALTER TABLE audit ADD COLUMN IF NOT EXISTS token text NOT NULL DEFAULT '';
