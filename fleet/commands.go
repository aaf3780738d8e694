package fleet

import (
	"context"
	"crypto/rand"
	"encoding/base32"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/lockergate/lockergate/protocol"
)

// NewID mints an opaque id with a prefix: prefix + "-" + 26 random base32
// characters (130 bits), well under protocol.MaxIDLen.
func NewID(prefix string) string {
	var b [16]byte
	rand.Read(b[:])
	return idOf(prefix, b)
}

// DerivedID is an id of NewID's form made from seed (a hash): the same seed
// gives the same id.
func DerivedID(prefix string, seed [32]byte) string {
	return idOf(prefix, [16]byte(seed[:16]))
}

func idOf(prefix string, b [16]byte) string {
	return prefix + "-" + strings.ToLower(base32.StdEncoding.WithPadding(base32.NoPadding).EncodeToString(b[:]))
}

// SendCommand validates and records a command and sends it when the locker is
// online; an offline locker gets it when it reconnects, if it has not expired.
func (m *Manager) SendCommand(ctx context.Context, req CommandRequest) (*Command, error) {
	return m.SendCommandWait(ctx, req, 0)
}

// SendCommandWait is SendCommand that, with wait > 0, then waits like
// WaitCommand. An answer that arrives before the wait starts is not missed.
// A locker outside req.Site is ErrForbidden.
func (m *Manager) SendCommandWait(ctx context.Context, req CommandRequest, wait time.Duration) (*Command, error) {
	if err := req.validate(); err != nil {
		return nil, err
	}
	now := m.now().UTC().Truncate(time.Millisecond)
	id := req.ID
	if id == "" {
		id = NewID("c")
	}
	c := &Command{
		ID: id, DeviceID: req.DeviceID, Type: req.Type, Compartment: req.Compartment,
		Reason: req.Reason, InService: req.InService, Status: CmdPending, Actor: req.Actor,
		CreatedAt: now, ExpiresAt: now.Add(req.TTL), Pickup: req.Pickup,
	}
	var audit *AuditEntry
	if req.Type == protocol.CmdUnlock {
		// Stored with the command, before it can be sent: no door opens
		// without its audit entry. The store fills in the locker's site.
		audit = &AuditEntry{Actor: req.Actor, Action: "unlock", Locker: c.DeviceID,
			Detail: map[string]any{"command": c.ID, "compartment": c.Compartment, "reason": c.Reason, "expires_at": c.ExpiresAt}}
	}
	var wake chan *Command
	if wait > 0 {
		// Before the command is stored: once it is, the locker may be sent
		// it (a birth delivers what is pending) and answer before this
		// call waits.
		wake = m.subscribe(c.ID)
	}
	handedOver := false // to waitCommand, which unsubscribes
	defer func() {
		if wake != nil && !handedOver {
			m.unsubscribe(c.ID, wake)
		}
	}()
	// The locker is checked where the command is stored: one round trip.
	t, created, err := m.store.CreateCommand(ctx, c, audit, req.Site)
	switch {
	case errors.Is(err, ErrExists) && req.ID != "":
		// Made by an earlier run of this very request (its answer was lost
		// with the gateway that ran it): that command, not a second one.
		m.log.Info("command request run again: answering the command it made before", "command", c.ID, "locker", c.DeviceID)
		return m.WaitCommand(ctx, req.DeviceID, c.ID, wait)
	case errors.Is(err, ErrNotFound):
		return nil, fmt.Errorf("locker %s: %w", req.DeviceID, ErrNotFound)
	case err == nil && req.Site != "" && t.Site != req.Site:
		return nil, fmt.Errorf("locker %s is at another site: %w", req.DeviceID, ErrForbidden)
	case err != nil:
		return nil, fmt.Errorf("create command: %w", err)
	case !t.HasCompartment:
		return nil, req.noCompartment()
	case t.Disabled:
		return nil, fmt.Errorf("locker %s is disabled: enable it (PATCH /v1/lockers/{id} with disabled false) before sending it commands: %w",
			req.DeviceID, ErrConflict)
	case t.PickupEnded:
		return nil, fmt.Errorf("pickup %s ended before its command was made: %w", req.Pickup, ErrConflict)
	case !created:
		return nil, fmt.Errorf("create command for %s: not stored, though its locker qualifies", req.DeviceID)
	}
	m.m.commands.WithLabelValues(c.Type, CmdPending).Inc()
	// Stored as sent when the locker is online: no second write on the
	// unlock's path.
	sendNow := c.Status == CmdSent
	if sendNow {
		m.m.commands.WithLabelValues(c.Type, CmdSent).Inc()
	}
	if sendNow {
		m.deliver(ctx, c)
	}
	if wait <= 0 {
		return c, nil
	}
	handedOver = true
	return m.waitCommand(ctx, c, wake, wait)
}

