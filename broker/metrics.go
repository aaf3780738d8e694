package broker

import (
	"errors"

	"github.com/prometheus/client_golang/prometheus"
)

// Drop reasons: the reason label of lockergate_mqtt_messages_dropped_total.
const (
	dropTooLarge  = "too_large"         // payload over 16 KiB, or packet over MaxPacketSize
	dropQueueFull = "client_queue_full" // the receiving client's outbound queue was full
)

// metrics of the broker. No label takes per-device values.
type metrics struct {
	authFailures *prometheus.CounterVec // reason
	aclDenied    *prometheus.CounterVec // action
	dropped      *prometheus.CounterVec // reason
	connections  *prometheus.GaugeVec   // kind
	connects     *prometheus.CounterVec // kind
	disconnects  *prometheus.CounterVec // reason
	authCache    *prometheus.CounterVec // result
	authBackend  prometheus.Histogram
	provisioning *prometheus.CounterVec // result
	readerRests  prometheus.CounterFunc

	all []prometheus.Collector
}

func newMetrics(reg prometheus.Registerer, readerRests func() float64) (*metrics, error) {
	m := &metrics{
		authFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "lockergate_mqtt_auth_failures_total",
			Help: "MQTT CONNECTs refused, by reason.",
		}, []string{"reason"}),
		aclDenied: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "lockergate_mqtt_acl_denied_total",
			Help: "Publishes and subscriptions refused by the topic access rules, by action.",
		}, []string{"action"}),
		dropped: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "lockergate_mqtt_messages_dropped_total",
			Help: "MQTT messages dropped by the broker, by reason.",
		}, []string{"reason"}),
		connections: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "lockergate_mqtt_connections",
			Help: "Authenticated MQTT connections, by kind (device, provisioning).",
		}, []string{"kind"}),
		connects: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "lockergate_mqtt_connects_total",
			Help: "MQTT CONNECTs accepted, by kind (device, provisioning).",
		}, []string{"kind"}),
		disconnects: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "lockergate_mqtt_disconnects_total",
			Help: "Ended MQTT sessions, by reason.",
		}, []string{"reason"}),
		authCache: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "lockergate_mqtt_auth_cache_total",
			Help: "Device credential checks answered from the cache (hit) or not (miss); stale: a miss the database could not confirm, admitted by the auth hook on the secret last verified.",
		}, []string{"result"}),
		authBackend: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "lockergate_mqtt_auth_backend_duration_seconds",
			Help:    "Duration of credential checks against the backend (device and claim).",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5},
		}),
		provisioning: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "lockergate_mqtt_provisioning_total",
			Help: "Provisioning requests handled, by result (ok, a protocol error code, busy, undelivered).",
		}, []string{"result"}),
		readerRests: prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "lockergate_mqtt_reader_rests_total",
			Help: "Times an idle connection's reader moved to a new goroutine, freeing the stack it grew handling packets (Options.ReaderRest).",
		}, readerRests),
	}
	// Every label value exists from the start, so rate() and alerts see zeros.
	for _, r := range refusalReasons {
		m.authFailures.WithLabelValues(r)
	}
	for _, a := range []string{"publish", "subscribe"} {
		m.aclDenied.WithLabelValues(a)
	}
	for _, r := range []string{dropTooLarge, dropQueueFull} {
		m.dropped.WithLabelValues(r)
	}
	for _, k := range []kind{kindDevice, kindProvision} {
		m.connections.WithLabelValues(k.String())
		m.connects.WithLabelValues(k.String())
	}
	for _, r := range disconnectReasons {
		m.disconnects.WithLabelValues(r)
	}
	for _, r := range []string{"hit", "miss", "stale"} {
		m.authCache.WithLabelValues(r)
	}
	for _, r := range provResults {
		m.provisioning.WithLabelValues(r)
	}

	m.all = []prometheus.Collector{m.authFailures, m.aclDenied, m.dropped, m.connections,
		m.connects, m.disconnects, m.authCache, m.authBackend, m.provisioning, m.readerRests}
	var errs []error
	var done []prometheus.Collector
	for _, c := range m.all {
		if err := reg.Register(c); err != nil {
			errs = append(errs, err)
			continue
		}
		done = append(done, c)
	}
	if err := errors.Join(errs...); err != nil {
		for _, c := range done { // leave the registry as it was
			reg.Unregister(c)
		}
		return nil, err
	}
	return m, nil
}

// unregister removes the metrics from reg, for a Broker that failed to start.
func (m *metrics) unregister(reg prometheus.Registerer) {
	for _, c := range m.all {
		reg.Unregister(c)
	}
}
