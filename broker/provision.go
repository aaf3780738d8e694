package broker

import (
	"bytes"
	"context"
	"fmt"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/lockergate/lockergate/protocol"
)

// Provisioning results: the result label of lockergate_mqtt_provisioning_total.
const (
	provOK          = "ok"
	provBusy        = "busy"        // no capacity within the call timeout; no answer sent
	provUnavailable = "unavailable" // the Provisioner could not decide; no answer sent
	provUndelivered = "undelivered" // the session ended before the answer was ready
	provError       = "error"       // an error answer with a code outside the protocol's
)

var provResults = []string{provOK, protocol.ProvClaimExpired, protocol.ProvClaimExhausted,
	protocol.ProvSerialTaken, protocol.ProvInvalid, provError, provBusy, provUnavailable, provUndelivered}

func provResult(r protocol.ProvisionResponse) string {
	if r.Status == "ok" {
		return provOK
	}
	switch r.Error {
	case protocol.ProvClaimExpired, protocol.ProvClaimExhausted, protocol.ProvSerialTaken, protocol.ProvInvalid:
		return r.Error
	}
	return provError
}

// startProvision runs the session's provisioning request, once per session,
// off the client's goroutine.
func (b *Broker) startProvision(s *session, payload []byte) {
	if !s.provStarted.CompareAndSwap(false, true) {
		return // a repeat (QoS 1 resend or a second request): the first one answers
	}
	payload = bytes.Clone(payload)
	b.provWG.Add(1) // on a client goroutine, so before Close's Wait (it waits for clients first)
	go b.provision(s, payload)
}

func (b *Broker) provision(s *session, payload []byte) {
	defer b.provWG.Done()
	ctx, cancel := context.WithTimeout(b.ctx, b.provCallTimeout)
	defer cancel()
	select {
	case b.provSem <- struct{}{}:
	case <-ctx.Done():
		b.m.provisioning.WithLabelValues(provBusy).Inc()
		b.log.Warn("mqtt provisioning request not served: busy", "serial", s.id)
		b.endSession(s, ReasonProvisionBusy, packets.ErrServerBusy)
		return
	}
	// Not decided before the record of the serial's last answer is in: it
	// could take the locker that got that answer for the retry of a lost
	// one. A wait that runs out is answered as a Provisioner failing.
	var resp protocol.ProvisionResponse
	err := b.awaitDelivered(ctx, s.id)
	if err == nil {
		resp, err = b.opts.Provisioner.Provision(ctx, s.token, s.id, payload)
	}
	<-b.provSem
	if s.cl.Closed() {
		// The Provisioner may have registered the device: a retry by the
		// locker then depends on it answering the same serial idempotently.
		b.m.provisioning.WithLabelValues(provUndelivered).Inc()
		b.log.Warn("mqtt provisioning answer not delivered: session ended", "serial", s.id,
			"status", resp.Status, "error", resp.Error, "device_id", resp.DeviceID, "err", err)
		return
	}
	if err != nil {
		// Not an answer: "invalid" would be final for the locker. It
		// retries after the disconnect, and a registration that did commit
		// is handed out again to the same serial (provisioning: retried).
		b.m.provisioning.WithLabelValues(provUnavailable).Inc()
		b.log.Warn("mqtt provisioning request not answered: provisioning unavailable; the locker retries", "serial", s.id, "err", err)
		b.endSession(s, ReasonProvisionUnavailable, packets.ErrServerUnavailable)
		return
	}
	b.m.provisioning.WithLabelValues(provResult(resp)).Inc()
	b.log.Info("mqtt provisioning answered", "serial", s.id, "status", resp.Status, "error", resp.Error,
		"device_id", resp.DeviceID)
	topic := protocol.ProvisionResponseTopic(s.id)
	// mochi delivers to whichever client holds the subscriber's client id
	// when it publishes: the locker's session may have been replaced (and
	// the topic subscribed again) since it was checked above.
	if resp.Status == "ok" {
		s.answered.Store(&resp.DeviceID)
	}
	b.answering.Store(s.id, s)
	err = b.server.Publish(topic, protocol.Encode(resp), false, 1)
	if f := testHookPublished.Load(); f != nil {
		(*f)(s.id)
	}
	b.answering.CompareAndDelete(s.id, s) // if no delivery to s took it out (provisionAnswerQueued)
	if err != nil {
		b.log.Error("mqtt provisioning answer not published", "serial", s.id, "err", err)
	}
	// The locker disconnects by itself once it has the answer. If it does
	// not, end the session when it acknowledges the answer (QoS 1, see
	// provisionAnswerAcked), once the answer is written (QoS 0, see
	// provisionAnswerSent), or after provisionLinger at the latest.
	time.AfterFunc(provisionLinger, func() { b.endSession(s, ReasonProvisioned, packets.CodeDisconnect) })
}

