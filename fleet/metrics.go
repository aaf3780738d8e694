package fleet

import "github.com/prometheus/client_golang/prometheus"

// metrics of the fleet manager. No label takes per-locker values.
type metrics struct {
	received      *prometheus.CounterVec // channel
	dropped       *prometheus.CounterVec // channel, reason
	queueDepth    *prometheus.GaugeVec   // queue
	ingestLag     prometheus.Histogram
	dbWrite       *prometheus.HistogramVec // op
	dbErrors      *prometheus.CounterVec   // op
	online        prometheus.Gauge
	commands      *prometheus.CounterVec // type, status
	cmdDuration   *prometheus.HistogramVec
	eventsDup     prometheus.Counter
	alerts        *prometheus.CounterVec // kind
	presenceEvent *prometheus.CounterVec // kind
}

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
		queueDepth: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "lockergate_ingest_queue_depth",
			Help: "Messages waiting in each ingest queue.",
		}, []string{"queue"}),
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
		cmdDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "lockergate_command_duration_seconds",
			Help:    "Time from issuing a command to the device's answer, by type.",
			Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30},
		}, []string{"type"}),
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
	}
	if reg != nil {
		reg.MustRegister(m.received, m.dropped, m.queueDepth, m.ingestLag, m.dbWrite, m.dbErrors,
			m.online, m.commands, m.cmdDuration, m.eventsDup, m.alerts, m.presenceEvent)
	}
	return m
}
