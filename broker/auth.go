package broker

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/lockergate/lockergate/protocol"
)

// Device authentication outcome reasons (used as metric labels and logs).
var (
	ErrUnknownDevice = errors.New("unknown device")
	ErrBadSecret     = errors.New("bad secret")
	ErrDisabled      = errors.New("device disabled")
	ErrUnknownClaim  = errors.New("unknown or revoked claim")
)

// Authenticator checks CONNECT credentials. The broker caches positive device
// results for Options.AuthCacheTTL, so an implementation may be slow.
type Authenticator interface {
	// AuthDevice returns nil when id is a known, enabled device whose secret
	// is password; otherwise ErrUnknownDevice, ErrBadSecret or ErrDisabled
	// (possibly wrapped), or another error when it cannot tell (db down).
	AuthDevice(ctx context.Context, id string, password []byte) error
	// AuthClaim returns nil when token names an existing, unrevoked claim.
	// Expired or exhausted claims are accepted: the provisioning answer tells
	// the device why it gets no identity. Otherwise ErrUnknownClaim (possibly
	// wrapped) or another error. usable reports whether the claim could
	// provision serial now (not expired, uses left, its serial pattern
	// allows it): one that could not may not take over a live session of
	// that serial's client id.
	AuthClaim(ctx context.Context, token, serial string) (usable bool, err error)
}

// Provisioner answers a provisioning request made with a claim token. An
// error means it could not decide (its database or identity store did not
// answer): the locker gets no answer, its session ends as server
// unavailable, and it tries again as after any lost connection. An answer,
// even an error answer, is final for the locker.
type Provisioner interface {
	Provision(ctx context.Context, claimToken string, serial string, payload []byte) (protocol.ProvisionResponse, error)
}

// AnswerRecorder is implemented by a Provisioner that wants to know when an
// "ok" answer reached its locker (PUBACK at QoS 1, written at QoS 0): a
// registration whose answer was delivered is not handed out again.
type AnswerRecorder interface {
	AnswerDelivered(ctx context.Context, deviceID string) error
}

// Observer is told about device sessions. For one device, calls alternate
// DeviceConnected, DeviceDisconnected, DeviceConnected, ... and are made in
// the order the sessions changed. Calls must return quickly: they run on
// client goroutines while the broker holds its presence lock.
type Observer interface {
	DeviceConnected(id, remoteAddr string)
	// DeviceDisconnected reports the end of the session last reported
	// connected; reason is one of the Reason* constants.
	DeviceDisconnected(id, reason string)
}

// LateSubscribeObserver is an Observer that also learns when a device
// subscribes to its cmd topic after its birth in the same session. Its open
// commands, sent at the birth, could not reach it then (protocol v1 has
// the birth "right after connecting", before any subscription).
type LateSubscribeObserver interface {
	DeviceSubscribedAfterBirth(id string)
}

// Refusal reasons: the reason label of lockergate_mqtt_auth_failures_total.
const (
	refuseBadCredentials   = "bad_credentials"       // empty credentials or wrong secret
	refuseUnknownDevice    = "unknown_device"        // no such device
	refuseDisabled         = "disabled"              // device disabled by an operator
	refuseClientIDMismatch = "client_id_mismatch"    // username does not match the client id
	refuseInvalidClientID  = "invalid_client_id"     // not a protocol id or serial, or reserved
	refuseWillDenied       = "will_denied"           // Last Will on a topic the session may not publish
	refuseUnknownClaim     = "unknown_claim"         // unknown or revoked claim token
	refuseNoProvisioning   = "provisioning_disabled" // claim session but no Provisioner configured
	refuseBackendError     = "backend_error"         // Authenticator failed (db down, timeout)
	refuseRateLimited      = "rate_limited"          // too many recent failures from the id or address
	refuseBusy             = "busy"                  // every backend check slot taken (a connect storm)
	refuseAuthMethod       = "auth_method"           // an MQTT 5 Authentication Method: enhanced authentication is not supported
	refuseClaimInUse       = "claim_session_live"    // a claim that cannot provision the serial, while another connection holds its claim session
)