// testHookPublished, when set by a test, runs after the answer to serial
// was published, before provision lets go of its guard (answering).
var testHookPublished atomic.Pointer[func(serial string)]

// provisionAnswerQueued notes the packet id of a QoS 1 answer to a claim
// session. A claim session may only subscribe to its response topic, so any
// publish to it is the answer. Queued for its own session, the answer needs
// the guard against a replacement session (answering) no more: it is let
// go here, before the locker can have it, so that the locker's next session
// (asking again at once) is not refused its subscription while provision's
// goroutine has yet to return from the publish.
func (b *Broker) provisionAnswerQueued(cl *mqtt.Client, pk packets.Packet) {
	if pk.FixedHeader.Qos == 0 {
		return
	}
	if s := b.sessionOf(cl); s != nil && s.kind == kindProvision {
		s.respID.Store(respPending | uint32(pk.PacketID))
		b.answering.CompareAndDelete(s.id, s)
	}
}

// provisionAnswerAcked ends a claim session when it acknowledges its answer:
// disconnecting only after the PUBACK cannot lose the answer in flight.
func (b *Broker) provisionAnswerAcked(cl *mqtt.Client, pk packets.Packet) {
	s := b.sessionOf(cl)
	if s == nil || s.kind != kindProvision {
		return
	}
	if s.respID.Load() == respPending|uint32(pk.PacketID) {
		b.answerDelivered(s)
		b.endSession(s, ReasonProvisioned, packets.CodeDisconnect)
	}
}

// answerDelivered tells the Provisioner, once per session, that its "ok"
// answer reached the locker (AnswerRecorder).
func (b *Broker) answerDelivered(s *session) {
	rec, ok := b.opts.Provisioner.(AnswerRecorder)
	if !ok {
		return
	}
	id := s.answered.Swap(nil)
	if id == nil {
		return
	}
	done := make(chan struct{})
	b.delivering.Store(s.id, done)
	b.provWG.Add(1)
	go func() {
		defer b.provWG.Done()
		defer func() {
			b.delivering.CompareAndDelete(s.id, done)
			close(done)
		}()
		ctx, cancel := context.WithTimeout(context.WithoutCancel(b.ctx), b.provCallTimeout)
		defer cancel()
		if err := rec.AnswerDelivered(ctx, *id); err != nil {
			// The registration stays open to a retry for its 10 minutes.
			b.log.Warn("provisioning answer delivered but not recorded", "serial", s.id, "locker", *id, "err", err)
		}
	}()
}

// awaitDelivered waits, until ctx ends, for the record that the serial's
// last answer was delivered, should it still be on its way. A locker (or a
// test) that got its answer and asks again at once is then told
// serial_taken, as the contract says, instead of being taken for the retry
// of a lost answer because its acknowledgement was not written yet. An
// error: ctx ended first, and the request must not be decided.
func (b *Broker) awaitDelivered(ctx context.Context, serial string) error {
	v, ok := b.delivering.Load(serial)
	if !ok {
		return nil
	}
	b.awaiting.Add(1)
	defer b.awaiting.Add(-1)
	select {
	case <-v.(chan struct{}):
		return nil
	case <-ctx.Done():
		if b.ctx.Err() != nil {
			return fmt.Errorf("the broker is stopping while the delivery of serial %s's last answer is recorded", serial)
		}
		return fmt.Errorf("the delivery of serial %s's last answer is still being recorded: %w", serial, ctx.Err())
	}
}

// provisionAnswerSent ends a claim session that subscribed at QoS 0 once its
// answer has been written.
func (b *Broker) provisionAnswerSent(cl *mqtt.Client) {
	if s := b.sessionOf(cl); s != nil && s.kind == kindProvision && s.provStarted.Load() {
		b.answerDelivered(s)
		b.endSession(s, ReasonProvisioned, packets.CodeDisconnect)
	}
}
