package pickup

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/protocol"
)

// Wants implements fleet.EventSink: the events that move pickups (a door
// opened by a code, not by a command or by hand).
func (s *Service) Wants(e *protocol.Event) bool {
	switch e.Type {
	case protocol.EventCodeAccepted, protocol.EventDoorClosed:
		return true
	case protocol.EventDoorOpened:
		return e.By == protocol.ByCredential && e.Credential != ""
	}
	return false
}

// DeviceEvents advances pickups from a locker's new events (called by the
// fleet manager with each stored batch, in order). A step that fails on the
// database is tried again until it succeeds, so a locker's events keep
// their order; it returns how many events it applied, fewer when ctx ends
// first or a step fails for good (the rest stay in the outbox and are
// offered again: at the next census once 5 minutes old, or at the next
// start). An event offered again may have been applied already: each step
// is idempotent.
func (s *Service) DeviceEvents(ctx context.Context, events []fleet.EventRecord) int {
	for i := range events {
		e := &events[i]
		ev, err := protocol.Decode[protocol.Event](e.Body)
		if err != nil {
			// Stored valid: one an older version read (a field name in
			// another letter case: operations.md, upgrade note 19).
			s.log.Warn("stored event no longer reads as an event: its pickup effects are not applied", "locker", e.DeviceID,
				"event", e.EventID, "err", err)
			continue
		}
		switch ev.Type {
		case protocol.EventCodeAccepted:
			err = s.codeAccepted(ctx, e.DeviceID, ev, e.ReceivedAt, events[i+1:])
		case protocol.EventCodeRejected:
			s.m.rejections.WithLabelValues(ev.Reason).Inc()
		case protocol.EventDoorOpened:
			if s.Wants(ev) { // by a code: the openings the outbox keeps
				err = s.doorOpened(ctx, e.DeviceID, ev, e.ReceivedAt, events[i+1:])
			}
		case protocol.EventDoorClosed:
			err = s.doorClosed(ctx, e.DeviceID, ev, e.ReceivedAt)
		}
		if err != nil {
			s.log.Error("device event not applied; it is offered again later (a census past 5 min, or the next start)", "locker", e.DeviceID, "event", e.EventID, "err", err)
			return i
		}
	}
	return len(events)
}

// retry runs a step until it succeeds, fails for good (the state moved:
// not found, a conflict, invalid), or ctx ends (an attempt that ends cut
// short by it is not logged as a failure).
func (s *Service) retry(ctx context.Context, op string, f func(context.Context) error) error {
	backoff := 50 * time.Millisecond
	for {
		err := f(ctx)
		if err == nil || errors.Is(err, fleet.ErrNotFound) || errors.Is(err, fleet.ErrConflict) || errors.Is(err, fleet.ErrInvalid) {
			return err
		}
		if ctx.Err() != nil { // cut short by the caller, not a failure
			return ctx.Err()
		}
		s.log.Error("pickup step failed; retrying", "op", op, "err", err, "retry_in", backoff)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, 5*time.Second)
	}
}

// codeAccepted spends the credential: single use, dropped from the next set.
// later are the locker's events applied after this one.
func (s *Service) codeAccepted(ctx context.Context, deviceID string, ev *protocol.Event, at time.Time, later []fleet.EventRecord) error {
	id := credentialID(ev.Credential)
	ps, err := s.use(ctx, "use_credential", func(ctx context.Context) ([]Pickup, error) {
		return s.o.Store.UseCredential(ctx, deviceID, id, at, ev.Compartments)
	})
	if errors.Is(err, fleet.ErrNotFound) {
		var door *DoorUse
		err := s.retry(ctx, "report_door_use", func(ctx context.Context) (err error) {
			door, err = s.o.Store.ReportDoorUse(ctx, deviceID, id, at)
			return err
		})
		if err != nil {
			return err
		}
		if door != nil {
			// The use a door's opening reported first (doorOpened) is
			// this one, and its live pickups were applied then; those
			// whose compartments it did not open are told now. The
			// compartments it opened of pickups that had expired (a
			// combined code, at a locker that was offline) are judged
			// now, as of that opening: its time is the use's.
			if err := s.notOpened(ctx, deviceID, ev, door.Ready, at); err != nil {
				return err
			}
			use := *ev
			use.TS = protocol.T(door.Opened)
			return s.judgeExpired(ctx, deviceID, id, &use, nil, door.At, later)
		}
		if ev.Compartments != nil && len(ev.Compartments) == 0 {
			// It opened nothing: no order was collected with it.
			return s.codeNotLive(ctx, deviceID, id, ev, at)
		}
		late, _, err := s.usedBeforeExpiry(ctx, deviceID, id, ev, ev.Compartments, at, later)
		if err != nil || late {
			return err
		}
		return s.codeNotLive(ctx, deviceID, id, ev, at)
	}
	if err != nil {
		return err
	}
	if err := s.spent(ctx, deviceID, ps, ev, later); err != nil {
		return err
	}
	if err := s.notOpened(ctx, deviceID, ev, ps, at); err != nil {
		return err
	}
	return s.judgeExpired(ctx, deviceID, id, ev, ps, at, later)
}

