// Package broker embeds the MQTT broker (mochi-mqtt) that lockers connect to.
// It owns the listeners (TCP, TLS), authenticates devices and claim sessions,
// enforces the topic access rules of protocol v1, reports device presence,
// answers provisioning requests and exports metrics. In process it is the
// fleet manager's fleet.Bus.
//
// Every hook runs on a client's goroutine and receives no context, so the
// publish path (ACL, OnPublish) never touches the database: identities are
// established once, at CONNECT, and the ACL is a pure function of the
// session's identity and the topic (protocol.DeviceMayPublish and friends).
package broker

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/protocol"
)

// Options configures a Broker. Zero values take the documented defaults.
type Options struct {
	TCPAddr   string      // plain MQTT listener, e.g. ":1883" or "127.0.0.1:0"; "" disables it
	TLSAddr   string      // MQTT over TLS listener, e.g. ":8883"; "" disables it
	TLSConfig *tls.Config // required when TLSAddr or TLSListener is set
	// TCPListener and TLSListener are sockets already listening (systemd
	// socket activation), served in place of TCPAddr and TLSAddr. The
	// Broker owns them from New on: it closes them, also when New fails.
	TCPListener, TLSListener net.Listener

	Auth        Authenticator // required
	Provisioner Provisioner   // nil: claim sessions are refused
	Observer    Observer      // may be nil
	Logger      *slog.Logger  // nil: slog.Default()
	Registerer  prometheus.Registerer
	// ProvisionOnly refuses lockers with an identity (as unknown_device):
	// they connect to an external broker, whose auth hook asks
	// CheckExternal; this broker serves claim sessions only.
	ProvisionOnly bool
	// KicksHeard reports whether Invalidate calls from other gateway
	// instances are reaching this broker now; when false, the auth hook
	// does not admit a secret it cannot confirm (CheckExternal). nil: one
	// instance, nothing to hear.
	KicksHeard func() bool

	MaxClientWritesPending int           // outbound queue per client; default 64
	MaxSessionExpiry       time.Duration // longest a disconnected persistent session is kept; default 1h
	ProvisionTimeout       time.Duration // a claim session is disconnected after this; default 30s
	AuthCacheTTL           time.Duration // how long a positive device check is trusted; default 5m
	// ReaderRest: a connection's reader that has handled a packet and then
	// waited this long for the next one moves to a new goroutine, freeing
	// the stack that handling packets grew (to 16 KiB for a PUBLISH; the
	// runtime would give it back one halving per collection). Default 2s:
	// a keep-alive's PINGREQ every 45 s or a health report every minute
	// then leaves its reader on a grown stack for 2 s of every 45–60, not
	// 5 (docs/benchmarks.md, 5 December: 18.7 KiB per settled idle locker
	// instead of 22.7); a rest per gap shorter than that would cost CPU on
	// lockers that send every second. Negative: never.
	ReaderRest time.Duration
	// AckWhenStored: a locker's QoS 1 message on events, cmd/result,
	// creds/ack or fw/status gets its PUBACK only when the Subscribe
	// handler it went to calls Message.Ack, as fleet.Manager does once the
	// message is stored (or judged invalid for good). A PUBACK then never
	// stands for a message a crash could still lose: until it comes, the
	// locker keeps the message and sends it again on its next connection.
	// Health, retained messages (presence), QoS 2, every message more than
	// one Subscribe handler takes and every message of a device subscribed
	// to one of its own device-to-gateway topics (echo, which goes through
	// mochi's routing) are acknowledged as they are received, and so is
	// everything when this is false (a handler need not call Ack).
	AckWhenStored bool
}

