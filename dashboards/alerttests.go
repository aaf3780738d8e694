package dashboards

// The labels of the one gateway the rule tests pretend to scrape.
const (
	testJob      = `job="lockergate"`
	testInstance = `instance="gw-1:8080"`
	testTarget   = testJob + ", " + testInstance
)

func jobOnly() map[string]string { return map[string]string{"job": "lockergate"} }

func jobInstance(more ...string) map[string]string {
	m := map[string]string{"job": "lockergate", "instance": "gw-1:8080"}
	for i := 0; i+1 < len(more); i += 2 {
		m[more[i]] = more[i+1]
	}
	return m
}

// RuleTests are the promtool unit tests of the rules: each rule fires on
// the input that should fire it, and some stay quiet on input that should not.
func RuleTests() []RuleTest {
	fires := func(at, alert string, labels ...map[string]string) Eval {
		return Eval{At: at, Alert: alert, Firing: labels}
	}
	quiet := func(at, alert string) Eval { return Eval{At: at, Alert: alert} }
	return []RuleTest{
		{
			Name:   "A gateway that stops answering scrapes is down after 2 minutes.",
			Series: []Series{{`up{` + testTarget + `}`, "1 1 0x10"}},
			Evals: []Eval{quiet("1m", "LockergateDown"), quiet("3m", "LockergateDown"),
				fires("5m", "LockergateDown", jobInstance()), quiet("5m", "LockergateMetricsAbsent")},
		},
		{
			Name:   "Without a lockergate target the rules are blind.",
			Series: []Series{{`up{job="node", instance="host:9100"}`, "1x20"}},
			Evals:  []Eval{quiet("5m", "LockergateMetricsAbsent"), fires("15m", "LockergateMetricsAbsent", jobOnly())},
		},
		{
			Name: "20 of 100 lockers offline for 15 minutes is a warning, not a mass outage.",
			Series: []Series{
				{`lockergate_devices_connected{` + testTarget + `}`, "100x5 80x30"},
				{`lockergate_devices_registered{` + testTarget + `}`, "100x35"},
			},
			Evals: []Eval{quiet("10m", "LockergateLockersOffline"), fires("25m", "LockergateLockersOffline", jobOnly()),
				quiet("25m", "LockergateLockersOfflineMass")},
		},
		{
			Name: "Two gateways report the same fleet-wide counts: 80 of 100 online is 20 % offline, not 160 online.",
			Series: []Series{
				{`lockergate_devices_connected{job="lockergate", instance="gw-1:8080"}`, "80x30"},
				{`lockergate_devices_connected{job="lockergate", instance="gw-2:8080"}`, "80x30"},
				{`lockergate_devices_registered{job="lockergate", instance="gw-1:8080"}`, "100x30"},
				{`lockergate_devices_registered{job="lockergate", instance="gw-2:8080"}`, "100x30"},
			},
			Evals: []Eval{fires("25m", "LockergateLockersOffline", jobOnly())},
		},
		{
			Name: "60 of 100 lockers offline for 5 minutes is a mass outage.",
			Series: []Series{
				{`lockergate_devices_connected{` + testTarget + `}`, "100x2 40x20"},
				{`lockergate_devices_registered{` + testTarget + `}`, "100x22"},
			},
			Evals: []Eval{fires("10m", "LockergateLockersOfflineMass", jobOnly())},
		},
		{
			Name: "An empty fleet is not offline.",
			Series: []Series{
				{`lockergate_devices_connected{` + testTarget + `}`, "0x30"},
				{`lockergate_devices_registered{` + testTarget + `}`, "0x30"},
			},
			Evals: []Eval{quiet("25m", "LockergateLockersOffline"), quiet("25m", "LockergateLockersOfflineMass")},
		},
		{
			Name: "10 % of the lockers silent for 15 minutes.",
			Series: []Series{
				{`lockergate_devices_stale{` + testTarget + `}`, "0x5 10x30"},
				{`lockergate_devices_registered{` + testTarget + `}`, "100x35"},
			},
			Evals: []Eval{fires("25m", "LockergateLockersStale", jobOnly())},
		},
		{
			Name:   "6 lockers flapping for 15 minutes.",
			Series: []Series{{`lockergate_devices_flapping{` + testTarget + `}`, "0 6x30"}},
			Evals:  []Eval{quiet("10m", "LockergateLockersFlapping"), fires("20m", "LockergateLockersFlapping", jobOnly())},
		},
		{
			Name: "Every message takes 1 to 10 s to reach the database: p99 lag above 5 s.",
			Series: []Series{
				{`lockergate_ingest_lag_seconds_bucket{` + testTarget + `, le="1"}`, "0x30"},
				{`lockergate_ingest_lag_seconds_bucket{` + testTarget + `, le="10"}`, "0+60x30"},
				{`lockergate_ingest_lag_seconds_bucket{` + testTarget + `, le="+Inf"}`, "0+60x30"},
			},
			Evals: []Eval{fires("20m", "LockergateIngestLag", jobInstance())},
		},
		{
			Name:   "The health queue holds 20000 messages for 5 minutes.",
			Series: []Series{{`lockergate_ingest_queue_depth{` + testTarget + `, queue="health"}`, "20000x20"}},
			Evals:  []Eval{fires("10m", "LockergateIngestQueueFilling", jobInstance("queue", "health"))},
		},
		{
			Name: "Health dropped because its queue is full; other drops do not count.",
			Series: []Series{
				{`lockergate_ingest_messages_dropped_total{` + testTarget + `, channel="health", reason="queue_full"}`, "0+100x30"},
				{`lockergate_ingest_messages_dropped_total{` + testTarget + `, channel="events", reason="invalid"}`, "0+100x30"},
			},
			Evals: []Eval{fires("20m", "LockergateHealthDropped", jobInstance())},
		},
		{
			Name: "Event inserts keep failing.",
			Series: []Series{
				{`lockergate_db_errors_total{` + testTarget + `, op="insert_events"}`, "0+5x20"},
				{`lockergate_db_errors_total{` + testTarget + `, op="presence"}`, "0x20"},
			},
			Evals: []Eval{fires("15m", "LockergateDatabaseErrors", jobInstance("op", "insert_events"))},
		},
		{
			Name:   "The firmware engine keeps failing an operation.",
			Series: []Series{{`lockergate_firmware_errors_total{` + testTarget + `, op="dispatch"}`, "0+1x30"}},
			Evals:  []Eval{fires("20m", "LockergateFirmwareErrors", jobInstance("op", "dispatch"))},
		},
		{
			Name: "A third of the unlocks time out; reboots fail 1 in 100.",
			Series: []Series{
				{`lockergate_commands_total{` + testTarget + `, type="unlock", status="ok"}`, "0+10x30"},
				{`lockergate_commands_total{` + testTarget + `, type="unlock", status="timed_out"}`, "0+5x30"},
				{`lockergate_commands_total{` + testTarget + `, type="reboot", status="ok"}`, "0+99x30"},
				{`lockergate_commands_total{` + testTarget + `, type="reboot", status="failed"}`, "0+1x30"},
			},
			Evals: []Eval{fires("25m", "LockergateCommandFailures", map[string]string{"job": "lockergate", "type": "unlock"})},
		},
		{
			Name: "Two failed unlocks out of three are too few to alert on.",
			Series: []Series{
				{`lockergate_commands_total{` + testTarget + `, type="unlock", status="ok"}`, "0x10 1x20"},
				{`lockergate_commands_total{` + testTarget + `, type="unlock", status="failed"}`, "0x10 2x20"},
			},
			Evals: []Eval{quiet("20m", "LockergateCommandFailures")},
		},
		{
			Name:   "A rollout pauses.",
			Series: []Series{{`lockergate_firmware_rollouts{` + testTarget + `, status="paused"}`, "0x3 1x10"}},
			Evals:  []Eval{quiet("2m", "LockergateRolloutPaused"), fires("10m", "LockergateRolloutPaused", jobOnly())},
		},
		{
			Name:   "A third rollout is aborted; two aborted long ago do not alert.",
			Series: []Series{{`lockergate_firmware_rollouts{` + testTarget + `, status="aborted"}`, "2x10 3x90"}},
			Evals: []Eval{quiet("5m", "LockergateRolloutAborted"), fires("15m", "LockergateRolloutAborted", jobOnly()),
				quiet("90m", "LockergateRolloutAborted")},
		},
		{
			Name:   "Webhook events wait longer and longer.",
			Series: []Series{{`lockergate_webhook_oldest_pending_seconds{` + testTarget + `}`, "0+60x30"}},
			Evals:  []Eval{quiet("10m", "LockergateWebhookBacklog"), fires("25m", "LockergateWebhookBacklog", jobOnly())},
		},
		{
			Name: "A webhook delivery is given up.",
			Series: []Series{
				{`lockergate_webhook_deliveries_total{` + testTarget + `, outcome="given_up"}`, "0x5 1x10"},
				{`lockergate_webhook_deliveries_total{` + testTarget + `, outcome="delivered"}`, "0+10x15"},
			},
			Evals: []Eval{quiet("4m", "LockergateWebhooksGivenUp"), fires("10m", "LockergateWebhooksGivenUp", jobOnly())},
		},
		{
			Name: "Doors left ajar twice a minute; no tampering.",
			Series: []Series{
				{`lockergate_alerts_raised_total{` + testTarget + `, kind="door_ajar"}`, "0+2x30"},
				{`lockergate_alerts_raised_total{` + testTarget + `, kind="tamper"}`, "0x30"},
			},
			Evals: []Eval{fires("20m", "LockergateDoorAjarSpike", jobOnly()), quiet("20m", "LockergateTamperSpike")},
		},
		{
			Name:   "Tamper alerts once a minute.",
			Series: []Series{{`lockergate_alerts_raised_total{` + testTarget + `, kind="tamper"}`, "0+1x30"}},
			Evals:  []Eval{fires("20m", "LockergateTamperSpike", jobOnly())},
		},
		{
			Name: "A locker's clock is off for 20 minutes; other open alerts do not count.",
			Series: []Series{
				{`lockergate_alerts_open{` + testTarget + `, kind="clock_skew"}`, "0 1x30"},
				{`lockergate_alerts_open{` + testTarget + `, kind="door_ajar"}`, "5x30"},
			},
			Evals: []Eval{quiet("10m", "LockergateLockerClocksWrong"), fires("20m", "LockergateLockerClocksWrong", jobOnly())},
		},
		{
			Name: "A locker does not apply its credential sets for 10 minutes; a clock_skew does not count.",
			Series: []Series{
				{`lockergate_alerts_open{` + testTarget + `, kind="creds_not_applied"}`, "0 1x30"},
				{`lockergate_alerts_open{` + testTarget + `, kind="clock_skew"}`, "3x30"},
			},
			Evals: []Eval{quiet("4m", "LockergateCredentialsNotApplied"), fires("10m", "LockergateCredentialsNotApplied", jobOnly())},
		},
		{
			Name: "Two refused CONNECTs a second with bad credentials; backend errors do not count.",
			Series: []Series{
				{`lockergate_mqtt_auth_failures_total{` + testTarget + `, reason="bad_credentials"}`, "0+120x30"},
				{`lockergate_mqtt_auth_failures_total{` + testTarget + `, reason="backend_error"}`, "0+600x30"},
			},
			Evals: []Eval{fires("20m", "LockergateCredentialGuessing", jobOnly())},
		},
		{
			Name:   "The broker drops oversize messages.",
			Series: []Series{{`lockergate_mqtt_messages_dropped_total{` + testTarget + `, reason="too_large"}`, "0+10x30"}},
			Evals:  []Eval{fires("20m", "LockergateBrokerDropping", jobInstance("reason", "too_large"))},
		},
		{
			Name:   "A gateway that hears heartbeats is quiet; one that stops hearing them warns after 2 minutes.",
			Series: []Series{{`lockergate_kicks_last_heard_timestamp_seconds{` + testTarget + `}`, "0+60x5 300x20"}},
			Evals: []Eval{quiet("5m", "LockergateKicksUnheard"), quiet("7m", "LockergateKicksUnheard"),
				fires("10m", "LockergateKicksUnheard", jobInstance())},
		},
		{
			Name:   "Lockers without an identity on the broker page at once; none is quiet.",
			Series: []Series{{`lockergate_broker_identities_missing{` + testTarget + `}`, "0x5 3x5"}},
			Evals:  []Eval{quiet("4m", "LockergateBrokerIdentitiesMissing"), fires("6m", "LockergateBrokerIdentitiesMissing", jobOnly())},
		},
	}
}
