-- gate_accepted: a failed job whose failure a resume accepted (a rollout
-- its gate stopped, resumed): its wave's gate counts only failures not
-- accepted, so the rest of the wave is gated again, and a failure that
-- later turns into a success (a late birth on the new version) leaves no
-- acceptance behind to hide a new one. retry-failed clears them.
-- rollouts.gate_from (waves below it not gated at all) is what resumes
-- before this migration set; it stays for those rollouts.
ALTER TABLE fw_jobs ADD COLUMN IF NOT EXISTS gate_accepted boolean NOT NULL DEFAULT false;
