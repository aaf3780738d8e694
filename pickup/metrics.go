package pickup

import (
	"sort"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
)

// MaxSiteLabels bounds the site label of the occupancy gauges; sites past it
// are summed under site="other".
const MaxSiteLabels = 200

type metrics struct {
	state      *prometheus.CounterVec
	late       prometheus.Counter
	stage      prometheus.Histogram
	collect    prometheus.Histogram
	rejections *prometheus.CounterVec
	alerts     *prometheus.CounterVec
	occupied   *prometheus.GaugeVec
	total      *prometheus.GaugeVec

	mu    sync.Mutex
	sites map[string]bool
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		state: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "lockergate_pickups_total", Help: "Pickups that entered a state, by state.",
		}, []string{"state"}),
		late: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "lockergate_pickups_reported_late_total",
			Help: "Pickups collected with their code before expires_at whose locker reported it after the expiry: each counts in lockergate_pickups_total as expired, then picked_up.",
		}),
		stage: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "lockergate_pickup_staging_duration_seconds", Help: "Time from creating a pickup to its being ready (staff loaded it).",
			Buckets: []float64{5, 15, 30, 60, 120, 300, 600, 1200, 3600},
		}),
		collect: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "lockergate_pickup_wait_duration_seconds", Help: "Time from ready to picked up.",
			Buckets: []float64{30, 60, 300, 600, 900, 1800, 3600, 7200, 14400, 43200},
		}),
		rejections: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "lockergate_credential_rejections_total", Help: "Codes lockers rejected, by reason.",
		}, []string{"reason"}),
		alerts: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "lockergate_pickup_alerts_total", Help: "Alerts the pickup workflow raised, by kind.",
		}, []string{"kind"}),
		occupied: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "lockergate_compartments_occupied", Help: "Occupied compartments, by site (at most 200 sites, then other).",
		}, []string{"site"}),
		total: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "lockergate_compartments", Help: "Compartments, by site (at most 200 sites, then other).",
		}, []string{"site"}),
		sites: map[string]bool{},
	}
	for _, s := range States {
		m.state.WithLabelValues(s)
	}
	for _, r := range []string{"unknown", "expired", "used", "locked_out"} {
		m.rejections.WithLabelValues(r)
	}
	for _, k := range AlertKinds {
		m.alerts.WithLabelValues(k)
	}
	if reg != nil {
		reg.MustRegister(m.state, m.late, m.stage, m.collect, m.rejections, m.alerts, m.occupied, m.total)
	}
	return m
}

func (m *metrics) setOccupancy(occ map[string][2]int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	sites := make([]string, 0, len(occ))
	for s := range occ {
		sites = append(sites, s)
	}
	sort.Strings(sites)
	agg := map[string][2]int{}
	for i, s := range sites {
		label := s
		if i >= MaxSiteLabels {
			label = "other"
		}
		v := agg[label]
		agg[label] = [2]int{v[0] + occ[s][0], v[1] + occ[s][1]}
	}
	for s := range m.sites {
		if _, ok := agg[s]; !ok {
			m.occupied.DeleteLabelValues(s)
			m.total.DeleteLabelValues(s)
			delete(m.sites, s)
		}
	}
	for s, v := range agg {
		m.total.WithLabelValues(s).Set(float64(v[0]))
		m.occupied.WithLabelValues(s).Set(float64(v[1]))
		m.sites[s] = true
	}
}
