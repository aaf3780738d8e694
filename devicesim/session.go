package devicesim

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strings"
	"sync"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	"github.com/eclipse/paho.mqtt.golang/packets"

	"github.com/lockergate/lockergate/protocol"
)

// session is one MQTT connection of a locker: a fresh paho client per
// connection, because paho warns that a client reused after Disconnect may
// panic, and because auto-reconnect is off (its back-off has no jitter).
type session struct {
	cl       mqtt.Client
	lost     chan struct{} // closed when paho reports the connection lost
	lostOnce sync.Once

	mu      sync.Mutex
	raw     net.Conn // the TCP connection under MQTT (and TLS), for abrupt loss
	aborted bool
	lostErr error
}

type sessionConfig struct {
	broker                   string
	tls                      *tls.Config
	clientID, user, password string
	willTopic                string // "" for no will
	will                     []byte
	keepAlive, timeout       time.Duration
	// localAddr is the source address to dial from; nil lets the system choose.
	localAddr net.Addr
	// onMessage receives every inbound message on paho's dispatch goroutine,
	// in order; it must not block.
	onMessage func(topic string, payload []byte)
}

var errConnectTimeout = errors.New("connect timed out")

// dialSession connects and returns the session once the broker accepted it.
// It never leaves a paho client behind: on failure or cancellation the
// connection is torn down before it returns.
func dialSession(ctx context.Context, cfg sessionConfig) (*session, error) {
	s := &session{lost: make(chan struct{})}
	o := mqtt.NewClientOptions().
		AddBroker(cfg.broker).
		SetClientID(cfg.clientID).
		SetUsername(cfg.user).
		SetPassword(cfg.password).
		SetProtocolVersion(4). // explicit: no silent retry with MQTT 3.1 after a refusal
		SetCleanSession(true).
		SetAutoReconnect(false).
		SetConnectRetry(false).
		SetKeepAlive(cfg.keepAlive).
		SetPingTimeout(10 * time.Second).
		SetConnectTimeout(cfg.timeout).
		SetWriteTimeout(writeTimeout).
		SetOrderMatters(true). // the handler only queues for the locker's goroutine, never blocks
		SetDefaultPublishHandler(func(_ mqtt.Client, m mqtt.Message) {
			if cfg.onMessage != nil {
				cfg.onMessage(m.Topic(), m.Payload())
			}
		}).
		SetConnectionLostHandler(func(_ mqtt.Client, err error) { s.markLost(err) }).
		SetCustomOpenConnectionFn(func(u *url.URL, _ mqtt.ClientOptions) (net.Conn, error) {
			return s.dial(ctx, u, cfg)
		})
	if cfg.willTopic != "" {
		o.SetBinaryWill(cfg.willTopic, cfg.will, 1, true)
	}
	s.cl = mqtt.NewClient(o)

	tok := s.cl.Connect()
	guard := time.NewTimer(2*cfg.timeout + time.Second) // dial and handshake each get cfg.timeout
	defer guard.Stop()
	select {
	case <-tok.Done():
	case <-ctx.Done():
		s.cancelConnect(tok, cfg.timeout)
		return nil, ctx.Err()
	case <-guard.C:
		s.cancelConnect(tok, cfg.timeout)
		return nil, errConnectTimeout
	}
	if err := tok.Error(); err != nil {
		if ct, ok := tok.(*mqtt.ConnectToken); ok && refusedForGood(ct.ReturnCode()) {
			return nil, fmt.Errorf("%w: %v", ErrConnRefused, err)
		}
		return nil, err
	}
	return s, nil
}

// refusedForGood reports CONNACK codes that retrying the same CONNECT cannot fix.
func refusedForGood(rc byte) bool {
	switch rc {
	case packets.ErrRefusedBadProtocolVersion, packets.ErrRefusedIDRejected,
		packets.ErrRefusedBadUsernameOrPassword, packets.ErrRefusedNotAuthorised:
		return true
	}
	return false
}

