// Package devicesimtest runs a real MQTT broker (mochi, on 127.0.0.1:0) with a
// stand-in gateway, for tests that drive simulated lockers over real TCP. The
// stand-in answers provisioning requests with made-up identities,
// authenticates clients with them, enforces the protocol's topic rules
// (protocol.DeviceMayPublish and friends) and records every message on device
// topics. It is for tests only: identities live in memory.
package devicesimtest

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/lockergate/lockergate/protocol"
)

// Options configures an Env.
type Options struct {
	// ClaimToken is the one claim token the stand-in accepts. Default "test-claim".
	ClaimToken string
	// Refuse answers provisioning requests of these serials with
	// {"status":"error","error":code}.
	Refuse map[string]string
	// Logger receives the broker's logs. Default: discard.
	Logger *slog.Logger
}

// Identity is what the stand-in handed to a serial.
type Identity struct {
	DeviceID string
	Password string
	CredKey  []byte
	FwPubkey []byte
}

// Message is one message seen on a device topic (lockers/v1/...).
type Message struct {
	Topic    string
	Payload  []byte
	Retain   bool
	QoS      byte
	ClientID string // publishing client; "inline" for the stand-in itself
}

// Env is a running broker with the stand-in gateway.
type Env struct {
	// URL is the broker's address, e.g. tcp://127.0.0.1:41234.
	URL string
	// Claim is the accepted claim token.
	Claim string
	// Server is the mochi broker.
	Server *mqtt.Server

	refuse map[string]string
	work   chan []byte
	wg     sync.WaitGroup
	once   sync.Once

	mu        sync.Mutex
	ids       map[string]Identity // by serial
	passwords map[string]string   // by device id
	seen      map[string]bool     // device ids that have logged in
	remotes   map[string]string   // client id → remote address of its last login
	msgs      []Message
	changed   chan struct{}
	denied    []string
	authFails []string
	dropped   int
	ended     map[string]int // client id → sessions ended
	// superseded holds the sessions a newer login with the same client id
	// replaces; their wills are dropped (see OnWill).
	superseded map[*mqtt.Client]bool
}