// Defaults and fixed limits.
const (
	DefaultMaxClientWritesPending = 64 // a locker gets a handful of messages at a time
	// NetBufferSize is mochi's per-client read buffer and write batch size:
	// device messages are a few hundred bytes, and every byte here is paid
	// once per connected locker.
	NetBufferSize           = 1024
	DefaultMaxSessionExpiry = time.Hour
	DefaultProvisionTimeout = 30 * time.Second
	DefaultAuthCacheTTL     = 5 * time.Minute
	DefaultReaderRest       = 2 * time.Second

	// MaxPacketSize is the largest MQTT packet a device session may send.
	// Payloads are at most 16 KiB (protocol.MaxPayload); one over that but
	// within this limit is acknowledged, counted and dropped, and the
	// session goes on (a locker whose firmware sends one report too large
	// keeps its others). A packet over it ends the connection: mochi refuses
	// it while reading, before it is buffered.
	MaxPacketSize = 256 << 10
	// MaxPacketSizeUnauthenticated bounds every packet until the CONNECT is
	// admitted, and a claim session's: a full payload plus 1 KiB for the
	// fixed header, topic and properties. mochi allocates a packet's buffer
	// from its fixed header, before the packet is checked, so a connection
	// that has not authenticated can make it allocate no more than this
	// (mochi patch 17 raises the limit of a device session once admitted).
	MaxPacketSizeUnauthenticated = protocol.MaxPayload + 1024

	authTimeout          = 5 * time.Second  // one backend credential check
	provisionCallTimeout = 10 * time.Second // one Provisioner.Provision call, queueing included
	provisionLinger      = 2 * time.Second  // how long a claim session may stay after its answer
	provisionConcurrency = 32               // Provision calls in flight
	authConcurrency      = 16               // backend credential checks in flight (half the database pool)
	authQueueWait        = time.Second      // wait for a free check before answering "busy"
	connectTimeout       = 10 * time.Second // to finish TLS and send CONNECT after accepting
	maxKeepalive         = 300              // seconds; larger or zero keep-alives are lowered to this
	maxInflight          = 1024             // QoS>0 messages held per client session
	sysTopicInterval     = 60               // seconds; nobody may read $SYS, keep it cheap
	closeGrace           = 2 * time.Second  // Close force-closes connections still open after this
)

// ErrClosed is returned by operations on a closed Broker. It is a
// fleet.ErrBusGone: the fleet manager does not retry what it publishes
// after the broker closed.
var ErrClosed = fmt.Errorf("broker closed (%w)", fleet.ErrBusGone)

// Broker is the embedded MQTT broker.
type Broker struct {
	opts   Options
	log    *slog.Logger
	server *mqtt.Server
	m      *metrics

	tcpLn, tlsLn net.Listener

	ctx    context.Context // cancelled by Close: ends backend and provisioning calls
	cancel context.CancelFunc

	cache   *authCache
	limiter *failLimiter
	// Rate limits for log lines clients can trigger.
	refusalLog, denyLog, dropLog, backendLog *logLimiter

	mu       sync.Mutex
	sessions map[net.Conn]*session // authenticated connections

	presMu   sync.Mutex          // orders Observer calls
	presence map[string]*session // device id -> the session last reported connected

	connMu  sync.Mutex
	conns   map[net.Conn]bool // accepted connections; true once a goroutine serves it
	closing bool
	connWG  sync.WaitGroup // goroutines serving connections

	provSem         chan struct{}
	provCallTimeout time.Duration // provisionCallTimeout (tests shorten it)
	authSem         chan struct{} // bounds backend credential checks (a connect storm)
	provWG          sync.WaitGroup

	// fwJobMu orders the publishes of a device's fw/job (striped by device
	// id) with the "no job" sent to a new subscriber of it (fwJobNone);
	// noJobOut[i], under fwJobMu[i], holds for a device id the client that
	// was its session when the gateway last published "none" (an empty
	// fw/job). No other lock is taken under fwJobMu: the fleet manager
	// publishes under it from the goroutine that the broker's presence
	// calls (under presMu) may wait for.
	fwJobMu  [64]sync.Mutex
	noJobOut [64]map[string]*mqtt.Client

	subID atomic.Int64
	subMu sync.Mutex                  // serialises Subscribe's updates of subs
	subs  atomic.Pointer[[]inlineSub] // every Subscribe, for direct delivery (deliverUplink)
	// echo holds the device sessions (*mqtt.Client) subscribed to one of
	// their own device-to-gateway topics, whose messages then go through
	// mochi, which delivers them back; echoes counts them, so the common
	// case costs deliverUplink one atomic load.
	echo   sync.Map
	echoes atomic.Int64
	// answering maps a serial to the claim session whose provisioning
	// answer is being published: only that session's client may receive
	// it (aclCheck), not a newer CONNECT with the same client id.
	answering sync.Map
	// delivering maps a serial to a channel closed once the Provisioner has
	// recorded that its last answer was delivered (answerDelivered): a
	// second request for the serial waits for that record, or it could be
	// taken for the retry of a lost answer.
	delivering sync.Map
	awaiting   atomic.Int32 // requests waiting in awaitDelivered (tests watch it)

	life      sync.Mutex
	started   bool
	closed    bool
	closeOnce sync.Once
}

