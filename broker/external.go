package broker

import (
	"errors"
	"time"

	"github.com/lockergate/lockergate/protocol"
)

// Verdict is the answer to an external broker's auth hook.
type Verdict uint8

const (
	// Allow: a locker's own credentials, or its own topic.
	Allow Verdict = iota + 1
	// Deny is final: wrong or unknown credentials, a disabled locker,
	// another locker's topic.
	Deny
	// Retry: cannot tell now (database unreachable, every check slot
	// taken); ask again later.
	Retry
	// Ignore: not a locker identity (the gateway's own user, an operator's
	// client); for the broker's other authenticators to decide.
	Ignore
)

func (v Verdict) String() string {
	switch v {
	case Allow:
		return "allow"
	case Deny:
		return "deny"
	case Retry:
		return "retry"
	case Ignore:
		return "ignore"
	}
	return "invalid"
}

// externalIdentity returns the locker a client of an external broker claims
// to be: client id and username both the device id, as on the embedded
// broker. ok is false for any other client.
func externalIdentity(clientID, username string) (id string, ok bool) {
	if username != clientID || !validDeviceID(clientID) {
		return "", false
	}
	return clientID, true
}

// CheckExternal decides a CONNECT that a client made to an external broker,
// as that broker's auth hook (httpapi's /v1/broker-auth endpoints) reports
// it. A locker identity gets the secret check of a CONNECT to this broker,
// with the same cache, refusal metric and log; Kick forgets a cached secret
// here too. remote is the client's address as the broker saw it, for the
// log. reason is the refusal reason, a label of
// lockergate_mqtt_auth_failures_total.
//
// Every refusal is final for the locker (a broker's HTTP authenticator
// cannot answer "not now"), so unlike a CONNECT here there is no lockout
// after failed attempts, and a secret this broker verified before is
// admitted when the database cannot confirm it now.
//
// A client that uses a locker's id as its client id with another username
// is refused (client_id_mismatch): it would take over the locker's session.
// Other clients are Ignore: for the broker's other authenticators.
func (b *Broker) CheckExternal(clientID, username string, password []byte, remote string) (v Verdict, reason string) {
	now := time.Now()
	id, ok := externalIdentity(clientID, username)
	switch {
	case !ok && !validDeviceID(clientID):
		return Ignore, ""
	case !ok:
		v, reason = b.foreignClientID(clientID, password)
	case len(password) == 0:
		v, reason = Deny, refuseBadCredentials
	default:
		v, reason = b.checkExternalSecret(id, password, now)
	}
	switch {
	case v == Allow || v == Ignore:
	case b.ctx.Err() != nil:
		return Retry, refuseBackendError // closing: not the client's fault
	case v == Deny || ok: // not a client the next authenticator admits anyway
		b.refused(clientID, username, remote, reason, now)
	}
	return v, reason
}

func (b *Broker) checkExternalSecret(id string, password []byte, now time.Time) (Verdict, string) {
	for attempt := 0; attempt < 3; attempt++ {
		epoch, known, reason := b.verifyDevice(id, password, "", now, hookLimits)
		// The secret this broker last verified for the locker, and the
		// database cannot confirm it now: admitted rather than refused for
		// good, while kicks from every instance are heard (a disabled or
		// replaced locker's secret is then not among these).
		stale := reason != "" && known && retryable(reason) && (b.opts.KicksHeard == nil || b.opts.KicksHeard())
		switch {
		case reason != "" && !stale:
			if retryable(reason) {
				return Retry, reason
			}
			return Deny, reason
		case b.cache.epoch(id) != epoch:
			continue // a Kick (disabled, replaced) during the check: ask again
		case stale:
			b.m.authCache.WithLabelValues("stale").Inc()
			b.logBackendError("auth hook admitted a locker on the secret last verified: cannot check it now", id, errors.New(reason))
		}
		return Allow, ""
	}
	return Retry, refuseBackendError
}

// foreignClientID decides a client whose client id is shaped like a
// locker's but whose username is not that id: refused when a locker has
// that id, Ignore when none has.
func (b *Broker) foreignClientID(clientID string, password []byte) (Verdict, string) {
	switch reason := b.checkDevice(clientID, password, hookLimits); reason {
	case refuseUnknownDevice:
		return Ignore, ""
	case refuseBackendError, refuseBusy:
		return Retry, reason
	}
	return Deny, refuseClientIDMismatch
}

// CheckExternalACL decides a publish (publish true) or a subscription by a
// client of an external broker: a locker may use exactly its own topics of
// protocol v1, as on this broker. A refusal is counted and logged like one
// here (lockergate_mqtt_acl_denied_total).
func (b *Broker) CheckExternalACL(clientID, username, topic string, publish bool) Verdict {
	id, ok := externalIdentity(clientID, username)
	if !ok {
		return Ignore
	}
	if publish && protocol.DeviceMayPublish(id, topic) || !publish && protocol.DeviceMaySubscribe(id, topic) {
		return Allow
	}
	b.deny(clientID, "", topic, publish)
	return Deny
}
