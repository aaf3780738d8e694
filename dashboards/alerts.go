package dashboards

// Rule is a Prometheus alerting rule. Its annotations may refer to labels
// of the alert as {{ $labels.NAME }}, and to nothing else, so that the
// promtool unit tests can state what they render to.
type Rule struct {
	Alert    string
	Expr     string
	For      string
	Severity string // warning or critical
	// Summary is one line for the notification's title.
	Summary string
	// Description says what is wrong and what it costs.
	Description string
	// Runbook is what to check and do, in order.
	Runbook string
}

// Job is the scrape job name the rules expect (see dashboards/prometheus.yml).
const Job = "lockergate"

// Rules are the alerting rules of dashboards/alerts.yml.
func Rules() []Rule {
	return []Rule{
		{
			Alert: "LockergateDown", Severity: "critical", For: "2m",
			Expr:        `up{job="lockergate"} == 0`,
			Summary:     "Lockergate gateway {{ $labels.instance }} is down",
			Description: "Prometheus has not scraped {{ $labels.instance }} for 2 minutes. Lockers connected to it are offline: no pickups, no remote unlocks there.",
			Runbook: "1. Check the process: systemctl status lockergate; journalctl -u lockergate -n 200.\n" +
				"2. Check GET /healthz and /readyz on the HTTP port; /readyz fails while PostgreSQL is unreachable.\n" +
				"3. A gateway that exits at start says why in its first log lines (port in use, data dir permissions, database URL).\n" +
				"4. Lockers keep events in their offline queue and reconnect by themselves once the gateway is back.",
		},
		{
			Alert: "LockergateMetricsAbsent", Severity: "critical", For: "10m",
			Expr:        `absent(up{job="lockergate"})`,
			Summary:     "No Lockergate gateway is scraped",
			Description: "Prometheus has no target in job lockergate: every Lockergate alert is blind.",
			Runbook: "1. Check the Prometheus configuration has a scrape job named lockergate (dashboards/prometheus.yml).\n" +
				"2. Check service discovery and the target list in the Prometheus UI (Status > Targets).",
		},
		{
			Alert: "LockergateLockersOffline", Severity: "warning", For: "15m",
			Expr: "(\n  1 - max by (job) (lockergate_devices_connected)\n    / max by (job) (lockergate_devices_registered)\n) > 0.10\n" +
				"and max by (job) (lockergate_devices_registered) > 0",
			Summary:     "More than 10 % of the lockers are offline",
			Description: "Over 10 % of the enabled lockers have been offline for 15 minutes. Orders in their compartments cannot be collected with new codes, remote unlocks do not reach them.",
			Runbook: "1. Fleet overview dashboard: are the offline lockers spread out (gateway or network side) or one site (store network, power)?\n" +
				"2. Session ends by reason: keepalive and connection_lost point at networks; takeover at cloned identities.\n" +
				"3. Broker panel CONNECTs refused: backend_error means the database, rate_limited a lockout.\n" +
				"4. GET /v1/lockers?online=false lists them with disconnect_reason and last_seen.",
		},
		{
			Alert: "LockergateLockersOfflineMass", Severity: "critical", For: "5m",
			Expr: "(\n  1 - max by (job) (lockergate_devices_connected)\n    / max by (job) (lockergate_devices_registered)\n) > 0.50\n" +
				"and max by (job) (lockergate_devices_registered) > 0",
			Summary:     "More than half of the lockers are offline",
			Description: "Over 50 % of the enabled lockers have been offline for 5 minutes: a gateway, broker, DNS, certificate or network outage rather than single sites.",
			Runbook: "1. Check every gateway is up (LockergateDown) and listening on MQTT/MQTTS.\n" +
				"2. Check the broker address lockers were given (--device-broker-url) still resolves, and the TLS certificate has not expired.\n" +
				"3. CONNECTs refused by reason: backend_error means PostgreSQL is failing credential checks.",
		},
		{
			Alert: "LockergateLockersStale", Severity: "warning", For: "15m",
			Expr:        "max by (job) (lockergate_devices_stale)\n  / max by (job) (lockergate_devices_registered) > 0.05",
			Summary:     "More than 5 % of the lockers are online but silent",
			Description: "Lockers hold a session but sent nothing for 3 health intervals: half-open connections or hung firmware.",
			Runbook: "1. GET /v1/lockers: stale lockers show online with an old last_seen.\n" +
				"2. One site: store network (NAT timeouts shorter than the keep-alive). Many sites: check ingest lag and database errors first.\n" +
				"3. A reboot command (POST /v1/lockers/{id}/commands type reboot) recovers hung firmware.",
		},
		{
			Alert: "LockergateLockersFlapping", Severity: "warning", For: "15m",
			Expr:        "max by (job) (lockergate_devices_flapping) >= 5",
			Summary:     "5 or more lockers keep reconnecting",
			Description: "At least 5 lockers had 5 or more sessions in 10 minutes, for 15 minutes.",
			Runbook: "1. GET /v1/lockers and look for flapping: true; group them by site and firmware version.\n" +
				"2. takeover as session end reason: two devices share an identity (replace one, re-provision).\n" +
				"3. Same firmware version: suspect the firmware; pause its rollout.",
		},
		{
			Alert: "LockergateIngestLag", Severity: "warning", For: "10m",
			Expr:        "histogram_quantile(0.99,\n  sum by (job, instance, le) (rate(lockergate_ingest_lag_seconds_bucket[5m]))\n) > 5",
			Summary:     "Device messages take over 5 s to reach the database on {{ $labels.instance }}",
			Description: "The 99th percentile from a message's arrival to its commit has been above 5 s for 10 minutes. Pickups turn ready and picked up late.",
			Runbook: "1. Gateway internals: database write latency and errors, ingest queue depth.\n" +
				"2. PostgreSQL: slow disks, locks, autovacuum, connections (pg_stat_activity).\n" +
				"3. CPU of the gateway process; a health interval too short for the fleet size.",
		},
		{
			Alert: "LockergateIngestQueueFilling", Severity: "warning", For: "5m",
			Expr:        "max by (job, instance, queue) (lockergate_ingest_queue_depth) > 10000",
			Summary:     "Ingest queue {{ $labels.queue }} on {{ $labels.instance }} holds over 10000 messages",
			Description: "The database does not keep up. A full health queue drops health; a full events queue slows every publishing locker.",
			Runbook: "1. Database errors and write latency on Gateway internals.\n" +
				"2. PostgreSQL health (disk, locks, connections).\n" +
				"3. A reconnect storm fills the queues briefly; it is not one if it lasts.",
		},
		{
			Alert: "LockergateHealthDropped", Severity: "warning", For: "10m",
			Expr:        `sum by (job, instance) (rate(lockergate_ingest_messages_dropped_total{reason="queue_full"}[5m])) > 0`,
			Summary:     "{{ $labels.instance }} drops health messages: its queue is full",
			Description: "Health telemetry is being lost because the database does not keep up; stale and fault detection suffer.",
			Runbook:     "1. See LockergateIngestQueueFilling.\n2. Lengthen the health interval of a large fleet, or add database capacity.",
		},
		{
			Alert: "LockergateDatabaseErrors", Severity: "critical", For: "5m",
			Expr:        "sum by (job, instance, op) (rate(lockergate_db_errors_total[5m])) > 0",
			Summary:     "Database operation {{ $labels.op }} fails on {{ $labels.instance }}",
			Description: "PostgreSQL has been failing {{ $labels.op }} for 5 minutes. Writes are retried and held in memory, so data is delayed, and lost if the gateway stops before the database is back.",
			Runbook: "1. Gateway log: \"database write failed; retrying\" carries the error.\n" +
				"2. PostgreSQL reachable (DATABASE_URL, network, pg_hba.conf), disk not full, not in recovery.\n" +
				"3. With the embedded database: free disk space in the data dir, and the PostgreSQL log in <data-dir>/pg.log.",
		},
		{
			Alert: "LockergateFirmwareErrors", Severity: "warning", For: "10m",
			Expr:        "sum by (job, instance, op) (rate(lockergate_firmware_errors_total[5m])) > 0",
			Summary:     "Firmware engine operation {{ $labels.op }} fails on {{ $labels.instance }}",
			Description: "The rollout engine keeps failing {{ $labels.op }} (database or publish): rollouts stall.",
			Runbook:     "1. Gateway log, component=firmware.\n2. Database health (LockergateDatabaseErrors).\n3. Pause the affected rollouts until it is fixed.",
		},
		{
			Alert: "LockergateCommandFailures", Severity: "warning", For: "5m",
			Expr: "(\n  sum by (job, type) (rate(lockergate_commands_total{status=~\"failed|rejected|timed_out\"}[15m]))\n" +
				"  / sum by (job, type) (rate(lockergate_commands_total{status=~\"ok|failed|rejected|timed_out|expired\"}[15m]))\n) > 0.10\n" +
				"and sum by (job, type) (increase(lockergate_commands_total{status=~\"ok|failed|rejected|timed_out|expired\"}[15m])) >= 10",
			Summary:     "More than 10 % of {{ $labels.type }} commands fail",
			Description: "Over the last 15 minutes more than 10 % of the finished {{ $labels.type }} commands failed, were rejected or got no answer. Remote unlocks by support staff do not work.",
			Runbook: "1. GET /v1/lockers/{id}/commands/{cid} shows the locker's error text for failed and rejected commands.\n" +
				"2. timed_out: the locker took the command and never answered (connectivity, firmware).\n" +
				"3. rejected: the locker refused it (a compartment out of service, say); a command that reached it expired is answered expired, which this alert does not count.",
		},
		{
			Alert: "LockergateRolloutPaused", Severity: "warning", For: "1m",
			Expr:        `max by (job) (lockergate_firmware_rollouts{status="paused"}) > 0`,
			Summary:     "A firmware rollout is paused",
			Description: "A rollout stopped, by its failure threshold or by an operator; its remaining lockers stay on the old firmware until someone acts.",
			Runbook: "1. GET /v1/rollouts, then GET /v1/rollouts/{id} of the paused one: its reason names the wave and the failures.\n" +
				"2. GET /v1/rollouts/{id}/jobs: the failed jobs' errors (download, checksum, signature, install, boot).\n" +
				"3. Fix and POST /v1/rollouts/{id}/retry-failed and /resume, or /cancel it.",
		},
		{
			Alert: "LockergateRolloutAborted", Severity: "critical", For: "0m",
			Expr: "max by (job) (lockergate_firmware_rollouts{status=\"aborted\"})\n" +
				"  - max by (job) (min_over_time(lockergate_firmware_rollouts{status=\"aborted\"}[1h])) > 0",
			Summary:     "A firmware rollout was aborted",
			Description: "A rollout was aborted in the last hour: its failure threshold was crossed with failure_action abort, or an operator aborted it.",
			Runbook: "1. GET /v1/rollouts, then GET /v1/rollouts/{id} of the aborted one: its reason.\n" +
				"2. GET /v1/rollouts/{id}/jobs for the failures; lockers that failed stay on (or roll back to) the old firmware.\n" +
				"3. Do not start a new rollout of the same artifact before the cause is understood.",
		},
		{
			Alert: "LockergateWebhookBacklog", Severity: "warning", For: "5m",
			Expr:        "max by (job) (lockergate_webhook_oldest_pending_seconds) > 900",
			Summary:     "Webhook events wait more than 15 minutes",
			Description: "The oldest undelivered webhook event is over 15 minutes old: delivery platforms do not learn that orders are ready or picked up.",
			Runbook: "1. Deliveries by outcome: retry means the receiver answers errors or times out.\n" +
				"2. GET /v1/webhooks, then GET /v1/webhooks/{id}/deliveries: the receiver's answers; contact the platform with its webhook id.\n" +
				"3. Events are kept and retried with backoff; they are given up after the retry limit.",
		},
		{
			Alert: "LockergateWebhooksGivenUp", Severity: "warning", For: "0m",
			Expr:        `sum by (job) (increase(lockergate_webhook_deliveries_total{outcome="given_up"}[1h])) > 0`,
			Summary:     "Webhook deliveries were given up",
			Description: "In the last hour at least one webhook event was given up (its 25 hours of retries ran out, also while its webhook was held for an unreachable receiver) and will not be delivered.",
			Runbook:     "1. Find the receiver: GET /v1/webhooks and GET /v1/webhooks/{id}/deliveries.\n2. The platform must reconcile with GET /v1/pickups for the period.",
		},
		{
			Alert: "LockergateDoorAjarSpike", Severity: "warning", For: "0m",
			Expr:        `sum by (job) (increase(lockergate_alerts_raised_total{kind="door_ajar"}[15m])) > 10`,
			Summary:     "More than 10 doors were left ajar in 15 minutes",
			Description: "door_ajar alerts are raised far more often than usual: staff or recipients leave doors open, or door sensors fail.",
			Runbook: "1. Which lockers: the gateway logs each alert at WARN (msg=alert kind=door_ajar locker=… compartment=…), and\n" +
				"   SELECT device_id, compartment, raised_at FROM alerts WHERE kind = 'door_ajar' AND cleared_at IS NULL lists the open ones.\n" +
				"2. One site points at a store process, one model at its door sensors.\n" +
				"3. door_ajar alerts clear when the door closes; Fleet overview shows how many are open now.",
		},
		{
			Alert: "LockergateTamperSpike", Severity: "critical", For: "0m",
			Expr:        `sum by (job) (increase(lockergate_alerts_raised_total{kind="tamper"}[15m])) > 3`,
			Summary:     "More than 3 tamper alerts in 15 minutes",
			Description: "Lockers report tampering (forced doors, opened housings) more often than usual. A locker that keeps reporting one tamper counts once until staff clear its alert (its repeats show in GET /v1/alerts).",
			Runbook: "1. Find the lockers: gateway log lines msg=alert kind=tamper, or SELECT device_id, raised_at, detail FROM alerts WHERE kind = 'tamper' ORDER BY id DESC.\n" +
				"2. Call the site; consider disabling affected compartments (set_service command) until inspected.",
		},
		{
			Alert: "LockergateLockerClocksWrong", Severity: "warning", For: "15m",
			Expr:        `max by (job) (lockergate_alerts_open{kind="clock_skew"}) > 0`,
			Summary:     "Lockers run with a clock too far off",
			Description: "At least one locker's clock was further from the gateway's than --max-clock-skew (30 s by default) at its last connect. A locker judges pickup codes' not_after and commands' expires_at by its own clock: one behind takes codes and commands past their expiry.",
			Runbook: "1. Which lockers: SELECT device_id, detail, raised_at FROM alerts WHERE kind = 'clock_skew' AND cleared_at IS NULL; GET /v1/lockers/{id} shows clock_offset_ms.\n" +
				"2. Many at one site: the store network blocks NTP. One model or firmware: its clock or time sync is broken.\n" +
				"3. The alert clears at the locker's next connect with its clock right (a reboot command reconnects it).",
		},
		{
			Alert: "LockergateCredentialsNotApplied", Severity: "warning", For: "5m",
			Expr:        `max by (job) (lockergate_alerts_open{kind="creds_not_applied"}) > 0`,
			Summary:     "Lockers do not apply their pickup codes",
			Description: "At least one locker did not acknowledge its credential set after five republishes: codes made since the last set it applied do not open it, so drivers and customers stand at a locker that refuses them.",
			Runbook: "1. Which lockers: GET /v1/alerts?kind=creds_not_applied&open=true; GET /v1/lockers/{id} shows creds_version against creds_acked.\n" +
				"2. One locker: restart it (a reboot command, or power): it gets its set at the next connect. Many of one model or firmware: its creds handling is broken (protocol.md, credentials).\n" +
				"3. The alert clears when the locker acknowledges its current set. Until then the locker gets no new pickup, and its compartments whose orders ended wait for a set without their codes (awaits_creds). Clear the alert by hand only when you know the locker holds its set (its acks are what fails): that also releases those compartments.",
		},
		{
			Alert: "LockergateCredentialGuessing", Severity: "warning", For: "10m",
			Expr:        `sum by (job) (rate(lockergate_mqtt_auth_failures_total{reason=~"bad_credentials|unknown_device|client_id_mismatch|unknown_claim"}[5m])) > 1`,
			Summary:     "MQTT CONNECTs with wrong credentials keep arriving",
			Description: "More than one refused CONNECT per second for 10 minutes: a wiped locker retrying, or someone guessing.",
			Runbook: "1. Gateway log: refused CONNECTs carry the client id and address.\n" +
				"2. One client id: re-provision that locker. Many ids from few addresses: block them at the firewall; rate limiting already applies.",
		},
		{
			Alert: "LockergateBrokerDropping", Severity: "warning", For: "10m",
			Expr:        "sum by (job, instance, reason) (rate(lockergate_mqtt_messages_dropped_total[5m])) > 0",
			Summary:     "The broker on {{ $labels.instance }} drops messages ({{ $labels.reason }})",
			Description: "MQTT messages are being dropped: too_large means a firmware sends oversize payloads, client_queue_full a slow receiver.",
			Runbook:     "1. too_large: find the firmware version by the devices' logs and fix it.\n2. client_queue_full: check the gateway's CPU and ingest lag.",
		},
		{
			Alert: "LockergateKicksUnheard", Severity: "warning", For: "2m",
			Expr:        "time() - lockergate_kicks_last_heard_timestamp_seconds > 30",
			Summary:     "{{ $labels.instance }} hears no kick notifications from PostgreSQL",
			Description: "Every instance sends a heartbeat over PostgreSQL NOTIFY every 3 s, and this one has heard none for over 30 s. It may miss disables and replacements made through other instances, so it forgets every cached locker secret (more database load); and during a database outage its auth hook refuses lockers it cannot confirm.",
			Runbook: "1. Gateway log: \"kick notifications interrupted\" or \"kick listener heard nothing\" carries the error.\n" +
				"2. A pooler in transaction mode drops LISTEN: connect the gateway directly or in session mode (docs/deployment.md).\n" +
				"3. Database health (LockergateDatabaseErrors).",
		},
		{
			Alert: "LockergateBrokerIdentitiesMissing", Severity: "critical", For: "0m",
			Expr:        "max by (job) (lockergate_broker_identities_missing) > 0",
			Summary:     "Lockers have no identity on the external broker ({{ $labels.job }})",
			Description: "mosquitto's dynamic security does not hold these lockers' clients: they are refused as not authorised (for good, as far as they know) until provisioned again. The usual cause is a dynsec file the broker could not write: it lost every change since at its last restart.",
			Runbook: "1. Gateway log: \"lockers without an identity on the external broker\" names the first ones.\n" +
				"2. mosquitto's log: \"Error saving Dynamic security plugin config\"; make the dynsec file writable by mosquitto's user (docs/deployment.md) before anything else.\n" +
				"3. Mark the lockers replaceable and provision them again (their secrets are stored hashed and cannot be put back).\n" +
				"4. Every gateway instance counts the same lockers (one alert for them all); the count is checked again at each reconnect to the broker and hourly, so it may stay up to an hour after the fix (restart an instance to check at once).",
		},
	}
}
