package dashboards

// Handoff follows orders from staging to picked up: how many, how fast,
// how many never collected, and the codes lockers turned down.
func Handoff() *Dashboard {
	entered := func(state string) string {
		return "sum(increase(" + vec("lockergate_pickups_total", `state="`+state+`"`) + "[$__range]))"
	}
	// A pickup collected in time but reported after its expiry entered
	// expired, then picked_up: it is no no-show.
	// The two may fall in different ranges (and increase extrapolates), and
	// the late counter is missing before an upgrade: never below zero.
	noShows := "clamp_min(" + entered("expired") + " - (sum(increase(" + vec("lockergate_pickups_reported_late_total", "") +
		"[$__range])) or vector(0)), 0)"
	return &Dashboard{
		UID: "lockergate-handoff", File: "handoff.json", Title: "Lockergate / Handoff",
		Description: "Pickups per state, staging and waiting times, no-shows, wrong codes and occupancy.",
		Rows: []Row{
			{Title: "In the time range", Panels: []Panel{
				stat("Pickups created", "Pickups created (entered staging) in the dashboard's time range.", "short", entered("staging")),
				stat("Ready", "Pickups loaded by staff and ready to collect.", "short", entered("ready")),
				stat("Picked up", "Pickups collected with their code.", "short", entered("picked_up")),
				{Kind: Stat, Title: "No-shows", Unit: "short", Thresholds: []Threshold{{Color: "green"}, {Value: f(1), Color: "orange"}},
					Description: "Pickups that expired uncollected: staff must retrieve the order (pickup_expired alert). A pickup collected offline in time whose locker reported it only after the expiry is picked up, not a no-show.",
					Targets:     []Target{{Expr: noShows}}},
				{Kind: Stat, Title: "No-show ratio", Unit: "percentunit", Decimals: new(1), Thresholds: warnAt(0.05, 0.15),
					Description: "No-shows over ended (picked up + no-show) pickups in the time range.",
					Targets:     []Target{{Expr: noShows + " / clamp_min(" + noShows + " + " + entered("picked_up") + ", 1)"}}},
				stat("Cancelled", "Pickups cancelled by the store or the platform.", "short", entered("cancelled")),
			}},
			{Title: "Flow", Panels: []Panel{
				withMin0(ts("Pickups entering each state", "Transitions per minute: staging (created), ready (loaded), picked_up, expired (a no-show, or a collection the locker reported only after the expiry, which then enters picked_up too), cancelled.", "opm",
					q("60 * sum by (state) ("+rate("lockergate_pickups_total", "")+")", "{{state}}"))),
				withMin0(ts("Wrong codes by reason", "Codes lockers rejected per minute: unknown (typos, guessing), expired, used (a second try), locked_out (keypad lockout).", "opm",
					q("60 * sum by (reason) ("+rate("lockergate_credential_rejections_total", "")+")", "{{reason}}"))),
				withMin0(ts("Staging time (created → ready)", "Time from creating a pickup to staff closing the loaded compartment.", "s",
					quantiles("lockergate_pickup_staging_duration_seconds", "", "")...)),
				withMin0(ts("Waiting time (ready → picked up)", "Time from ready to the recipient closing the emptied compartment.", "s",
					quantiles("lockergate_pickup_wait_duration_seconds", "", "")...)),
				withMin0(ts("Pickup alerts raised in the last hour", "staged_empty (closed empty after staging), pickup_expired (no-show), pickup_not_taken (opened with the code, order left inside), pickup_removed (emptied without the code), code_not_live (opened by a code the gateway had revoked or spent: a stale set offline), pickup_cancelled (cancelled after its compartment was opened: take the order out), staging_failed (the staging unlock failed, was refused or went unanswered), pickup_not_opened (a combined code used but this door did not open: a jammed door, the order still inside).", "short",
					q("sum by (kind) (increase("+vec("lockergate_pickup_alerts_total", "")+"[1h]))", "{{kind}}"))),
				withMin0(ts("Keypad lockouts raised in the last hour", "code_lockout alerts: too many rejected codes at a locker (its keypad locked out, or the gateway counted the lockout policy's failures within its window).", "short",
					q("sum(increase("+vec("lockergate_alerts_raised_total", `kind="code_lockout"`)+"[1h]))", "code_lockout"))),
			}},
			{Title: "Occupancy", Panels: []Panel{
				{Kind: TimeSeries, Title: "Occupancy by site", Unit: "percentunit", Min: f(0), Max: f(1),
					Thresholds:  []Threshold{{Color: "green"}, {Value: f(0.9), Color: "red"}},
					Description: "Occupied over all compartments per site; near 100 % new pickups find no compartment.",
					Targets: []Target{{Expr: "max by (site) (" + vec("lockergate_compartments_occupied", `site=~"$site"`) +
						") / clamp_min(max by (site) (" + vec("lockergate_compartments", `site=~"$site"`) + "), 1)", Legend: "{{site}}"}}},
				withMin0(ts("Free compartments by site", "Compartments not occupied, per site.", "short",
					q("max by (site) ("+vec("lockergate_compartments", `site=~"$site"`)+") - max by (site) ("+
						vec("lockergate_compartments_occupied", `site=~"$site"`)+")", "{{site}}"))),
			}},
			{Title: "Platform notifications", Panels: []Panel{
				withMin0(ts("Webhook deliveries by outcome", "Delivery attempts per second: delivered, retry (the receiver failed; tried again later), given_up (out of time, also a held webhook's waiting deliveries), dropped (the webhook was deleted or its token revoked).", "ops",
					q("sum by (outcome) ("+rate("lockergate_webhook_deliveries_total", "")+")", "{{outcome}}"))),
				withMin0(ts("Webhook backlog", "Deliveries waiting, and the age of the oldest undelivered event.", "short",
					q("max("+vec("lockergate_webhook_backlog", "")+")", "waiting"))),
				withMin0(ts("Platforms unreachable", "Webhooks held because their receiver did not answer (or answered 5xx/429): those platforms' notifications wait. GET /v1/webhooks shows which.", "short",
					q("max("+vec("lockergate_webhooks_held", "")+")", "held"))),
			}},
		},
	}
}
