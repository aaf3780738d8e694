-- Firmware jobs (docs/firmware.md): payload renewal, late successes, and
-- replaced boards.

-- When a handed-out job's payload must be renewed: its signed download URL
-- past half its validity, or its install window closed. The engine renews
-- it and republishes the locker's fw/job. Jobs handed out before this
-- column existed are renewed once, on the engine's first pass.
ALTER TABLE fw_jobs ADD COLUMN refresh_at timestamptz;
UPDATE fw_jobs SET refresh_at = now()
    WHERE state IN ('sent', 'downloading', 'verifying') AND payload IS NOT NULL;

-- A birth looks up its locker's queued and timed-out jobs (a locker that
-- runs the version already, a success that came after the step timeout).
CREATE INDEX fw_jobs_settle ON fw_jobs (device_id) WHERE state IN ('queued', 'timed_out');

-- A replaced board (re-provisioned under the locker's identity: a new
-- key_gen) is not the board its open jobs were for: they end, skipped with
-- the reason "replaced", in the replacement's transaction, so the new
-- board's first connect finds no fw/job for it. Not a failure of the image.
CREATE FUNCTION fw_jobs_board_replaced() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE fw_jobs SET state = 'skipped', error = 'replaced', updated_at = now(), done_at = now()
    WHERE device_id = NEW.id
        AND state IN ('queued', 'sent', 'downloading', 'verifying', 'installing', 'rebooting');
    RETURN NULL;
END
$$;
CREATE TRIGGER devices_fw_jobs_replaced AFTER UPDATE OF key_gen ON devices
    FOR EACH ROW WHEN (NEW.key_gen IS DISTINCT FROM OLD.key_gen)
    EXECUTE FUNCTION fw_jobs_board_replaced();
