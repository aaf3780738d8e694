// Package mqttbus is the fleet Bus over an external MQTT broker cluster
// (EMQX, HiveMQ, VerneMQ, mosquitto) through paho: device topics are
// consumed through shared subscriptions so several gateway instances split
// the load, and any instance publishes commands and retained state.
//
// Delivery is at least once: a QoS 1 message is acknowledged to the broker
// only when the fleet manager calls fleet.Message.Ack (its effect is
// stored), never on receipt. With Options.Persistent the broker keeps what
// an instance had not acknowledged, and what it queued for the instance
// meanwhile, in the instance's session, and delivers it again when the
// instance connects with the same client id (docs/deployment.md).
package mqttbus

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/protocol"
)

// Options configure a Bus.
type Options struct {
	// URL of the broker: mqtt://host:port or mqtts://host:port.
	URL string
	// ClientID must be unique per gateway instance.
	ClientID string
	Username string
	Password string
	TLS      *tls.Config
	// Group names the shared subscription group (default "lockergate"):
	// instances in one group split device messages between them.
	Group string
	// Persistent keeps this instance's session on the broker while it is
	// disconnected (MQTT clean session off): QoS 1 messages it received but
	// had not acknowledged, and those the broker queues for it meanwhile,
	// are delivered when a client with the same ClientID connects again.
	// Only for a ClientID that is stable across restarts: a session nobody
	// returns to keeps taking its share of the group's messages.
	Persistent bool
	// Resubscribed, when not nil, runs on a goroutine of its own each time
	// a reconnect (not Dial's first connection) has every subscription in
	// again: the broker may have restarted, and lost state of its own.
	Resubscribed func()
	Logger       *slog.Logger

	// openConn replaces paho's dialer (tests: a connection they can cut).
	openConn func(*url.URL, paho.ClientOptions) (net.Conn, error)
	// peekWait replaces retainedWait (tests).
	peekWait time.Duration
	// now replaces time.Now (tests of pendingTTL).
	now func() time.Time
	// onConnect runs first in each connection's handler (tests: a handler
	// that runs late).
	onConnect func()
	// subscribing runs as each subscription is about to be sent, past its
	// check that the bus is not closing (tests: one that comes late).
	subscribing func(filter string)
	// afterFunc replaces time.AfterFunc (tests of pendingTTL).
	afterFunc func(time.Duration, func()) *time.Timer
}

// deliver handles one message; ack is nil for QoS 0 and must otherwise be
// called once the message's effect is stored (or it is invalid for good).
type deliver func(m paho.Message, ack func())

type route struct {
	filter string // as subscribed, maybe $share/<group>/...
	topic  string // the filter without the shared-subscription prefix
	h      deliver
}

type pendingMsg struct {
	m   paho.Message
	ack func()
	at  time.Time
}

// pendingTTL bounds how long a message no subscription of this process
// matches is held unacknowledged: with a persistent session the broker
// delivers right after CONNACK, before the fleet has subscribed; after
// this long the message is for a topic this version no longer consumes.
const pendingTTL = time.Minute

