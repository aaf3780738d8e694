-- sites: the sites a platform token may make pickups and codes at (an empty
-- list: every site, as before). A delivery platform usually serves some
-- stores, not the whole fleet, and making a pickup opens a compartment for
-- staging: a platform token limited to its stores cannot open compartments
-- anywhere else if it leaks. Site ids are checked against sites as they are
-- written (sites are never deleted). A column with a constant default
-- rewrites nothing.
ALTER TABLE tokens ADD COLUMN IF NOT EXISTS sites text[] NOT NULL DEFAULT '{}',
    ADD CONSTRAINT tokens_sites_platform CHECK (role = 'platform' OR sites = '{}');