// Start starts the broker and the stand-in; tb.Cleanup closes them.
func Start(tb testing.TB, opts Options) *Env {
	tb.Helper()
	if opts.ClaimToken == "" {
		opts.ClaimToken = "test-claim"
	}
	logger := opts.Logger
	if logger == nil {
		logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	e := &Env{
		Claim:      opts.ClaimToken,
		refuse:     opts.Refuse,
		work:       make(chan []byte, 4096),
		ids:        map[string]Identity{},
		passwords:  map[string]string{},
		seen:       map[string]bool{},
		remotes:    map[string]string{},
		ended:      map[string]int{},
		superseded: map[*mqtt.Client]bool{},
		changed:    make(chan struct{}),
	}
	e.Server = mqtt.New(&mqtt.Options{InlineClient: true, Logger: logger})
	if err := e.Server.AddHook(&authHook{env: e}, nil); err != nil {
		tb.Fatalf("add auth hook: %v", err)
	}
	tcp := listeners.NewTCP(listeners.Config{Type: "tcp", ID: "t1", Address: "127.0.0.1:0"})
	if err := e.Server.AddListener(tcp); err != nil {
		tb.Fatalf("listen: %v", err)
	}
	e.URL = "tcp://" + tcp.Address()
	if err := e.Server.Subscribe(protocol.Root+"#", 1, e.record); err != nil {
		tb.Fatalf("subscribe recorder: %v", err)
	}
	if err := e.Server.Subscribe(protocol.ProvisionRoot+"+/request", 2, e.enqueue); err != nil {
		tb.Fatalf("subscribe provisioning: %v", err)
	}
	e.wg.Add(1)
	go e.provisioner()
	if err := e.Server.Serve(); err != nil {
		tb.Fatalf("serve: %v", err)
	}
	tb.Cleanup(e.Close)
	return e
}

// Close stops the broker and the stand-in; it is idempotent.
func (e *Env) Close() {
	e.once.Do(func() {
		_ = e.Server.Close()
		close(e.work)
		e.wg.Wait()
	})
}

// record runs on the publishing client's goroutine: copy and return.
func (e *Env) record(cl *mqtt.Client, _ packets.Subscription, pk packets.Packet) {
	m := Message{
		Topic:    pk.TopicName,
		Payload:  bytes.Clone(pk.Payload),
		Retain:   pk.FixedHeader.Retain,
		QoS:      pk.FixedHeader.Qos,
		ClientID: pk.Origin,
	}
	if m.ClientID == "" && cl != nil {
		m.ClientID = cl.ID
	}
	e.mu.Lock()
	e.msgs = append(e.msgs, m)
	e.notifyLocked()
	e.mu.Unlock()
}

func (e *Env) notifyLocked() {
	close(e.changed)
	e.changed = make(chan struct{})
}

// enqueue hands a provisioning request to the provisioner without blocking
// the publishing client.
func (e *Env) enqueue(_ *mqtt.Client, _ packets.Subscription, pk packets.Packet) {
	select {
	case e.work <- bytes.Clone(pk.Payload):
	default:
		e.mu.Lock()
		e.dropped++
		e.mu.Unlock()
	}
}

func (e *Env) provisioner() {
	defer e.wg.Done()
	for payload := range e.work {
		req, err := protocol.Decode[protocol.ProvisionRequest](payload)
		if err != nil {
			continue // no valid serial, nowhere to answer
		}
		resp := e.answer(req)
		_ = e.Server.Publish(protocol.ProvisionResponseTopic(req.Serial), protocol.Encode(resp), false, 1)
	}
}

func (e *Env) answer(req *protocol.ProvisionRequest) protocol.ProvisionResponse {
	if code, ok := e.refuse[req.Serial]; ok {
		return protocol.ProvisionResponse{Status: "error", Error: code}
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	// Like the gateway, a locker whose answer was lost (it never connected
	// with its identity) may ask again and gets a new one.
	if old, taken := e.ids[req.Serial]; taken {
		if e.seen[old.DeviceID] {
			return protocol.ProvisionResponse{Status: "error", Error: protocol.ProvSerialTaken}
		}
		delete(e.passwords, old.DeviceID)
	}
	pub, _, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		panic(err)
	}
	id := Identity{
		DeviceID: "lk-" + randHex(8),
		Password: randHex(16),
		CredKey:  []byte(randHex(16)),
		FwPubkey: pub,
	}
	e.ids[req.Serial] = id
	e.passwords[id.DeviceID] = id.Password
	return protocol.ProvisionResponse{
		Status:   "ok",
		DeviceID: id.DeviceID,
		Password: id.Password,
		CredKey:  base64.StdEncoding.EncodeToString(id.CredKey),
		FwPubkey: base64.StdEncoding.EncodeToString(id.FwPubkey),
		Broker:   e.URL,
	}
}

func randHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// Publish sends a message to devices from the stand-in (QoS 1).
func (e *Env) Publish(topic string, payload []byte, retain bool) error {
	return e.Server.Publish(topic, payload, retain, 1)
}

// All returns every recorded message, in order.
func (e *Env) All() []Message {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]Message(nil), e.msgs...)
}

// Messages returns the recorded messages on topic, in order.
func (e *Env) Messages(topic string) []Message {
	e.mu.Lock()
	defer e.mu.Unlock()
	var out []Message
	for _, m := range e.msgs {
		if m.Topic == topic {
			out = append(out, m)
		}
	}
	return out
}

// Retained returns the broker's retained message on topic.
func (e *Env) Retained(topic string) ([]byte, bool) {
	for _, pk := range e.Server.Topics.Messages(topic) {
		if pk.TopicName == topic {
			return pk.Payload, true
		}
	}
	return nil, false
}

// Identity returns the identity handed to serial.
func (e *Env) Identity(serial string) (Identity, bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	id, ok := e.ids[serial]
	return id, ok
}

// Provisioned returns how many identities the stand-in handed out.
func (e *Env) Provisioned() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return len(e.ids)
}

// Violations returns refused publishes/subscribes, failed logins and dropped
// provisioning requests; a well-behaved simulator causes none.
func (e *Env) Violations() []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	out := append([]string(nil), e.denied...)
	out = append(out, e.authFails...)
	if e.dropped > 0 {
		out = append(out, fmt.Sprintf("%d provisioning requests dropped", e.dropped))
	}
	return out
}

// Wait waits up to 10 s for cond, re-checking on every recorded message and
// every 10 ms; it fails tb with what when the deadline passes.
func (e *Env) Wait(tb testing.TB, what string, cond func() bool) {
	tb.Helper()
	e.WaitTimeout(tb, 10*time.Second, what, cond)
}

