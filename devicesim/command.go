package devicesim

import (
	"encoding/json"

	"github.com/lockergate/lockergate/protocol"
)

// What the locker's goroutine must do after handling a message.
type action int

const (
	actNone action = iota
	actReboot
	actRescheduleHealth
)

// Error codes in command results.
const (
	errInvalid        = "invalid"
	errUnknownType    = "unknown_type"
	errBadCompartment = "bad_compartment"
	errBadReason      = "bad_reason"
	errBadInService   = "bad_in_service"
	errDoorJammed     = "door_jammed"
	errOutOfService   = "out_of_service"
)

// handleCommand runs a command at most once and answers every delivery of
// it: a repeated id gets the remembered answer again without running.
func (l *Locker) handleCommand(payload []byte) action {
	cmd, err := protocol.Decode[protocol.Command](payload)
	l.mu.Lock()
	defer l.mu.Unlock()
	if err != nil {
		// Answer what can be answered: a command with a usable id gets
		// "rejected", so the gateway is not left waiting for it.
		var probe struct {
			ID string `json:"id"`
		}
		if json.Unmarshal(payload, &probe) != nil || !protocol.ValidID(probe.ID) {
			l.f.c.decodeErrors.Add(1)
			l.f.log.Debug("undecodable command", "serial", l.serial, "err", err)
			return actNone
		}
		if !l.repeatLocked(probe.ID) {
			l.answerLocked(probe.ID, protocol.StatusRejected, errInvalid)
		}
		return actNone
	}
	if l.repeatLocked(cmd.ID) {
		return actNone
	}
	status, code, act := l.runCommandLocked(cmd)
	l.answerLocked(cmd.ID, status, code)
	return act
}

func (l *Locker) runCommandLocked(cmd *protocol.Command) (status, errCode string, act action) {
	if l.now().After(cmd.ExpiresAt.Time) {
		return protocol.StatusExpired, "", actNone
	}
	switch cmd.Type {
	case protocol.CmdUnlock:
		c := l.compLocked(cmd.Compartment)
		if c == nil {
			return protocol.StatusRejected, errBadCompartment, actNone
		}
		var occ bool
		switch cmd.Reason {
		case protocol.ReasonStaging:
			occ = true // staff loads the item
		case protocol.ReasonPickup:
			occ = false // the item is taken
		case protocol.ReasonRemote, protocol.ReasonService:
			occ = c.occupied
		default:
			return protocol.StatusRejected, errBadReason, actNone
		}
		if c.fault {
			return protocol.StatusFailed, errDoorJammed, actNone
		}
		if !c.inService && cmd.Reason != protocol.ReasonService {
			return protocol.StatusFailed, errOutOfService, actNone
		}
		l.ranLocked(cmd.ID)
		l.openDoorLocked(c, protocol.ByCommand, cmd.ID, occ)
		return protocol.StatusOK, "", actNone
	case protocol.CmdSetService:
		c := l.compLocked(cmd.Compartment)
		if c == nil {
			return protocol.StatusRejected, errBadCompartment, actNone
		}
		if cmd.InService == nil {
			return protocol.StatusRejected, errBadInService, actNone
		}
		l.ranLocked(cmd.ID)
		c.inService = *cmd.InService
		return protocol.StatusOK, "", actNone
	case protocol.CmdReboot:
		l.ranLocked(cmd.ID)
		return protocol.StatusOK, "", actReboot
	default:
		return protocol.StatusRejected, errUnknownType, actNone
	}
}

func (l *Locker) ranLocked(id string) {
	l.runs[id]++
	l.f.c.commandsRun.Add(1)
}

// answerLocked remembers and sends the answer to command id.
func (l *Locker) answerLocked(id, status, errCode string) {
	r := protocol.CommandResult{ID: id, Status: status, Error: errCode, TS: wireTime(l.now())}
	if len(l.resultOrder) >= maxRemembered {
		old := l.resultOrder[0]
		l.resultOrder = l.resultOrder[1:]
		delete(l.results, old)
		delete(l.runs, old)
	}
	l.results[id] = r
	l.resultOrder = append(l.resultOrder, id)
	l.sendResultLocked(r)
}

// repeatLocked answers a repeated command id from memory.
func (l *Locker) repeatLocked(id string) bool {
	r, ok := l.results[id]
	if !ok {
		return false
	}
	l.f.c.commandRepeats.Add(1)
	l.sendResultLocked(r)
	return true
}

func (l *Locker) sendResultLocked(r protocol.CommandResult) {
	l.f.c.commandsAnswered.Add(1)
	l.sendLocked(outMsg{topic: l.topic(protocol.ChanCmdResult), payload: protocol.Encode(r), qos: 1, queue: true})
}
