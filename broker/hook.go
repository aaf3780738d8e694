package broker

import (
	"strings"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/lockergate/lockergate/protocol"
)

// hook connects mochi's events to the Broker. It provides only what it
// implements; everything else falls through to mqtt.HookBase.
type hook struct {
	mqtt.HookBase
	b *Broker
}

// ID implements mqtt.Hook.
func (h *hook) ID() string { return "lockergate" }

// Provides implements mqtt.Hook.
func (h *hook) Provides(event byte) bool {
	switch event {
	case mqtt.OnConnect, mqtt.OnConnectAuthenticate, mqtt.OnACLCheck, mqtt.OnSessionEstablished, mqtt.OnDisconnect,
		mqtt.OnPublish, mqtt.OnPublished, mqtt.OnPublishDropped, mqtt.OnPacketEncode, mqtt.OnPacketRead,
		mqtt.OnPacketSent, mqtt.OnQosPublish, mqtt.OnWill, mqtt.OnSubscribed:
		return true
	}
	return false
}

// OnConnect implements mqtt.Hook: the credentials are checked here, where a
// refusal that means "not now" (the database is unreachable, every check
// slot is taken, too many recent failures) can be answered as such. mochi's
// OnConnectAuthenticate can only answer "bad user name or password", which
// devices must take as final.
func (h *hook) OnConnect(cl *mqtt.Client, pk packets.Packet) error {
	reason := h.b.authenticate(cl, pk)
	if reason == refuseAuthMethod {
		_ = h.b.server.SendConnack(cl, packets.ErrBadAuthenticationMethod, false, nil)
		return packets.ErrBadAuthenticationMethod
	}
	if !retryable(reason) {
		return nil // OnConnectAuthenticate admits or refuses
	}
	code := packets.ErrServerUnavailable
	if reason == refuseBusy && cl.Properties.ProtocolVersion == 5 {
		code = packets.ErrServerBusy
	}
	// MQTT 3.1.1 has one code for both: 3, server unavailable.
	_ = h.b.server.SendConnack(cl, code, false, nil)
	return code
}

// OnConnectAuthenticate implements mqtt.Hook: it admits what OnConnect
// authenticated.
func (h *hook) OnConnectAuthenticate(cl *mqtt.Client, _ packets.Packet) bool {
	return h.b.sessionOf(cl) != nil
}

// OnACLCheck implements mqtt.Hook. mochi calls it with write=true for every
// PUBLISH, with write=false for every SUBSCRIBE filter and again before
// delivering each message to a subscriber.
func (h *hook) OnACLCheck(cl *mqtt.Client, topic string, write bool) bool {
	return h.b.aclCheck(cl, topic, write)
}

// OnSessionEstablished implements mqtt.Hook.
func (h *hook) OnSessionEstablished(cl *mqtt.Client, _ packets.Packet) {
	h.b.established(cl)
}

// OnSubscribed implements mqtt.Hook: mochi calls it once the filters are
// in place, before the SUBACK.
func (h *hook) OnSubscribed(cl *mqtt.Client, pk packets.Packet, codes []byte) {
	h.b.subscribed(cl, &pk, codes)
}

// OnDisconnect implements mqtt.Hook.
func (h *hook) OnDisconnect(cl *mqtt.Client, err error, _ bool) {
	if s := h.b.sessionOf(cl); s != nil {
		h.b.finish(s, err)
	}
}

// OnPublish implements mqtt.Hook.
func (h *hook) OnPublish(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	// By pointer: the publish path runs on each client's goroutine, and
	// every ~800-byte copy of a packet on it is stack that grows again after
	// each collection shrinks it.
	err := h.b.onPublish(cl, &pk)
	return pk, err
}

// OnPublished implements mqtt.Hook: mochi calls it after the PUBACK of a
// QoS 1 publish is written. A provisioning request starts here, not in
// OnPublish: a request that cannot be served (the database is down) ends
// the session at once, and ended before its PUBACK was written the locker
// would see its publish lost instead of the session refused.
func (h *hook) OnPublished(cl *mqtt.Client, pk packets.Packet) {
	if len(pk.Payload) > protocol.MaxPayload {
		return // dropped and counted in OnPublish
	}
	if s := h.b.provisionRequest(cl, &pk); s != nil {
		h.b.startProvision(s, pk.Payload)
	}
}

