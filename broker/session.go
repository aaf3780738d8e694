package broker

import (
	"crypto/tls"
	"errors"
	"io"
	"net"
	"os"
	"sync/atomic"
	"syscall"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/lockergate/lockergate/protocol"
)

// Reasons a session ended: Observer.DeviceDisconnected's reason and the reason
// label of lockergate_mqtt_disconnects_total. The set is closed.
const (
	ReasonClientDisconnect = "client_disconnect" // the client sent DISCONNECT
	ReasonKeepalive        = "keepalive"         // nothing received within 1.5 keep-alives
	ReasonConnectionLost   = "connection_lost"   // the connection closed or reset without DISCONNECT
	ReasonKicked           = "kicked"            // Broker.Kick
	ReasonTakeover         = "takeover"          // a new connection with the same client id replaced it
	ReasonShutdown         = "shutdown"          // the broker is closing
	ReasonPacketTooLarge   = "packet_too_large"  // a packet over MaxPacketSize
	ReasonNotAuthorized    = "not_authorized"    // ended as not authorised (a refused publish no longer ends a session: mochi patch 7)
	ReasonProtocolError    = "protocol_error"    // malformed packet or protocol violation
	ReasonError            = "error"             // anything else
	ReasonProvisioned      = "provisioned"       // claim session ended after its answer
	ReasonProvisionTimeout = "provision_timeout" // claim session outlived Options.ProvisionTimeout
	ReasonProvisionBusy    = "provision_busy"    // no provisioning capacity within the call timeout

	ReasonProvisionUnavailable = "provision_unavailable" // the provisioner could not decide (database down)
)

var disconnectReasons = []string{ReasonClientDisconnect, ReasonKeepalive, ReasonConnectionLost,
	ReasonKicked, ReasonTakeover, ReasonShutdown, ReasonPacketTooLarge, ReasonNotAuthorized,
	ReasonProtocolError, ReasonError, ReasonProvisioned, ReasonProvisionTimeout, ReasonProvisionBusy,
	ReasonProvisionUnavailable}

// session is one authenticated connection.
type session struct {
	cl     *mqtt.Client
	kind   kind
	id     string // device id, or serial for a claim session
	remote string
	token  string // claim token (claim sessions only)

	done      bool                   // guarded by Broker.mu
	endReason atomic.Pointer[string] // set when the broker ends the session itself
	timer     *time.Timer            // ProvisionTimeout (claim sessions); set before the session is shared

	superseded  atomic.Bool   // a newer session with the same client id authenticated
	born        atomic.Bool   // the device published its presence (birth) in this session
	resent      atomic.Bool   // its open commands were asked for again after a late cmd subscription
	provStarted atomic.Bool   // the one provisioning request of the session was taken
	respID      atomic.Uint32 // respPending | packet id of the answer in flight
	// answered is the device id of the session's "ok" answer, set before
	// it is published; answerDelivered takes it, so it is recorded once.
	answered atomic.Pointer[string]
}

const respPending = 1 << 16

func (b *Broker) register(cl *mqtt.Client, k kind, id, token string) *session {
	s := &session{cl: cl, kind: k, id: id, remote: cl.Net.Remote, token: token}
	b.mu.Lock()
	b.sessions[cl.Net.Conn] = s
	b.mu.Unlock()
	return s
}

func (b *Broker) unregister(s *session) {
	b.mu.Lock()
	if b.sessions[s.cl.Net.Conn] == s {
		delete(b.sessions, s.cl.Net.Conn)
	}
	b.mu.Unlock()
}