var refusalReasons = []string{refuseBadCredentials, refuseUnknownDevice, refuseDisabled,
	refuseClientIDMismatch, refuseInvalidClientID, refuseWillDenied, refuseUnknownClaim,
	refuseNoProvisioning, refuseBackendError, refuseRateLimited, refuseBusy, refuseAuthMethod, refuseClaimInUse}

// retryable reports whether a refusal says "not now" rather than "not you":
// the CONNACK then says server unavailable (MQTT 3.1.1) or server busy /
// unavailable (MQTT 5), which devices retry with a back-off, instead of bad
// credentials, which they must treat as final.
func retryable(reason string) bool {
	switch reason {
	case refuseBackendError, refuseRateLimited, refuseBusy, refuseClaimInUse:
		return true
	}
	return false
}

// countsAsFailure reports whether a refusal counts towards rate limiting:
// wrong or malformed credentials do; "not now" refusals (our own trouble,
// a lockout already in force, a claim session live: a locker retrying
// after a lost answer with its used-up claim while its own earlier
// connection is still thought alive gets that, and must not get its
// store's address blocked) and disabled provisioning do not.
func countsAsFailure(reason string) bool {
	return !retryable(reason) && reason != refuseNoProvisioning
}

// kind is what an authenticated session is.
type kind uint8

const (
	kindNone kind = iota
	kindDevice
	kindProvision
)

func (k kind) String() string {
	switch k {
	case kindDevice:
		return "device"
	case kindProvision:
		return "provisioning"
	}
	return "none"
}

// identify derives a connected client's identity from its client id and
// username. authenticate admits a client only when these fields have exactly
// the shape checked here, so the ACL needs neither a lookup nor the database.
func identify(cl *mqtt.Client) (kind, string) {
	if cl.Net.Inline {
		return kindNone, ""
	}
	user := cl.Properties.Username
	if serial, ok := strings.CutPrefix(cl.ID, protocol.ProvisionClientPrefix); ok {
		if string(user) == protocol.ProvisionUsername && protocol.ValidSerial(serial) {
			return kindProvision, serial
		}
		return kindNone, ""
	}
	if string(user) == cl.ID && validDeviceID(cl.ID) {
		return kindDevice, cl.ID
	}
	return kindNone, ""
}

// validDeviceID excludes, beyond protocol.ValidID, the names a device can
// never have: the provisioning client prefix and mochi's inline client.
func validDeviceID(id string) bool {
	return protocol.ValidID(id) && id != mqtt.InlineClientId &&
		!strings.HasPrefix(id, protocol.ProvisionClientPrefix)
}

// classify checks the shape of a CONNECT without any lookup and returns the
// session it asks for, or why it cannot be one.
func classify(clientID string, pk packets.Packet) (k kind, subject, reason string) {
	if pk.Properties.AuthenticationMethod != "" {
		// MQTT 5 enhanced authentication (AUTH exchanges): none is
		// supported, and a server that does not support the method must
		// refuse the CONNECT [MQTT-4.12.0-1], not read it as a password.
		return kindNone, "", refuseAuthMethod
	}
	user := string(pk.Connect.Username)
	if user == "" || len(pk.Connect.Password) == 0 {
		return kindNone, "", refuseBadCredentials
	}
	c := pk.Connect
	if serial, ok := strings.CutPrefix(clientID, protocol.ProvisionClientPrefix); ok {
		switch {
		case !protocol.ValidSerial(serial):
			return kindNone, "", refuseInvalidClientID
		case user != protocol.ProvisionUsername:
			return kindNone, "", refuseClientIDMismatch
		case c.WillFlag: // a claim session has no presence to announce
			return kindNone, "", refuseWillDenied
		}
		return kindProvision, serial, ""
	}
	switch {
	case !validDeviceID(clientID):
		return kindNone, "", refuseInvalidClientID
	case user != clientID:
		return kindNone, "", refuseClientIDMismatch
	case c.WillFlag && (c.WillTopic != protocol.Topic(clientID, protocol.ChanPresence) || len(c.WillPayload) > protocol.MaxPayload):
		// mochi publishes wills without an ACL check: a will on another
		// device's topic would be a forged message. And protocol v1's Last
		// Will is its presence, nothing else: a will on its events or
		// cmd/result topic would be a message the device never sent while
		// it was connected, delivered when it is gone (kicked, disabled).
		return kindNone, "", refuseWillDenied
	}
	return kindDevice, clientID, ""
}