// OnWill implements mqtt.Hook. mochi offers no way to cancel a will from a
// hook, but a will without a topic reaches no subscriber and is not retained:
// that is how a replaced session's will is dropped.
func (h *hook) OnWill(cl *mqtt.Client, will mqtt.Will) (mqtt.Will, error) {
	if h.b.dropWill(cl) {
		return mqtt.Will{}, nil
	}
	return will, nil
}

// OnPublishDropped implements mqtt.Hook: the client's outbound queue was full.
func (h *hook) OnPublishDropped(cl *mqtt.Client, pk packets.Packet) {
	b := h.b
	b.m.dropped.WithLabelValues(dropQueueFull).Inc()
	if ok, suppressed := b.dropLog.allow(time.Now()); ok {
		b.log.Warn("mqtt message dropped: client queue full", "client_id", cl.ID, "topic", pk.TopicName,
			"suppressed", suppressed)
	}
}

// OnPacketEncode implements mqtt.Hook: it advertises the client's packet limit in the
// CONNACK so MQTT 5 clients refuse oversize packets themselves (mochi does
// not send the property on its own).
func (h *hook) OnPacketEncode(cl *mqtt.Client, pk packets.Packet) packets.Packet {
	if pk.FixedHeader.Type == packets.Connack && cl.Properties.ProtocolVersion == 5 && pk.ReasonCode < packets.ErrUnspecifiedError.Code {
		pk.Properties.MaximumPacketSize = cl.MaxPacketSize()
		if isClaimClient(cl) {
			// Tells the client its session ends with the connection
			// (MQTT-3.2.2.3.2), whatever expiry it asked for: see
			// cleanClaimSession.
			pk.Properties.SessionExpiryInterval, pk.Properties.SessionExpiryIntervalFlag = 0, true
		}
	}
	return pk
}

// OnQosPublish implements mqtt.Hook; see provisionAnswerQueued.
func (h *hook) OnQosPublish(cl *mqtt.Client, pk packets.Packet, _ int64, _ int) {
	if pk.FixedHeader.Type == packets.Publish && isClaimClient(cl) {
		h.b.provisionAnswerQueued(cl, pk)
	}
}

// OnPacketRead implements mqtt.Hook; see provisionAnswerAcked.
func (h *hook) OnPacketRead(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	switch t := pk.FixedHeader.Type; {
	case t == packets.Connect:
		cleanClaimSession(&pk)
	case t == packets.Puback && isClaimClient(cl):
		h.b.provisionAnswerAcked(cl, pk)
	case t == packets.Publish && !cl.Net.Inline && pk.TopicName != "" && !mqtt.IsValidFilter(pk.TopicName, true):
		// mochi refuses a client's publish to $SYS (acknowledged like any
		// refused publish) before asking the ACL, and closes the
		// connection of one to a name with wildcards (a protocol error):
		// counted and logged like the others.
		h.b.denied(cl, pk.TopicName, true)
	}
	return pk, nil
}

// OnPacketSent implements mqtt.Hook; see provisionAnswerSent.
func (h *hook) OnPacketSent(cl *mqtt.Client, pk packets.Packet, _ []byte) {
	if pk.FixedHeader.Type == packets.Publish && pk.FixedHeader.Qos == 0 && isClaimClient(cl) {
		h.b.provisionAnswerSent(cl)
	}
}

// cleanClaimSession makes the session a claim CONNECT asks for clean and
// short-lived, whatever its flags say: clean session (MQTT 3.1.1) or clean
// start (MQTT 5), and no session expiry. A kept claim session would hold
// its provisioning answer (the device secret and cred_key, QoS 1 in
// flight) for whoever connects next as prov-{serial} with clean session
// off, and any claim token lets anyone do that; a claim session must
// neither outlive its connection nor inherit another's. It runs on the
// CONNECT as read, before mochi parses it into the client, which is the
// only place the flag mochi's session takeover reads can be changed (the
// OnConnect hooks get a copy). A locker loses nothing: a claim session has
// nothing to resume, and one that ends before its answer asks again.
func cleanClaimSession(pk *packets.Packet) {
	if !strings.HasPrefix(pk.Connect.ClientIdentifier, protocol.ProvisionClientPrefix) {
		return
	}
	pk.Connect.Clean = true
	pk.Properties.SessionExpiryInterval, pk.Properties.SessionExpiryIntervalFlag = 0, false
}

