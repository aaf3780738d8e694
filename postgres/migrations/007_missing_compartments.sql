-- A replaced board may report fewer compartments than the locker had. One
-- that holds a live pickup is kept, marked missing: the order stays on
-- record (it expires, or staff cancel it) and nothing new is put there.
ALTER TABLE compartments ADD COLUMN missing boolean NOT NULL DEFAULT false;
