package fleet

import (
	"context"
	"fmt"
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
var StatefulAlerts = []string{AlertDoorAjar, AlertDoorFault, AlertOnBattery, AlertClockSkew, AlertCredsNotApplied}

// DefaultCensusInterval is how often the census gauges are refreshed.
const DefaultCensusInterval = 15 * time.Second

// census refreshes the fleet-wide gauges: one query over devices (each
// locker costs at most FlappingConnects index entries of presence_log) and
// one over the open-alert index, every CensusInterval.
func (m *Manager) census(ctx context.Context) {
	now := m.now()
	silent := m.SilentAfter()
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
	m.doorsLeftOpen(ctx, now)
}

// doorsLeftOpenLimit bounds the door_ajar alerts one census raises.
const doorsLeftOpenLimit = 500

// doorAjarGrace is how long past door_ajar_s the gateway waits for a
// locker's own door_ajar (or closing) before it raises door_ajar itself:
// the configured time, at most 30 s.
func (m *Manager) doorAjarGrace() time.Duration {
	return min(time.Duration(m.opts.Config.DoorAjarS)*time.Second, 30*time.Second)
}

// doorsLeftOpen raises door_ajar for doors reported open longer than
// door_ajar_s and its grace with nothing from the locker since: a locker
// whose firmware sends no door_ajar, or that went silent (offline, hung)
// with a door open, would otherwise leave an open compartment unreported.
// Not in a run's first door_ajar_s and grace: closings queued while this
// gateway was down (in the lockers' sessions, or its own on an external
// broker) are still coming in. Behind an external broker a closing can
// also wait in another instance's session while that instance is down;
// this one may then raise door_ajar for a door closed meanwhile, which the
// closing clears when it comes (docs/deployment.md).
func (m *Manager) doorsLeftOpen(ctx context.Context, now time.Time) {
	ajar := time.Duration(m.opts.Config.DoorAjarS)*time.Second + m.doorAjarGrace()
	if ajar <= 0 || now.Sub(m.started) < ajar {
		return
	}
	raised, err := m.store.RaiseDoorsLeftOpen(ctx, now.Add(-ajar), now, doorsLeftOpenLimit)
	if err != nil {
		m.m.dbErrors.WithLabelValues("doors_left_open").Inc()
		m.log.Error("door-ajar check; tried again at the next census", "err", err)
		return
	}
	for i := range raised {
		m.alertRaised(&raised[i])
	}
}

const (
	// credsRepublishLimit bounds the lockers one census republishes to.
	credsRepublishLimit = 500
	// credsRepublishTries bounds how often one set is republished to a
	// locker that does not acknowledge it.
	credsRepublishTries = 5
)

// credsLagSeen is a locker found behind on its credential set at a census.
type credsLagSeen struct {
	version int64
	tries   int
}

// reconcileCreds republishes the credential set of every online locker
// that was behind on the same version at the previous census too: a set
// whose publish failed (a database or broker error after the change was
// committed) or that the locker lost. Until then the locker would keep the
// codes of pickups since cancelled or expired, up to their own not_after.
// A locker that still does not acknowledge after credsRepublishTries is
// left alone until its set changes; its locker record shows creds_current
// false. It runs on Run's goroutine only.
func (m *Manager) reconcileCreds(ctx context.Context) {
	// Those given up on are left out of the query, so that however many
	// never acknowledge, the lockers behind after them are still found.
	var gaveUp []CredsLag
	for id, s := range m.credsLag {
		if s.tries >= credsRepublishTries {
			gaveUp = append(gaveUp, CredsLag{DeviceID: id, Version: s.version})
		}
	}
	lctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	lags, err := m.store.CredsBehind(lctx, credsRepublishLimit, gaveUp)
	cancel()
	if err != nil {
		m.m.dbErrors.WithLabelValues("creds_behind").Inc()
		m.log.Error("load lockers behind on credentials", "err", err)
		return
	}
	next := make(map[string]credsLagSeen, len(lags)+len(gaveUp))
	for _, l := range gaveUp {
		// Kept until the set changes: the query then finds the locker
		// at its new version, and it starts over.
		next[l.DeviceID] = m.credsLag[l.DeviceID]
	}
	for _, l := range lags {
		cur := credsLagSeen{version: l.Version}
		if prev, ok := m.credsLag[l.DeviceID]; ok && prev.version == l.Version {
			cur.tries = prev.tries
			if cur.tries < credsRepublishTries {
				// Each publish has its own deadline, and only one that
				// went out counts as a try.
				pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
				err := m.PublishCreds(pctx, l.DeviceID)
				cancel()
				if err != nil {
					m.log.Error("republish credential set", "locker", l.DeviceID, "version", l.Version, "err", err)
				} else {
					cur.tries++
					m.m.credsRepublished.Inc()
					m.log.Info("credential set republished: not acknowledged", "locker", l.DeviceID, "version", l.Version, "try", cur.tries)
				}
				if cur.tries == credsRepublishTries {
					m.log.Warn("locker does not acknowledge its credential set; republishing stops until it changes",
						"locker", l.DeviceID, "version", l.Version, "tries", cur.tries)
					m.alert(ctx, Alert{DeviceID: l.DeviceID, Kind: AlertCredsNotApplied, RaisedAt: m.now(),
						Detail: fmt.Sprintf("the locker has not acknowledged its credential set (version %d) after %d republishes: "+
							"codes made since the last set it applied do not open it; check its firmware, or restart it", l.Version, cur.tries)})
				}
			}
		}
		next[l.DeviceID] = cur
	}
	m.credsLag = next
}