// authenticate checks a CONNECT (the OnConnect hook); it returns the reason
// of a refusal, "" when the session is admitted.
//
// Session takeover: MQTT lets a new connection with a client id replace the
// live one. That is safe here because both connections had to authenticate as
// the same identity (client id == username == device id, same secret), so a
// takeover is the device reconnecting before its old connection was noticed
// dead, never another party stealing the session.
func (b *Broker) authenticate(cl *mqtt.Client, pk packets.Packet) string {
	now := time.Now()
	ip := hostOf(cl.Net.Remote)
	k, subject, reason := classify(cl.ID, pk)
	var sess *session
	if reason == "" {
		switch {
		case k == kindDevice && b.opts.ProvisionOnly:
			// Not counted against the id: anyone could otherwise lock a
			// locker out of the external broker's auth hook from here.
			k, reason = kindNone, refuseUnknownDevice
		case k == kindDevice:
			sess, reason = b.authDevice(cl, subject, pk.Connect.Password, ip, now)
		case k == kindProvision:
			sess, reason = b.authClaim(cl, subject, string(pk.Connect.Password), ip, now)
		}
	}
	if sess == nil {
		b.refuse(k, cl.ID, string(cl.Properties.Username), cl.Net.Remote, reason, now)
		return reason
	}
	b.admit(sess)
	return ""
}

// checkLimits bound one backend credential check: the wait for a check
// slot and the check itself; rateLimited: refused at once while the id or
// address is blocked after failures.
type checkLimits struct {
	queue, call time.Duration
	rateLimited bool
}

var (
	// connectLimits: a CONNECT here, which can be answered "busy" or
	// "rate limited, retry later".
	connectLimits = checkLimits{queue: authQueueWait, call: authTimeout, rateLimited: true}
	// hookLimits: an external broker's auth hook, which must answer within
	// the broker's request timeout (EMQX: 5 s) and cannot say "not now":
	// any refusal is final for the locker, so a rate limit would let anyone
	// lock lockers out for good. Secrets are random and long; the bounded
	// check slots protect the database.
	hookLimits = checkLimits{queue: 1500 * time.Millisecond, call: 1500 * time.Millisecond}
)

// backendSlot waits up to wait for one of the authConcurrency backend
// check slots; false: the gateway is busy (answer so, at once, rather than
// let a storm of CONNECTs queue into timeouts).
func (b *Broker) backendSlot(wait time.Duration) (release func(), ok bool) {
	select {
	case b.authSem <- struct{}{}:
	default:
		t := time.NewTimer(wait)
		defer t.Stop()
		select {
		case b.authSem <- struct{}{}:
		case <-t.C:
			return nil, false
		case <-b.ctx.Done():
			return nil, false
		}
	}
	return func() { <-b.authSem }, true
}