// Bus implements fleet.Bus with paho.
type Bus struct {
	o   Options
	c   paho.Client
	log *slog.Logger

	// subMu is held for reading from a subscription's check that the bus
	// is not closing until paho has queued its SUBSCRIBE, and for writing
	// by Close as it begins: Close's UNSUBSCRIBE goes out after every
	// SUBSCRIBE, and none follows it (one would put a persistent session
	// back in the group, taking a share of device messages for nobody).
	subMu sync.RWMutex

	mu     sync.Mutex
	routes []route             // dispatch, in subscription order
	subs   map[string]struct{} // filters restored on reconnect
	// missing holds the filters the broker has not confirmed on the
	// current connection (refused or not answered), with why; a
	// resubscription loop tries them until they are in.
	missing map[string]error
	conns   int // connections made: a loop of an older one stops
	// reconnects counts reconnections begun (the reconnecting handler): an
	// answer to a subscription sent before one says nothing of the next
	// connection, whose handler may not have run yet.
	reconnects int
	pending    []pendingMsg // arrived before a matching subscription
	// pendingTimer expires held messages while nothing else arrives (the
	// broker stops sending QoS 1 messages once its in-flight window is full
	// of unacknowledged ones); nil when none is held.
	pendingTimer *time.Timer
	closing      bool
	unacked      int           // QoS 1 messages handed out and not acknowledged
	idle         chan struct{} // closed when unacked drops to 0 (while Close waits)
	closed       chan struct{} // closed by Close: resubscription loops end
	// disconnected is set once Close has disconnected: a Publish then is
	// a fleet.ErrBusGone, which the fleet manager does not retry.
	disconnected atomic.Bool

	closeOnce sync.Once

	// peek is the connection Retained reads through, dialled at its first
	// use by the holder of peekDial's token. peekSem bounds the reads in
	// progress (Close takes every token to wait for them), and peeking holds
	// a channel for each topic being read (under mu), closed when its read
	// ends: reads of one topic take turns. Close cancels peekCtx once the
	// bus can no longer acknowledge messages, which ends every read.
	peekSem     chan struct{}
	peekDial    chan struct{}
	peek        paho.Client
	peeking     map[string]chan struct{}
	peekCtx     context.Context
	peekStop    context.CancelFunc
	peekWaiting atomic.Int32 // reads past their SUBACK, waiting for the message (tests)
	server      string
}

// maxPeeks bounds the retained reads in progress at once: one for each of
// the fleet manager's control shards (16 by default; a will is judged on
// its locker's shard).
const maxPeeks = 16

var _ fleet.Bus = (*Bus)(nil)

