package devicesim

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/lockergate/lockergate/protocol"
)

// Disconnect simulates abrupt network loss: the TCP connection is shut down
// without an MQTT DISCONNECT, so the broker publishes the Last Will. The
// locker stays down (the keypad keeps working, events queue) until Reconnect.
func (l *Locker) Disconnect() {
	l.mu.Lock()
	l.wantUp = false
	s := l.sess
	l.dropSessionLocked(s, false)
	cancel := l.cancelAttempt
	l.mu.Unlock()
	if cancel != nil {
		cancel()
	}
	if s != nil {
		s.abort()
	}
	l.wake()
}

// Reconnect lets a locker held down by Disconnect (or stopped by a refusal)
// connect again and waits until it is connected or ctx ends.
func (l *Locker) Reconnect(ctx context.Context) error {
	l.mu.Lock()
	if l.stopped {
		l.mu.Unlock()
		return ErrClosed
	}
	if !l.running {
		l.mu.Unlock()
		return ErrNotStarted
	}
	l.wantUp = true
	l.permErr = nil
	l.notifyLocked()
	l.mu.Unlock()
	l.wake()
	return l.waitConnected(ctx)
}

// waitConnected waits until the locker is connected as itself, has failed for
// good, or ctx ends.
func (l *Locker) waitConnected(ctx context.Context) error {
	for {
		l.mu.Lock()
		switch {
		case l.connected.Load():
			l.mu.Unlock()
			return nil
		case l.stopped:
			l.mu.Unlock()
			return ErrClosed
		case !l.running:
			l.mu.Unlock()
			return ErrNotStarted
		case l.permErr != nil:
			err := l.permErr
			l.mu.Unlock()
			return err
		case !l.wantUp:
			l.mu.Unlock()
			return ErrDisconnected
		}
		ch := l.changed
		l.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			if last := l.LastError(); last != nil {
				return fmt.Errorf("%w (last error: %v)", ctx.Err(), last)
			}
			return ctx.Err()
		}
	}
}

func (l *Locker) shouldConnect() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.wantUp && l.permErr == nil && !l.stopped
}

// Why serve returned.
type ending int

const (
	endLost ending = iota // connection lost, or Disconnect
	endReboot
	endStop
)

var errGoneDown = errors.New("disconnected or closed while connecting")

// A session that lasted this long resets the reconnect back-off; shorter
// ones (accepted, then kicked) keep it growing.
const stableSession = 30 * time.Second

// run is the locker's goroutine: connect (provisioning first if needed), serve
// the session, and after an unexpected loss reconnect with capped exponential
// back-off and full jitter, until the fleet closes.
func (l *Locker) run(ctx context.Context) {
	defer l.f.wg.Done()
	log := l.f.log.With("serial", l.serial)
	attempt := 0
	var delay time.Duration
	for ctx.Err() == nil {
		if !l.shouldConnect() {
			delay, attempt = 0, 0 // Reconnect connects at once, with a fresh back-off
			select {
			case <-l.kick:
				continue
			case <-ctx.Done():
				return
			}
		}
		if delay > 0 {
			t := time.NewTimer(delay)
			delay = 0
			select {
			case <-t.C:
			case <-l.kick: // Disconnect or Reconnect: decide again
				t.Stop()
				continue
			case <-ctx.Done():
				t.Stop()
				return
			}
		}
		if l.networkDown() { // the attempt fails at once: back off and try again
			delay = backoff(l.jitter, attempt, l.f.opts.RetryBase, l.f.opts.RetryMax)
			attempt++
			continue
		}
		actx, cancel := context.WithCancel(ctx)
		l.mu.Lock()
		l.cancelAttempt = cancel
		l.mu.Unlock()
		s, err := l.establish(actx)
		if err == nil {
			err = l.announce(actx, s)
		}
		l.mu.Lock()
		l.cancelAttempt = nil
		interrupted := actx.Err() != nil || l.x.holds > 0 // by Disconnect or a network loss
		l.mu.Unlock()
		cancel()
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			if !l.shouldConnect() { // Disconnect interrupted the attempt
				continue
			}
			if interrupted { // the network went away during the attempt
				delay = backoff(l.jitter, attempt, l.f.opts.RetryBase, l.f.opts.RetryMax)
				attempt++
				continue
			}
			l.fail(err)
			if permanent(err) {
				log.Warn("locker gives up until Reconnect", "err", err)
				continue
			}
			delay = backoff(l.jitter, attempt, l.f.opts.RetryBase, l.f.opts.RetryMax)
			attempt++
			log.Debug("connect failed", "err", err, "retry_in", delay)
			continue
		}
		up := time.Now()
		switch l.serve(ctx, s) {
		case endStop:
			return
		case endReboot:
			l.mu.Lock()
			l.newBootLocked()
			l.rebootReason = "command"
			l.mu.Unlock()
			attempt = 0
		case endLost:
			if time.Since(up) >= stableSession {
				attempt = 0
			}
			delay = backoff(l.jitter, attempt, l.f.opts.RetryBase, l.f.opts.RetryMax)
			attempt++
			log.Debug("connection lost", "err", s.lostReason(), "retry_in", delay)
		}
	}
}