var _ fleet.Bus = (*Broker)(nil)

// New validates opts, builds the mochi server with its hooks and binds the
// listeners, so address errors surface here rather than in Start.
func New(opts Options) (_ *Broker, err error) {
	defer func() {
		if err != nil {
			for _, ln := range []net.Listener{opts.TCPListener, opts.TLSListener} {
				if ln != nil {
					_ = ln.Close()
				}
			}
		}
	}()
	if opts.Auth == nil {
		return nil, errors.New("broker: Options.Auth is required")
	}
	if (opts.TLSAddr != "" || opts.TLSListener != nil) && opts.TLSConfig == nil {
		return nil, errors.New("broker: Options.TLSConfig is required with TLSAddr or TLSListener")
	}
	if opts.MaxClientWritesPending <= 0 {
		opts.MaxClientWritesPending = DefaultMaxClientWritesPending
	}
	if opts.MaxClientWritesPending > math.MaxInt32 {
		return nil, fmt.Errorf("broker: MaxClientWritesPending %d too large", opts.MaxClientWritesPending)
	}
	if opts.MaxSessionExpiry <= 0 {
		opts.MaxSessionExpiry = DefaultMaxSessionExpiry
	}
	if opts.ProvisionTimeout <= 0 {
		opts.ProvisionTimeout = DefaultProvisionTimeout
	}
	if opts.AuthCacheTTL <= 0 {
		opts.AuthCacheTTL = DefaultAuthCacheTTL
	}
	if opts.ReaderRest == 0 {
		opts.ReaderRest = DefaultReaderRest
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	reg := opts.Registerer
	if reg == nil {
		reg = prometheus.NewRegistry()
	}
	// The reader-rest counter reads the mochi server, made below; a scrape
	// of a registry already served may come before it is.
	var server atomic.Pointer[mqtt.Server]
	m, err := newMetrics(reg, func() float64 {
		if s := server.Load(); s != nil {
			return float64(s.ReadersRested())
		}
		return 0
	})
	if err != nil {
		return nil, fmt.Errorf("broker: register metrics: %w", err)
	}

	ctx, cancel := context.WithCancel(context.Background())
	b := &Broker{
		opts:       opts,
		log:        opts.Logger.With("component", "broker"),
		m:          m,
		ctx:        ctx,
		cancel:     cancel,
		cache:      newAuthCache(opts.AuthCacheTTL),
		limiter:    newFailLimiter(),
		refusalLog: newLogLimiter(5, 20),
		denyLog:    newLogLimiter(1, 5),
		dropLog:    newLogLimiter(1, 5),
		backendLog: newLogLimiter(1, 5),
		sessions:   make(map[net.Conn]*session),
		presence:   make(map[string]*session),
		conns:      make(map[net.Conn]bool),
		provSem:    make(chan struct{}, provisionConcurrency),
		authSem:    make(chan struct{}, authConcurrency),

		provCallTimeout: provisionCallTimeout,
	}

	caps := mqtt.NewDefaultServerCapabilities()
	caps.MaximumPacketSize = MaxPacketSizeUnauthenticated
	caps.MaximumClientWritesPending = int32(opts.MaxClientWritesPending)
	caps.MaximumSessionExpiryInterval = uint32(min(opts.MaxSessionExpiry/time.Second, math.MaxUint32))
	caps.MaximumInflight = maxInflight
	// Retained creds, config and fw/job must outlive a day without traffic;
	// mochi otherwise force-expires retained and in-flight messages after
	// 24 h. In-flight messages of offline sessions still go with the session.
	caps.MaximumMessageExpiryInterval = 0
	// Inbound topic aliases are not advertised (CONNACK carries none), and an
	// alias-only PUBLISH would reach the ACL with an empty topic anyway.
	caps.TopicAliasMaximum = 0

	b.server = mqtt.New(&mqtt.Options{
		InlineClient:             true,
		Capabilities:             caps,
		ClientNetReadBufferSize:  NetBufferSize,
		ClientNetWriteBufferSize: NetBufferSize,
		SysTopicResendInterval:   sysTopicInterval,
		Logger:                   slog.New(newMochiHandler(opts.Logger.Handler())).With("component", "mochi"),
	})
	server.Store(b.server)
	fail := func(err error) (*Broker, error) {
		cancel()
		_ = b.server.Close() // closes the listeners added so far
		for _, ln := range []net.Listener{b.tcpLn, b.tlsLn} {
			if ln != nil {
				_ = ln.Close()
			}
		}
		m.unregister(reg) // so the caller may try again with the same registry
		return nil, err
	}
	if err := b.server.AddHook(&hook{b: b}, nil); err != nil {
		return fail(fmt.Errorf("broker: add hook: %w", err))
	}
	if opts.TCPListener != nil || opts.TCPAddr != "" {
		ln := opts.TCPListener
		if ln == nil {
			if ln, err = net.Listen("tcp", opts.TCPAddr); err != nil {
				return fail(fmt.Errorf("broker: listen tcp %s: %w", opts.TCPAddr, err))
			}
		}
		b.tcpLn = ln
		if err := b.addListener("tcp", ln); err != nil {
			return fail(fmt.Errorf("broker: add tcp listener: %w", err))
		}
	}
	if opts.TLSListener != nil || opts.TLSAddr != "" {
		ln := opts.TLSListener
		if ln == nil {
			if ln, err = net.Listen("tcp", opts.TLSAddr); err != nil {
				return fail(fmt.Errorf("broker: listen tls %s: %w", opts.TLSAddr, err))
			}
		}
		b.tlsLn = ln
		if err := b.addListener("tls", tls.NewListener(ln, opts.TLSConfig.Clone())); err != nil {
			return fail(fmt.Errorf("broker: add tls listener: %w", err))
		}
	}
	return b, nil
}

// Start serves the listeners in the background.
func (b *Broker) Start() error {
	b.life.Lock()
	defer b.life.Unlock()
	switch {
	case b.closed:
		return ErrClosed
	case b.started:
		return errors.New("broker: already started")
	}
	b.started = true
	if err := b.server.Serve(); err != nil {
		return fmt.Errorf("broker: serve: %w", err)
	}
	b.log.Info("mqtt broker serving", "tcp", addrString(b.TCPAddr()), "tls", addrString(b.TLSAddr()))
	return nil
}

// TCPAddr is the bound address of the plain listener, nil if disabled.
func (b *Broker) TCPAddr() net.Addr {
	if b.tcpLn == nil {
		return nil
	}
	return b.tcpLn.Addr()
}

// TLSAddr is the bound address of the TLS listener, nil if disabled.
func (b *Broker) TLSAddr() net.Addr {
	if b.tlsLn == nil {
		return nil
	}
	return b.tlsLn.Addr()
}

// Close stops the listeners, disconnects every client and waits for their
// goroutines and pending provisioning calls. It is idempotent.
func (b *Broker) Close() error {
	b.closeOnce.Do(func() {
		b.life.Lock()
		b.closed = true
		b.life.Unlock()

		b.cancel() // backend checks and Provision calls return now

		b.connMu.Lock()
		b.closing = true
		var pending []net.Conn
		for c := range b.conns {
			if b.sessionByConn(c) == nil {
				pending = append(pending, c) // not past CONNECT: mochi does not know them
			}
		}
		b.connMu.Unlock()
		for _, c := range pending {
			closeRaw(c)
		}

		// mochi disconnects its clients politely and waits for them; a
		// client that stops reading could hold a write until its deadline.
		stop := make(chan struct{})
		watchdogDone := make(chan struct{})
		go func() {
			defer close(watchdogDone)
			select {
			case <-stop:
			case <-time.After(closeGrace):
				b.closeAllConns()
			}
		}()
		_ = b.server.Close()
		close(stop)
		<-watchdogDone

		b.connWG.Wait()
		b.provWG.Wait()
		b.log.Info("mqtt broker stopped")
	})
	return nil
}

func (b *Broker) closeAllConns() {
	b.connMu.Lock()
	defer b.connMu.Unlock()
	for c := range b.conns {
		closeRaw(c)
	}
}

func (b *Broker) isClosed() bool {
	b.life.Lock()
	defer b.life.Unlock()
	return b.closed
}

// Publish sends a message from the gateway (the inline client) to the
// subscribers of topic. It does not wait for delivery.
func (b *Broker) Publish(ctx context.Context, topic string, payload []byte, qos byte, retain bool) error {
	if err := b.mayPublish(ctx, topic, payload, qos); err != nil {
		return err
	}
	if id, ch, ok := protocol.ParseTopic(topic); ok && ch == protocol.ChanFwJob {
		i := stripeOf(id, len(b.fwJobMu))
		b.fwJobMu[i].Lock()
		defer b.fwJobMu[i].Unlock()
		out := b.noJobOut[i]
		if cl, ok := b.server.Clients.Get(id); ok && len(payload) == 0 {
			if out == nil {
				out = make(map[string]*mqtt.Client)
				b.noJobOut[i] = out
			}
			out[id] = cl
		} else {
			delete(out, id)
		}
	}
	if err := b.server.Publish(topic, payload, retain, qos); err != nil {
		return fmt.Errorf("publish %s: %w", topic, err)
	}
	return nil
}

// PublishExpiring is Publish, not retained, of a message that must not be
// delivered after expiresAt (a command: protocol v1's expires_at). It
// carries a Message Expiry Interval: a session kept for a locker (clean
// session off, or an MQTT 5 session expiry) that holds it, queued or sent
// and unacknowledged, drops it once it expired instead of sending it again
// when the locker reconnects; an MQTT 5 locker is sent the interval left.
// A message already expired is not published (nil).
func (b *Broker) PublishExpiring(ctx context.Context, topic string, payload []byte, qos byte, expiresAt time.Time) error {
	if err := b.mayPublish(ctx, topic, payload, qos); err != nil {
		return err
	}
	left := time.Until(expiresAt)
	if left <= 0 {
		return nil
	}
	// Whole seconds, rounded up: the broker expires by the second.
	secs := min((left+time.Second-1)/time.Second, math.MaxUint32)
	if err := b.server.PublishExpiring(topic, payload, qos, uint32(secs)); err != nil {
		return fmt.Errorf("publish %s: %w", topic, err)
	}
	return nil
}

// mayPublish checks a gateway publish: its context, the broker open, the
// payload's size, the QoS and the topic.
func (b *Broker) mayPublish(ctx context.Context, topic string, payload []byte, qos byte) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if b.isClosed() {
		return ErrClosed
	}
	if len(payload) > protocol.MaxPayload {
		return fmt.Errorf("publish %s: %w: %d bytes", topic, protocol.ErrTooLarge, len(payload))
	}
	if qos > 2 {
		return fmt.Errorf("publish %s: qos %d: want 0, 1 or 2", topic, qos)
	}
	if topic == "" || !mqtt.IsValidFilter(topic, true) {
		return fmt.Errorf("publish %q: invalid topic name", topic)
	}
	return nil
}