// Dial connects to the broker; paho reconnects by itself afterwards (one
// client per gateway instance, so its back-off without jitter is harmless).
func Dial(ctx context.Context, o Options) (*Bus, error) {
	if o.Group == "" {
		o.Group = "lockergate"
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	u, err := url.Parse(o.URL)
	if err != nil || u.Host == "" {
		return nil, fmt.Errorf("broker url %q: want mqtt://host:port or mqtts://host:port", o.URL)
	}
	server := "tcp://" + u.Host
	switch u.Scheme {
	case "mqtt", "tcp":
	case "mqtts", "ssl", "tls":
		server = "ssl://" + u.Host
	default:
		return nil, fmt.Errorf("broker url %q: scheme must be mqtt or mqtts", o.URL)
	}
	b := &Bus{o: o, log: o.Logger, subs: map[string]struct{}{}, missing: map[string]error{}, closed: make(chan struct{}),
		peekSem: make(chan struct{}, maxPeeks), peekDial: make(chan struct{}, 1), peeking: map[string]chan struct{}{}}
	b.peekCtx, b.peekStop = context.WithCancel(context.Background())
	// Acknowledgements are manual (after the store), and every message
	// goes through b.receive, which holds those that arrive before their
	// subscription is made: a resumed session delivers right after CONNACK.
	opts := paho.NewClientOptions().AddBroker(server).SetClientID(o.ClientID).
		SetUsername(o.Username).SetPassword(o.Password).SetCleanSession(!o.Persistent).
		SetAutoAckDisabled(true).SetDefaultPublishHandler(b.receive).
		SetKeepAlive(30 * time.Second).SetOrderMatters(false).SetAutoReconnect(true).
		// paho's default (30 s to queue a packet, and to write it) would
		// hold a Publish past its own wait, and Close behind a SUBSCRIBE
		// being queued on a dying connection.
		SetWriteTimeout(10 * time.Second).
		SetMaxReconnectInterval(10 * time.Second).SetConnectRetry(false).
		// Publishes still queued when the connection drops are sent again
		// on the next, in the order they were made: paho's default store
		// is a map, and a locker's retained creds, config or fw/job sent
		// out of order would leave an older one retained.
		SetStore(paho.NewOrderedMemoryStore()).
		SetOnConnectHandler(b.resubscribe).
		// Before each reconnect: paho marks the new connection up before it
		// starts the connect handler, and until that runs the new session
		// (a clean one holds no subscriptions) must not look ready.
		SetReconnectingHandler(func(paho.Client, *paho.ClientOptions) { b.notSubscribed() }).
		SetConnectionLostHandler(func(_ paho.Client, err error) {
			b.log.Warn("external broker connection lost; reconnecting", "err", err)
		})
	if o.TLS != nil {
		opts.SetTLSConfig(o.TLS)
	}
	if o.openConn != nil {
		opts.SetCustomOpenConnectionFn(o.openConn)
	}
	b.server = server
	b.c = paho.NewClient(opts)
	t := b.c.Connect()
	if err := wait(ctx, t, 10*time.Second); err != nil {
		// paho goes on connecting after the wait gave up: a connection made
		// then would hold the client id (and, in a persistent session, take
		// a share of the group's messages) for nobody.
		b.c.Disconnect(0)
		b.peekStop()
		return nil, fmt.Errorf("connect to external broker %s as %s: %w", u.Host, o.ClientID, err)
	}
	return b, nil
}

func wait(ctx context.Context, t paho.Token, d time.Duration) error {
	select {
	case <-t.Done():
		return t.Error()
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(d):
		return errors.New("timed out")
	}
}

// Publish implements fleet.Bus. A command is refused while the connection
// is down, rather than queued for the next: sent when the broker is back it
// could be past its expiry, or withdrawn meanwhile (the fleet manager sends
// an unanswered command again, while it is open, once the bus is
// connected). Anything else (retained state, dynamic security commands) is
// queued, in order, for the next connection.
func (b *Bus) Publish(ctx context.Context, topic string, payload []byte, qos byte, retain bool) error {
	if b.disconnected.Load() {
		return fmt.Errorf("publish %s: the external broker connection is closed (%w)", topic, fleet.ErrBusGone)
	}
	if _, ch, ok := protocol.ParseTopic(topic); ok && ch == protocol.ChanCmd && !b.c.IsConnectionOpen() {
		return fmt.Errorf("publish %s: not connected to the external broker (reconnecting): a command is not queued", topic)
	}
	return wait(ctx, b.c.Publish(topic, qos, retain, payload), 10*time.Second)
}

// Subscribe implements fleet.Bus. Device-to-gateway filters are taken
// through the shared group. QoS 1 messages carry an Ack that sends the
// PUBACK; until it is called the broker holds the message for this
// session.
func (b *Bus) Subscribe(filter string, h fleet.Handler) error {
	shared := filter
	if strings.HasPrefix(filter, "lockers/v1/") {
		shared = "$share/" + b.o.Group + "/" + filter
	}
	return b.subscribe(shared, func(m paho.Message, ack func()) {
		h(fleet.Message{Topic: m.Topic(), Payload: m.Payload(), QoS: m.Qos(), Retain: m.Retained(), Ack: ack})
	})
}

// subscribe subscribes at QoS 1, keeps the subscription across reconnects
// and hands h what arrived for it before.
func (b *Bus) subscribe(filter string, h deliver) error {
	r := route{filter: filter, topic: unshare(filter), h: h}
	b.mu.Lock()
	b.routes = append(b.routes, r)
	b.subs[filter] = struct{}{}
	var early []pendingMsg
	kept := b.pending[:0]
	for _, p := range b.pending {
		if protocol.TopicMatches(r.topic, p.m.Topic()) {
			early = append(early, p)
		} else {
			kept = append(kept, p)
		}
	}
	clear(b.pending[len(kept):])
	b.pending = kept
	b.mu.Unlock()
	for _, p := range early {
		h(p.m, p.ack)
	}
	// Which connection this subscription is made on: 0 connections
	// counted is Dial's, whose handler (paho runs it on a goroutine of its
	// own) has not run yet, and may not have when the answer comes.
	current := func() int { return max(b.conns, 1) }
	b.mu.Lock()
	conn, rec := current(), b.reconnects
	b.mu.Unlock()
	err := b.subscribeOnce(filter)
	b.mu.Lock()
	if conn == current() && rec == b.reconnects { // else a reconnect's loop has it
		if err != nil {
			b.missing[filter] = err
		} else {
			delete(b.missing, filter)
		}
	}
	b.mu.Unlock()
	return err
}

// subscribeTimeout bounds the wait for a SUBACK.
const subscribeTimeout = 10 * time.Second

// subscribeOnce subscribes to filter at QoS 1 and waits for the broker's
// answer: an error when it does not come, or refuses (a SUBACK return code
// of 0x80: mosquitto's dynamic security, for one, refuses a filter the
// user's roles do not allow).
func (b *Bus) subscribeOnce(filter string) error {
	b.subMu.RLock()
	b.mu.Lock()
	closing := b.closing
	b.mu.Unlock()
	if closing {
		b.subMu.RUnlock()
		return fmt.Errorf("subscribe to %s: the bus is closing", filter)
	}
	if b.o.subscribing != nil {
		b.o.subscribing(filter)
	}
	t := b.c.Subscribe(filter, 1, nil)
	b.subMu.RUnlock()
	return subscribed(context.Background(), t, filter)
}

// subscribed waits for the answer to a subscription to filter.
func subscribed(ctx context.Context, t paho.Token, filter string) error {
	if err := wait(ctx, t, subscribeTimeout); err != nil {
		return fmt.Errorf("subscribe to %s on the external broker: %w", filter, err)
	}
	st, ok := t.(*paho.SubscribeToken)
	if !ok {
		return nil
	}
	// One filter, so one code; paho keys it by the filter without the
	// $share/<group>/ prefix.
	for _, code := range st.Result() {
		if code >= 0x80 {
			return fmt.Errorf("the external broker refused the subscription to %s (SUBACK 0x%02x): "+
				"let the gateway's broker user subscribe to it (docs/deployment.md)", filter, code)
		}
	}
	return nil
}

// receive is paho's handler for every message (each on its own goroutine:
// order does not matter).
func (b *Bus) receive(_ paho.Client, m paho.Message) {
	ack := b.acker(m)
	now := b.now()
	b.mu.Lock()
	stale := b.takeStale(now)
	var h deliver
	for _, r := range b.routes {
		if protocol.TopicMatches(r.topic, m.Topic()) {
			h = r.h
			break
		}
	}
	if h == nil {
		b.pending = append(b.pending, pendingMsg{m: m, ack: ack, at: now})
		b.armPendingTimer(now)
	}
	b.mu.Unlock()
	b.dropStale(stale)
	if h != nil {
		h(m, ack)
	}
}

// takeStale removes the held messages older than pendingTTL at now and
// returns them, oldest first. Called with b.mu held.
func (b *Bus) takeStale(now time.Time) []pendingMsg {
	var stale []pendingMsg
	for len(b.pending) > 0 && now.Sub(b.pending[0].at) > pendingTTL {
		stale = append(stale, b.pending[0])
		b.pending[0] = pendingMsg{}
		b.pending = b.pending[1:]
	}
	return stale
}

// dropStale acknowledges the held messages takeStale returned (the broker
// stops redelivering them) and says so.
func (b *Bus) dropStale(stale []pendingMsg) {
	for _, p := range stale {
		b.log.Warn("external broker delivered a message no subscription of this instance takes; dropped",
			"topic", p.m.Topic())
		if p.ack != nil {
			p.ack()
		}
	}
}

// armPendingTimer makes sure a timer expires the oldest held message when
// its time is up. Called with b.mu held.
func (b *Bus) armPendingTimer(now time.Time) {
	if b.pendingTimer != nil || len(b.pending) == 0 || b.closing {
		return
	}
	after := time.AfterFunc
	if b.o.afterFunc != nil {
		after = b.o.afterFunc
	}
	d := pendingTTL - now.Sub(b.pending[0].at) + time.Millisecond
	b.pendingTimer = after(max(d, time.Millisecond), b.expirePending)
}

// expirePending is the timer's: it drops what is past pendingTTL and arms
// the timer again for what is left.
func (b *Bus) expirePending() {
	now := b.now()
	b.mu.Lock()
	b.pendingTimer = nil
	stale := b.takeStale(now)
	b.armPendingTimer(now)
	b.mu.Unlock()
	b.dropStale(stale)
}

// notSubscribed marks every subscription missing: a connection is about
// to be made again.
func (b *Bus) notSubscribed() {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.reconnects++
	b.markMissing()
}

// markMissing marks every subscription missing. Called with b.mu held.
func (b *Bus) markMissing() {
	for f := range b.subs {
		b.missing[f] = errors.New("not yet subscribed on this connection")
	}
}

func (b *Bus) now() time.Time {
	if b.o.now != nil {
		return b.o.now()
	}
	return time.Now()
}

// acker returns the acknowledgement of a QoS 1 message (nil for QoS 0):
// it sends the PUBACK once, however often it is called.
func (b *Bus) acker(m paho.Message) func() {
	if m.Qos() == 0 {
		return nil
	}
	b.mu.Lock()
	b.unacked++
	b.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			m.Ack() // dropped by paho when the connection it came on is gone
			b.mu.Lock()
			if b.unacked--; b.unacked == 0 && b.idle != nil {
				close(b.idle)
				b.idle = nil
			}
			b.mu.Unlock()
		})
	}
}