func (l *Locker) fail(err error) {
	l.f.c.connectFailures.Add(1)
	l.mu.Lock()
	defer l.mu.Unlock()
	l.lastErr = err
	if permanent(err) {
		l.permErr = err
	}
	l.notifyLocked()
}

// establish provisions the locker if it has no identity, then connects as
// itself and subscribes to its gateway → device topics.
func (l *Locker) establish(ctx context.Context) (*session, error) {
	id, ok := l.Identity()
	if !ok {
		var err error
		if id, err = l.provision(ctx); err != nil {
			return nil, fmt.Errorf("provision: %w", err)
		}
		l.mu.Lock()
		l.ident, l.hasIdent = id, true
		l.mu.Unlock()
		l.f.register(l, id.DeviceID)
		l.f.c.provisioned.Add(1)
		l.f.log.Debug("provisioned", "serial", l.serial, "device_id", id.DeviceID)
	}
	if err := l.f.lim.wait(ctx); err != nil {
		return nil, err
	}
	s, err := dialSession(ctx, sessionConfig{
		broker:    l.f.opts.Broker,
		tls:       l.f.opts.TLSConfig,
		clientID:  id.DeviceID,
		user:      id.DeviceID,
		password:  id.Password,
		willTopic: protocol.Topic(id.DeviceID, protocol.ChanPresence),
		will:      protocol.Encode(protocol.Presence{Online: false}),
		keepAlive: l.f.opts.KeepAlive,
		timeout:   l.f.opts.ConnectTimeout,
		localAddr: l.localAddr(),
		onMessage: l.in.push,
	})
	if err != nil {
		return nil, fmt.Errorf("connect as %s: %w", id.DeviceID, err)
	}
	// Subscribe before the birth so whatever the gateway sends in answer to
	// the birth (retained state, pending commands) reaches this session.
	err = s.subscribe(ctx,
		protocol.Topic(id.DeviceID, protocol.ChanCmd),
		protocol.Topic(id.DeviceID, protocol.ChanCreds),
		protocol.Topic(id.DeviceID, protocol.ChanConfig),
		protocol.Topic(id.DeviceID, protocol.ChanFwJob))
	if err != nil {
		s.closeClean()
		return nil, err
	}
	return s, nil
}

