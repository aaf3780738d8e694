package broker

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/internal/testtool"
	"github.com/lockergate/lockergate/protocol"
)

const (
	waitTimeout = 10 * time.Second
	claimToken  = "claim-token-0123456789"
)

// fakeAuth is an in-memory Authenticator.
type fakeAuth struct {
	mu          sync.Mutex
	devices     map[string]fakeDevice
	claims      map[string]bool
	deviceCalls map[string]int
	claimCalls  int
	failWith    error // returned by every call when set (backend down)
	// after, when set, runs once after AuthDevice has decided and before it
	// returns: the moment a concurrent change races the check.
	after func(id string)
	// afterEach is after for every call.
	afterEach func(id string)
}

type fakeDevice struct {
	secret   string
	disabled bool
}

func newFakeAuth() *fakeAuth {
	return &fakeAuth{
		devices: map[string]fakeDevice{
			"A": {secret: "secret-A"},
			"B": {secret: "secret-B"},
			"D": {secret: "secret-D", disabled: true},
		},
		claims:      map[string]bool{claimToken: true},
		deviceCalls: map[string]int{},
	}
}

func (f *fakeAuth) AuthDevice(ctx context.Context, id string, password []byte) error {
	err := f.authDevice(id, password)
	f.mu.Lock()
	after, each := f.after, f.afterEach
	f.after = nil
	f.mu.Unlock()
	if after != nil {
		after(id)
	}
	if each != nil {
		each(id)
	}
	return err
}

func (f *fakeAuth) authDevice(id string, password []byte) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.deviceCalls[id]++
	if f.failWith != nil {
		return f.failWith
	}
	d, ok := f.devices[id]
	switch {
	case !ok:
		return fmt.Errorf("load device %s: %w", id, ErrUnknownDevice)
	case d.disabled:
		return fmt.Errorf("device %s: %w", id, ErrDisabled)
	case string(password) != d.secret:
		return ErrBadSecret
	}
	return nil
}

func (f *fakeAuth) AuthClaim(ctx context.Context, token, serial string) (bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.claimCalls++
	if f.failWith != nil {
		return false, f.failWith
	}
	if !f.claims[token] {
		return false, fmt.Errorf("claim: %w", ErrUnknownClaim)
	}
	return true, nil
}

func (f *fakeAuth) calls(id string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.deviceCalls[id]
}

// fail makes every call fail with err (nil: the backend is back).
func (f *fakeAuth) fail(err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.failWith = err
}

func (f *fakeAuth) setDevice(id string, d fakeDevice) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.devices[id] = d
}

// fakeProv is an in-memory Provisioner.
type fakeProv struct {
	mu      sync.Mutex
	calls   []provCall
	answer  protocol.ProvisionResponse
	err     error         // when set, Provision returns it instead of answer
	release chan struct{} // when set, Provision waits for it
}

type provCall struct {
	token, serial string
	payload       []byte
}

func (p *fakeProv) Provision(ctx context.Context, token, serial string, payload []byte) (protocol.ProvisionResponse, error) {
	p.mu.Lock()
	p.calls = append(p.calls, provCall{token, serial, payload})
	release, answer, err := p.release, p.answer, p.err
	p.mu.Unlock()
	if release != nil {
		select {
		case <-release:
		case <-ctx.Done():
		}
	}
	return answer, err
}

func (p *fakeProv) get() []provCall {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]provCall(nil), p.calls...)
}

func (p *fakeProv) set(answer protocol.ProvisionResponse, release chan struct{}) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.answer, p.release = answer, release
}

func (p *fakeProv) callCount() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.calls)
}

// fakeObserver records presence calls as "+id" (connected) and "-id:reason".
type fakeObserver struct {
	mu     sync.Mutex
	events []string
	late   []string // DeviceSubscribedAfterBirth calls
}

func (o *fakeObserver) DeviceSubscribedAfterBirth(id string) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.late = append(o.late, id)
}

func (o *fakeObserver) lateSubscribed() []string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return append([]string(nil), o.late...)
}

func (o *fakeObserver) DeviceConnected(id, remote string) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.events = append(o.events, "+"+id)
}

func (o *fakeObserver) DeviceDisconnected(id, reason string) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.events = append(o.events, "-"+id+":"+reason)
}

