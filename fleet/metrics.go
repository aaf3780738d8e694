package fleet

import (
	"slices"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/lockergate/lockergate/protocol"
)

// metrics of the fleet manager. No label takes per-locker values.
type metrics struct {
	received         *prometheus.CounterVec // channel
	dropped          *prometheus.CounterVec // channel, reason
	ingestLag        prometheus.Histogram
	dbWrite          *prometheus.HistogramVec // op
	dbErrors         *prometheus.CounterVec   // op
	online           prometheus.Gauge
	commands         *prometheus.CounterVec // type, status
	lateAnswers      *prometheus.CounterVec // type, status
	cmdDuration      *prometheus.HistogramVec
	resent           prometheus.Counter
	credsRepublished prometheus.Counter
	credsCaughtUp    prometheus.Counter
	effectsReplayed  prometheus.Counter
	eventsDup        prometheus.Counter
	alerts           *prometheus.CounterVec // kind
	presenceEvent    *prometheus.CounterVec // kind
	staleWills       prometheus.Counter
	staleBirths      prometheus.Counter
	knownBirths      prometheus.Counter

	// Fleet-wide, from the census (the same on every gateway instance).
	registered prometheus.Gauge
	connected  prometheus.Gauge
	stale      prometheus.Gauge
	flapping   prometheus.Gauge
	alertsOpen *prometheus.GaugeVec // kind
}