func isClaimClient(cl *mqtt.Client) bool {
	return strings.HasPrefix(cl.ID, protocol.ProvisionClientPrefix) && !cl.Net.Inline
}

// aclCheck applies protocol v1's access rules to the session's identity.
func (b *Broker) aclCheck(cl *mqtt.Client, topic string, write bool) bool {
	if cl.Net.Inline {
		return true
	}
	var ok bool
	switch k, id := identify(cl); {
	case k == kindDevice && write:
		ok = protocol.DeviceMayPublish(id, topic)
	case k == kindDevice:
		ok = protocol.DeviceMaySubscribe(id, topic)
	case k == kindProvision && write:
		ok = protocol.ProvisionerMayPublish(id, topic)
	case k == kindProvision:
		ok = protocol.ProvisionerMaySubscribe(id, topic) && b.mayReceiveAnswer(cl, id)
	}
	if !ok {
		b.denied(cl, topic, write)
	}
	return ok
}

// mayReceiveAnswer reports whether the claim client cl of serial may get
// a message on its response topic now: not while the answer of another
// session with the same client id is being published (provision). The
// check runs when mochi delivers, and for a SUBSCRIBE at that moment too,
// which is then refused: such a session replaced the locker's own just as
// it was answered.
func (b *Broker) mayReceiveAnswer(cl *mqtt.Client, serial string) bool {
	v, ok := b.answering.Load(serial)
	return !ok || v.(*session).cl == cl
}

// denied counts and logs a refused publish (write) or subscription.
func (b *Broker) denied(cl *mqtt.Client, topic string, write bool) {
	b.deny(cl.ID, cl.Net.Remote, topic, write)
}

// deny counts and logs a refused publish (write) or subscription by a
// client of this broker or, through its auth hook, of an external one
// (remote "").
func (b *Broker) deny(clientID, remote, topic string, write bool) {
	action := "subscribe"
	if write {
		action = "publish"
	}
	b.m.aclDenied.WithLabelValues(action).Inc()
	if allowed, suppressed := b.denyLog.allow(time.Now()); allowed {
		b.log.Warn("mqtt access denied", "action", action, "client_id", logID(clientID),
			"topic", logID(topic), "remote", remote, "suppressed", suppressed)
	}
}

// errPayloadTooLarge is the reason code of the PUBACK answering an MQTT 5
// QoS 1 publish over protocol.MaxPayload (0x83 is a valid PUBACK reason code;
// 0x95 "packet too large" is not).
var errPayloadTooLarge = packets.Code{Code: packets.ErrImplementationSpecificError.Code, Reason: "payload over 16 KiB"}

// errIgnore is packets.CodeSuccessIgnore as an error, boxed once: converted
// at each return it was an allocation per message.
var errIgnore error = packets.CodeSuccessIgnore

// onPublish drops oversize payloads, takes provisioning requests and
// delivers device messages to the gateway (deliverUplink).
//
// A payload over protocol.MaxPayload (but within MaxPacketSize) can never be
// processed, so it is acknowledged and dropped rather than left unacknowledged:
// a device would otherwise resend it forever. MQTT 5 QoS 1 publishers get a
// negative PUBACK; MQTT 3.1.1 has none. Packets over MaxPacketSize are refused
// by mochi while reading, which ends the connection (packet_too_large).
func (b *Broker) onPublish(cl *mqtt.Client, pk *packets.Packet) error {
	if cl.Net.Inline {
		return nil // Broker.Publish checks its own payloads
	}
	if len(pk.Payload) > protocol.MaxPayload {
		b.m.dropped.WithLabelValues(dropTooLarge).Inc()
		if ok, suppressed := b.dropLog.allow(time.Now()); ok {
			b.log.Warn("mqtt message dropped: payload too large", "client_id", logID(cl.ID),
				"topic", logID(pk.TopicName), "bytes", len(pk.Payload), "suppressed", suppressed)
		}
		if cl.Properties.ProtocolVersion == 5 && pk.FixedHeader.Qos == 1 {
			return errPayloadTooLarge
		}
		return errIgnore
	}
	if strings.HasSuffix(pk.TopicName, "/"+string(protocol.ChanPresence)) {
		b.noteBirth(cl, pk.TopicName)
	} else if pk.FixedHeader.Retain {
		b.notRetained(cl, pk)
	}
	if b.provisionRequest(cl, pk) != nil {
		// Acknowledged, not forwarded: the request is for the gateway
		// only. It is served from OnPublished, once the PUBACK is written.
		return errIgnore
	}
	if delivered, ackLater := b.deliverUplink(cl, pk); ackLater {
		// Acknowledged once stored (Message.Ack), routed no further.
		return mqtt.ErrAckLater
	} else if delivered {
		// Acknowledged by mochi, which routes it no further.
		return errIgnore
	}
	return nil
}