// notOpened tells staff of each ready pickup of ps (those of the code
// that ev, a code_accepted got at at, reports used) whose compartment the
// locker did not list among those it opened (a jammed door): the code is
// spent, so its driver cannot open it again. A pickup_not_opened alert is
// raised, and then the pickup gets a fresh code, which its platform is
// told of (pickup.credential_changed). The alert comes first, so that a
// step cut short before the mint (a crash) has told staff; offered again,
// the use raises it again, one alert (its key is the use's arrival), and
// mints. (A code from before a rotation the locker had not applied counts
// as its replacement, which opens the same compartments.) A locker that
// leaves compartments out is taken to have opened them all; an empty list
// opened none (a single code's door jammed). A use offered again after
// the mint finds such a pickup on its fresh code, not this one's, and
// changes nothing more.
func (s *Service) notOpened(ctx context.Context, deviceID string, ev *protocol.Event, ps []Pickup, at time.Time) error {
	if ev.Compartments == nil {
		return nil
	}
	for i := range ps {
		p := &ps[i]
		if p.State != Ready || slices.Contains(ev.Compartments, p.Compartment) {
			continue
		}
		s.log.Warn("pickup code used but its compartment did not open: a fresh code is issued", "pickup", p.ID, "locker", deviceID,
			"compartment", p.Compartment, "opened", ev.Compartments)
		if err := s.alert(ctx, fleet.Alert{DeviceID: deviceID, Kind: AlertNotOpened, Compartment: p.Compartment, RaisedAt: at,
			Detail: fmt.Sprintf("pickup %s: its code was used but the locker did not open compartment %d (it opened %v): the order is still inside, "+
				"and a fresh code is issued for it while it is ready (webhook pickup.credential_changed); if the door is jammed, "+
				"open it on site or with a remote unlock and hand the order over", p.ID, p.Compartment, ev.Compartments)}); err != nil {
			return err
		}
		if err := s.issue(ctx, p); err != nil {
			return err
		}
	}
	return nil
}

// judgeExpired judges the compartments that use ev of credential id, got
// at at, opened beyond those of its live pickups ps. A combined code opens
// the compartments of its pickups that ended too, on a locker that was
// offline since (the gateway narrowed the code to the live ones): those
// that expired after the use were collected in time. Others (cancelled
// ones, or a use offered again once its pickups were picked up) stay as
// they are. A locker that leaves the optional compartments out has them
// all judged (nil: the code's, less those this use spent on its live
// pickups). A compartment the locker lists that is neither a live
// pickup's (ps), nor one the code was live for when this use spent it
// (SpentFor: a door's opening spent it, or the use is offered again), nor
// one it collected an expired order from raises code_not_live: the locker
// let the code open a compartment the gateway did not hold it live for (a
// set it had not applied), where another order may be.
func (s *Service) judgeExpired(ctx context.Context, deviceID, id string, ev *protocol.Event, ps []Pickup, at time.Time, later []fleet.EventRecord) error {
	rest := slices.DeleteFunc(slices.Clone(ev.Compartments), func(n int) bool {
		return slices.ContainsFunc(ps, func(p Pickup) bool { return p.Compartment == n })
	})
	if len(rest) == 0 && ev.Compartments != nil {
		return nil // none beyond the live ones opened (an empty list: none at all)
	}
	_, held, err := s.usedBeforeExpiry(ctx, deviceID, id, ev, rest, at, later)
	if err != nil || ev.Compartments == nil {
		return err
	}
	stray := slices.DeleteFunc(rest, func(n int) bool {
		return slices.ContainsFunc(held, func(p Pickup) bool { return p.Compartment == n })
	})
	if len(stray) == 0 {
		return nil
	}
	var spent []int
	if err := s.retry(ctx, "spent_for", func(ctx context.Context) (err error) {
		spent, err = s.o.Store.SpentFor(ctx, deviceID, id, at)
		return err
	}); err != nil {
		return err
	}
	if stray = slices.DeleteFunc(stray, func(n int) bool { return slices.Contains(spent, n) }); len(stray) == 0 {
		return nil
	}
	// The use is audited as spent (UseCredential), with every compartment
	// the locker listed.
	s.log.Warn("pickup code opened compartments it was not live for", "locker", deviceID, "credential", id,
		"compartments", stray, "listed", ev.Compartments)
	return s.alertNotLive(ctx, fleet.Alert{DeviceID: deviceID, Kind: AlertCodeNotLive, RaisedAt: at, Compartment: stray[0],
		Detail: fmt.Sprintf("code %s opened compartments %v, which the gateway did not hold it live for (the locker listed %v; "+
			"it held an older set): check the order in each", id, stray, ev.Compartments)})
}