// deliverTimeout bounds a command's delivery, which does not end with the
// request that asked for it.
const deliverTimeout = 10 * time.Second

// deliver publishes a command, marking a pending one sent first, and
// reports whether it was published.
//
// The delivery does not end with the caller's context: a command stored as
// sent whose request went away before the publish would otherwise reach
// the locker only by the resend (Options.CommandResend). A pending command
// is marked sent before it is published, and only while it has not
// expired: published first, it could expire pending in between (the
// sweeper), and the locker's answer to a command it ran would be refused.
func (m *Manager) deliver(ctx context.Context, c *Command) bool {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), deliverTimeout)
	defer cancel()
	now := m.now()
	if !now.Before(c.ExpiresAt) {
		return false // the sweeper expires it; an expired command is never sent
	}
	if c.Status == CmdPending {
		ok, err := m.store.MarkCommandSent(ctx, c.ID, now)
		if err != nil {
			m.log.Error("mark command sent", "command", c.ID, "err", err)
			return false
		}
		if !ok {
			return false // answered, expired or sent meanwhile
		}
		// Waiters wait for a final status; "sent" wakes no one.
		c.Status, c.SentAt = CmdSent, &now
		m.m.commands.WithLabelValues(c.Type, CmdSent).Inc()
	}
	return m.publishCommand(ctx, c)
}

func (m *Manager) publishCommand(ctx context.Context, c *Command) bool {
	topic, payload := protocol.Topic(c.DeviceID, protocol.ChanCmd), protocol.Encode(c.Wire())
	var err error
	if eb, ok := m.bus.(ExpiringPublisher); ok {
		// A session kept for the locker drops it once expired, rather
		// than deliver it on the locker's next connection.
		err = eb.PublishExpiring(ctx, topic, payload, 1, c.ExpiresAt)
	} else {
		err = m.bus.Publish(ctx, topic, payload, 1, false)
	}
	if err != nil {
		m.log.Error("publish command", "locker", c.DeviceID, "command", c.ID, "err", err)
		return false
	}
	return true
}

// resendLimit bounds the commands one sweep sends again.
const resendLimit = 500

// ResendMaxWait bounds the growing wait between resends of one command: a
// locker that never answers (a firmware fault) gets an unanswered command
// about once a minute, not every CommandResend until it expires.
const ResendMaxWait = time.Minute

// resent is what resend remembers of a command it sent again.
type resent struct {
	last time.Time // the last resend
	n    int       // resends so far
}

// wait is how long after its last resend the command is due again:
// CommandResend doubled for each resend so far (the first came
// CommandResend after the send), at most ResendMaxWait (or CommandResend,
// when that is longer).
func (r resent) wait(base time.Duration) time.Duration {
	w := base
	for range r.n {
		if w >= ResendMaxWait {
			break
		}
		w *= 2
	}
	return min(w, max(base, ResendMaxWait))
}

// resend sends again, by id, the commands sent at least CommandResend ago
// to lockers that are online and have not answered: a publish lost on its
// way (a request that ended before it, an external broker that failed it)
// or a session that dropped the message. It also delivers a command left
// pending for CommandResend while its locker is online: one created as the
// locker came online, stored pending after the birth had read the open
// commands. Lockers run a command id at most once and repeat their answer,
// so a locker that has it only answers again. This instance sends a
// command again CommandResend after it was sent, then after twice as long
// each time, at most ResendMaxWait apart (resent.wait). Run calls it after
// each sweep.
func (m *Manager) resend(ctx context.Context) {
	if m.opts.CommandResend < 0 {
		return
	}
	now := m.now()
	// Those not due are left out of the read: the oldest unanswered
	// commands, waiting out their back-off, would otherwise fill the
	// limit and keep newer ones from their first resend.
	var notDue []string
	for id, r := range m.resent {
		if now.Sub(r.last) < r.wait(m.opts.CommandResend) {
			notDue = append(notDue, id)
		}
	}
	cmds, err := m.store.UnansweredCommands(ctx, now, now.Add(-m.opts.CommandResend), resendLimit, notDue)
	if err != nil {
		m.m.dbErrors.WithLabelValues("unanswered_commands").Inc()
		m.log.Error("load unanswered commands", "err", err)
		return
	}
	seen := make(map[string]bool, len(cmds)+len(notDue))
	for _, id := range notDue {
		seen[id] = true // kept until due: a read that then leaves it out (answered, expired) forgets it
	}
	busDown := false
	for i := range cmds {
		c := &cmds[i]
		seen[c.ID] = true
		if busDown {
			continue // the bus refused a publish: the rest wait for the next pass
		}
		r := m.resent[c.ID]
		var sent bool
		if c.Status == CmdPending {
			m.log.Info("pending command delivered to an online locker", "locker", c.DeviceID, "command", c.ID)
			sent = m.deliver(ctx, c)
		} else if sent = m.publishCommand(ctx, c); sent {
			m.m.resent.Inc()
			m.log.Info("command sent again: no answer yet", "locker", c.DeviceID, "command", c.ID, "sent_at", c.SentAt)
		}
		// Not sent, and sent as far as the database knows: the bus refused
		// it (deliver marks a pending command sent before it publishes). An
		// external broker's connection down refuses every command at once:
		// one error a pass, not one per unanswered command.
		busDown = !sent && c.Status == CmdSent
		// A send that failed (the broker down) is tried again as soon as
		// the last one, not after a longer wait.
		if sent {
			r.n++
		}
		m.resent[c.ID] = resent{last: now, n: r.n}
	}
	for id := range m.resent {
		if !seen[id] {
			delete(m.resent, id)
		}
	}
}