// WaitTimeout is Wait with a deadline of d.
func (e *Env) WaitTimeout(tb testing.TB, d time.Duration, what string, cond func() bool) {
	tb.Helper()
	deadline := time.NewTimer(d)
	defer deadline.Stop()
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		e.mu.Lock()
		ch := e.changed
		e.mu.Unlock()
		if cond() {
			return
		}
		select {
		case <-ch:
		case <-tick.C:
		case <-deadline.C:
			tb.Fatalf("timed out after %v waiting for %s", d, what)
		}
	}
}

// authHook authenticates claim sessions and provisioned devices and applies
// the protocol's topic rules.
type authHook struct {
	mqtt.HookBase
	env *Env
}

func (h *authHook) ID() string { return "devicesimtest-auth" }

func (h *authHook) Provides(b byte) bool {
	return b == mqtt.OnConnectAuthenticate || b == mqtt.OnACLCheck || b == mqtt.OnWill || b == mqtt.OnDisconnect
}

// OnWill drops the Last Will of a session replaced by a newer login with the
// same client id, as the gateway's broker does (broker.dropWill). mochi
// publishes it from the old connection's reader, which may run after the new
// session's birth, and a retained "offline" would then overwrite the birth of
// a locker that is online (a locker that reboots and reconnects before its
// DISCONNECT is read). A will without a topic is neither retained nor
// delivered.
func (h *authHook) OnWill(cl *mqtt.Client, will mqtt.Will) (mqtt.Will, error) {
	h.env.mu.Lock()
	superseded := h.env.superseded[cl]
	h.env.mu.Unlock()
	if superseded || errors.Is(cl.StopCause(), packets.ErrSessionTakenOver) {
		return mqtt.Will{}, nil
	}
	return will, nil
}

// OnDisconnect counts the sessions that ended; it runs after the session's
// will, if any, was published.
func (h *authHook) OnDisconnect(cl *mqtt.Client, _ error, _ bool) {
	e := h.env
	e.mu.Lock()
	e.ended[cl.ID]++
	delete(e.superseded, cl)
	e.notifyLocked()
	e.mu.Unlock()
}

// SessionsEnded returns how many MQTT sessions of clientID have ended.
func (e *Env) SessionsEnded(clientID string) int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.ended[clientID]
}

func (h *authHook) OnConnectAuthenticate(cl *mqtt.Client, pk packets.Packet) bool {
	user, pass := string(pk.Connect.Username), string(pk.Connect.Password)
	e := h.env
	ok := false
	if user == protocol.ProvisionUsername {
		serial, isProv := strings.CutPrefix(cl.ID, protocol.ProvisionClientPrefix)
		ok = isProv && protocol.ValidSerial(serial) && pass == e.Claim
	} else {
		e.mu.Lock()
		want, known := e.passwords[user]
		ok = known && cl.ID == user && pass == want
		if ok {
			e.seen[user] = true
		}
		e.mu.Unlock()
	}
	e.mu.Lock()
	if ok {
		e.remotes[cl.ID] = cl.Net.Remote
		if old, found := e.Server.Clients.Get(cl.ID); found && old != cl {
			e.superseded[old] = true
		}
	} else {
		e.authFails = append(e.authFails, fmt.Sprintf("login refused: client %q user %q", cl.ID, user))
	}
	e.mu.Unlock()
	return ok
}

// Remote returns the remote address (host:port) clientID last logged in from.
func (e *Env) Remote(clientID string) string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.remotes[clientID]
}

func (h *authHook) OnACLCheck(cl *mqtt.Client, topic string, write bool) bool {
	var ok bool
	if serial, isProv := strings.CutPrefix(cl.ID, protocol.ProvisionClientPrefix); isProv {
		if write {
			ok = protocol.ProvisionerMayPublish(serial, topic)
		} else {
			ok = protocol.ProvisionerMaySubscribe(serial, topic)
		}
	} else if write {
		ok = protocol.DeviceMayPublish(cl.ID, topic)
	} else {
		ok = protocol.DeviceMaySubscribe(cl.ID, topic)
	}
	if !ok {
		h.env.mu.Lock()
		h.env.denied = append(h.env.denied, fmt.Sprintf("refused: client %q write=%v topic %q", cl.ID, write, topic))
		h.env.mu.Unlock()
	}
	return ok
}
