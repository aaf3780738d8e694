-- Every health batch rewrites the latest-health columns of its lockers. Free
-- space on each page lets PostgreSQL update those rows in place (HOT: no
-- index writes, no new page), which is most of the cost of ingest. Applies
-- to pages written from now on; VACUUM FULL devices rewrites older ones.
ALTER TABLE devices SET (fillfactor = 50);