// GetCommand returns a command of a locker.
func (m *Manager) GetCommand(ctx context.Context, deviceID, id string) (*Command, error) {
	return m.store.GetCommand(ctx, deviceID, id)
}

// WaitCommand waits up to d for a command to reach a final status and returns
// it as it is then. It wakes on the result, not by polling.
func (m *Manager) WaitCommand(ctx context.Context, deviceID, id string, d time.Duration) (*Command, error) {
	wake := m.subscribe(id)
	c, err := m.store.GetCommand(ctx, deviceID, id)
	if err != nil {
		m.unsubscribe(id, wake)
		return c, err
	}
	return m.waitCommand(ctx, c, wake, d)
}

// waitCommand waits on wake (subscribed before c was read or sent) until c
// is final, expired unsent, or d has passed, and unsubscribes.
func (m *Manager) waitCommand(ctx context.Context, c *Command, wake chan *Command, d time.Duration) (*Command, error) {
	id, deviceID := c.ID, c.DeviceID
	defer m.unsubscribe(id, wake)
	deadline := m.now().Add(d)
	for {
		if Final(c.Status) {
			return c, nil
		}
		now := m.now()
		if c.Status == CmdPending && !now.Before(c.ExpiresAt) {
			// Do not leave a caller waiting on the sweeper's next tick. The
			// sweep ends every command due, not only this one, and records
			// their ends (metrics, staff told of a failed staging unlock):
			// a caller that goes away meanwhile must not cut it short after
			// its statement committed.
			sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), deliverTimeout)
			m.sweep(sctx)
			cancel()
			nc, err := m.store.GetCommand(ctx, deviceID, id)
			if err != nil {
				return c, err // the last known state: the command is stored
			}
			return nc, nil
		}
		if !now.Before(deadline) {
			return c, nil
		}
		until := deadline
		if c.Status == CmdPending && c.ExpiresAt.Before(until) {
			until = c.ExpiresAt
		}
		t := time.NewTimer(until.Sub(now))
		select {
		case got := <-wake:
			t.Stop()
			if got != nil {
				c = got // the answer, as this instance stored it
				continue
			}
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return c, ctx.Err()
		case <-m.waitsEnded:
			t.Stop()
			return c, nil // the last known state; the caller answers it
		}
		// Woken by another instance (or the timer): read what is stored.
		nc, err := m.store.GetCommand(ctx, deviceID, id)
		if err != nil {
			return c, err
		}
		c = nc
	}
}

// EndWaits ends every wait for a command's result, now and from now on:
// each returns the command as it is then. A gateway that stops calls it
// before it drains its HTTP requests, so that a wait_s request is answered
// (the command, with its status and Location) rather than cut off with the
// connection: its client would not know the command exists, and a retry
// without an Idempotency-Key would be a second unlock.
func (m *Manager) EndWaits() {
	m.endWaitsOnce.Do(func() { close(m.waitsEnded) })
}

func (m *Manager) subscribe(id string) chan *Command {
	ch := make(chan *Command, 1)
	m.mu.Lock()
	m.waiters[id] = append(m.waiters[id], ch)
	m.mu.Unlock()
	return ch
}

func (m *Manager) unsubscribe(id string, ch chan *Command) {
	m.mu.Lock()
	defer m.mu.Unlock()
	ws := m.waiters[id]
	for i, w := range ws {
		if w == ch {
			ws = append(ws[:i], ws[i+1:]...)
			break
		}
	}
	if len(ws) == 0 {
		delete(m.waiters, id)
	} else {
		m.waiters[id] = ws
	}
}