func (o *fakeObserver) get() []string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return append([]string(nil), o.events...)
}

// harness is a started Broker on 127.0.0.1:0 with fakes around it.
type harness struct {
	b    *Broker
	reg  *prometheus.Registry
	auth *fakeAuth
	prov *fakeProv
	obs  *fakeObserver
	logs *testtool.LockedBuffer
	addr string
}

// newHarness starts a Broker; opt adjusts its Options, tune its internals
// before Start (either may be nil).
func newHarness(t *testing.T, opt func(*Options), tune func(*Broker)) *harness {
	t.Helper()
	h := &harness{
		reg:  prometheus.NewRegistry(),
		auth: newFakeAuth(),
		prov: &fakeProv{answer: protocol.ProvisionResponse{Status: "ok", DeviceID: "lk-1",
			Password: "fresh-device-secret", CredKey: "a2V5", Broker: "mqtt://127.0.0.1"}},
		obs:  &fakeObserver{},
		logs: &testtool.LockedBuffer{},
	}
	opts := Options{
		TCPAddr:     "127.0.0.1:0",
		Auth:        h.auth,
		Provisioner: h.prov,
		Observer:    h.obs,
		Logger:      slog.New(slog.NewTextHandler(h.logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
		Registerer:  h.reg,
		// Readers rest (move to a new goroutine) after 20 ms without a
		// packet, so every test here runs across many hand-offs.
		ReaderRest: 20 * time.Millisecond,
	}
	if opt != nil {
		opt(&opts)
	}
	b, err := New(opts)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	if tune != nil {
		tune(b)
	}
	t.Cleanup(func() {
		if err := b.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		if t.Failed() {
			t.Logf("broker log:\n%s", h.logs.String())
		}
	})
	if err := b.Start(); err != nil {
		t.Fatalf("Start: %v", err)
	}
	h.b = b
	if a := b.TCPAddr(); a != nil {
		h.addr = a.String()
	}
	return h
}

// metric returns the value of the series name{label=value} (label "" for none).
func (h *harness) metric(t *testing.T, name, label, value string) float64 {
	t.Helper()
	return gatherValue(t, h.reg, name, label, value)
}

func gatherValue(t *testing.T, reg *prometheus.Registry, name, label, value string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatalf("gather: %v", err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			if label != "" && !hasLabel(m, label, value) {
				continue
			}
			switch {
			case m.Counter != nil:
				return m.Counter.GetValue()
			case m.Gauge != nil:
				return m.Gauge.GetValue()
			case m.Histogram != nil:
				return float64(m.Histogram.GetSampleCount())
			}
		}
		t.Fatalf("metric %s has no series %s=%q", name, label, value)
	}
	t.Fatalf("metric %s not registered", name)
	return 0
}

func hasLabel(m *dto.Metric, name, value string) bool {
	for _, l := range m.GetLabel() {
		if l.GetName() == name && l.GetValue() == value {
			return true
		}
	}
	return false
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(waitTimeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func (h *harness) waitMetric(t *testing.T, name, label, value string, want float64) {
	t.Helper()
	waitFor(t, fmt.Sprintf("%s{%s=%q} == %v", name, label, value, want), func() bool {
		return h.metric(t, name, label, value) == want
	})
}

// inbox collects messages of an inline subscription.
type inbox struct {
	mu   sync.Mutex
	msgs []fleet.Message
}

func (in *inbox) handle(m fleet.Message) {
	in.mu.Lock()
	defer in.mu.Unlock()
	in.msgs = append(in.msgs, m)
}

func (in *inbox) get() []fleet.Message {
	in.mu.Lock()
	defer in.mu.Unlock()
	return append([]fleet.Message(nil), in.msgs...)
}

func (in *inbox) topics() []string {
	var out []string
	for _, m := range in.get() {
		out = append(out, m.Topic)
	}
	return out
}

func (h *harness) subscribe(t *testing.T, filter string) *inbox {
	t.Helper()
	in := &inbox{}
	if err := h.b.Subscribe(filter, in.handle); err != nil {
		t.Fatalf("Subscribe(%q): %v", filter, err)
	}
	return in
}

// client is a paho MQTT 3.1.1 client.
type client struct {
	paho.Client
	lost chan error
	msgs chan paho.Message
}

func dialPaho(t *testing.T, broker, id, user, pass string, mod ...func(*paho.ClientOptions)) (*client, error) {
	t.Helper()
	c := &client{lost: make(chan error, 1), msgs: make(chan paho.Message, 64)}
	o := paho.NewClientOptions().AddBroker(broker).SetClientID(id).SetUsername(user).SetPassword(pass).
		SetProtocolVersion(4). // else paho retries a refused CONNECT as MQTT 3.1
		SetAutoReconnect(false).SetConnectRetry(false).SetConnectTimeout(5 * time.Second).
		SetKeepAlive(30 * time.Second).SetOrderMatters(false).SetCleanSession(true).
		SetConnectionLostHandler(func(_ paho.Client, err error) {
			select {
			case c.lost <- err:
			default:
			}
		}).
		SetDefaultPublishHandler(func(_ paho.Client, m paho.Message) { c.msgs <- m })
	for _, f := range mod {
		f(o)
	}
	c.Client = paho.NewClient(o)
	tok := c.Connect()
	if !tok.WaitTimeout(waitTimeout) {
		return nil, errors.New("connect timed out")
	}
	if err := tok.Error(); err != nil {
		return nil, err
	}
	t.Cleanup(func() {
		if c.IsConnectionOpen() {
			c.Disconnect(50)
		}
	})
	return c, nil
}

func (h *harness) dial(t *testing.T, id, user, pass string, mod ...func(*paho.ClientOptions)) (*client, error) {
	t.Helper()
	return dialPaho(t, "tcp://"+h.addr, id, user, pass, mod...)
}

func (h *harness) mustDial(t *testing.T, id, user, pass string, mod ...func(*paho.ClientOptions)) *client {
	t.Helper()
	c, err := h.dial(t, id, user, pass, mod...)
	if err != nil {
		t.Fatalf("connect %s: %v", id, err)
	}
	return c
}

func (h *harness) mustDialDevice(t *testing.T, id string) *client {
	t.Helper()
	return h.mustDial(t, id, id, "secret-"+id)
}

func (c *client) waitLost(t *testing.T) {
	t.Helper()
	select {
	case <-c.lost:
	case <-time.After(waitTimeout):
		t.Fatal("connection not lost")
	}
}

func (c *client) mustPublish(t *testing.T, topic string, qos byte, payload []byte) {
	t.Helper()
	tok := c.Publish(topic, qos, false, payload)
	if !tok.WaitTimeout(waitTimeout) {
		t.Fatalf("publish %s timed out", topic)
	}
	if err := tok.Error(); err != nil {
		t.Fatalf("publish %s: %v", topic, err)
	}
}

// subscribeResult returns the SUBACK code paho got for filter.
func (c *client) subscribeResult(t *testing.T, filter string, qos byte) byte {
	t.Helper()
	tok := c.Subscribe(filter, qos, nil)
	if !tok.WaitTimeout(waitTimeout) {
		t.Fatalf("subscribe %s timed out", filter)
	}
	if err := tok.Error(); err != nil {
		t.Fatalf("subscribe %s: %v", filter, err)
	}
	key := filter
	if strings.HasPrefix(key, "$share/") { // paho keys results by the filter without the share part
		key = strings.Join(strings.Split(key, "/")[2:], "/")
	}
	return tok.(*paho.SubscribeToken).Result()[key]
}

func (c *client) nextMessage(t *testing.T) paho.Message {
	t.Helper()
	select {
	case m := <-c.msgs:
		return m
	case <-time.After(waitTimeout):
		t.Fatal("no message received")
		return nil
	}
}

// raw is a bare MQTT client built on mochi's packet codec, for what paho
// (3.1.1 only) cannot show: MQTT 5 reason codes, properties, abrupt closes.
type raw struct {
	t    *testing.T
	conn net.Conn
	r    *bufio.Reader
	v    byte
	next uint16
	id   string // the client id connectIdle gave it
}

func dialRaw(t *testing.T, addr string, version byte) *raw {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, waitTimeout)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return &raw{t: t, conn: c, r: bufio.NewReader(c), v: version}
}

func (r *raw) send(pk packets.Packet) {
	r.t.Helper()
	pk.ProtocolVersion = r.v
	var buf bytes.Buffer
	var err error
	switch pk.FixedHeader.Type {
	case packets.Connect:
		err = pk.ConnectEncode(&buf)
	case packets.Publish:
		err = pk.PublishEncode(&buf)
	case packets.Puback:
		err = pk.PubackEncode(&buf)
	case packets.Pubrel:
		err = pk.PubrelEncode(&buf)
	case packets.Subscribe:
		err = pk.SubscribeEncode(&buf)
	case packets.Disconnect:
		err = pk.DisconnectEncode(&buf)
	case packets.Pingreq:
		err = pk.PingreqEncode(&buf)
	default:
		r.t.Fatalf("raw: cannot send packet type %d", pk.FixedHeader.Type)
	}
	if err != nil {
		r.t.Fatalf("raw: encode: %v", err)
	}
	if _, err := r.conn.Write(buf.Bytes()); err != nil {
		r.t.Fatalf("raw: write: %v", err)
	}
}

// read returns the next packet, or an error (io.EOF when the broker closed).
func (r *raw) read() (packets.Packet, error) {
	_ = r.conn.SetReadDeadline(time.Now().Add(waitTimeout))
	var pk packets.Packet
	hb, err := r.r.ReadByte()
	if err != nil {
		return pk, err
	}
	if err := pk.FixedHeader.Decode(hb); err != nil {
		return pk, err
	}
	n, _, err := packets.DecodeLength(r.r)
	if err != nil {
		return pk, err
	}
	pk.FixedHeader.Remaining = n
	body := make([]byte, n)
	if _, err := io.ReadFull(r.r, body); err != nil {
		return pk, err
	}
	pk.ProtocolVersion = r.v
	switch pk.FixedHeader.Type {
	case packets.Connack:
		err = pk.ConnackDecode(body)
	case packets.Publish:
		err = pk.PublishDecode(body)
	case packets.Puback:
		err = pk.PubackDecode(body)
	case packets.Pubrec:
		err = pk.PubrecDecode(body)
	case packets.Pubcomp:
		err = pk.PubcompDecode(body)
	case packets.Suback:
		err = pk.SubackDecode(body)
	case packets.Disconnect:
		err = pk.DisconnectDecode(body)
	}
	return pk, err
}

func (r *raw) mustRead(want byte) packets.Packet {
	r.t.Helper()
	pk, err := r.read()
	if err != nil {
		r.t.Fatalf("raw: read: %v", err)
	}
	if pk.FixedHeader.Type != want {
		r.t.Fatalf("raw: got packet type %d, want %d", pk.FixedHeader.Type, want)
	}
	return pk
}

// waitClosed reads until the broker closes the connection.
func (r *raw) waitClosed() {
	r.t.Helper()
	for {
		if _, err := r.read(); err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				r.t.Fatal("raw: connection not closed by the broker")
			}
			return
		}
	}
}