// noJobSent reports whether the gateway has published "none" on device
// id's fw/job in its session cl. The SUBSCRIBE hook asks before it hands
// the rest to fwJobNone: only a "none" published before the subscription
// was in place went unheard (one published after it reached the device),
// and a goroutine started for every fw/job subscription (10,000 in a
// reconnect storm) could run late enough to find a "none" published after
// its SUBSCRIBE, and send a second. One published in the moment between
// mochi's adding the subscription and this hook is heard twice, which a
// device takes as what it is: no job, again.
func (b *Broker) noJobSent(cl *mqtt.Client, id string) bool {
	i := stripeOf(id, len(b.fwJobMu))
	b.fwJobMu[i].Lock()
	defer b.fwJobMu[i].Unlock()
	return b.noJobOut[i][id] == cl
}

// forgetNoJob drops device id's "none" mark when it names session cl,
// which has ended: the mark would otherwise keep the ended client (its
// state and buffers) for as long as the locker stays away, for good for
// one taken out of service.
func (b *Broker) forgetNoJob(id string, cl *mqtt.Client) {
	i := stripeOf(id, len(b.fwJobMu))
	b.fwJobMu[i].Lock()
	defer b.fwJobMu[i].Unlock()
	if b.noJobOut[i][id] == cl {
		delete(b.noJobOut[i], id)
	}
}