// authDevice checks a device's secret, from the cache when it can.
//
// Rate limits guard the backend and slow down guessing; they are checked after
// the cache, so a device whose secret was verified recently still gets in while
// someone hammers its id with wrong secrets (device secrets are random and
// long, so the cache is no practical guessing oracle). Nor do they apply to
// the secret this broker last verified for the id, however long ago: device
// ids are not secret, and anyone could otherwise keep a locker whose cache
// entry has expired offline by sending five wrong secrets a minute. The
// backend still confirms such a secret.
func (b *Broker) authDevice(cl *mqtt.Client, id string, password []byte, ip string, now time.Time) (*session, string) {
	for range settleAttempts {
		epoch, _, reason := b.verifyDevice(id, password, ip, now, connectLimits)
		if reason != "" {
			return nil, reason
		}
		// Register, then look at the epoch again: Kick invalidates first and
		// then ends registered sessions, so either it sees this session or
		// this check sees its invalidation and asks the backend again.
		sess := b.register(cl, kindDevice, id, "")
		if b.cache.epoch(id) == epoch {
			return sess, ""
		}
		b.unregister(sess)
	}
	b.logBackendError("mqtt device check not settled", id, errUnsettled)
	return nil, refuseBackendError
}

// settleAttempts is how many times authDevice checks a locker whose cache
// stripe is invalidated meanwhile before it gives up (errUnsettled).
const settleAttempts = 3

// errUnsettled is why authDevice gave a check up: every attempt saw the
// id's cache stripe invalidated meanwhile.
var errUnsettled = fmt.Errorf("lockers were disabled or re-provisioned during each of %d checks "+
	"(they share the auth cache's invalidation stripe with this one); the locker reconnects after its back-off", settleAttempts)

// verifyDevice checks id's secret, from the cache when it can; see
// authDevice. epoch is id's cache epoch from before the check; known: the
// secret is the one last verified for id, however long ago. ip may be ""
// (unknown).
func (b *Broker) verifyDevice(id string, password []byte, ip string, now time.Time, lim checkLimits) (epoch uint64, known bool, reason string) {
	sum := sha256.Sum256(password)
	epoch = b.cache.epoch(id)
	fresh, known := b.cache.lookup(id, sum, now)
	if fresh {
		b.m.authCache.WithLabelValues("hit").Inc()
		return epoch, true, ""
	}
	b.m.authCache.WithLabelValues("miss").Inc()
	if lim.rateLimited && !known && (b.limiter.blocked(b.limiter.addrKey(ip), now) || b.limiter.blocked(idKey(id), now)) {
		return epoch, false, refuseRateLimited
	}
	if reason := b.checkDevice(id, password, lim); reason != "" {
		if known && !retryable(reason) {
			b.cache.invalidate(id) // the secret changed without a Kick
		}
		return epoch, known, reason
	}
	b.cache.store(id, sum, epoch, now)
	b.limiter.reset(idKey(id))
	return epoch, true, ""
}

func (b *Broker) checkDevice(id string, password []byte, lim checkLimits) string {
	release, ok := b.backendSlot(lim.queue)
	if !ok {
		return refuseBusy
	}
	defer release()
	ctx, cancel := context.WithTimeout(b.ctx, lim.call)
	defer cancel()
	start := time.Now()
	err := b.opts.Auth.AuthDevice(ctx, id, password)
	b.m.authBackend.Observe(time.Since(start).Seconds())
	switch {
	case err == nil:
		return ""
	case errors.Is(err, ErrBadSecret):
		return refuseBadCredentials
	case errors.Is(err, ErrUnknownDevice):
		return refuseUnknownDevice
	case errors.Is(err, ErrDisabled):
		return refuseDisabled
	}
	b.logBackendError("mqtt device check failed", id, err)
	return refuseBackendError
}