func (r *raw) connect(id, user, pass string, keepalive uint16, mod func(*packets.Packet)) packets.Packet {
	r.t.Helper()
	pk := packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Connect},
		Connect: packets.ConnectParams{
			ProtocolName:     []byte("MQTT"),
			Clean:            true,
			Keepalive:        keepalive,
			ClientIdentifier: id,
			UsernameFlag:     user != "",
			Username:         []byte(user),
			PasswordFlag:     pass != "",
			Password:         []byte(pass),
		},
	}
	if mod != nil {
		mod(&pk)
	}
	r.send(pk)
	return r.mustRead(packets.Connack)
}

func (r *raw) publish(topic string, qos byte, payload []byte) uint16 {
	r.t.Helper()
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: qos}, TopicName: topic, Payload: payload}
	if qos > 0 {
		r.next++
		pk.PacketID = r.next
	}
	r.send(pk)
	return pk.PacketID
}

func (r *raw) subscribe(filter string, qos byte) packets.Packet {
	r.t.Helper()
	r.next++
	r.send(packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1},
		PacketID:    r.next,
		Filters:     packets.Subscriptions{{Filter: filter, Qos: qos}},
	})
	return r.mustRead(packets.Suback)
}

func jsonHas(s string, parts ...string) bool {
	for _, p := range parts {
		if !strings.Contains(s, p) {
			return false
		}
	}
	return true
}
