package dashboards

// GatewayInternals is for whoever runs the gateway process: broker,
// ingest pipeline, database, commands, webhooks and the Go runtime.
func GatewayInternals() *Dashboard {
	finals := `status=~"ok|failed|rejected|timed_out|expired"`
	failures := `status=~"failed|rejected|timed_out"`
	return &Dashboard{
		UID: "lockergate-internals", File: "gateway-internals.json", Title: "Lockergate / Gateway internals",
		Description: "Broker connections, refusals and drops; ingest queues and lag; database latency and errors; " +
			"commands; webhooks; the Go runtime and the process.",
		Rows: []Row{
			{Title: "Broker", PanelWidth: 8, Panels: []Panel{
				withMin0(ts("MQTT connections", "Authenticated sessions by kind: device (lockers), provisioning (claim sessions).", "short",
					q("sum by (kind) ("+vec("lockergate_mqtt_connections", "")+")", "{{kind}}"))),
				withMin0(ts("CONNECTs accepted", "Accepted MQTT CONNECTs per second, by kind.", "ops",
					q("sum by (kind) ("+rate("lockergate_mqtt_connects_total", "")+")", "{{kind}}"))),
				withMin0(ts("CONNECTs refused", "Refused CONNECTs by reason: bad_credentials and unknown_device (guessing or a wiped locker), "+
					"rate_limited (lockout), backend_error (database trouble).", "ops",
					q("sum by (reason) ("+rate("lockergate_mqtt_auth_failures_total", "")+")", "{{reason}}"))),
				withMin0(ts("Topic access denied", "Publishes and subscriptions the ACL refused, by action.", "ops",
					q("sum by (action) ("+rate("lockergate_mqtt_acl_denied_total", "")+")", "{{action}}"))),
				withMin0(ts("Messages dropped by the broker", "too_large (over 16 KiB), client_queue_full (a slow receiver).", "ops",
					q("sum by (reason) ("+rate("lockergate_mqtt_messages_dropped_total", "")+")", "{{reason}}"))),
				withMin0(ts("Session ends by reason", "Ended MQTT sessions per second, by reason.", "ops",
					q("sum by (reason) ("+rate("lockergate_mqtt_disconnects_total", "")+")", "{{reason}}"))),
				{Kind: TimeSeries, Title: "Credential cache hit ratio", Unit: "percentunit", Min: f(0), Max: f(1),
					Description: "Device credential checks answered from the cache; misses cost a database round trip.",
					Targets: []Target{{Expr: "sum(" + rate("lockergate_mqtt_auth_cache_total", `result="hit"`) + ") / clamp_min(sum(" +
						rate("lockergate_mqtt_auth_cache_total", "") + "), 1e-9)", Legend: "hit ratio"}}},
				withMin0(ts("Credential backend latency", "Device and claim credential checks against the database.", "s",
					quantiles("lockergate_mqtt_auth_backend_duration_seconds", "", "")...)),
				withMin0(ts("Provisioning requests", "Provisioning requests by result: ok, claim_expired, claim_exhausted, serial_taken, invalid, error, busy, undelivered.", "ops",
					q("sum by (result) ("+rate("lockergate_mqtt_provisioning_total", "")+")", "{{result}}"))),
				withMin0(ts("Readers resting", "Idle connections whose reader moved to a fresh goroutine (freeing the stack and read buffer "+
					"it held) after 2 s without a packet. About one per locker per message gap longer than that: a fleet reporting "+
					"health every 60 s rests about once per locker per minute.", "ops",
					q("sum by (instance) ("+rate("lockergate_mqtt_reader_rests_total", "")+")", "{{instance}}"))),
			}},
			{Title: "Ingest", Panels: []Panel{
				withMin0(ts("Ingest queue depth", "Messages waiting for the database, per queue. Health is dropped when its queue is full; events make publishers wait.", "short",
					q("max by (instance, queue) ("+vec("lockergate_ingest_queue_depth", "")+")", "{{instance}} {{queue}}"))),
				withMin0(ts("Ingest lag", "From a message's arrival to its commit in PostgreSQL.", "s",
					quantiles("lockergate_ingest_lag_seconds", "", "")...)),
				withMin0(ts("Device messages by channel", "Messages received per second, by channel.", "ops",
					q("sum by (channel) ("+rate("lockergate_mqtt_messages_received_total", "")+")", "{{channel}}"))),
				withMin0(ts("Device messages dropped", "Dropped per second by channel and reason.", "ops",
					q("sum by (channel, reason) ("+rate("lockergate_ingest_messages_dropped_total", "")+")", "{{channel}} {{reason}}"))),
			}},
			{Title: "Database", PanelWidth: 8, Panels: []Panel{
				withMin0(ts("Write latency p99 by operation", "Fleet writes to PostgreSQL (each try, including failed ones).", "s",
					q("histogram_quantile(0.99, sum by (op, le) ("+rate("lockergate_db_write_duration_seconds_bucket", "")+"))", "{{op}}"))),
				withMin0(ts("Writes by operation", "Write attempts per second, by operation.", "ops",
					q("sum by (op) ("+rate("lockergate_db_write_duration_seconds_count", "")+")", "{{op}}"))),
				withMin0(ts("Database errors by operation", "Failed fleet operations; writes are retried with backoff, so errors mean delay, not loss, until the drain timeout.", "ops",
					q("sum by (op) ("+rate("lockergate_db_errors_total", "")+")", "{{op}}"))),
			}},
			{Title: "Commands", PanelWidth: 8, Panels: []Panel{
				withMin0(ts("Commands by type and status", "Commands reaching a status per second: pending (created), sent, then ok, failed, rejected, expired (never delivered in time), timed_out (no answer); answers that came after the command had ended (late, counted in their ended status before); and sent again (unanswered by an online locker after 5 s); credential sets republished to lockers that had not acknowledged them, and published again at once because a newer one was committed meanwhile (several instances); device events whose effects a stopped run had not applied, replayed.", "ops",
					q("sum by (type, status) ("+rate("lockergate_commands_total", "")+")", "{{type}} {{status}}"),
					q("sum by (type, status) ("+rate("lockergate_command_late_answers_total", "")+")", "{{type}} {{status}} late"),
					q("sum("+rate("lockergate_commands_resent_total", "")+")", "sent again"),
					q("sum("+rate("lockergate_creds_republished_total", "")+")", "credential sets republished"),
					q("sum("+rate("lockergate_creds_caught_up_total", "")+")", "credential sets caught up"),
					q("sum("+rate("lockergate_events_replayed_total", "")+")", "device events replayed"))),
				{Kind: TimeSeries, Title: "Command failure ratio by type", Unit: "percentunit", Min: f(0), Max: f(1),
					Thresholds:  []Threshold{{Color: "green"}, {Value: f(0.1), Color: "red"}},
					Description: "failed, rejected and timed_out over all finished commands. Alert LockergateCommandFailures fires above 10 %.",
					Targets: []Target{{Expr: "sum by (type) (" + rate("lockergate_commands_total", failures) + ") / clamp_min(sum by (type) (" +
						rate("lockergate_commands_total", finals) + "), 1e-9)", Legend: "{{type}}"}}},
				withMin0(ts("Command latency", "From issuing a command to the locker's answer, by type.", "s",
					quantiles("lockergate_command_duration_seconds", "", "type")...)),
			}},
			{Title: "Webhooks", Panels: []Panel{
				withMin0(ts("Deliveries by outcome", "Attempts per second: delivered, retry, given_up (also a held webhook's deliveries whose time ran out), dropped (webhook deleted or token revoked).", "ops",
					q("sum by (outcome) ("+rate("lockergate_webhook_deliveries_total", "")+")", "{{outcome}}"))),
				withMin0(ts("Delivery latency", "Duration of delivery attempts (the receiver's answer time).", "s",
					quantiles("lockergate_webhook_delivery_duration_seconds", "", "")...)),
				withMin0(ts("Backlog", "Deliveries waiting (fleet-wide).", "short",
					q("max("+vec("lockergate_webhook_backlog", "")+")", "waiting"))),
				withMin0(ts("Oldest undelivered event", "Age of the oldest undelivered webhook event (fleet-wide). Alert LockergateWebhookBacklog fires above 15 minutes.", "s",
					q("max("+vec("lockergate_webhook_oldest_pending_seconds", "")+")", "oldest"))),
				withMin0(ts("Webhooks held", "Webhooks whose receiver was unreachable (no answer, a 5xx or a 429), their events waiting (fleet-wide; GET /v1/webhooks says which).", "short",
					q("max("+vec("lockergate_webhooks_held", "")+")", "held"))),
			}},
			{Title: "Process", Panels: []Panel{
				withMin0(ts("CPU", "CPU seconds per second used by the gateway process.", "percentunit",
					q("rate(process_cpu_seconds_total{"+sel+"}[$__rate_interval])", "{{instance}}"))),
				withMin0(ts("Resident memory", "Resident set size of the gateway process, and the Go heap in use.", "bytes",
					q("process_resident_memory_bytes{"+sel+"}", "rss {{instance}}"),
					q("go_memstats_heap_inuse_bytes{"+sel+"}", "heap {{instance}}"))),
				withMin0(ts("Goroutines", "Goroutines of the gateway process.", "short",
					q("go_goroutines{"+sel+"}", "{{instance}}"))),
				{Kind: TimeSeries, Title: "Open file descriptors", Unit: "percentunit", Min: f(0), Max: f(1),
					Thresholds:  []Threshold{{Color: "green"}, {Value: f(0.8), Color: "red"}},
					Description: "Open over allowed file descriptors: every locker session holds one.",
					Targets:     []Target{{Expr: "process_open_fds{" + sel + "} / process_max_fds{" + sel + "}", Legend: "{{instance}}"}}},
			}},
		},
	}
}