func (s *session) dial(ctx context.Context, u *url.URL, cfg sessionConfig) (net.Conn, error) {
	useTLS := brokerSchemes[u.Scheme]
	host := u.Host
	if u.Port() == "" {
		port := "1883"
		if useTLS {
			port = "8883"
		}
		host = net.JoinHostPort(u.Hostname(), port)
	}
	d := net.Dialer{Timeout: cfg.timeout, LocalAddr: cfg.localAddr}
	raw, err := d.DialContext(ctx, "tcp", host)
	if err != nil {
		return nil, err
	}
	conn := raw
	if useTLS {
		tc := cfg.tls.Clone()
		if tc == nil {
			tc = &tls.Config{}
		}
		if tc.ServerName == "" {
			tc.ServerName = u.Hostname()
		}
		tconn := tls.Client(raw, tc)
		hctx, cancel := context.WithTimeout(ctx, cfg.timeout)
		err := tconn.HandshakeContext(hctx)
		cancel()
		if err != nil {
			_ = raw.Close()
			return nil, err
		}
		conn = tconn
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.aborted {
		_ = raw.Close()
		return nil, errors.New("connect aborted")
	}
	s.raw = raw
	return conn, nil
}

// cancelConnect aborts a pending Connect and waits (bounded) for paho to give
// up, so no client outlives the attempt.
func (s *session) cancelConnect(tok mqtt.Token, timeout time.Duration) {
	s.abort()
	t := time.NewTimer(timeout + time.Second)
	defer t.Stop()
	select {
	case <-tok.Done():
		if tok.Error() == nil {
			s.cl.Disconnect(0)
		}
	case <-t.C:
	}
	s.mu.Lock()
	if s.raw != nil {
		_ = s.raw.Close()
	}
	s.mu.Unlock()
}

// abort simulates network loss: the TCP connection is shut down without an
// MQTT DISCONNECT, so the broker publishes the Last Will. Shutdown rather than
// Close, because paho ignores read errors on a connection closed under it and
// would never report the loss; after a shutdown both ends read EOF and paho
// tears the client down through its ordinary connection-lost path.
func (s *session) abort() {
	s.mu.Lock()
	s.aborted = true
	raw := s.raw
	s.mu.Unlock()
	if raw == nil {
		return
	}
	if tc, ok := raw.(*net.TCPConn); ok {
		_ = tc.CloseWrite()
		_ = tc.CloseRead()
		return
	}
	_ = raw.Close()
}

// closeClean sends DISCONNECT (the broker drops the will) and stops paho.
func (s *session) closeClean() {
	s.cl.Disconnect(quiesceMillis)
}

// leave ends the session of locker id cleanly, as a locker going away on
// purpose does (a stop, a reboot): it first publishes {"online":false}
// itself, retained, with its ts (the broker drops the will at a clean
// DISCONNECT, and a gateway behind a broker that reports no session ends
// learns of the end only so: docs/protocol.md); then DISCONNECT.
func (s *session) leave(id string) {
	bye := protocol.Encode(protocol.Presence{Online: false, TS: protocol.T(time.Now())})
	tok := s.cl.Publish(protocol.Topic(id, protocol.ChanPresence), 1, true, bye)
	tok.WaitTimeout(time.Second) // best effort: the session is ending
	s.closeClean()
}

func (s *session) markLost(err error) {
	s.lostOnce.Do(func() {
		s.mu.Lock()
		s.lostErr = err
		s.mu.Unlock()
		close(s.lost)
	})
}

// dead reports whether err, the failure of a publish on s, came from the
// connection going away rather than from the broker.
func (s *session) dead(err error) bool {
	select {
	case <-s.lost:
		return true
	default:
	}
	s.mu.Lock()
	aborted := s.aborted
	s.mu.Unlock()
	return aborted || errors.Is(err, mqtt.ErrNotConnected) || strings.Contains(err.Error(), "connection lost")
}

func (s *session) lostReason() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lostErr
}

// waitToken waits for a paho token, bounded by d and ctx; never call it on
// paho's dispatch goroutine.
func waitToken(ctx context.Context, t mqtt.Token, d time.Duration) error {
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-t.Done():
		return t.Error()
	case <-timer.C:
		return fmt.Errorf("no answer from broker within %v", d)
	case <-ctx.Done():
		return ctx.Err()
	}
}

// subscribe subscribes QoS 1 to filters and checks every grant.
func (s *session) subscribe(ctx context.Context, filters ...string) error {
	m := make(map[string]byte, len(filters))
	for _, f := range filters {
		m[f] = 1
	}
	tok := s.cl.SubscribeMultiple(m, nil)
	if err := waitToken(ctx, tok, subackTimeout); err != nil {
		return fmt.Errorf("subscribe: %w", err)
	}
	st, ok := tok.(*mqtt.SubscribeToken)
	if !ok {
		return nil
	}
	for f, code := range st.Result() {
		if code >= 0x80 {
			return fmt.Errorf("subscribe %s: refused by broker (0x%02x)", f, code)
		}
	}
	return nil
}

// localAddr is the source address of the locker's connections
// (Options.SourceAddrs, by index round robin), nil for the system's choice.
func (l *Locker) localAddr() net.Addr {
	a := l.f.opts.SourceAddrs
	if len(a) == 0 {
		return nil
	}
	return &net.TCPAddr{IP: net.ParseIP(a[l.index%len(a)])}
}
