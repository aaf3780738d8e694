package devicesim

import (
	"time"

	"github.com/lockergate/lockergate/protocol"
)

// handle applies one gateway → device message on the locker's goroutine.
func (l *Locker) handle(m inMsg) action {
	if m.topic == fwRebootTopic { // the firmware updater reboots (firmware.go)
		return actReboot
	}
	l.f.c.received.Add(1)
	_, ch, ok := protocol.ParseTopic(m.topic)
	if !ok {
		return actNone
	}
	switch ch {
	case protocol.ChanCmd:
		return l.handleCommand(m.payload)
	case protocol.ChanCreds:
		l.handleCreds(m.payload)
	case protocol.ChanConfig:
		return l.handleConfig(m.payload)
	case protocol.ChanFwJob:
		l.handleFwJob(m.payload)
	}
	return actNone
}

func (l *Locker) decodeFailed(what string, err error) {
	l.f.c.decodeErrors.Add(1)
	l.f.log.Debug("undecodable message", "serial", l.serial, "channel", what, "err", err)
}

// handleCreds replaces the credential set and acknowledges the version. A set
// older than the applied one (a late duplicate) is not applied; the ack then
// names the version the device holds.
func (l *Locker) handleCreds(payload []byte) {
	if len(payload) == 0 {
		return // retained message cleared
	}
	set, err := protocol.Decode[protocol.CredSet](payload)
	if err != nil {
		l.decodeFailed("creds", err)
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.x.credsHeld {
		l.x.heldCreds = payload
		return
	}
	if !l.haveCreds || set.Version >= l.creds.Version {
		l.creds, l.haveCreds = *set, true
		// Forget used marks of credentials the gateway dropped; keep those
		// it still lists (it may not have seen code_accepted yet).
		listed := make(map[string]bool, len(set.Creds))
		for _, c := range set.Creds {
			listed[c.ID] = true
		}
		for id := range l.used {
			if !listed[id] {
				delete(l.used, id)
			}
		}
	}
	l.sendLocked(outMsg{
		topic:   l.topic(protocol.ChanCredsAck),
		payload: protocol.Encode(protocol.CredsAck{Version: l.creds.Version}),
		qos:     1,
	})
}

func (l *Locker) handleConfig(payload []byte) action {
	if len(payload) == 0 {
		return actNone
	}
	cfg, err := protocol.Decode[protocol.Config](payload)
	if err != nil {
		l.decodeFailed("config", err)
		return actNone
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.cfg = settings{
		version:        cfg.Version,
		healthInterval: time.Duration(cfg.HealthIntervalS) * time.Second,
		doorAjar:       time.Duration(cfg.DoorAjarS) * time.Second,
		lockout:        cfg.Lockout,
	}
	return actRescheduleHealth
}

// handleFwJob stores the job (nil for the empty payload: no job); running it
// is the firmware updater's work.
func (l *Locker) handleFwJob(payload []byte) {
	job, err := protocol.DecodeFwJob(payload)
	if err != nil {
		l.decodeFailed("fw/job", err)
		return
	}
	l.mu.Lock()
	l.fwJob = job
	l.mu.Unlock()
	l.fwJobArrived(job) // the firmware updater (firmware.go)
}
