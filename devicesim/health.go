package devicesim

import (
	"math"
	"time"

	"github.com/lockergate/lockergate/protocol"
)

// healthInterval is the current health period; negative means none.
func (l *Locker) healthInterval() time.Duration {
	if l.f.opts.HealthInterval < 0 {
		return -1
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.cfg.healthInterval > 0 {
		return l.cfg.healthInterval
	}
	return l.f.opts.HealthInterval
}

func (l *Locker) sendHealth() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.sess == nil {
		return // health is not queued: gaps in seq tell the gateway what was lost
	}
	h := l.healthLocked()
	l.sendLocked(outMsg{topic: l.topic(protocol.ChanHealth), payload: protocol.Encode(h), qos: l.f.opts.HealthQoS})
}

// healthLocked samples the sensors for the next health message.
func (l *Locker) healthLocked() protocol.Health {
	l.seq++
	now := l.f.now() // uptime counts from boot on the same clock
	temp := math.Round((l.baseTempC+0.3*l.sensor.NormFloat64())*10) / 10
	rssi := l.baseRSSI + l.sensor.IntN(7) - 3
	battery := l.batteryLocked()
	power := protocol.PowerMains
	if l.x.onBattery {
		power = protocol.PowerBattery
	}
	free := 0
	var faults []int
	for _, c := range l.comps {
		if c.inService && !c.occupied {
			free++
		}
		if c.fault {
			faults = append(faults, c.spec.N)
		}
	}
	return protocol.Health{
		TS:               wireTime(now.Add(l.x.skew)),
		Seq:              l.seq,
		FW:               l.fwVersionLocked(),
		UptimeS:          int64(now.Sub(l.bootAt) / time.Second),
		TempC:            &temp,
		Power:            power,
		BatteryPct:       &battery,
		RSSIdBm:          &rssi,
		FreeCompartments: &free,
		DoorFaults:       faults,
	}
}
