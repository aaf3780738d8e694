package dashboards

// FleetOverview is the operators' home: are the lockers there, are they
// healthy, what needs a person.
func FleetOverview() *Dashboard {
	connected := "max(" + vec("lockergate_devices_connected", "") + ")"
	registered := "max(" + vec("lockergate_devices_registered", "") + ")"
	return &Dashboard{
		UID: "lockergate-fleet", File: "fleet-overview.json", Title: "Lockergate / Fleet overview",
		Description: "Lockers online, stale and flapping, their health messages and the alerts they raise. " +
			"Counts marked fleet-wide come from the database and are the same on every gateway.",
		Rows: []Row{
			{Title: "Now", Panels: []Panel{
				stat("Lockers online", "Enabled lockers marked online (fleet-wide: a session on any gateway, or on the external broker).", "short", connected),
				stat("Lockers registered", "Enabled lockers in the database (fleet-wide).", "short", registered),
				{Kind: Stat, Title: "Offline share", Unit: "percentunit", Decimals: new(1),
					Description: "Share of registered lockers not online. Alert LockergateLockersOffline fires above 10 %, LockergateLockersOfflineMass above 50 %.",
					Thresholds:  warnAt(0.05, 0.10),
					Targets:     []Target{{Expr: "1 - " + connected + " / clamp_min(" + registered + ", 1)"}}},
				{Kind: Stat, Title: "Stale", Unit: "short", Thresholds: warnAt(1, 10),
					Description: "Lockers online but silent for more than 3 health intervals (fleet-wide): a session the broker still holds, a locker that stopped talking.",
					Targets:     []Target{{Expr: "max(" + vec("lockergate_devices_stale", "") + ")"}}},
				{Kind: Stat, Title: "Flapping", Unit: "short", Thresholds: warnAt(1, 10),
					Description: "Lockers with 5 or more sessions in the last 10 minutes (fleet-wide): bad network, power or firmware.",
					Targets:     []Target{{Expr: "max(" + vec("lockergate_devices_flapping", "") + ")"}}},
				{Kind: Stat, Title: "Doors ajar now", Unit: "short", Thresholds: warnAt(1, 10),
					Description: "Open door_ajar alerts (fleet-wide): compartments left open past the configured time.",
					Targets:     []Target{{Expr: "max(" + vec("lockergate_alerts_open", `kind="door_ajar"`) + ")"}}},
				{Kind: Stat, Title: "Clocks off", Unit: "short", Thresholds: warnAt(1, 10),
					Description: "Open clock_skew alerts (fleet-wide): lockers whose clock was further from the gateway's than --max-clock-skew (30 s by default) at their last connect. They judge code and command expiry by it.",
					Targets:     []Target{{Expr: "max(" + vec("lockergate_alerts_open", `kind="clock_skew"`) + ")"}}},
			}},
			{Title: "Presence", Panels: []Panel{
				withMin0(ts("Online, registered, stale", "Fleet-wide counts from the database, refreshed every 15 s.", "short",
					q(connected, "online"), q(registered, "registered"),
					q("max("+vec("lockergate_devices_stale", "")+")", "stale"),
					q("max("+vec("lockergate_devices_flapping", "")+")", "flapping"))),
				withMin0(ts("Sessions per gateway", "Live locker sessions on each gateway's embedded broker (0 with an external broker).", "short",
					q("sum by (instance) ("+vec("lockergate_devices_online", "")+")", "{{instance}}"))),
				withMin0(ts("Sessions started and ended", "Locker presence changes per second (a session start is online, its end offline). With an external broker, late wills and births are presence messages of an earlier session, held by a crashed gateway instance's session and not applied because the locker's presence changed since; retained births of sessions on record come with each gateway start (the broker's copies) and start no session.", "ops",
					q("sum by (kind) ("+rate("lockergate_presence_changes_total", "")+")", "{{kind}}"),
					q("sum("+rate("lockergate_presence_stale_wills_total", "")+")", "late wills not applied"),
					q("sum("+rate("lockergate_presence_stale_births_total", "")+")", "late births not applied"),
					q("sum("+rate("lockergate_presence_retained_births_known_total", "")+")", "retained births of known sessions"))),
				withMin0(ts("Session ends by reason", "Why MQTT sessions ended: keepalive and connection_lost point at networks, takeover at duplicate lockers, kicked at operators.", "ops",
					q("sum by (reason) ("+rate("lockergate_mqtt_disconnects_total", "")+")", "{{reason}}"))),
				{Kind: TimeSeries, Title: "Reconnects per online locker", Unit: "short", Min: f(0), Width: 24,
					Description: "Device sessions started per hour per online locker. A healthy fleet stays near 0; 5 or more in 10 minutes makes one locker flapping.",
					Thresholds:  []Threshold{{Color: "green"}, {Value: f(1), Color: "orange"}},
					Targets: []Target{{Expr: "3600 * sum(" + rate("lockergate_mqtt_connects_total", `kind="device"`) + ") / clamp_min(" + connected + ", 1)",
						Legend: "sessions per locker per hour"}}},
			}},
			{Title: "Health", Panels: []Panel{
				withMin0(ts("Device messages by channel", "Messages the fleet manager received per second, by channel. Health arrives once per health interval per locker.", "ops",
					q("sum by (channel) ("+rate("lockergate_mqtt_messages_received_total", "")+")", "{{channel}}"))),
				withMin0(ts("Device messages dropped", "Messages dropped before storage: invalid or malformed payloads (firmware bugs), wrong topics, a full health queue (overload).", "ops",
					q("sum by (channel, reason) ("+rate("lockergate_ingest_messages_dropped_total", "")+")", "{{channel}} {{reason}}"))),
				withMin0(ts("Open stateful alerts", "Alerts that clear themselves when the condition ends (fleet-wide): doors ajar, door sensor faults, lockers on battery.", "short",
					q("max by (kind) ("+vec("lockergate_alerts_open", "")+")", "{{kind}}"))),
				withMin0(ts("Repeated events", "Device events received again (QoS 1 repeats after reconnects) and stored once.", "ops",
					q("sum("+rate("lockergate_events_duplicates_total", "")+")", "duplicates"))),
			}},
			{Title: "Alerts", Panels: []Panel{
				withMin0(ts("Locker alerts raised in the last hour", "Alerts raised from events, health and births, by kind: door_ajar, tamper, on_battery, door_fault, code_lockout, clock_skew.", "short",
					q("sum by (kind) (increase("+vec("lockergate_alerts_raised_total", "")+"[1h]))", "{{kind}}"))),
				withMin0(ts("Pickup alerts raised in the last hour", "Alerts of the handoff: staged_empty, pickup_expired (a no-show to retrieve), pickup_not_taken, pickup_removed, code_not_live (opened by a code no longer live), pickup_cancelled (an order to take out), staging_failed (a staging unlock that did not open), pickup_not_opened (a used code whose door did not open: hand the order over).", "short",
					q("sum by (kind) (increase("+vec("lockergate_pickup_alerts_total", "")+"[1h]))", "{{kind}}"))),
			}},
			{Title: "Occupancy", Panels: []Panel{
				{Kind: TimeSeries, Title: "Occupancy by site", Unit: "percentunit", Min: f(0), Max: f(1),
					Description: "Occupied over all compartments, per site (site variable; at most 200 sites, then other).",
					Targets: []Target{{Expr: "max by (site) (" + vec("lockergate_compartments_occupied", `site=~"$site"`) +
						") / clamp_min(max by (site) (" + vec("lockergate_compartments", `site=~"$site"`) + "), 1)", Legend: "{{site}}"}}},
				withMin0(ts("Compartments", "Compartments and occupied ones over the selected sites.", "short",
					q("sum(max by (site) ("+vec("lockergate_compartments", `site=~"$site"`)+"))", "compartments"),
					q("sum(max by (site) ("+vec("lockergate_compartments_occupied", `site=~"$site"`)+"))", "occupied"))),
			}},
		},
	}
}
