-- An order_ref is unique per site and platform among live pickups (staging
-- or ready) only: an order whose pickup was cancelled, expired or collected
-- may be staged again (staff cancel and re-stage; an order sent back to the
-- store and handed out again). Before, the reference was taken for good.
ALTER TABLE pickups DROP CONSTRAINT IF EXISTS pickups_site_platform_order_ref_key;
CREATE UNIQUE INDEX pickups_live_order_ref ON pickups (site, platform, order_ref) WHERE state IN ('staging', 'ready');
CREATE INDEX pickups_order_ref ON pickups (site, platform, order_ref);
