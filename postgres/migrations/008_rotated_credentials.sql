-- A rotated credential names the one that replaced it: a code the locker
-- accepted from its old set counts as a use of the new one.
ALTER TABLE credentials ADD COLUMN replaced_by text;
-- Code uses and rotations find a credential's pickups by credential_id.
CREATE INDEX pickups_credential ON pickups (credential_id) WHERE credential_id IS NOT NULL;