// resubscribe restores subscriptions after a reconnect (the broker may
// have kept them in a persistent session; subscribing again is harmless),
// and keeps trying those it refuses or does not answer, with a back-off,
// until they are in, the connection is replaced or the bus closes. Paho
// runs it on a goroutine of its own for each connection.
func (b *Bus) resubscribe(paho.Client) {
	if b.o.onConnect != nil {
		b.o.onConnect()
	}
	b.mu.Lock()
	b.conns++
	conn, rec := b.conns, b.reconnects
	if conn == 1 {
		// Dial's own connection: Subscribe makes its subscriptions (this
		// may run after some of them, and must not race them).
		b.mu.Unlock()
		return
	}
	b.markMissing() // the reconnecting handler did too, before this connection was made
	b.mu.Unlock()
	for backoff := resubscribeBackoff; ; backoff = min(2*backoff, maxResubscribeBackoff) {
		b.mu.Lock()
		current := conn == b.conns && rec == b.reconnects && !b.closing
		todo := make([]string, 0, len(b.missing))
		for f := range b.missing {
			todo = append(todo, f)
		}
		b.mu.Unlock()
		if !current {
			return
		}
		if len(todo) == 0 {
			// Open, and still this loop's connection: paho runs the
			// reconnecting handler (reconnects) before every new attempt,
			// so an open connection seen before the check is not a newer
			// one whose subscriptions are not back yet.
			if b.o.Resubscribed != nil && b.c.IsConnectionOpen() {
				b.mu.Lock()
				still := conn == b.conns && rec == b.reconnects && !b.closing
				b.mu.Unlock()
				if still {
					go b.o.Resubscribed()
				}
			}
			return
		}
		for _, f := range todo {
			err := b.subscribeOnce(f)
			b.mu.Lock()
			current := conn == b.conns && rec == b.reconnects && !b.closing // Close left the filters: none comes back
			if current {
				if err != nil {
					b.missing[f] = err
				} else {
					delete(b.missing, f)
				}
			}
			b.mu.Unlock()
			if !current {
				return // a newer connection's loop takes over
			}
			if err != nil {
				b.log.Error("external broker subscription not restored; trying again", "filter", f, "retry_in", backoff, "err", err)
			}
		}
		b.mu.Lock()
		done := len(b.missing) == 0
		b.mu.Unlock()
		if done {
			continue // every one in: said at once, not after a back-off (while the connection may have gone again)
		}
		select {
		case <-time.After(backoff):
		case <-b.closed:
			return
		}
	}
}

