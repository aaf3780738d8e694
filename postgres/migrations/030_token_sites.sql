-- sites: the sites where a platform token may make pickups and codes (an
-- empty list: every site, as before). A delivery platform usually serves
-- some stores, not the whole fleet, and making a pickup opens an empty
-- compartment for staging: a platform token limited to its stores cannot
-- open empty compartments anywhere else if it leaks. Site ids are checked
-- against sites as they are written (sites are never deleted). A column
-- with a constant default rewrites no row; the CHECK reads the (small)
-- table once.
ALTER TABLE tokens ADD COLUMN sites text[] NOT NULL DEFAULT '{}',
    ADD CONSTRAINT tokens_sites_platform CHECK (role = 'platform' OR sites = '{}');
