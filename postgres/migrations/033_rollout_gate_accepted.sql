-- gate_accepted: per wave, the failures a resume accepted (a rollout its
-- gate stopped, resumed): the wave's gate counts only the failures beyond
-- them, so the rest of the wave is gated again. gate_from (waves below it
-- not gated at all) is what resumes before this migration set; it stays for
-- those rollouts.
ALTER TABLE rollouts ADD COLUMN IF NOT EXISTS gate_accepted int[] NOT NULL DEFAULT '{}';