// Retained returns topic's retained message on the broker, nil when it
// holds none (or an empty one). It reads through a connection of its own
// (a clean session outside the shared group, dialled at the first call),
// so the group's share of messages is untouched: a subscription to the
// topic, the retained message the broker sends for it, and the
// subscription left. The broker sends what it retains right after its
// SUBACK; nothing within a short wait means none. Reads of different
// topics run at the same time (up to maxPeeks: a burst of wills, one per
// locker, is judged in parallel); reads of one topic take turns, since a
// subscription to a topic replaces the handler of the one before it.
// Reads work while Close waits for acknowledgements; once the bus can no
// longer acknowledge, reads fail, with an error that wraps
// fleet.ErrBusClosed when the session is persistent (Options.Persistent).
func (b *Bus) Retained(ctx context.Context, topic string) ([]byte, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(b.peekCtx, cancel)
	defer stop()
	p, err := b.retained(ctx, topic)
	if err != nil && b.peekCtx.Err() != nil {
		if b.o.Persistent {
			// Whatever the read reached: the message it was to judge can
			// no longer be acknowledged, and the broker keeps it for this
			// instance's next run.
			return nil, fmt.Errorf("retained message of %s not read: %w", topic, fleet.ErrBusClosed)
		}
		// A clean session ends with the bus, and what it was given with
		// it: the message is better applied unjudged than lost.
		return nil, fmt.Errorf("retained message of %s not read: the external broker connection is closed", topic)
	}
	return p, err
}