// fwJobNone tells device id's session cl, which subscribed to its fw/job
// topic, that it has no job, when the broker holds none for it and the
// gateway has already published "none" in this session (noJobOut). "None"
// is an empty retained payload (protocol), which a broker does not keep, so
// a device that subscribes after the gateway published it (its connect's
// state went out before its SUBSCRIBE was read) would otherwise hear
// nothing; one that subscribed before hears the gateway's own. Under the
// topic's lock, a job published meanwhile is either retained before the
// look (nothing is sent) or published after the empty message (the device
// hears none, then the job).
func (b *Broker) fwJobNone(cl *mqtt.Client, id string) {
	topic := protocol.Topic(id, protocol.ChanFwJob)
	i := stripeOf(id, len(b.fwJobMu))
	b.fwJobMu[i].Lock()
	defer b.fwJobMu[i].Unlock()
	if b.noJobOut[i][id] != cl || cl.Closed() || b.isClosed() || len(b.server.Topics.Messages(topic)) > 0 {
		return
	}
	// To this session alone (mochi patch 20): the gateway's own
	// subscriptions hear only what it publishes. At QoS 0: never above
	// the QoS the device subscribed at, and never kept in its inflight
	// messages (resent after a resume, it could come after a job); lost
	// with the connection, it is sent again at the next SUBSCRIBE.
	if err := b.server.PublishToClient(cl, topic, nil, 0); err != nil {
		b.log.Debug("no-job message not sent to a new fw/job subscriber", "locker", id, "err", err)
	}
}