// notify wakes everyone waiting on command id: they read it again.
func (m *Manager) notify(id string) { m.wake(id, nil) }

// changed is told by the store of every command changed by any instance,
// this one included (WatchCommands). While this instance records a
// result for the command, the recording wakes the waiters with the
// command it stored: the notification of its own commit, which races
// that, would only have them read it again.
func (m *Manager) changed(id string) {
	if id == "" {
		// Notifications may have been missed (the store's listener was
		// replaced): every waiter reads its command again.
		m.mu.Lock()
		ids := make([]string, 0, len(m.waiters))
		for id := range m.waiters {
			ids = append(ids, id)
		}
		m.mu.Unlock()
		for _, id := range ids {
			m.notify(id)
		}
		return
	}
	m.mu.Lock()
	recording := m.completing[id] > 0
	m.mu.Unlock()
	if !recording {
		m.notify(id)
	}
}

// completingStart notes that a result for command id is being recorded
// (see changed); call the function it returns once its waiters are woken.
func (m *Manager) completingStart(id string) (done func()) {
	m.mu.Lock()
	m.completing[id]++
	m.mu.Unlock()
	return func() {
		m.mu.Lock()
		defer m.mu.Unlock()
		if m.completing[id]--; m.completing[id] <= 0 {
			delete(m.completing, id)
		}
	}
}

// wake hands waiters on id the command as it now is (nil: read it again).
// A waiter that has a wake-up pending keeps it and reads the store.
func (m *Manager) wake(id string, c *Command) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, ch := range m.waiters[id] {
		var cp *Command
		if c != nil {
			v := *c
			cp = &v
		}
		select {
		case ch <- cp:
		default:
			// Coalesced with the wake-up already pending; make it a re-read
			// so the newest state is seen.
			select {
			case <-ch:
			default:
			}
			select {
			case ch <- nil:
			default:
			}
		}
	}
}

// CommandEnded accounts for a command the store ended outside the manager
// (a pickup's staging unlock withdrawn with its pickup), as finished does
// for those the manager ends. Waiters hear of it through the store's
// notification (WatchCommands).
func (m *Manager) CommandEnded(typ, status string) {
	m.m.commands.WithLabelValues(typ, status).Inc()
}

// finished accounts for a command that reached a final status, and tells
// Options.CommandFinished of one that did not end ok.
func (m *Manager) finished(ctx context.Context, c *Command) {
	m.CommandEnded(c.Type, c.Status)
	m.wake(c.ID, c)
	if c.Status != CmdOK && m.opts.CommandFinished != nil {
		m.opts.CommandFinished(ctx, c)
	}
}

// sweep finalises commands past their deadline.
func (m *Manager) sweep(ctx context.Context) {
	cmds, err := m.store.ExpireCommands(ctx, m.now(), resultGrace)
	if err != nil {
		m.m.dbErrors.WithLabelValues("expire_commands").Inc()
		m.log.Error("expire commands", "err", err)
		return
	}
	for i := range cmds {
		m.finished(ctx, &cmds[i])
		m.log.Info("command ended without an answer", "locker", cmds[i].DeviceID, "command", cmds[i].ID, "status", cmds[i].Status)
	}
}

// GetLocker returns a locker, with stale computed from the health interval:
// online but silent for more than 3 health intervals.
func (m *Manager) GetLocker(ctx context.Context, id string) (*Locker, error) {
	l, err := m.store.GetLocker(ctx, id)
	if err != nil {
		return nil, err
	}
	m.decorate(l)
	return l, nil
}

// ListLockers lists lockers.
func (m *Manager) ListLockers(ctx context.Context, f LockerFilter) ([]Locker, error) {
	ls, err := m.store.ListLockers(ctx, f)
	for i := range ls {
		m.decorate(&ls[i])
	}
	return ls, err
}

// SilentAfter is how long an online locker may go unheard before it is
// stale: three health intervals of the configuration lockers are given.
func (m *Manager) SilentAfter() time.Duration {
	return 3 * time.Duration(m.opts.Config.HealthIntervalS) * time.Second
}

// FlappingConnects is how many sessions in 10 minutes make a locker flapping.
const FlappingConnects = 5

func (m *Manager) decorate(l *Locker) {
	l.Flapping = l.RecentConnects >= FlappingConnects
	l.Stale = l.Online && (l.LastSeen == nil || m.now().Sub(*l.LastSeen) > m.SilentAfter())
	l.CredsCurrent = l.CredsAcked == l.CredsVersion
	// The version its config goes out under (publishState).
	l.ConfigVersion = max(l.ConfigVersion, m.opts.Config.Version)
}
