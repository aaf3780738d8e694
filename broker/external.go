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
	// taken, too many recent failures); ask again later.
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

// ExternalIdentity returns the locker a client of an external broker claims
// to be: client id and username both the device id, as on the embedded
// broker. ok is false for any other client.
func ExternalIdentity(clientID, username string) (id string, ok bool) {
	if username != clientID || !validDeviceID(clientID) {
		return "", false
	}
	return clientID, true
}

// CheckExternal decides a CONNECT that a client made to an external broker,
// as that broker's auth hook (httpapi's /v1/broker-auth endpoints) reports
// it. A locker identity gets the checks of a CONNECT to this broker, with
// the same secret cache, rate limits, refusal metric and log; Kick
// invalidates the cache here too, so a disabled locker's next CONNECT is
// refused. remote is the client's address as the broker saw it (host or
// host:port; "" when the broker does not say: then only the per-locker
// limit applies). reason is the refusal reason, a label of
// lockergate_mqtt_auth_failures_total.
func (b *Broker) CheckExternal(clientID, username string, password []byte, remote string) (v Verdict, reason string) {
	id, ok := ExternalIdentity(clientID, username)
	if !ok {
		return Ignore, ""
	}
	now := time.Now()
	known := false
	if len(password) == 0 {
		reason = refuseBadCredentials
	} else {
		_, known, reason = b.verifyDevice(id, password, hostOf(remote), now, hookLimits)
	}
	switch {
	case reason == "":
		return Allow, ""
	case b.ctx.Err() != nil:
		return Retry, refuseBackendError // closing: not the client's fault
	case known && retryable(reason):
		// The secret this gateway last verified for the locker, and the
		// database cannot confirm it now. A broker's HTTP authenticator
		// cannot answer "server unavailable": EMQX turns any failure
		// into "not authorised", which a locker must take as final. So
		// the secret is admitted (a Kick, from a disable or a
		// replacement, forgets it).
		b.m.authCache.WithLabelValues("stale").Inc()
		b.logBackendError("auth hook admitted a locker on the secret last verified: cannot check it now", clientID, errors.New(reason))
		return Allow, ""
	}
	b.refuse(kindDevice, clientID, username, remote, reason, now)
	if retryable(reason) {
		return Retry, reason
	}
	return Deny, reason
}

// CheckExternalACL decides a publish (publish true) or a subscription by a
// client of an external broker: a locker may use exactly its own topics of
// protocol v1, as on this broker. A refusal is counted and logged like one
// here (lockergate_mqtt_acl_denied_total).
func (b *Broker) CheckExternalACL(clientID, username, topic string, publish bool) Verdict {
	id, ok := ExternalIdentity(clientID, username)
	if !ok {
		return Ignore
	}
	if publish && protocol.DeviceMayPublish(id, topic) || !publish && protocol.DeviceMaySubscribe(id, topic) {
		return Allow
	}
	b.deny(clientID, "", topic, publish)
	return Deny
}