// notRetained takes the retain flag off a publish on any topic but a
// presence (the contract retains only those): a locker's events, results or
// acks kept by the broker would be handed to every later subscriber (and,
// behind an external broker, to every gateway instance as it starts). The
// message itself goes on: an event is never lost for a flag. With the flag
// off it takes the uplink path (deliverUplink); mochi retains no publish a
// hook had it ignore.
func (b *Broker) notRetained(cl *mqtt.Client, pk *packets.Packet) {
	pk.FixedHeader.Retain = false
	if ok, suppressed := b.dropLog.allow(time.Now()); ok {
		b.log.Warn("mqtt retain flag ignored: only a locker's presence is retained", "client_id", logID(cl.ID),
			"topic", logID(pk.TopicName), "suppressed", suppressed)
	}
}

// noteBirth records that a device published its own presence (the ACL let
// only its own topic through).
func (b *Broker) noteBirth(cl *mqtt.Client, topic string) {
	if k, id := identify(cl); k == kindDevice && topic == protocol.Topic(id, protocol.ChanPresence) {
		if s := b.sessionOf(cl); s != nil {
			s.born.Store(true)
		}
	}
}

// subscribed follows a device's granted subscriptions: one to its own
// device-to-gateway topics turns on the echo of its messages (echoOn), one
// covering its fw/job topic after the gateway said "none" in the session
// gets "no job" when there is none (noJobSent, fwJobNone),
// and the first one covering its cmd topic after its birth is reported to a
// LateSubscribeObserver (once per session: a device that subscribes again
// and again does not make the fleet manager reread its commands each time).
func (b *Broker) subscribed(cl *mqtt.Client, pk *packets.Packet, codes []byte) {
	k, id := identify(cl)
	if k != kindDevice {
		return
	}
	s := b.sessionOf(cl)
	if s == nil {
		return
	}
	cmd, fwJob := protocol.Topic(id, protocol.ChanCmd), protocol.Topic(id, protocol.ChanFwJob)
	late, job := false, false
	for i, f := range pk.Filters {
		if i >= len(codes) || codes[i] >= packets.ErrUnspecifiedError.Code {
			continue
		}
		if protocol.SubscribesUplink(id, f.Filter) {
			b.echoOn(s)
		}
		late = late || protocol.TopicMatches(f.Filter, cmd)
		job = job || protocol.TopicMatches(f.Filter, fwJob)
	}
	if job && b.noJobSent(cl, id) {
		// Off the client's goroutine; it may go out before mochi's SUBACK
		// (this hook runs before it), which MQTT allows (3.8.4).
		go b.fwJobNone(cl, id)
	}
	if late && s.born.Load() && s.resent.CompareAndSwap(false, true) {
		if obs, ok := b.opts.Observer.(LateSubscribeObserver); ok {
			obs.DeviceSubscribedAfterBirth(id)
		}
	}
}

// echoOn routes the session's own messages through mochi, which delivers
// them back to it (deliverUplink), until the session ends. Marked only for
// a live session: finish clears it once, and a mark after that would stay.
func (b *Broker) echoOn(s *session) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if s.done {
		return
	}
	if _, had := b.echo.LoadOrStore(s.cl, struct{}{}); !had {
		b.echoes.Add(1)
	}
}

// provisionRequest returns the claim session whose provisioning request pk
// is, or nil.
func (b *Broker) provisionRequest(cl *mqtt.Client, pk *packets.Packet) *session {
	if !isClaimClient(cl) {
		return nil
	}
	if s := b.sessionOf(cl); s != nil && s.kind == kindProvision && pk.TopicName == protocol.ProvisionRequestTopic(s.id) {
		return s
	}
	return nil
}
