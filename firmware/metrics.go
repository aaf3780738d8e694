package firmware

import "github.com/prometheus/client_golang/prometheus"

// metrics of the firmware engine. No label takes per-locker or per-rollout
// values: gauges about rollouts report the worst running one.
type metrics struct {
	jobs         *prometheus.GaugeVec   // state
	rollouts     *prometheus.GaugeVec   // status
	wave         prometheus.Gauge       // highest current wave of running rollouts
	failureRatio prometheus.Gauge       // highest failure ratio of live rollouts
	finished     *prometheus.CounterVec // state
	reports      *prometheus.CounterVec // result
	bytesServed  prometheus.Counter
	stalled      prometheus.Counter
	gateLatency  prometheus.Histogram
	errors       *prometheus.CounterVec // op
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		jobs: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "lockergate_firmware_jobs",
			Help: "Firmware jobs of running and paused rollouts, by state.",
		}, []string{"state"}),
		rollouts: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "lockergate_firmware_rollouts",
			Help: "Firmware rollouts by status.",
		}, []string{"status"}),
		wave: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "lockergate_firmware_rollout_wave",
			Help: "Current wave (1-based) of the running rollout furthest along; 0 when none runs.",
		}),
		failureRatio: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "lockergate_firmware_rollout_failure_ratio",
			Help: "Failed over finished jobs of the worst running or paused rollout (0..1).",
		}),
		finished: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "lockergate_firmware_jobs_finished_total",
			Help: "Firmware jobs that reached a final state, by state (retried failures count as failed).",
		}, []string{"state"}),
		reports: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "lockergate_firmware_reports_total",
			Help: "Firmware reports (fw/status and births with a job) by result: applied, or ignored (stale or unknown job).",
		}, []string{"result"}),
		stalled: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "lockergate_firmware_downloads_stalled_total",
			Help: "Image downloads cut because the client took no 64 KiB within the stall timeout (it resumes with Range).",
		}),
		bytesServed: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "lockergate_firmware_bytes_served_total",
			Help: "Firmware image bytes sent by the download endpoint.",
		}),
		gateLatency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "lockergate_firmware_gate_stop_seconds",
			Help:    "Time from receiving the report that crossed a wave's failure threshold to the rollout paused or aborted.",
			Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5},
		}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "lockergate_firmware_errors_total",
			Help: "Failed firmware engine operations (database or publish), by operation.",
		}, []string{"op"}),
	}
	for _, s := range States {
		m.jobs.WithLabelValues(s)
	}
	for _, s := range Statuses {
		m.rollouts.WithLabelValues(s)
	}
	if reg != nil {
		reg.MustRegister(m.jobs, m.rollouts, m.wave, m.failureRatio, m.finished, m.reports, m.bytesServed, m.stalled, m.gateLatency, m.errors)
	}
	return m
}

func (m *metrics) set(g *Gauges) {
	for _, s := range States {
		m.jobs.WithLabelValues(s).Set(float64(g.Jobs[s]))
	}
	for _, s := range Statuses {
		m.rollouts.WithLabelValues(s).Set(float64(g.Rollouts[s]))
	}
	m.wave.Set(float64(g.MaxWave))
	m.failureRatio.Set(g.FailureRatio)
}