func (b *Broker) sessionByConn(c net.Conn) *session {
	if c == nil {
		return nil
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.sessions[c]
}

func (b *Broker) sessionOf(cl *mqtt.Client) *session {
	return b.sessionByConn(cl.Net.Conn)
}

// admit finishes a successful CONNECT; it runs on the client's goroutine
// before mochi takes over any existing session with the same client id.
func (b *Broker) admit(s *session) {
	cl := s.cl
	// A half-open connection with keep-alive 0 would stay "online" forever.
	if ka := cl.State.Keepalive; ka == 0 || ka > maxKeepalive {
		cl.State.Keepalive = maxKeepalive
		cl.State.ServerKeepalive = true // told to MQTT 5 clients in CONNACK
	}
	if s.kind == kindDevice {
		cl.SetMaxPacketSize(MaxPacketSize)
		// No MQTT 5 will delay: a will held back would go out after the
		// session is over, when the device may have been disabled or
		// replaced since (and then follow the new board's birth). The
		// protocol's will is "offline", true the moment the connection
		// ends. MQTT 5 has no way to tell the client; it sees its will
		// sooner than it asked for, never later.
		cl.Properties.Will.WillDelayInterval = 0
		// The device is back before its old connection was noticed dead.
		// mochi is about to end that connection, and its Last Will
		// ({"online":false}) would follow this session's birth; the fleet
		// reads the will as "offline". Same identity: the will is dropped
		// (see dropWill).
		if old, ok := b.server.Clients.Get(cl.ID); ok && old != cl {
			if os := b.sessionOf(old); os != nil {
				os.superseded.Store(true)
			}
		}
	}
	if s.kind == kindProvision {
		s.timer = time.AfterFunc(b.opts.ProvisionTimeout, func() {
			b.endSession(s, ReasonProvisionTimeout, packets.ErrMaxConnectTime)
		})
	}
	b.m.connects.WithLabelValues(s.kind.String()).Inc()
	b.m.connections.WithLabelValues(s.kind.String()).Inc()
	b.log.Debug("mqtt client authenticated", "kind", s.kind.String(), "client_id", cl.ID, "remote", s.remote)
}

// dropWill reports whether the Last Will of a closing session must not be
// published: the session was replaced by a newer one of the same identity,
// it was kicked (its device disabled or replaced: nothing more is taken
// from it, and a replaced board's "offline" would follow the new board's
// birth), or the broker is closing.
func (b *Broker) dropWill(cl *mqtt.Client) bool {
	if c := cl.StopCause(); errors.Is(c, packets.ErrSessionTakenOver) || errors.Is(c, packets.ErrAdministrativeAction) {
		return true
	}
	if b.isClosed() {
		// The broker is closing: a will would reach only its own
		// subscribers, which go away with it (the fleet manager records
		// session ends from the session events, and no retained message
		// outlives the process). At a restart with 10,000 lockers that is
		// 10,000 retained publishes through the hooks, on the downtime's
		// path.
		return true
	}
	s := b.sessionOf(cl)
	if s == nil {
		return false
	}
	if r := s.endReason.Load(); r != nil && *r == ReasonKicked {
		return true
	}
	return s.superseded.Load()
}

// established is the OnSessionEstablished hook: the CONNACK is sent and any
// previous session with the client id has been taken over.
func (b *Broker) established(cl *mqtt.Client) {
	s := b.sessionOf(cl)
	if s == nil || s.kind != kindDevice {
		return
	}
	b.presMu.Lock()
	if cur, ok := b.server.Clients.Get(s.id); !ok || cur != cl || cl.Closed() {
		b.presMu.Unlock()
		// Already replaced (or ended): a newer connection with this client id
		// got through CONNECT first, or two raced and mochi kept the other,
		// so this one would get no messages. Drop it unannounced.
		b.endSession(s, ReasonTakeover, packets.ErrSessionTakenOver)
		return
	}
	if prev := b.presence[s.id]; prev != nil && prev != s {
		// The previous session is taken over and its own end, whenever it
		// comes, is no longer reported: close it for the observer now, so
		// the calls keep alternating and nothing reports "offline" after this.
		b.notifyDisconnected(s.id, ReasonTakeover)
	}
	b.presence[s.id] = s
	if b.opts.Observer != nil {
		b.opts.Observer.DeviceConnected(s.id, s.remote)
	}
	b.presMu.Unlock()
	// A resumed session inherits its subscriptions without a SUBSCRIBE.
	for filter := range cl.State.Subscriptions.GetAll() {
		if protocol.SubscribesUplink(s.id, filter) {
			b.echoOn(s)
			break
		}
	}
}

func (b *Broker) notifyDisconnected(id, reason string) {
	if b.opts.Observer != nil {
		b.opts.Observer.DeviceDisconnected(id, reason)
	}
}

// finish records the end of a session. It runs once per session: from the
// OnDisconnect hook, or when the connection's goroutine ends without one
// (mochi skips OnDisconnect when writing the CONNACK fails).
func (b *Broker) finish(s *session, cause error) {
	b.mu.Lock()
	if s.done {
		b.mu.Unlock()
		return
	}
	s.done = true
	if b.sessions[s.cl.Net.Conn] == s {
		delete(b.sessions, s.cl.Net.Conn)
	}
	if _, had := b.echo.LoadAndDelete(s.cl); had { // under mu: echoOn checks done
		b.echoes.Add(-1)
	}
	b.mu.Unlock()
	if s.timer != nil {
		s.timer.Stop()
	}

	reason := s.reason(cause)
	b.m.connections.WithLabelValues(s.kind.String()).Dec()
	b.m.disconnects.WithLabelValues(reason).Inc()
	if reason == ReasonPacketTooLarge {
		b.m.dropped.WithLabelValues(dropTooLarge).Inc()
	}
	if s.kind == kindDevice {
		b.presMu.Lock()
		// Only the session last reported connected may report the device
		// gone; a session that was taken over was already closed out.
		if b.presence[s.id] == s {
			delete(b.presence, s.id)
			b.notifyDisconnected(s.id, reason)
		}
		b.presMu.Unlock()
		b.forgetNoJob(s.id, s.cl)
	}
	b.log.Debug("mqtt session ended", "kind", s.kind.String(), "client_id", s.cl.ID, "remote", s.remote, "reason", reason)
}

// endSession disconnects a session on the broker's initiative.
func (b *Broker) endSession(s *session, reason string, code packets.Code) {
	b.mu.Lock()
	done := s.done
	b.mu.Unlock()
	if done || s.cl.Closed() {
		return
	}
	s.endReason.CompareAndSwap(nil, &reason)
	_ = b.server.DisconnectClient(s.cl, code)
}

func (s *session) reason(cause error) string {
	if r := s.endReason.Load(); r != nil {
		return *r
	}
	if c := s.cl.StopCause(); c != nil {
		cause = c // the first reason the client was stopped for
	}
	return disconnectReason(cause)
}

// disconnectReason maps why mochi stopped a client to a bounded label.
func disconnectReason(err error) string {
	var code packets.Code
	var ne net.Error
	switch {
	case err == nil:
		return ReasonError
	case errors.Is(err, packets.CodeDisconnect), errors.Is(err, packets.CodeDisconnectWillMessage):
		return ReasonClientDisconnect
	case errors.Is(err, packets.ErrSessionTakenOver):
		return ReasonTakeover
	case errors.Is(err, packets.ErrAdministrativeAction):
		return ReasonKicked
	case errors.Is(err, packets.ErrServerShuttingDown):
		return ReasonShutdown
	case errors.Is(err, packets.ErrPacketTooLarge):
		return ReasonPacketTooLarge
	case errors.Is(err, packets.ErrNotAuthorized):
		return ReasonNotAuthorized
	case errors.Is(err, packets.ErrKeepAliveTimeout), errors.Is(err, os.ErrDeadlineExceeded),
		errors.As(err, &ne) && ne.Timeout():
		return ReasonKeepalive
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, net.ErrClosed),
		errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE), errors.Is(err, mqtt.ErrConnectionClosed):
		return ReasonConnectionLost
	case errors.As(err, &code):
		return ReasonProtocolError
	}
	return ReasonError
}