// Subscribe delivers every message matching filter to h, including the
// retained ones at the time of the call.
//
// h is called synchronously on the publishing client's goroutine (mochi
// delivers inline subscriptions while processing the PUBLISH, and a device's
// own messages are delivered before their PUBACK, see deliverUplink), so a
// slow h stalls that client's reads: h must hand the message off to a queue
// and return. Message.ClientID is the publisher's MQTT client id ("inline" for
// the gateway's own publishes; device ids can never be "inline"), and
// Message.Payload is a copy h may keep.
func (b *Broker) Subscribe(filter string, h fleet.Handler) error {
	if h == nil {
		return errors.New("subscribe: nil handler")
	}
	if b.isClosed() {
		return ErrClosed
	}
	if !mqtt.IsValidFilter(filter, false) {
		return fmt.Errorf("subscribe %q: invalid topic filter", filter)
	}
	b.subMu.Lock()
	defer b.subMu.Unlock()
	// Direct delivery first: a message published while mochi indexes the
	// filter reaches h one way or the other.
	prev := b.subs.Load()
	var subs []inlineSub
	if prev != nil {
		subs = slices.Clone(*prev)
	}
	subs = append(subs, inlineSub{filter: filter, h: h})
	b.subs.Store(&subs)
	id := int(b.subID.Add(1))
	err := b.server.Subscribe(filter, id, func(_ *mqtt.Client, _ packets.Subscription, pk packets.Packet) {
		h(fleet.Message{
			Topic:    pk.TopicName,
			Payload:  bytes.Clone(pk.Payload),
			QoS:      pk.FixedHeader.Qos,
			Retain:   pk.FixedHeader.Retain,
			ClientID: pk.Origin,
		})
	})
	if err != nil {
		b.subs.Store(prev)
		return fmt.Errorf("subscribe %q: %w", filter, err)
	}
	return nil
}

// inlineSub is one Subscribe.
type inlineSub struct {
	filter string
	h      fleet.Handler
}

