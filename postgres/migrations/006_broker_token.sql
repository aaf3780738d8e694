-- A token role for external brokers: it may only call the auth hooks under
-- /v1/broker-auth (docs/deployment.md).
ALTER TABLE tokens DROP CONSTRAINT tokens_role_check;
ALTER TABLE tokens ADD CONSTRAINT tokens_role_check
    CHECK (role IN ('admin', 'operator', 'store', 'platform', 'broker'));
