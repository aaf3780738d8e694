package fleet

import (
	"context"
	"time"
)

// Census is a fleet-wide count behind the gauges that session events cannot
// give: how many lockers there are, which ones went quiet or keep
// reconnecting, and which stateful alerts are open.
type Census struct {
	// Registered counts enabled lockers.
	Registered int
	// Connected counts enabled lockers marked online: a session on any
	// gateway instance or, with an external broker, a birth without a will.
	Connected int
	// Stale counts enabled lockers marked online but not heard from since
	// the staleBefore given to Store.Census.
	Stale int
	// Flapping counts enabled lockers with at least FlappingConnects
	// sessions since the flapSince given to Store.Census.
	Flapping int
	// OpenAlerts counts open alerts by kind, for the kinds asked for.
	OpenAlerts map[string]int
}

// StatefulAlerts are the alert kinds that clear when their condition ends,
// so that an open count means "now" (the others stay open for a person).
var StatefulAlerts = []string{AlertDoorAjar, AlertDoorFault, AlertOnBattery}

// DefaultCensusInterval is how often the census gauges are refreshed.
const DefaultCensusInterval = 15 * time.Second

// census refreshes the fleet-wide gauges: one query over devices (each
// locker costs at most FlappingConnects index entries of presence_log) and
// one over the open-alert index, every CensusInterval.
func (m *Manager) census(ctx context.Context) {
	now := m.now()
	silent := 3 * time.Duration(m.opts.Config.HealthIntervalS) * time.Second
	// A database that hangs must not hold up the sweeps and the shutdown.
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	c, err := m.store.Census(ctx, now.Add(-silent), now.Add(-10*time.Minute), StatefulAlerts)
	if err != nil {
		m.m.dbErrors.WithLabelValues("census").Inc()
		m.log.Error("fleet census", "err", err)
		return
	}
	m.m.registered.Set(float64(c.Registered))
	m.m.connected.Set(float64(c.Connected))
	m.m.stale.Set(float64(c.Stale))
	m.m.flapping.Set(float64(c.Flapping))
	for _, k := range StatefulAlerts {
		m.m.alertsOpen.WithLabelValues(k).Set(float64(c.OpenAlerts[k]))
	}
}