// listener wraps mochi's net listener to bound the time before CONNECT, to
// track connections for Close, and to learn when a connection's goroutine is
// over, the one moment mochi always reaches.
type listener struct {
	*listeners.Net
	b *Broker
}

func (b *Broker) addListener(id string, ln net.Listener) error {
	return b.server.AddListener(&listener{Net: listeners.NewNet(id, &acceptor{Listener: ln, b: b}), b: b})
}

// Close implements listeners.Listener. mochi's own sweep of the listener's
// clients (Clients.GetByListener) takes the clients' read lock twice, which
// deadlocks when a client leaves at the same moment (its pending write lock
// blocks the second read lock; seen under -race in the end-to-end tests).
// The sweep here takes the lock once.
func (l *listener) Close(_ listeners.CloseFn) {
	l.Net.Close(func(string) {})
	for _, cl := range l.b.server.Clients.GetAll() {
		if cl.Net.Listener == l.ID() && !cl.Closed() {
			_ = l.b.server.DisconnectClient(cl, packets.ErrServerShuttingDown)
		}
	}
}

// Serve implements listeners.Listener. Connections are served through
// mochi's ServeConnection rather than the establish function it passes (its
// EstablishConnection), so that an idle locker's reader can move to a fresh
// goroutine on a small stack (Options.ReaderRest; PATCHES.md, 13): ended
// runs on whichever goroutine ends the connection.
func (l *listener) Serve(_ listeners.EstablishFn) {
	l.Net.Serve(func(id string, c net.Conn) error {
		// Only what ServeConnection needs stays in this frame: a
		// connection's first reader parks under it until it rests, and the
		// runtime shrinks a parked stack only while less than a quarter of
		// it is in use (see third_party/mochi-mqtt-server/PATCHES.md, 3).
		if l.starting(c) {
			l.b.server.ServeConnection(id, c, l.b.opts.ReaderRest, func(err error) { l.ended(id, c, err) })
		}
		return nil
	})
}