func (b *Broker) authClaim(cl *mqtt.Client, serial, token, ip string, now time.Time) (*session, string) {
	if b.opts.Provisioner == nil {
		return nil, refuseNoProvisioning
	}
	// Only the address is limited: a wrong token is not counted against
	// the client id (see refuse), or five guesses with anyone's serial
	// would keep that locker from provisioning with its valid token.
	if b.limiter.blocked(b.limiter.addrKey(ip), now) {
		return nil, refuseRateLimited
	}
	release, ok := b.backendSlot(authQueueWait)
	if !ok {
		return nil, refuseBusy
	}
	defer release()
	ctx, cancel := context.WithTimeout(b.ctx, authTimeout)
	defer cancel()
	start := time.Now()
	usable, err := b.opts.Auth.AuthClaim(ctx, token, serial)
	b.m.authBackend.Observe(time.Since(start).Seconds())
	switch {
	case err == nil && !usable && b.sessionLive(cl.ID):
		// The connection would take the live session over (MQTT), ending
		// it, with a claim that could not provision this serial anyway:
		// an expired claim pulled from old firmware, used over and over,
		// would keep a locker that provisions with a valid one from ever
		// getting its answer.
		return nil, refuseClaimInUse
	case err == nil && b.claimSessionHeld(cl.ID, token):
		return nil, refuseClaimInUse
	case err == nil:
		return b.register(cl, kindProvision, serial, token), ""
	case errors.Is(err, ErrUnknownClaim):
		return nil, refuseUnknownClaim
	}
	b.logBackendError("mqtt claim check failed", cl.ID, err)
	return nil, refuseBackendError
}

// claimSessionHeld reports whether a live claim session for client id may
// not be taken over by a CONNECT with token: one made with another claim
// (any claim for another site's serial, or a batch's token, could otherwise
// end a provisioning locker's session, and the answer with it), or one whose
// request is being served (its answer, already committed, is that session's:
// taken over, it would be lost, and a second request with the same claim
// within 10 minutes is given the identity again). A locker retrying with
// its own claim after its connection dropped before it asked takes over as
// MQTT has it (and its old session takes no request from then on, should
// it come in before the takeover); one whose request was taken waits for
// its old session to end.
func (b *Broker) claimSessionHeld(id, token string) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, s := range b.sessions {
		// StopCause: set before the connection is closed, which the
		// locker may see, and retry upon, before Closed says so.
		if s.kind != kindProvision || s.cl.ID != id || s.done || s.cl.Closed() || s.cl.StopCause() != nil {
			continue
		}
		if subtle.ConstantTimeCompare([]byte(s.token), []byte(token)) != 1 {
			return true
		}
		// Taken over from here on: the old session takes no request
		// between this check and the takeover (its request would be
		// answered to a session about to end). One already taken keeps it.
		if !s.provStarted.CompareAndSwap(false, true) {
			return true
		}
	}
	return false
}

// sessionLive reports whether a connection holds client id's session now.
func (b *Broker) sessionLive(id string) bool {
	c, ok := b.server.Clients.Get(id)
	return ok && !c.Closed()
}

func (b *Broker) logBackendError(msg, clientID string, err error) {
	if b.ctx.Err() != nil {
		return // cancelled by Close
	}
	if ok, suppressed := b.backendLog.allow(time.Now()); ok {
		b.log.Warn(msg, "client_id", clientID, "err", err, "suppressed", suppressed)
	}
}

func (b *Broker) refuse(k kind, clientID, username, remote, reason string, now time.Time) {
	if b.ctx.Err() != nil {
		return // shutting down: not the client's fault, not worth a metric
	}
	if countsAsFailure(reason) {
		b.limiter.fail(b.limiter.addrKey(hostOf(remote)), b.limiter.ipLimit, now)
		// Only device ids are tracked: a malformed id is not worth it, and
		// a claim client id (prov-{serial}) names a serial anyone may know,
		// so wrong tokens counted against it would lock the locker with
		// that serial out of provisioning (claim tokens are 256 random
		// bits: the address limit and the bounded backend checks are
		// enough against guessing).
		if k == kindDevice {
			b.limiter.fail(idKey(clientID), b.limiter.idLimit, now)
		}
	}
	b.refused(clientID, username, remote, reason, now)
}

