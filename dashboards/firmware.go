package dashboards

// FirmwareRollouts shows rollouts as the firmware engine's gauges allow: the
// gauges carry no rollout id (a label per rollout would grow without
// bound), so wave and failure ratio are those of the worst live rollout and
// the per-rollout detail is in the API (GET /v1/rollouts/{id}).
func FirmwareRollouts() *Dashboard {
	status := func(s string) string { return "max(" + vec("lockergate_firmware_rollouts", `status="`+s+`"`) + ")" }
	return &Dashboard{
		UID: "lockergate-firmware", File: "firmware-rollouts.json", Title: "Lockergate / Firmware rollouts",
		Description: "Rollouts by status, jobs by state, the current wave and the failure ratio against the threshold " +
			"of the worst live rollout, reports and bytes served. Per-rollout detail: GET /v1/rollouts/{id}.",
		Rows: []Row{
			{Title: "Rollouts", Panels: []Panel{
				stat("Running", "Rollouts running (fleet-wide).", "short", status("running")),
				{Kind: Stat, Title: "Paused", Unit: "short", Thresholds: []Threshold{{Color: "green"}, {Value: f(1), Color: "orange"}},
					Description: "Rollouts paused by an operator or by their failure threshold (alert LockergateRolloutPaused).",
					Targets:     []Target{{Expr: status("paused")}}},
				{Kind: Stat, Title: "Aborted (all time)", Unit: "short", Thresholds: []Threshold{{Color: "green"}, {Value: f(1), Color: "red"}},
					Description: "Rollouts aborted by their failure threshold or an operator, since the database was created.",
					Targets:     []Target{{Expr: status("aborted")}}},
				stat("Current wave", "Wave (1-based) of the running rollout furthest along; 0 when none runs.", "short",
					"max("+vec("lockergate_firmware_rollout_wave", "")+")"),
				{Kind: Stat, Title: "Failure ratio", Unit: "percentunit", Decimals: new(1), Thresholds: warnAt(0.025, 0.05),
					Description: "Failed over finished jobs of the worst running or paused rollout. Red from the default threshold (5 %).",
					Targets:     []Target{{Expr: "max(" + vec("lockergate_firmware_rollout_failure_ratio", "") + ")"}}},
				stat("Completed (all time)", "Rollouts that finished every wave.", "short", status("completed")),
			}},
			{Title: "Progress", Panels: []Panel{
				{Kind: TimeSeries, Title: "Failure ratio vs threshold", Unit: "percentunit", Min: f(0),
					Thresholds: []Threshold{{Color: "green"}, {Value: f(0.05), Color: "red"}},
					Description: "Failed over finished jobs of the worst live rollout. The dashed line is the default max_failure_pct " +
						"(5 %); a rollout's own threshold may differ, and its wave gate counts failures against the wave's size.",
					Targets: []Target{{Expr: "max(" + vec("lockergate_firmware_rollout_failure_ratio", "") + ")", Legend: "failure ratio"}}},
				withMin0(ts("Current wave", "Wave of the running rollout furthest along.", "short",
					q("max("+vec("lockergate_firmware_rollout_wave", "")+")", "wave"))),
				{Kind: TimeSeries, Title: "Jobs of live rollouts by state", Unit: "short", Min: f(0), Stack: true,
					Description: "Jobs of running and paused rollouts: queued, sent, downloading … succeeded, failed, rejected, timed_out.",
					Targets:     []Target{{Expr: "max by (state) (" + vec("lockergate_firmware_jobs", "") + ")", Legend: "{{state}}"}}},
				withMin0(ts("Rollouts by status", "Rollouts per status (fleet-wide).", "short",
					q("max by (status) ("+vec("lockergate_firmware_rollouts", "")+")", "{{status}}"))),
				withMin0(ts("Jobs finished", "Jobs reaching a final state per minute; a retried failure counts as failed.", "opm",
					q("60 * sum by (state) ("+rate("lockergate_firmware_jobs_finished_total", "")+")", "{{state}}"))),
				withMin0(ts("Reports from lockers", "fw/status reports and births with a job per minute: applied, or ignored (stale or unknown job).", "opm",
					q("60 * sum by (result) ("+rate("lockergate_firmware_reports_total", "")+")", "{{result}}"))),
			}},
			{Title: "Delivery", Panels: []Panel{
				withMin0(ts("Firmware bytes served", "Image bytes sent by the download endpoint.", "Bps",
					q("sum("+rate("lockergate_firmware_bytes_served_total", "")+")", "served"))),
				withMin0(ts("Downloads cut for no progress", "Image downloads per minute the gateway closed because the client took no 64 KiB within a minute (a link gone, a stalled locker); lockers resume with Range.", "opm",
					q("60 * sum("+rate("lockergate_firmware_downloads_stalled_total", "")+")", "cut"))),
				withMin0(ts("Gate reaction time", "From the report that crossed a wave's failure threshold to the rollout paused or aborted.", "s",
					quantiles("lockergate_firmware_gate_stop_seconds", "", "")...)),
			}},
		},
	}
}