// starting admits a new connection and bounds its wait for CONNECT.
//
//go:noinline
func (l *listener) starting(c net.Conn) bool {
	if !l.b.startServing(c) {
		closeRaw(c)
		return false
	}
	// mochi sets no deadline until CONNECT arrives; a silent connection
	// (or a stalled TLS handshake) would hold its goroutines forever.
	_ = c.SetDeadline(time.Now().Add(connectTimeout))
	return true
}

// ended ends the session of a connection whose establish returned err.
//
//go:noinline
func (l *listener) ended(id string, c net.Conn, err error) {
	defer l.b.untrackConn(c)
	if s := l.b.sessionByConn(c); s != nil {
		l.b.finish(s, err)
	}
	if err != nil {
		// Refusals and lost connections are counted and logged by the
		// hooks; mochi would log each at warn level.
		l.b.log.Debug("mqtt connection closed", "listener", id, "remote", c.RemoteAddr().String(), "err", err)
	}
}

// acceptor is the net.Listener mochi accepts from. It tracks every accepted
// connection (mochi drops, without closing, one accepted while it closes),
// and it retries failed accepts: mochi stops serving a listener for good on
// the first Accept error, which a burst of EMFILE would turn into an outage.
type acceptor struct {
	net.Listener
	b *Broker
}

// Accept implements net.Listener.
func (a *acceptor) Accept() (net.Conn, error) {
	delay := 5 * time.Millisecond
	for {
		c, err := a.Listener.Accept()
		if err == nil {
			if !a.b.trackAccepted(c) {
				closeRaw(c)
				return nil, net.ErrClosed
			}
			return c, nil
		}
		if errors.Is(err, net.ErrClosed) || a.b.ctx.Err() != nil {
			return nil, err
		}
		a.b.log.Warn("mqtt accept failed, retrying", "listener", a.Addr().String(), "err", err, "retry_in", delay)
		select {
		case <-time.After(delay):
		case <-a.b.ctx.Done():
			return nil, err
		}
		delay = min(2*delay, time.Second)
	}
}

// trackAccepted records a new connection unless the broker is closing.
func (b *Broker) trackAccepted(c net.Conn) bool {
	b.connMu.Lock()
	defer b.connMu.Unlock()
	if b.closing {
		return false
	}
	b.conns[c] = false
	return true
}

// startServing marks a connection as handled by a goroutine Close waits for.
func (b *Broker) startServing(c net.Conn) bool {
	b.connMu.Lock()
	defer b.connMu.Unlock()
	if b.closing {
		delete(b.conns, c)
		return false
	}
	b.conns[c] = true
	b.connWG.Add(1)
	return true
}

func (b *Broker) untrackConn(c net.Conn) {
	b.connMu.Lock()
	delete(b.conns, c)
	b.connMu.Unlock()
	b.connWG.Done()
}

// closeRaw closes a connection without a TLS close_notify, which could block
// on a peer that does not read.
func closeRaw(c net.Conn) {
	if tc, ok := c.(*tls.Conn); ok {
		_ = tc.NetConn().Close()
		return
	}
	_ = c.Close()
}