// refused counts and logs a refusal.
func (b *Broker) refused(clientID, username, remote, reason string, now time.Time) {
	b.m.authFailures.WithLabelValues(reason).Inc()
	if ok, suppressed := b.refusalLog.allow(now); ok {
		b.log.Warn("mqtt connect refused", "reason", reason, "client_id", logID(clientID),
			logUsername(clientID, username), "remote", remote, "suppressed", suppressed)
	}
}

// logUsername is the log attribute of a refused CONNECT's username: the
// username itself only when it is one a locker sends (its client id, or
// "claim"), else its length. A firmware that swaps the fields sends its
// secret or a claim token as the username, and neither may reach the log.
func logUsername(clientID, username string) slog.Attr {
	if username == clientID || username == protocol.ProvisionUsername {
		return slog.String("username", logID(username))
	}
	return slog.Int("username_len", len(username))
}

func idKey(clientID string) string { return "id:" + clientID }
func ipKey(ip string) string       { return "ip:" + ip }

func hostOf(remote string) string {
	if h, _, err := net.SplitHostPort(remote); err == nil {
		return h
	}
	return remote
}

// logID bounds attacker-chosen strings before they reach the log.
func logID(s string) string {
	const max = 80
	if len(s) > max {
		return s[:max] + "..."
	}
	return s
}

// authCache remembers devices whose secret the backend confirmed, as
// id -> sha256(secret), trusted for the TTL. Entries only come from successful
// checks, so its size is bounded by the fleet; the cap is a backstop.
type authCache struct {
	mu      sync.Mutex
	ttl     time.Duration
	max     int
	entries map[string]cacheEntry
	// epochs count invalidations per stripe of ids. A backend answer is only
	// cached, and a session only admitted, if no invalidation of its stripe
	// happened meanwhile: a device disabled during its own check stays out.
	epochs [64]uint64
}

type cacheEntry struct {
	sum     [sha256.Size]byte
	expires time.Time
}

func newAuthCache(ttl time.Duration) *authCache {
	return &authCache{ttl: ttl, max: 1 << 17, entries: make(map[string]cacheEntry)}
}

func (c *authCache) stripe(id string) *uint64 {
	return &c.epochs[stripeOf(id, len(c.epochs))]
}

// stripeOf is the stripe of n that device id falls in (FNV-1a of the id):
// what the auth cache's epochs and the fw/job locks are split by.
func stripeOf(id string, n int) int {
	h := uint32(2166136261)
	for i := 0; i < len(id); i++ {
		h ^= uint32(id[i])
		h *= 16777619
	}
	return int(h % uint32(n))
}

func (c *authCache) epoch(id string) uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return *c.stripe(id)
}

func (c *authCache) match(id string, sum [sha256.Size]byte, now time.Time) bool {
	fresh, _ := c.lookup(id, sum, now)
	return fresh
}

// lookup compares sum with the secret last verified for id. known: it is that
// secret; fresh: also within the TTL, so the backend need not be asked.
// Expired entries stay (until invalidated or evicted) to tell known secrets.
func (c *authCache) lookup(id string, sum [sha256.Size]byte, now time.Time) (fresh, known bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.entries[id]
	if !ok {
		return false, false
	}
	known = subtle.ConstantTimeCompare(e.sum[:], sum[:]) == 1
	return known && now.Before(e.expires), known
}

func (c *authCache) store(id string, sum [sha256.Size]byte, epoch uint64, now time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if *c.stripe(id) != epoch {
		return
	}
	if _, ok := c.entries[id]; !ok && len(c.entries) >= c.max {
		for k, e := range c.entries {
			if !now.Before(e.expires) {
				delete(c.entries, k)
			}
		}
		for k := range c.entries {
			if len(c.entries) < c.max {
				break
			}
			delete(c.entries, k)
		}
	}
	c.entries[id] = cacheEntry{sum: sum, expires: now.Add(c.ttl)}
}

func (c *authCache) invalidate(id string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.entries, id)
	*c.stripe(id)++
}