// doorOpened: a door opened by a code. A locker reports a code's use with
// code_accepted, and the protocol's order puts it before the door's
// opening, which then finds the code spent and changes nothing. A locker
// that reports the opening first, or only the opening, has the code spent
// by it (the code_accepted that may follow reports the same use:
// ReportDoorUse), so that its door's closing empty is a pickup. An opening
// by a code that is not live changes nothing: its code_accepted alerts
// staff (codeNotLive), or marks an order collected before it expired
// (usedBeforeExpiry), which a locker that reports only openings does not
// get. later are the locker's events applied after this one.
func (s *Service) doorOpened(ctx context.Context, deviceID string, ev *protocol.Event, at time.Time, later []fleet.EventRecord) error {
	id := credentialID(ev.Credential)
	ps, err := s.use(ctx, "use_credential_by_door", func(ctx context.Context) ([]Pickup, error) {
		return s.o.Store.UseCredentialByDoor(ctx, deviceID, id, at, ev.TS.Time, ev.Compartment)
	})
	if errors.Is(err, fleet.ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	return s.spent(ctx, deviceID, ps, ev, later)
}

// use spends a credential with spend (a Store's UseCredential or
// UseCredentialByDoor), trying again while the database fails.
func (s *Service) use(ctx context.Context, op string, spend func(context.Context) ([]Pickup, error)) ([]Pickup, error) {
	var ps []Pickup
	err := s.retry(ctx, op, func(ctx context.Context) (err error) {
		ps, err = spend(ctx)
		return err
	})
	return ps, err
}

// spent applies the use of a code, reported by ev (a code_accepted, or a
// door's opening), that opened live pickups ps: the locker is sent the set
// without it, and a closing of their doors applied before the use is
// judged again (closedBeforeCode).
func (s *Service) spent(ctx context.Context, deviceID string, ps []Pickup, ev *protocol.Event, later []fleet.EventRecord) error {
	for _, p := range ps {
		s.log.Info("pickup code used", "pickup", p.ID, "locker", deviceID, "compartment", p.Compartment, "reported_by", ev.Type)
	}
	s.publish(ctx, deviceID)
	for i := range ps {
		if err := s.closedBeforeCode(ctx, &ps[i], ev, later); err != nil {
			return err
		}
	}
	return nil
}

// closedBeforeCode applies again the closing of ready pickup p's door that
// the locker reported after the code's use (ev) but that was applied before
// it. A locker's events may be applied out of their order: through an
// external broker they are shared among the gateway instances, and one held
// for an instance that was down arrives late. The closing then found the
// code unused: it raised pickup_removed (or nothing, closed occupied) and
// left the pickup ready, where with the code it is picked up (or not taken).
// The closing judged again is the first after the code's use, by the
// locker's clock: the driver's. When it ends the pickup, the pickup_removed
// alerts that it and the closings after it raised without the code are
// withdrawn (in the locker's order those found no live pickup). A first
// closing still to come among later is applied in its turn.
func (s *Service) closedBeforeCode(ctx context.Context, p *Pickup, ev *protocol.Event, later []fleet.EventRecord) error {
	if p.State != Ready {
		return nil
	}
	closings, closed, err := s.closingApplied(ctx, p, ev.TS.Time, later)
	if err != nil || closed == nil {
		return err
	}
	first := &closings[0]
	s.log.Info("door closing judged again: the code used before it was applied after it",
		"pickup", p.ID, "locker", p.Locker, "compartment", p.Compartment, "event", first.EventID)
	if err := s.doorClosed(ctx, p.Locker, closed, first.ReceivedAt); err != nil {
		return err
	}
	if closed.Occupied != nil && *closed.Occupied {
		return nil // not taken: a fresh code; the closings after it were judged against the pickup still live
	}
	for i := range closings {
		if err := s.withdrawRemoved(ctx, p, &closings[i]); err != nil {
			return err
		}
	}
	return nil
}

// closingApplied returns the closings of pickup p's door that the locker
// reported after the code's use at used (by its clock), in its order, that
// were applied already, and the first of them decoded when it is to be
// judged again:
// nil when there is none, or when it is among later (to be applied in its
// turn). Only a closing received after the pickup became ready (not the
// staging's, which made it ready) can be the driver's.
func (s *Service) closingApplied(ctx context.Context, p *Pickup, used time.Time, later []fleet.EventRecord) ([]fleet.EventRecord, *protocol.Event, error) {
	since := p.CreatedAt
	if p.ReadyAt != nil {
		since = *p.ReadyAt
	}
	var closings []fleet.EventRecord
	err := s.retry(ctx, "door_closings_after", func(ctx context.Context) (err error) {
		closings, err = s.o.Store.DoorClosingsAfter(ctx, p.Locker, p.Compartment, since, used)
		return err
	})
	if err != nil || len(closings) == 0 {
		return nil, nil, err
	}
	first := &closings[0]
	if slices.ContainsFunc(later, func(e fleet.EventRecord) bool { return e.EventID == first.EventID }) {
		return nil, nil, nil
	}
	closed, err := protocol.Decode[protocol.Event](first.Body)
	if err != nil {
		return nil, nil, nil // stored valid; not a closing to judge again
	}
	return closings, closed, nil
}

// withdrawRemoved withdraws the pickup_removed alert that closing c of
// pickup p's compartment raised, judged without the code used before it.
func (s *Service) withdrawRemoved(ctx context.Context, p *Pickup, c *fleet.EventRecord) error {
	removed := fleet.Alert{DeviceID: p.Locker, Kind: AlertRemoved, Compartment: p.Compartment, RaisedAt: c.ReceivedAt}
	return s.withdraw(ctx, removed, "its code's use before the closing arrived after it", "pickup", p.ID, "closing", c.EventID)
}

// withdraw withdraws open alert a as the gateway, audited with reason: the
// order was taken with its code. attrs are logged with it.
func (s *Service) withdraw(ctx context.Context, a fleet.Alert, reason string, attrs ...any) error {
	var withdrawn bool
	err := s.retry(ctx, "withdraw_alert", func(ctx context.Context) (err error) {
		withdrawn, err = s.o.Store.WithdrawAlert(ctx, a, "gateway", reason, s.o.Now())
		return err
	})
	if withdrawn {
		s.log.Info("alert withdrawn: the order was taken with its code", append([]any{"locker", a.DeviceID, "kind", a.Kind,
			"compartment", a.Compartment}, attrs...)...)
	}
	return err
}

// usedBeforeExpiry reports whether a code that is no longer live opened
// compartments whose pickups expired after the use, by the locker's clock:
// a driver collected with it in time while the locker was offline, and the
// gateway, told only now, had expired them meanwhile. The locker checks a
// code's not_after (the pickup's expires_at) itself. Those pickups are
// marked collected; the door's closing after the use decides whether they
// were picked up (lateCollection), and one applied before the use (out of
// the locker's order) is judged again now. later are the locker's events
// applied after this one; compartments are those of the use to judge
// (empty: all of the code's). Any other use of a code that is not live is
// for staff to look at (codeNotLive).
func (s *Service) usedBeforeExpiry(ctx context.Context, deviceID, id string, ev *protocol.Event, compartments []int, at time.Time,
	later []fleet.EventRecord) (found bool, ps []Pickup, err error) {
	err = s.retry(ctx, "use_expired_credential", func(ctx context.Context) (err error) {
		ps, err = s.o.Store.UseExpiredCredential(ctx, deviceID, id, ev.TS.Time, at, compartments)
		return err
	})
	if errors.Is(err, fleet.ErrNotFound) {
		return false, nil, nil
	}
	if err != nil {
		return false, nil, err
	}
	for i := range ps {
		p := &ps[i]
		if p.State != Expired {
			continue // picked up since (this use, offered again)
		}
		s.log.Info("pickup code used before expiry, reported after it", "pickup", p.ID, "locker", deviceID,
			"compartment", p.Compartment, "used", ev.TS.Time, "expires_at", p.ExpiresAt)
		closings, closed, err := s.closingApplied(ctx, p, ev.TS.Time, later)
		if err != nil {
			return true, ps, err
		}
		if closed != nil {
			s.log.Info("door closing judged again: the code used before it was applied after it",
				"pickup", p.ID, "locker", p.Locker, "compartment", p.Compartment, "event", closings[0].EventID)
			// Judged as of the code's arrival, which marked it collected,
			// against this pickup: a new order may have taken the
			// compartment the closing freed since.
			if err := s.judgeLateClosing(ctx, deviceID, closed, at, func(ctx context.Context) (*Pickup, time.Time, error) {
				return s.o.Store.LateCollectionOf(ctx, p.ID)
			}); err != nil {
				return true, ps, err
			}
		}
	}
	return true, ps, nil
}

// lateCollection applies a door's closing that found no live pickup to the
// compartment's expired pickup whose code opened it before expires_at
// (usedBeforeExpiry): closed empty, the driver took the order, so the
// pickup is picked up after all and its pickup_expired alert withdrawn;
// closed with the order inside, it stays expired and the alert stands.
// Closings after the use that were applied while the pickup was still
// ready (out of the locker's order) raised pickup_removed without the
// code: those alerts are withdrawn with the pickup_expired one. The
// closing, arrived at at, is about the last pickup created at its
// compartment by then.
func (s *Service) lateCollection(ctx context.Context, deviceID string, ev *protocol.Event, at time.Time) error {
	return s.judgeLateClosing(ctx, deviceID, ev, at, func(ctx context.Context) (*Pickup, time.Time, error) {
		return s.o.Store.LateCollectionAt(ctx, deviceID, ev.Compartment, at)
	})
}

// judgeLateClosing is lateCollection for the pickup find returns, with the
// use's time; at dates the transition.
func (s *Service) judgeLateClosing(ctx context.Context, deviceID string, ev *protocol.Event, at time.Time,
	find func(context.Context) (*Pickup, time.Time, error)) error {
	var p *Pickup
	var used time.Time
	err := s.retry(ctx, "late_collection", func(ctx context.Context) (err error) {
		p, used, err = find(ctx)
		return err
	})
	if errors.Is(err, fleet.ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	// Only the door's first closing after the code's use, by the
	// locker's clock, is the driver's: a later one (staff emptying the
	// compartment of an order the driver left) says nothing of the pickup.
	closings, _, err := s.closingApplied(ctx, p, used, nil)
	if err != nil {
		return err
	}
	if len(closings) == 0 || closings[0].EventID != ev.ID {
		return nil
	}
	// That closing is judged once. The order left inside, or the door
	// closed past the grace a driver gets (CollectGrace: left open, the
	// closing says nothing of who took what), the pickup stays expired and
	// its alert stands; no closing after it can make it picked up.
	if left, late := ev.Occupied != nil && *ev.Occupied, ev.TS.Time.After(used.Add(CollectGrace)); left || late {
		err := s.retry(ctx, "judge_late_collection", func(ctx context.Context) error {
			return s.o.Store.JudgeLateCollection(ctx, p.ID)
		})
		if err == nil {
			s.log.Info("expired pickup opened with its code before expiry, not taken by its driver", "pickup", p.ID,
				"locker", deviceID, "compartment", p.Compartment, "order_inside", left, "closed_past_grace", late)
		}
		return err
	}
	// Withdrawn first: a stop before the transition leaves the pickup
	// expired, and the event that judged it (the closing, or the code's
	// use that judged a closing applied before it), offered again,
	// finishes it.
	if p.DoneAt != nil { // set by the expiry
		if err := s.withdraw(ctx, ExpiredAlert(p), "its code opened the compartment before expires_at; the locker reported it after", "pickup", p.ID); err != nil {
			return err
		}
		for i := range closings {
			// Received before the expiry: judged with the pickup ready.
			if !closings[i].ReceivedAt.Before(*p.DoneAt) {
				continue
			}
			if err := s.withdrawRemoved(ctx, p, &closings[i]); err != nil {
				return err
			}
		}
		// Dated no earlier than the expiry it follows: the closing judged
		// may have arrived before it (applied late, or by another instance).
		if at.Before(*p.DoneAt) {
			at = *p.DoneAt
		}
	}
	pe := s.event(EventPickedUp, p, at)
	pe.Data["reported_late"] = true
	var done *Pickup
	err = s.retry(ctx, "picked_up_late", func(ctx context.Context) (err error) {
		done, err = s.o.Store.Transition(ctx, p.ID, []string{Expired}, PickedUp, "locker:"+deviceID,
			"collected with its code before expires_at; the locker reported it after the expiry", at, pe)
		return err
	})
	if errors.Is(err, fleet.ErrConflict) || errors.Is(err, fleet.ErrNotFound) {
		return nil // done already (a replay)
	}
	if err != nil {
		return err
	}
	s.transitioned(done, PickedUp)
	s.m.late.Inc()
	return nil
}

// codeNotLive: the locker opened compartments for a code the gateway does
// not hold live: revoked (its pickup cancelled, expired or given another
// code while the locker was offline or had not applied the new set), used
// already, or unknown. Staff must look: the order may have gone to someone
// it was no longer meant for. The locker is sent its current set again.
func (s *Service) codeNotLive(ctx context.Context, deviceID, id string, ev *protocol.Event, at time.Time) error {
	var state string
	err := s.retry(ctx, "credential_state", func(ctx context.Context) (err error) {
		state, err = s.o.Store.CredentialState(ctx, deviceID, id)
		return err
	})
	switch {
	case errors.Is(err, fleet.ErrNotFound):
		state = "unknown"
	case err != nil:
		return err
	}
	a := fleet.Alert{DeviceID: deviceID, Kind: AlertCodeNotLive, RaisedAt: at,
		Detail: fmt.Sprintf("code %s (%s at the gateway) opened compartments %v: check the order", id, state, ev.Compartments)}
	if len(ev.Compartments) > 0 {
		a.Compartment = ev.Compartments[0]
	}
	// Audited as every use is (api-v1: "every ... credential use"), with
	// what the gateway held it for; with the alert, so that a replayed
	// event is audited once.
	a.Audit = &fleet.AuditEntry{Actor: "locker:" + deviceID, Action: "credential.use", Locker: deviceID,
		Detail: map[string]any{"credential": id, "state": state, "compartments": ev.Compartments}}
	return s.alertNotLive(ctx, a)
}

// alertNotLive raises a's code_not_live and sends its locker the current
// set again.
func (s *Service) alertNotLive(ctx context.Context, a fleet.Alert) error {
	if err := s.alert(ctx, a); err != nil {
		return err
	}
	s.publish(ctx, a.DeviceID)
	return nil
}

// doorClosed: staff closed a loaded compartment (ready), or a driver closed
// it after taking the order (picked up).
func (s *Service) doorClosed(ctx context.Context, deviceID string, ev *protocol.Event, at time.Time) error {
	var p *Pickup
	err := s.retry(ctx, "live_pickup", func(ctx context.Context) (err error) {
		p, err = s.o.Store.LivePickupAt(ctx, deviceID, ev.Compartment)
		return err
	})
	if errors.Is(err, fleet.ErrNotFound) {
		return s.lateCollection(ctx, deviceID, ev, at)
	}
	if err != nil {
		return err
	}
	if at.Before(p.CreatedAt) {
		// A closing from before this pickup existed (an event offered
		// again after a stop): it was about the compartment's last order.
		return s.lateCollection(ctx, deviceID, ev, at)
	}
	if old, err := s.closedBeforeCreated(ctx, p, ev); err != nil {
		return err
	} else if old {
		// The same, held back by the locker and dated so by its clock.
		return s.lateCollection(ctx, deviceID, ev, at)
	}
	occupied := ev.Occupied != nil && *ev.Occupied
	actor := "locker:" + deviceID
	if p.State == Staging && occupied {
		return s.ready(ctx, p, actor, at)
	}
	if p.State == Staging {
		// Closed empty after staging: the order is not in it yet.
		return s.alert(ctx, fleet.Alert{DeviceID: deviceID, Kind: fleet.AlertStagedEmpty, Compartment: p.Compartment,
			Detail: "pickup " + p.ID + " staged but the compartment closed empty", RaisedAt: at})
	}
	used, err := s.credentialUsed(ctx, p)
	if err != nil {
		return err
	}
	switch {
	case !occupied && used:
		var done *Pickup
		err := s.retry(ctx, "picked_up", func(ctx context.Context) (err error) {
			done, err = s.o.Store.Transition(ctx, p.ID, []string{Ready}, PickedUp, actor, "opened with its code and closed empty", at, s.event(EventPickedUp, p, at))
			return err
		})
		if errors.Is(err, fleet.ErrConflict) || errors.Is(err, fleet.ErrNotFound) {
			return nil // ended meanwhile
		}
		if err != nil {
			return err
		}
		s.transitioned(done, PickedUp)
		if done.ReadyAt != nil {
			s.m.collect.Observe(at.Sub(*done.ReadyAt).Seconds())
		}
	case occupied && used:
		// The driver opened it and left the order: still to collect, with a
		// fresh code (the spent one no longer opens it).
		if err := s.alert(ctx, fleet.Alert{DeviceID: deviceID, Kind: AlertNotTaken, Compartment: p.Compartment,
			Detail: "pickup " + p.ID + " opened with its code but the order is still inside", RaisedAt: at}); err != nil {
			return err
		}
		return s.issue(ctx, p)
	case !occupied:
		return s.alert(ctx, fleet.Alert{DeviceID: deviceID, Kind: AlertRemoved, Compartment: p.Compartment,
			Detail: "pickup " + p.ID + " is ready but its compartment closed empty without its code", RaisedAt: at})
	}
	return nil
}

// staleClosingMargin is how much earlier than a pickup's creation a
// closing of its compartment may be dated, by the locker's clock less its
// measured offset, and still be taken as this pickup's (its loading while
// staging, its collection once ready): the offset's own error and a
// clock's drift since it was measured.
const staleClosingMargin = time.Minute

// closedBeforeCreated reports whether closing ev came well before live
// pickup p was created, by the locker's clock less its measured offset: a
// closing the locker held back (offline, or behind an instance that was
// down) from the compartment's earlier use, which says nothing of this
// order (not its loading, nor its collection). Only a locker whose clock
// was within fleet.DefaultMaxClockSkew at its last birth is judged: the
// offset of one further off may be stale (its clock set right since,
// without a reconnect), and an unknown one tells nothing. A closing whose
// own date is later than the creation less the margin plus that skew
// cannot be so: the locker is not read for it.
func (s *Service) closedBeforeCreated(ctx context.Context, p *Pickup, ev *protocol.Event) (bool, error) {
	if !ev.TS.Time.Before(p.CreatedAt.Add(-staleClosingMargin + fleet.DefaultMaxClockSkew)) {
		return false, nil
	}
	var l *fleet.Locker
	err := s.retry(ctx, "get_locker", func(ctx context.Context) (err error) {
		l, err = s.o.Fleet.GetLocker(ctx, p.Locker)
		return err
	})
	if errors.Is(err, fleet.ErrNotFound) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	if l.ClockOffsetMS == nil {
		return false, nil
	}
	offset := time.Duration(*l.ClockOffsetMS) * time.Millisecond
	if offset.Abs() > fleet.DefaultMaxClockSkew {
		return false, nil
	}
	closed := ev.TS.Time.Add(-offset)
	if !closed.Before(p.CreatedAt.Add(-staleClosingMargin)) {
		return false, nil
	}
	s.log.Warn("door closing dated before its pickup was created: taken as about the compartment's earlier order",
		"pickup", p.ID, "locker", p.Locker, "compartment", p.Compartment, "event", ev.ID, "closed", closed, "created", p.CreatedAt)
	return true, nil
}

// Alert kinds raised by the pickup workflow.
const (
	AlertNotTaken = "pickup_not_taken"
	AlertRemoved  = "pickup_removed"
	// AlertCodeNotLive: a locker reported opening compartments with a code
	// the gateway had revoked, spent already, or never issued.
	AlertCodeNotLive = "code_not_live"
	// AlertCancelled: a pickup was cancelled after its compartment was
	// opened for it (CancelledAlert).
	AlertCancelled = "pickup_cancelled"
	// AlertStagingFailed: a staging pickup's unlock did not end ok
	// (StagingUnlockEnded).
	AlertStagingFailed = "staging_failed"
	// AlertNotOpened: a code was used but the locker did not open a
	// ready pickup's compartment that it covers (notOpened).
	AlertNotOpened = "pickup_not_opened"
)

// AlertKinds are the kinds the pickup workflow raises (the two defined in
// fleet as well).
var AlertKinds = []string{fleet.AlertStagedEmpty, fleet.AlertPickupExpired, AlertNotTaken, AlertRemoved, AlertCodeNotLive, AlertCancelled,
	AlertStagingFailed, AlertNotOpened}

// stagingOpenedLate withdraws the staging_failed alert raised for staging
// unlock c, which its locker has answered ok after all (late: the door did
// open for loading).
func (s *Service) stagingOpenedLate(ctx context.Context, c *fleet.Command) {
	var withdrawn bool
	err := s.retry(ctx, "withdraw_staging_failed", func(ctx context.Context) (err error) {
		withdrawn, err = s.o.Store.WithdrawStagingFailed(ctx, c.DeviceID, c.Compartment, c.ID,
			"its staging unlock was answered ok after all: the compartment opened", s.o.Now())
		return err
	})
	switch {
	case err != nil:
		s.log.Error("staging unlock answered ok late, but its staging_failed alert was not withdrawn", "locker", c.DeviceID,
			"command", c.ID, "err", err)
	case withdrawn:
		s.log.Info("staging_failed alert withdrawn: its staging unlock was answered ok late", "locker", c.DeviceID,
			"compartment", c.Compartment, "command", c.ID)
	}
}

// StagingUnlockEnded tells staff of a staging pickup whose unlock ended
// otherwise than ok (fleet.Options.CommandFinished): the locker answered
// failed (a jammed door), rejected or expired (its clock ahead of the
// gateway's), or never answered in time. The compartment may not have
// opened, and nothing else would say so: the pickup waits in staging,
// holding it, until its expires_at. Staff open it remotely or cancel the
// pickup. A pickup that went on (ready: the door did open and close) or
// ended is left alone; so is any other command.
func (s *Service) StagingUnlockEnded(ctx context.Context, c *fleet.Command) {
	if c.Type != protocol.CmdUnlock || c.Reason != protocol.ReasonStaging {
		return
	}
	if c.Status == fleet.CmdOK {
		if c.LateAnswer {
			s.stagingOpenedLate(ctx, c)
		}
		return
	}
	var p *Pickup
	err := s.retry(ctx, "live_pickup", func(ctx context.Context) (err error) {
		p, err = s.o.Store.LivePickupAt(ctx, c.DeviceID, c.Compartment)
		return err
	})
	if err != nil || p.CommandID != c.ID || p.State != Staging {
		if err != nil && !errors.Is(err, fleet.ErrNotFound) {
			s.log.Error("staging unlock ended unopened, but its pickup could not be read: staff are not told", "locker", c.DeviceID,
				"command", c.ID, "status", c.Status, "err", err)
		}
		return
	}
	status := c.Status
	if status == fleet.CmdTimedOut {
		status = "unanswered"
	}
	if c.Error != "" {
		status += ": " + c.Error
	}
	at := s.o.Now()
	if c.DoneAt != nil {
		at = *c.DoneAt
	}
	s.alert(ctx, fleet.Alert{DeviceID: c.DeviceID, Kind: AlertStagingFailed, Compartment: c.Compartment, RaisedAt: at,
		Detail: "the staging unlock of pickup " + p.ID + " (" + p.OrderRef + ") ended " + status +
			": its compartment may not have opened for loading; open it remotely, or cancel the pickup"})
}

// credentialUsed reports whether the pickup's credential was spent at the locker.
func (s *Service) credentialUsed(ctx context.Context, p *Pickup) (bool, error) {
	if p.CredentialID == "" {
		return false, nil
	}
	var st string
	err := s.retry(ctx, "credential_state", func(ctx context.Context) (err error) {
		st, err = s.o.Store.CredentialState(ctx, p.Locker, p.CredentialID)
		return err
	})
	if errors.Is(err, fleet.ErrNotFound) {
		return false, nil
	}
	return st == "used", err
}

// ready marks a staged pickup ready, mints its credential and tells the platform.
func (s *Service) ready(ctx context.Context, p *Pickup, actor string, at time.Time) error {
	var c *Credential
	err := s.retry(ctx, "mint", func(ctx context.Context) (err error) {
		c, err = s.mint(ctx, p.Locker, []int{p.Compartment}, p.ExpiresAt, []string{p.ID}, "", false, nil, nil)
		return err
	})
	if errors.Is(err, fleet.ErrConflict) || errors.Is(err, fleet.ErrNotFound) {
		return nil // ended meanwhile
	}
	if err != nil {
		return err
	}
	p.CredentialID = c.ID
	ev := s.event(EventReady, p, at)
	ev.Data["credential_id"] = c.ID
	var done *Pickup
	err = s.retry(ctx, "ready", func(ctx context.Context) (err error) {
		done, err = s.o.Store.Transition(ctx, p.ID, []string{Staging}, Ready, actor, "closed with the order inside", at, ev)
		return err
	})
	if errors.Is(err, fleet.ErrConflict) || errors.Is(err, fleet.ErrNotFound) {
		return nil // ready already (a replay), or ended meanwhile
	}
	if err != nil {
		return err
	}
	s.transitioned(done, Ready)
	s.m.stage.Observe(at.Sub(done.CreatedAt).Seconds())
	s.publish(ctx, p.Locker)
	return nil
}

// issue mints a fresh credential for a ready pickup, and tells its
// webhooks the new codes.
func (s *Service) issue(ctx context.Context, p *Pickup) error {
	err := s.retry(ctx, "mint", func(ctx context.Context) error {
		_, err := s.mint(ctx, p.Locker, []int{p.Compartment}, p.ExpiresAt, []string{p.ID}, "", true, s.credentialChanged, nil)
		return err
	})
	if errors.Is(err, fleet.ErrConflict) || errors.Is(err, fleet.ErrNotFound) {
		return nil // ended meanwhile
	}
	if err != nil {
		return err
	}
	s.publish(ctx, p.Locker)
	return nil
}

// alert raises a, trying again while the database fails; an error means
// ctx ended first (a step then fails, and its event is offered again: the
// same alert raised twice is one).
func (s *Service) alert(ctx context.Context, a fleet.Alert) error {
	var raised bool
	err := s.retry(ctx, "raise_alert", func(ctx context.Context) (err error) {
		raised, err = s.o.Store.RaiseAlert(ctx, a)
		return err
	})
	if err != nil {
		s.log.Error("alert not raised", "locker", a.DeviceID, "kind", a.Kind, "detail", a.Detail, "err", err)
		return err
	}
	if raised {
		s.alerted(a)
		s.o.Wake() // its alert.raised deliveries, queued with it
	}
	return nil
}

// alerted counts and logs alert a, raised.
func (s *Service) alerted(a fleet.Alert) {
	s.m.alerts.WithLabelValues(a.Kind).Inc()
	s.log.Warn("alert", "locker", a.DeviceID, "kind", a.Kind, "compartment", a.Compartment, "detail", a.Detail)
}

// Run ends expired pickups until ctx ends, and keeps the occupancy gauges.
func (s *Service) Run(ctx context.Context) error {
	t := time.NewTicker(s.o.SweepInterval)
	defer t.Stop()
	occ := time.NewTicker(15 * time.Second)
	defer occ.Stop()
	s.occupancy(ctx)
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			s.expire(ctx)
		case <-occ.C:
			s.occupancy(ctx)
		}
	}
}