// deliverUplink hands a device's message on one of its own device-to-gateway
// topics to the matching Subscribe handlers, and reports whether it did;
// then mochi need not route it. It is what mochi would do: only the device
// itself may subscribe to such a topic (protocol.DeviceMaySubscribe), and
// one that has is left to mochi (echo), so otherwise the gateway's inline
// subscriptions are its only subscribers. Skipping mochi's
// topic tree, which allocates four maps per message, and the payload copy
// saved a tenth of the gateway's CPU in health ingest (docs/benchmarks.md).
//
// Retained messages (presence) and QoS 2 take mochi's path, which stores or
// acknowledges them. A filter starting with $ ($SYS, $share) matches no
// device topic here (protocol.TopicMatches) nor in mochi, which files an
// inline subscription under a literal $ level.
//
// ackLater reports that the message went to one handler with an Ack that
// sends its PUBACK (Options.AckWhenStored); mochi must not send one.
func (b *Broker) deliverUplink(cl *mqtt.Client, pk *packets.Packet) (delivered, ackLater bool) {
	if pk.FixedHeader.Retain || pk.FixedHeader.Qos > 1 {
		return false, false
	}
	if k, _ := identify(cl); k != kindDevice {
		return false, false
	}
	if b.echoes.Load() > 0 {
		if _, ok := b.echo.Load(cl); ok {
			return false, false
		}
	}
	p := b.subs.Load()
	if p == nil {
		return false, false
	}
	// The payload is the packet's own buffer, read for this packet alone
	// (mochi's Client.ReadPacket), and nothing in mochi keeps it once the
	// packet is ignored: the handlers may keep it without a copy.
	msg := fleet.Message{
		Topic:    pk.TopicName,
		Payload:  pk.Payload,
		QoS:      pk.FixedHeader.Qos,
		ClientID: cl.ID,
	}
	if pk.FixedHeader.Qos == 1 && b.opts.AckWhenStored && !strings.HasSuffix(pk.TopicName, healthSuffix) {
		if h := onlyHandler(*p, pk.TopicName); h != nil {
			// Once only: after the PUBACK the locker may use the id
			// for a new message, which a second call would acknowledge.
			id, acked := pk.PacketID, new(atomic.Bool)
			cl.HoldAck(id) // before the hand-off: the Ack may come first
			msg.Ack = func() {
				if acked.CompareAndSwap(false, true) {
					// Queued for the locker's own writer: one locker that
					// reads nothing holds up no fleet writer. On a
					// connection closed meanwhile (the only error) nothing
					// is sent: the locker sends the message again on its
					// next, and the fleet takes a repeat once (events by
					// id; results, acks and firmware status by what they
					// name).
					_ = b.server.AckPublish(cl, id)
				}
			}
			h(msg)
			return true, true
		}
	}
	for _, s := range *p {
		if protocol.TopicMatches(s.filter, pk.TopicName) {
			s.h(msg)
		}
	}
	return true, false
}

// onlyHandler returns the handler of the one subscription in subs that
// matches topic, nil when none or several do.
func onlyHandler(subs []inlineSub, topic string) fleet.Handler {
	var h fleet.Handler
	for _, s := range subs {
		if protocol.TopicMatches(s.filter, topic) {
			if h != nil {
				return nil
			}
			h = s.h
		}
	}
	return h
}

// healthSuffix ends a locker's health topic: health is acknowledged as it
// is received, whatever Options.AckWhenStored says. It comes every minute
// and the next one stands for it; a report lost in a crash shows as a gap in
// seq, and holding thousands of PUBACKs a second for their batches' commits
// would cost the ingest path.
const healthSuffix = "/" + string(protocol.ChanHealth)

// Kick disconnects every live session with client id id, discards the
// session mochi keeps for it (a client that connected with a clean session
// off), and forgets its cached credentials, so the next CONNECT is checked
// against Auth and starts clean: a locker disabled or replaced gets none of
// the messages queued for it before (an unlock the disable withdrew). Use
// it when a device is disabled or replaced. A kicked session's Last Will is
// not published (dropWill).
func (b *Broker) Kick(id string) {
	b.Invalidate(id)
	// Sessions are matched in our own table, not only mochi's client map, so a
	// connection that passed authentication but is not yet registered with
	// mochi is caught too (see authenticate for the other half of that race).
	b.mu.Lock()
	var victims []*session
	for _, s := range b.sessions {
		if s.cl.ID == id {
			victims = append(victims, s)
		}
	}
	b.mu.Unlock()
	discarded := 0
	for _, s := range victims {
		b.endSession(s, ReasonKicked, packets.ErrAdministrativeAction)
		if b.server.DiscardSession(s.cl) {
			discarded++
		}
	}
	// A session kept while its client is away is no live session of ours.
	if cl, ok := b.server.Clients.Get(id); ok && cl.StopTime() != 0 && b.server.DiscardSession(cl) {
		discarded++
	}
	if len(victims) > 0 || discarded > 0 {
		b.log.Info("mqtt client kicked", "client_id", id, "sessions", len(victims), "kept_sessions_discarded", discarded)
	}
}

// Invalidate forgets the cached credentials of device id.
func (b *Broker) Invalidate(id string) {
	b.cache.invalidate(id)
}

// InvalidateAll forgets every cached credential (when kicks may have been
// missed).
func (b *Broker) InvalidateAll() {
	b.cache.invalidateAll()
}

// ConnectedDevices is the number of devices with a live session (each
// reported to the Observer as connected and not yet as disconnected).
func (b *Broker) ConnectedDevices() int {
	b.presMu.Lock()
	defer b.presMu.Unlock()
	return len(b.presence)
}

func addrString(a net.Addr) string {
	if a == nil {
		return ""
	}
	return a.String()
}