func (c *authCache) invalidateAll() {
	c.mu.Lock()
	defer c.mu.Unlock()
	clear(c.entries)
	for i := range c.epochs {
		c.epochs[i]++
	}
}

// failLimiter counts refused CONNECTs per client id and per remote address.
// Reaching the limit within window blocks the key for block: further attempts
// are refused at once (rate_limited) without asking the backend. The address
// limit is higher because many lockers may share one (carrier NAT).
//
// This host's own address, 127.0.0.1 or ::1, is not limited as an address
// (the client id limit still applies): every client of a TLS terminator or
// proxy on this host arrives from it, so thirty wrong guesses by anyone
// would refuse every new locker and claim session for a minute; and a test
// suite or an operator's tool on the gateway's host is not a remote
// guesser. The rest of 127.0.0.0/8 is limited like any address.
type failLimiter struct {
	mu      sync.Mutex
	window  time.Duration
	block   time.Duration
	idLimit int
	ipLimit int
	// limitLocalhost limits 127.0.0.1 and ::1 too (tests).
	limitLocalhost bool
	max            int
	m              map[string]*failRecord
}

type failRecord struct {
	start time.Time // of the current counting window
	n     int
	until time.Time // blocked until
}

func newFailLimiter() *failLimiter {
	return &failLimiter{window: time.Minute, block: time.Minute, idLimit: 5, ipLimit: 30,
		max: 1 << 14, m: make(map[string]*failRecord)}
}

// addrKey is ip's key in the limiter, "" for an address not limited.
func (l *failLimiter) addrKey(ip string) string {
	if !l.limitLocalhost {
		if a := net.ParseIP(ip); a != nil && (a.Equal(net.IPv4(127, 0, 0, 1)) || a.Equal(net.IPv6loopback)) {
			return ""
		}
	}
	return ipKey(ip)
}

func (l *failLimiter) blocked(key string, now time.Time) bool {
	if key == "" {
		return false
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	r := l.m[key]
	return r != nil && now.Before(r.until)
}

func (l *failLimiter) fail(key string, limit int, now time.Time) {
	if key == "" {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	r := l.m[key]
	if r == nil {
		l.makeRoom(now)
		r = &failRecord{start: now}
		l.m[key] = r
	}
	if now.Sub(r.start) > l.window {
		r.start, r.n = now, 0
	}
	r.n++
	if r.n >= limit {
		r.until = now.Add(l.block)
		r.start, r.n = now, 0
	}
}

func (l *failLimiter) reset(key string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	delete(l.m, key)
}

// makeRoom keeps the map bounded: first drop idle records, then arbitrary ones.
func (l *failLimiter) makeRoom(now time.Time) {
	if len(l.m) < l.max {
		return
	}
	for k, r := range l.m {
		if now.Sub(r.start) > l.window && !now.Before(r.until) {
			delete(l.m, k)
		}
	}
	for k := range l.m {
		if len(l.m) < l.max-l.max/8 {
			break
		}
		delete(l.m, k)
	}
}

// logLimiter is a token bucket for log lines an attacker can trigger.
type logLimiter struct {
	mu         sync.Mutex
	rate       float64 // tokens per second
	burst      float64
	tokens     float64
	last       time.Time
	suppressed atomic.Int64
}

func newLogLimiter(rate, burst float64) *logLimiter {
	return &logLimiter{rate: rate, burst: burst, tokens: burst}
}

// allow reports whether a line may be logged now, and how many were
// suppressed since the last one allowed.
func (l *logLimiter) allow(now time.Time) (bool, int64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.last.IsZero() {
		l.tokens = min(l.burst, l.tokens+now.Sub(l.last).Seconds()*l.rate)
	}
	l.last = now
	if l.tokens < 1 {
		l.suppressed.Add(1)
		return false, 0
	}
	l.tokens--
	return true, l.suppressed.Swap(0)
}