func (s *Service) expire(ctx context.Context) {
	due, err := s.o.Store.DuePickups(ctx, s.o.Now(), 500)
	if err != nil {
		if ctx.Err() == nil { // not a stop cutting the read short
			s.log.Error("find expired pickups", "err", err)
		}
		return
	}
	// Each locker's set is published once, after its pickups are ended:
	// one publish per pickup (each waiting up to 10 s on a broker that is
	// down) made a pass of 500 take very long.
	var lockers []string
	seen := map[string]bool{}
	for _, p := range due {
		done, err := s.end(ctx, p.ID, Expired, "system:expiry", "not collected by expires_at", EventExpired)
		if errors.Is(err, fleet.ErrConflict) {
			continue // ended meanwhile
		}
		if err != nil {
			if ctx.Err() != nil {
				return // stopping: the next start's sweep ends the rest
			}
			s.log.Error("expire pickup", "pickup", p.ID, "err", err)
			continue
		}
		if done.CredentialID != "" && !seen[done.Locker] {
			seen[done.Locker] = true
			lockers = append(lockers, done.Locker)
		}
		// Its alert was raised with the expiry (Store.Transition), and its
		// deliveries woken by the transition.
		s.alerted(ExpiredAlert(done))
	}
	for _, id := range lockers {
		s.publish(ctx, id)
	}
}

func (s *Service) occupancy(ctx context.Context) {
	occ, err := s.o.Store.Occupancy(ctx)
	if err != nil {
		if ctx.Err() == nil {
			s.log.Error("compartment occupancy", "err", err)
		}
		return
	}
	s.m.setOccupancy(occ)
}
