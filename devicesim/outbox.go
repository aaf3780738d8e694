package devicesim

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"

	"github.com/lockergate/lockergate/protocol"
)

func (l *Locker) topic(c protocol.Channel) string { return protocol.Topic(l.ident.DeviceID, c) }

// emitLocked publishes a device event, minting its id.
func (l *Locker) emitLocked(e protocol.Event) {
	l.eventSeq++
	e.ID = fmt.Sprintf("e-%s-%d", l.bootID, l.eventSeq)
	e.TS = wireTime(l.now())
	l.sendLocked(outMsg{topic: l.topic(protocol.ChanEvents), payload: protocol.Encode(e), qos: 1, queue: true})
}

// sendLocked hands m to paho, or queues it while offline. Holding mu keeps
// the order of messages equal to the order of state changes; paho's Publish
// returns once its writer took the packet (at most writeTimeout).
func (l *Locker) sendLocked(m outMsg) {
	if l.stopped {
		return
	}
	if l.sess == nil {
		if m.queue {
			l.enqueueLocked(m)
		}
		return
	}
	s := l.sess
	tok := s.cl.Publish(m.topic, m.qos, m.retain, m.payload)
	var done func()
	if m.topic == l.topic(protocol.ChanEvents) {
		l.f.c.eventsInFlight.Add(1)
		done = func() { l.f.c.eventsInFlight.Add(-1) }
	}
	l.f.watch(tok, done, func(err error) {
		if s.dead(err) {
			l.f.c.interrupted.Add(1) // the loss itself is counted (or was injected)
		} else {
			l.f.c.publishErrors.Add(1)
		}
		l.f.log.Debug("publish failed", "serial", l.serial, "topic", m.topic, "err", err)
		l.sendFailed(s, m, err)
	})
}

func (l *Locker) enqueueLocked(m outMsg) {
	if len(l.offline) >= l.f.opts.OfflineQueue {
		l.offline = l.offline[1:]
		l.f.c.dropped.Add(1)
	}
	l.offline = append(l.offline, m)
}

// sendFailed resends a message the gateway must see: now on a newer session,
// or when the next one comes up.
func (l *Locker) sendFailed(failed *session, m outMsg, err error) {
	if !m.queue {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.stopped {
		return
	}
	// Only failures on a connection that stayed up count towards giving up:
	// a locker on a flapping network keeps its events until they get through
	// (bounded by the offline queue), as QoS 1 promises.
	if !failed.dead(err) {
		m.tries++
	}
	if m.tries > maxSendRetries {
		l.f.c.dropped.Add(1)
		l.f.log.Debug("giving up on message", "serial", l.serial, "topic", m.topic, "err", err)
		return
	}
	if l.sess != nil && l.sess != failed {
		l.sendLocked(m)
		return
	}
	l.enqueueLocked(m)
}

// watch counts a successful publish without blocking the caller; onErr
// runs (and counts) if it fails while the fleet is open. done, if not nil,
// runs once the publish is acknowledged, failed or given up.
func (f *Fleet) watch(tok mqtt.Token, done func(), onErr func(error)) {
	f.tokens.Add(1)
	go func() {
		defer f.tokens.Done()
		if done != nil {
			defer done()
		}
		t := time.NewTimer(ackTimeout)
		defer t.Stop()
		var err error
		select {
		case <-tok.Done():
			if err = tok.Error(); err == nil {
				f.c.published.Add(1)
				return
			}
		case <-t.C:
			err = errors.New("no acknowledgement")
		case <-f.stopping:
			return
		}
		if f.closing.Load() {
			return
		}
		onErr(err)
	}()
}

func wireTime(t time.Time) protocol.Time { return protocol.T(t.Truncate(time.Millisecond)) }

// inbox queues gateway → device messages for the locker's goroutine. push
// never blocks, so paho's dispatch goroutine (and with it PUBACKs and
// PINGRESPs) never waits for the locker.
type inbox struct {
	mu      sync.Mutex
	q       []inMsg
	ready   chan struct{} // buffer 1: something is queued
	dropped *atomic.Uint64
}

// maxInbox bounds a locker's unprocessed messages; beyond it they are dropped
// and counted.
const maxInbox = 4096

func (b *inbox) push(topic string, payload []byte) {
	b.mu.Lock()
	if len(b.q) >= maxInbox {
		b.mu.Unlock()
		b.dropped.Add(1)
		return
	}
	b.q = append(b.q, inMsg{topic: topic, payload: payload})
	b.mu.Unlock()
	select {
	case b.ready <- struct{}{}:
	default:
	}
}

func (b *inbox) take() []inMsg {
	b.mu.Lock()
	defer b.mu.Unlock()
	q := b.q
	b.q = nil
	return q
}

// unshift puts msgs back in front of anything queued since.
func (b *inbox) unshift(msgs []inMsg) {
	if len(msgs) == 0 {
		return
	}
	b.mu.Lock()
	b.q = append(append([]inMsg(nil), msgs...), b.q...)
	b.mu.Unlock()
	select {
	case b.ready <- struct{}{}:
	default:
	}
}