// Label values that exist from the start, so that rate(), ratios and alert
// rules see zeros instead of no data. Other values appear when first used.
var (
	metricChannels = []protocol.Channel{protocol.ChanPresence, protocol.ChanHealth, protocol.ChanEvents,
		protocol.ChanCmdResult, protocol.ChanCredsAck, protocol.ChanFwStatus}
	metricQueues   = []string{"health", "events"}
	queueDepthDesc = prometheus.NewDesc("lockergate_ingest_queue_depth",
		"Messages waiting in each ingest queue, with those taken for a write not yet stored (one retried through a database outage).",
		[]string{"queue"}, nil)
	metricWriteOps = []string{"insert_health", "latest_health", "insert_events", "presence", "command_result", "creds_ack", "fw_status", "publish_retained"}
	metricErrorOps = append(slices.Clone(metricWriteOps), "expire_commands", "unanswered_commands", "census", "last_seen", "creds_behind", "pending_effects", "effects_applied", "effects_lock", "doors_left_open")
	metricCmdTypes = []string{protocol.CmdUnlock, protocol.CmdSetService, protocol.CmdReboot}
)

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		received: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "lockergate_mqtt_messages_received_total",
			Help: "Device messages received by the fleet manager, by channel.",
		}, []string{"channel"}),
		dropped: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "lockergate_ingest_messages_dropped_total",
			Help: "Device messages dropped by the fleet manager, by channel and reason.",
		}, []string{"channel", "reason"}),
		ingestLag: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "lockergate_ingest_lag_seconds",
			Help:    "Time from a message's arrival to its commit in PostgreSQL.",
			Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10},
		}),
		dbWrite: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "lockergate_db_write_duration_seconds",
			Help:    "Duration of fleet writes to PostgreSQL, by operation.",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 5},
		}, []string{"op"}),
		dbErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "lockergate_db_errors_total",
			Help: "Failed fleet operations on PostgreSQL, by operation.",
		}, []string{"op"}),
		online: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "lockergate_devices_online",
			Help: "Lockers with a live session on this gateway.",
		}),
		commands: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "lockergate_commands_total",
			Help: "Commands that reached a status, by type and status.",
		}, []string{"type", "status"}),
		lateAnswers: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "lockergate_command_late_answers_total",
			Help: "Device answers to commands the gateway had already ended (timed_out or expired, counted in lockergate_commands_total then), by type and the answer's status: the command now reads as the answer says.",
		}, []string{"type", "status"}),
		cmdDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "lockergate_command_duration_seconds",
			Help:    "Time from issuing a command to the device's answer, by type.",
			Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30},
		}, []string{"type"}),
		effectsReplayed: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "lockergate_events_replayed_total",
			Help: "Device events offered to the pickup workflow again because their effects had not been applied (a crash or a failed step).",
		}),
		credsRepublished: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "lockergate_creds_republished_total",
			Help: "Credential sets republished to online lockers that had not acknowledged them by two censuses, or that acknowledged an older set than they had before.",
		}),
		credsCaughtUp: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "lockergate_creds_caught_up_total",
			Help: "Credential sets published again right after a publish, because a newer one was committed meanwhile (instances sharing an external broker: another's may have gone out first).",
		}),
		resent: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "lockergate_commands_resent_total",
			Help: "Commands sent again, by id, to online lockers that had not answered them.",
		}),
		eventsDup: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "lockergate_events_duplicates_total",
			Help: "Device events received again (MQTT repeats) and recorded once.",
		}),
		alerts: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "lockergate_alerts_raised_total",
			Help: "Alerts raised, by kind.",
		}, []string{"kind"}),
		presenceEvent: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "lockergate_presence_changes_total",
			Help: "Locker presence changes, by kind (online, offline).",
		}, []string{"kind"}),
		staleWills: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "lockergate_presence_stale_wills_total",
			Help: "Last Will messages not applied: an earlier session's, delivered late by an external broker after the locker's next birth.",
		}),
		staleBirths: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "lockergate_presence_stale_births_total",
			Help: "Births not applied: an earlier session's, delivered late by an external broker after the locker's presence changed again.",
		}),
		knownBirths: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "lockergate_presence_retained_births_known_total",
			Help: "Births from an external broker that were copies of the session on record's (retained ones at a new subscription, one that reached two instances): not counted as new sessions.",
		}),
		registered: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "lockergate_devices_registered",
			Help: "Enabled lockers in the database (fleet-wide: every gateway instance reports the same count).",
		}),
		connected: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "lockergate_devices_connected",
			Help: "Enabled lockers marked online in the database, on any gateway or broker (fleet-wide).",
		}),
		stale: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "lockergate_devices_stale",
			Help: "Lockers marked online but silent for more than 3 health intervals (fleet-wide).",
		}),
		flapping: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "lockergate_devices_flapping",
			Help: "Lockers with 5 or more sessions in the last 10 minutes (fleet-wide).",
		}),
		alertsOpen: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "lockergate_alerts_open",
			Help: "Open stateful alerts (door_ajar, door_fault, on_battery, clock_skew), by kind (fleet-wide).",
		}, []string{"kind"}),
	}
	for _, ch := range metricChannels {
		m.received.WithLabelValues(string(ch))
	}
	m.dropped.WithLabelValues(string(protocol.ChanHealth), "queue_full")
	for _, op := range metricWriteOps {
		m.dbWrite.WithLabelValues(op)
	}
	for _, op := range metricErrorOps {
		m.dbErrors.WithLabelValues(op)
	}
	for _, t := range metricCmdTypes {
		m.cmdDuration.WithLabelValues(t)
		for _, s := range CommandStatuses {
			m.commands.WithLabelValues(t, s)
		}
		for _, s := range []string{CmdOK, CmdFailed, CmdRejected} {
			m.lateAnswers.WithLabelValues(t, s)
		}
	}
	for _, k := range AlertKinds {
		m.alerts.WithLabelValues(k)
	}
	for _, k := range StatefulAlerts {
		m.alertsOpen.WithLabelValues(k)
	}
	for _, k := range []string{"online", "offline"} {
		m.presenceEvent.WithLabelValues(k)
	}
	if reg != nil {
		reg.MustRegister(m.received, m.dropped, m.ingestLag, m.dbWrite, m.dbErrors,
			m.online, m.commands, m.lateAnswers, m.cmdDuration, m.resent, m.credsRepublished, m.credsCaughtUp, m.effectsReplayed, m.eventsDup, m.alerts, m.presenceEvent,
			m.staleWills, m.staleBirths, m.knownBirths, m.registered, m.connected, m.stale, m.flapping, m.alertsOpen)
	}
	return m
}

// queueDepth is lockergate_ingest_queue_depth, counted when scraped: what
// waits in each queue, and what its writers hold while a write (and its
// retries) runs, so the depth grows through a database outage instead of
// reading what it was before it.
type queueDepth struct{ m *Manager }

func (q queueDepth) Describe(ch chan<- *prometheus.Desc) { ch <- queueDepthDesc }

func (q queueDepth) Collect(ch chan<- prometheus.Metric) {
	for i, name := range metricQueues {
		n := q.m.queued(name) + int(q.m.held[i].Load())
		ch <- prometheus.MustNewConstMetric(queueDepthDesc, prometheus.GaugeValue, float64(n), name)
	}
}
