package devicesim

import (
	"time"

	"github.com/lockergate/lockergate/protocol"
)

// compartment is one compartment's physical state.
type compartment struct {
	spec      protocol.CompartmentSpec
	open      bool
	occupied  bool // occupancy sensor, as of the last door close
	inService bool
	fault     bool   // door sensor or latch fails: the door cannot be opened
	faultGen  uint64 // bumped whenever a fault starts; a jam's repair ends only its own
	// occOnClose is what the sensor will report when the door closes: it
	// records what the person at the open door did.
	occOnClose bool
	openedAt   time.Time
	closeTimer *time.Timer
	ajarTimer  *time.Timer
	closeGen   uint64 // bumped on every arm; stale close timers do nothing
	openGen    uint64 // bumped on every open; stale ajar timers do nothing
}

func (c *compartment) stopTimers() {
	if c.closeTimer != nil {
		c.closeTimer.Stop()
		c.closeTimer = nil
	}
	if c.ajarTimer != nil {
		c.ajarTimer.Stop()
		c.ajarTimer = nil
	}
}

// CompartmentState is a compartment as an observer sees it.
type CompartmentState struct {
	N         int
	Size      string
	Zone      string
	Open      bool
	Occupied  bool
	InService bool
	Fault     bool
}

// Compartment returns compartment n (1-based); N is 0 when there is none.
func (l *Locker) Compartment(n int) CompartmentState {
	l.mu.Lock()
	defer l.mu.Unlock()
	c := l.compLocked(n)
	if c == nil {
		return CompartmentState{}
	}
	return CompartmentState{N: n, Size: c.spec.Size, Zone: c.spec.Zone, Open: c.open,
		Occupied: c.occupied, InService: c.inService, Fault: c.fault}
}

func (l *Locker) compLocked(n int) *compartment {
	if n < 1 || n > len(l.comps) {
		return nil
	}
	return l.comps[n-1]
}

// SetOccupied is a person's action on compartment n: on an open door it sets
// what the occupancy sensor reports when the door closes; on a closed door it
// changes occupancy silently (as if the sensor re-read it).
func (l *Locker) SetOccupied(n int, occupied bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	c := l.compLocked(n)
	switch {
	case c == nil:
	case c.open:
		c.occOnClose = occupied
	default:
		c.occupied = occupied
	}
}

// SetDoorFault marks compartment n's door as failing (it will not open and is
// listed in health door_faults) or repaired.
func (l *Locker) SetDoorFault(n int, fault bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if c := l.compLocked(n); c != nil {
		c.setFault(fault)
	}
}

// setFault starts (or ends) the compartment's door fault.
func (c *compartment) setFault(fault bool) {
	if fault && !c.fault {
		c.faultGen++
	}
	c.fault = fault
}

// CloseDoor closes compartment n's open door now (door_closed); it reports
// whether the door was open. With a negative DoorCloseDelay this is the only
// way doors close.
func (l *Locker) CloseDoor(n int) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	c := l.compLocked(n)
	if c == nil || !c.open {
		return false
	}
	l.closeDoorLocked(c)
	return true
}

// openDoorLocked opens compartment n (door_opened) and arms the simulated
// person who closes it after DoorCloseDelay, leaving occOnClose behind.
func (l *Locker) openDoorLocked(c *compartment, by, ref string, occOnClose bool) {
	c.occOnClose = occOnClose
	if !c.open {
		c.open = true
		c.openGen++
		c.openedAt = l.now()
		e := protocol.Event{Type: protocol.EventDoorOpened, Compartment: c.spec.N, By: by}
		switch by {
		case protocol.ByCredential:
			e.Credential = ref
		case protocol.ByCommand:
			e.Command = ref
		}
		l.emitLocked(e)
		if d := l.cfg.doorAjar; d > 0 {
			gen := c.openGen
			c.ajarTimer = time.AfterFunc(d, func() { l.doorAjar(c, gen) })
		}
	}
	c.closeGen++
	if c.closeTimer != nil {
		c.closeTimer.Stop()
		c.closeTimer = nil
	}
	if d := l.f.opts.DoorCloseDelay; d >= 0 {
		gen := c.closeGen
		c.closeTimer = time.AfterFunc(d, func() { l.autoClose(c, gen) })
	}
}

func (l *Locker) closeDoorLocked(c *compartment) {
	c.open = false
	c.occupied = c.occOnClose
	c.closeGen++
	c.stopTimers()
	occ := c.occupied
	l.emitLocked(protocol.Event{Type: protocol.EventDoorClosed, Compartment: c.spec.N, Occupied: &occ})
}

func (l *Locker) autoClose(c *compartment, gen uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.stopped || !c.open || c.closeGen != gen {
		return
	}
	l.closeDoorLocked(c)
}

func (l *Locker) doorAjar(c *compartment, gen uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.stopped || !c.open || c.openGen != gen {
		return
	}
	c.ajarTimer = nil
	openS := int(l.now().Sub(c.openedAt) / time.Second)
	l.emitLocked(protocol.Event{Type: protocol.EventDoorAjar, Compartment: c.spec.N, OpenS: max(openS, 1)})
}
