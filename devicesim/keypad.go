package devicesim

import (
	"time"

	"github.com/lockergate/lockergate/protocol"
)

// CodeResult is the keypad's verdict on a code.
type CodeResult struct {
	Accepted bool
	// Reason is protocol.RejectUnknown, RejectExpired, RejectUsed or
	// RejectLockedOut when the code was rejected.
	Reason string
	// Credential is the id of the credential the code matched, if any.
	Credential string
	// Compartments are the compartments opened.
	Compartments []int
}

// EnterCode types code on the keypad. The locker checks it offline against
// its credential set (HMAC with cred_key), not_after, single use (across
// the forms of one credential: the set's group extension) and the lockout
// policy; it reports code_accepted or code_rejected, and on accept
// opens the credential's compartments. The driver takes the items (the doors
// close unoccupied after DoorCloseDelay) unless Behavior says they leave one.
func (l *Locker) EnterCode(code string) CodeResult {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.now()
	lo := l.cfg.lockout
	if now.Before(l.lockedUntil) {
		return l.rejectLocked(protocol.RejectLockedOut, "")
	}
	var match *protocol.Credential
	if l.hasIdent {
		for i := range l.creds.Creds {
			if protocol.CredMatches(l.ident.CredKey, code, l.creds.Creds[i].MAC) {
				match = &l.creds.Creds[i]
				break
			}
		}
	}
	var reason string
	switch {
	case match == nil:
		reason = protocol.RejectUnknown
	case l.used[match.ID]:
		reason = protocol.RejectUsed
	case !match.NotAfter.IsZero() && now.After(match.NotAfter.Time):
		reason = protocol.RejectExpired
	}
	if reason != "" {
		l.countFailureLocked(now, lo)
		id := ""
		if match != nil {
			id = match.ID
		}
		return l.rejectLocked(reason, id)
	}

	l.used[match.ID] = true
	if match.Group > 0 {
		// The other forms of the same code are spent with it.
		for _, c := range l.creds.Creds {
			if c.Group == match.Group {
				l.used[c.ID] = true
			}
		}
	}
	l.failures = l.failures[:0]
	type opening struct {
		c   *compartment
		occ bool
	}
	var open []opening
	nums := []int{} // none opened (jammed doors) is an empty list, not all
	for _, n := range match.Compartments {
		c := l.compLocked(n)
		if c == nil || c.fault {
			continue
		}
		// One draw per compartment whatever the probability, so changing
		// it does not shift later decisions.
		leave := l.decide.Float64() < l.f.opts.Behavior.LeaveItemProb
		l.keypadDecisionLocked(n, leave)
		open = append(open, opening{c, leave && c.occupied})
		nums = append(nums, n)
	}
	l.f.c.codesAccepted.Add(1)
	ev := protocol.Event{Type: protocol.EventCodeAccepted, Credential: match.ID, Compartments: nums}
	if l.f.opts.OmitCodeCompartments {
		ev.Compartments = nil
	}
	if l.f.opts.CodeReport == CodeAcceptedFirst {
		l.emitLocked(ev)
	}
	for _, o := range open {
		l.openDoorLocked(o.c, protocol.ByCredential, match.ID, o.occ)
	}
	if l.f.opts.CodeReport == DoorOpenedFirst {
		l.emitLocked(ev)
	}
	return CodeResult{Accepted: true, Credential: match.ID, Compartments: nums}
}

// countFailureLocked records a rejected code and locks the keypad once the
// policy's failures fall within its window.
func (l *Locker) countFailureLocked(now time.Time, lo protocol.Lockout) {
	window := time.Duration(lo.WindowS) * time.Second
	kept := l.failures[:0]
	for _, t := range l.failures {
		if now.Sub(t) < window {
			kept = append(kept, t)
		}
	}
	l.failures = append(kept, now)
	if lo.MaxFailures > 0 && len(l.failures) >= lo.MaxFailures && lo.LockS > 0 {
		l.lockedUntil = now.Add(time.Duration(lo.LockS) * time.Second)
		l.failures = l.failures[:0]
	}
}

func (l *Locker) rejectLocked(reason, credential string) CodeResult {
	l.f.c.codesRejected.Add(1)
	l.emitLocked(protocol.Event{Type: protocol.EventCodeRejected, Reason: reason})
	return CodeResult{Reason: reason, Credential: credential}
}