// retained is Retained; ctx ends at Close too.
func (b *Bus) retained(ctx context.Context, topic string) ([]byte, error) {
	done, err := b.peekTurn(ctx, topic)
	if err != nil {
		return nil, err
	}
	defer done()
	select {
	case b.peekSem <- struct{}{}:
		defer func() { <-b.peekSem }()
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	if err := b.peekCtx.Err(); err != nil {
		return nil, err // Close has begun waiting for the reads: none starts now
	}
	c, err := b.peekConn(ctx)
	if err != nil {
		return nil, err
	}
	got := make(chan []byte, 1)
	t := c.Subscribe(topic, 0, func(_ paho.Client, m paho.Message) {
		if m.Retained() { // not a message published meanwhile
			select {
			case got <- m.Payload():
			default:
			}
		}
	})
	// Left whatever the answer (a subscription made after a SUBACK timeout
	// would otherwise stay), and the turn ends only once the broker says so
	// (or a while has passed): what it sent for this read comes before its
	// UNSUBACK, and finds no route, rather than reaching the topic's next
	// read as that read's (an older retained message than the topic has).
	defer func() { wait(context.Background(), c.Unsubscribe(topic), unsubscribeWait) }()
	if err := subscribed(ctx, t, topic); err != nil {
		return nil, err
	}
	d := b.o.peekWait
	if d == 0 {
		d = retainedWait
	}
	b.peekWaiting.Add(1)
	defer b.peekWaiting.Add(-1)
	select {
	case p := <-got:
		if len(p) == 0 {
			return nil, nil
		}
		return p, nil
	case <-time.After(d):
		return nil, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// peekTurn waits until no other read of topic is in progress and makes
// this one the topic's; done ends the turn.
func (b *Bus) peekTurn(ctx context.Context, topic string) (done func(), err error) {
	for {
		b.mu.Lock()
		busy, ok := b.peeking[topic]
		if !ok {
			mine := make(chan struct{})
			b.peeking[topic] = mine
			b.mu.Unlock()
			return func() {
				b.mu.Lock()
				delete(b.peeking, topic)
				b.mu.Unlock()
				close(mine)
			}, nil
		}
		b.mu.Unlock()
		select {
		case <-busy:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// peekConn returns the connection Retained reads through, dialled at its
// first use (by one caller; the others wait for it).
func (b *Bus) peekConn(ctx context.Context) (paho.Client, error) {
	select {
	case b.peekDial <- struct{}{}:
		defer func() { <-b.peekDial }()
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	if b.peek != nil {
		return b.peek, nil
	}
	opts := paho.NewClientOptions().AddBroker(b.server).SetClientID(b.o.ClientID + "-peek").
		SetUsername(b.o.Username).SetPassword(b.o.Password).SetCleanSession(true).
		SetKeepAlive(30 * time.Second).SetAutoReconnect(true).SetMaxReconnectInterval(10 * time.Second).
		SetWriteTimeout(5 * time.Second) // paho's default (30 s per packet) would hold Close up
	if b.o.TLS != nil {
		opts.SetTLSConfig(b.o.TLS)
	}
	if b.o.openConn != nil {
		opts.SetCustomOpenConnectionFn(b.o.openConn)
	}
	c := paho.NewClient(opts)
	if err := wait(ctx, c.Connect(), subscribeTimeout); err != nil {
		c.Disconnect(0)
		return nil, fmt.Errorf("connect to read retained messages as %s-peek: %w", b.o.ClientID, err)
	}
	b.peek = c
	return c, nil
}

// unsubscribeWait bounds a retained read's wait for its UNSUBACK.
const unsubscribeWait = 2 * time.Second

// retainedWait is how long Retained waits after the SUBACK for a retained
// message before it takes the topic to have none.
const retainedWait = 2 * time.Second

// Back-off between attempts to restore refused subscriptions.
const (
	resubscribeBackoff    = time.Second
	maxResubscribeBackoff = 30 * time.Second
)

// Connected reports whether the connection to the broker is up (not lost,
// nor being re-established).
func (b *Bus) Connected() bool { return b.c.IsConnectionOpen() }

// Ready reports why the bus cannot take device messages: its connection
// is down, or a subscription is not in (the broker refused it or has not
// answered). nil when both are fine.
func (b *Bus) Ready() error {
	if !b.Connected() {
		return errors.New("not connected (reconnecting; check --broker-url and the broker)")
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	for f, err := range b.missing {
		return fmt.Errorf("subscription to %s missing: %w", f, err)
	}
	return nil
}

// Close leaves the subscriptions, so the broker hands device messages to
// the other instances and stops queueing them for this one, waits a while
// for the fleet manager to store and acknowledge what it was given, and
// disconnects. Call it before stopping the fleet manager. What is still
// unacknowledged stays in a persistent session for this instance's return.
// Calling it again does nothing.
func (b *Bus) Close() { b.closeOnce.Do(b.close) }

func (b *Bus) close() {
	b.subMu.Lock() // after every SUBSCRIBE under way is queued
	b.mu.Lock()
	b.closing = true
	if b.pendingTimer != nil {
		b.pendingTimer.Stop()
		b.pendingTimer = nil
	}
	close(b.closed)
	filters := make([]string, 0, len(b.subs))
	for f := range b.subs {
		filters = append(filters, f)
	}
	b.mu.Unlock()
	b.subMu.Unlock()
	if len(filters) > 0 && b.c.IsConnectionOpen() {
		if err := wait(context.Background(), b.c.Unsubscribe(filters...), 5*time.Second); err != nil {
			b.log.Warn("leave subscriptions on the external broker", "err", err)
		}
	}
	if n := b.waitAcked(5 * time.Second); n > 0 {
		b.log.Warn("disconnecting with messages not yet acknowledged; the broker delivers them again",
			"unacknowledged", n, "persistent_session", b.o.Persistent)
	}
	// Publishes before this still go out (retained state the broker keeps);
	// paho refuses them once Disconnect starts.
	b.disconnected.Store(true)
	b.c.Disconnect(250)
	// Nothing delivered can be acknowledged from here on: the reads in
	// progress end (see Retained for their error), and Close waits for
	// them; later ones start none.
	b.peekStop()
	for range cap(b.peekSem) {
		b.peekSem <- struct{}{}
	}
	if b.peek != nil {
		b.peek.Disconnect(250)
	}
	for range cap(b.peekSem) {
		<-b.peekSem
	}
}

// waitAcked waits up to d until every message handed out is acknowledged
// and returns how many are not.
func (b *Bus) waitAcked(d time.Duration) int {
	b.mu.Lock()
	if b.unacked == 0 {
		b.mu.Unlock()
		return 0
	}
	if b.idle == nil {
		b.idle = make(chan struct{})
	}
	idle := b.idle
	b.mu.Unlock()
	select {
	case <-idle:
	case <-time.After(d):
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.unacked
}

// unshare strips a shared-subscription prefix ($share/<group>/).
func unshare(filter string) string {
	if rest, ok := strings.CutPrefix(filter, "$share/"); ok {
		if _, topic, ok := strings.Cut(rest, "/"); ok {
			return topic
		}
	}
	return filter
}