// announce publishes the birth and waits for the broker to acknowledge it;
// only then is the locker connected: the reboot event and everything queued
// offline follow, in order, and anything sent meanwhile was queued behind them.
func (l *Locker) announce(ctx context.Context, s *session) error {
	l.mu.Lock()
	if !l.wantUp || l.stopped || l.x.holds > 0 {
		l.mu.Unlock()
		l.discard(s)
		return errGoneDown
	}
	birth := protocol.Presence{Online: true, TS: wireTime(l.now()), FW: l.fwVersionLocked(), Model: l.model.Name, BootID: l.bootID}
	tok := s.cl.Publish(l.topic(protocol.ChanPresence), 1, true, protocol.Encode(birth))
	l.mu.Unlock()
	// Safe to wait: paho's dispatch goroutine never blocks on this locker.
	if err := waitToken(ctx, tok, l.f.opts.ConnectTimeout); err != nil {
		l.discard(s)
		return fmt.Errorf("birth: %w", err)
	}
	l.f.c.published.Add(1)

	l.mu.Lock()
	if !l.wantUp || l.stopped || l.x.holds > 0 {
		l.mu.Unlock()
		l.discard(s)
		return errGoneDown
	}
	defer l.mu.Unlock()
	l.sess = s
	if l.rebootReason != "" {
		l.emitLocked(protocol.Event{Type: protocol.EventReboot, Reason: l.rebootReason})
		l.rebootReason = ""
	}
	queued := l.offline
	l.offline = nil
	for _, m := range queued {
		// Events raised before provisioning (a fault can strike a locker
		// that has no identity yet) were queued without a device id.
		if ch, ok := strings.CutPrefix(m.topic, protocol.Topic("", "")); ok {
			m.topic = l.topic(protocol.Channel(ch))
		}
		l.sendLocked(m)
	}
	l.lastErr = nil
	// Counted first: whoever sees Connected() sees the connect counted.
	l.f.c.connected.Add(1)
	l.f.c.connects.Add(1)
	l.connected.Store(true)
	l.notifyLocked()
	return nil
}

// discard ends a session that never became the locker's: as network loss
// if Disconnect or a lost network asked for it, cleanly otherwise (closing,
// broker too slow).
func (l *Locker) discard(s *session) {
	l.mu.Lock()
	held := (!l.wantUp || l.x.holds > 0) && !l.stopped
	l.mu.Unlock()
	if held {
		s.abort()
		return
	}
	s.closeClean()
}

// dropSessionLocked forgets s if it is the current session.
func (l *Locker) dropSessionLocked(s *session, lost bool) {
	if s == nil || l.sess != s {
		return
	}
	l.sess = nil
	if l.connected.Swap(false) {
		l.f.c.connected.Add(-1)
	}
	if lost && l.wantUp && !l.stopped {
		l.f.c.connectionsLost.Add(1)
	}
	l.notifyLocked()
}

// serve runs one session until it ends.
func (l *Locker) serve(ctx context.Context, s *session) ending {
	health := time.NewTimer(0) // the first health right after connecting
	defer health.Stop()
	if l.healthInterval() < 0 {
		health.Stop()
	}
	for {
		select {
		case <-ctx.Done():
			l.mu.Lock()
			l.dropSessionLocked(s, false)
			l.mu.Unlock()
			s.leave(l.DeviceID())
			return endStop
		case <-s.lost:
			l.mu.Lock()
			l.dropSessionLocked(s, true)
			l.mu.Unlock()
			return endLost
		case <-l.in.ready:
			msgs := l.in.take()
			for i, m := range msgs {
				switch l.handle(m) {
				case actReboot:
					l.in.unshift(msgs[i+1:]) // handled after the reboot
					l.mu.Lock()
					l.dropSessionLocked(s, false)
					l.mu.Unlock()
					s.leave(l.DeviceID())
					return endReboot
				case actRescheduleHealth:
					health.Stop()
					if d := l.healthInterval(); d >= 0 {
						health.Reset(d)
					}
				}
			}
		case <-health.C:
			l.sendHealth()
			if d := l.healthInterval(); d >= 0 {
				health.Reset(d)
			}
		}
	}
}
