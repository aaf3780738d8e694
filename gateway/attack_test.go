package gateway_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	pahopackets "github.com/eclipse/paho.mqtt.golang/packets"

	"github.com/lockergate/lockergate/broker"
	"github.com/lockergate/lockergate/client"
	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/protocol"
)

// The attack suite: real TCP clients against the real gateway (embedded
// broker, PostgreSQL, provisioning). Every refusal is shown three ways: the
// client sees it (CONNACK refused, SUBACK 0x80, no delivery), nothing reached
// the database, and the refusal metric moved by exactly one.

// secConn is a raw MQTT 3.1.1 client that keeps, in arrival order, every
// message it receives and tells when its connection is lost.
type secConn struct {
	paho.Client
	lost chan error
	msgs chan paho.Message
}

// secDial connects from the loopback source address src ("" for any).
// Attacks come from their own addresses so that one case's refusals do not
// trip the per-address rate limit of the next. MQTT 3.1.1 only: paho would
// retry a refused CONNECT as MQTT 3.1 and every refusal would count twice.
func secDial(addr, src, clientID, user, pass string, mod ...func(*paho.ClientOptions)) (*secConn, error) {
	c := &secConn{lost: make(chan error, 1), msgs: make(chan paho.Message, 4096)}
	o := paho.NewClientOptions().AddBroker("tcp://" + addr).SetClientID(clientID).
		SetUsername(user).SetPassword(pass).SetProtocolVersion(4).
		SetAutoReconnect(false).SetConnectRetry(false).SetConnectTimeout(5 * time.Second).
		SetKeepAlive(30 * time.Second).SetCleanSession(true).
		// In order, so a marker received proves nothing earlier is pending;
		// the handler only queues, it never blocks on the test.
		SetOrderMatters(true).
		SetDefaultPublishHandler(func(_ paho.Client, m paho.Message) { c.msgs <- m }).
		SetConnectionLostHandler(func(_ paho.Client, err error) {
			select {
			case c.lost <- err:
			default:
			}
		})
	if src != "" {
		o.SetDialer(&net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}})
	}
	for _, f := range mod {
		f(o)
	}
	c.Client = paho.NewClient(o)
	t := c.Connect()
	if !t.WaitTimeout(10 * time.Second) {
		return nil, errors.New("connect timed out")
	}
	if err := t.Error(); err != nil {
		return nil, err
	}
	return c, nil
}

// mustSecDial connects or fails the test; the client disconnects at cleanup.
func mustSecDial(tb testing.TB, addr, src, clientID, user, pass string, mod ...func(*paho.ClientOptions)) *secConn {
	tb.Helper()
	c, err := secDial(addr, src, clientID, user, pass, mod...)
	if err != nil {
		tb.Fatalf("connect %s: %v", clientID, err)
	}
	tb.Cleanup(func() {
		if c.IsConnectionOpen() {
			c.Disconnect(50)
		}
	})
	return c
}

// refused reports whether err is a CONNACK refusal for good (not a network
// error, not "retry later").
func refused(err error) bool {
	return errors.Is(err, pahopackets.ErrorRefusedNotAuthorised) || errors.Is(err, pahopackets.ErrorRefusedBadUsernameOrPassword)
}

// refusedForNow reports whether err is a CONNACK saying "retry later"
// (rate limited, database unreachable, busy).
func refusedForNow(err error) bool {
	return errors.Is(err, pahopackets.ErrorRefusedServerUnavailable)
}

// subscribe returns the SUBACK code for filter (0x80: refused).
func (c *secConn) subscribe(tb testing.TB, filter string, qos byte) byte {
	tb.Helper()
	t := c.Subscribe(filter, qos, nil)
	if !t.WaitTimeout(10 * time.Second) {
		tb.Fatalf("subscribe %s: no SUBACK within 10 s", filter)
	}
	if err := t.Error(); err != nil {
		tb.Fatalf("subscribe %s: %v", filter, err)
	}
	key := filter
	if strings.HasPrefix(key, "$share/") { // paho keys results by the filter without the share part
		key = strings.Join(strings.Split(key, "/")[2:], "/")
	}
	code, ok := t.(*paho.SubscribeToken).Result()[key]
	if !ok {
		tb.Fatalf("subscribe %s: no result in SUBACK", filter)
	}
	return code
}

// mustSubscribe subscribes and fails the test unless the broker granted it.
func (c *secConn) mustSubscribe(tb testing.TB, filter string) {
	tb.Helper()
	if code := c.subscribe(tb, filter, 1); code >= 0x80 {
		tb.Fatalf("subscribe %s refused (0x%02x)", filter, code)
	}
}

// mustPublish publishes and waits for the PUBACK (QoS 1) or the write (QoS 0).
func (c *secConn) mustPublish(tb testing.TB, topic string, qos byte, retain bool, payload []byte) {
	tb.Helper()
	t := c.Publish(topic, qos, retain, payload)
	if !t.WaitTimeout(10 * time.Second) {
		tb.Fatalf("publish %s: not done within 10 s", topic)
	}
	if err := t.Error(); err != nil {
		tb.Fatalf("publish %s: %v", topic, err)
	}
}

// waitLost waits up to d for the broker to end the connection.
func (c *secConn) waitLost(d time.Duration) error {
	select {
	case <-c.lost:
		return nil
	case <-time.After(d):
		return fmt.Errorf("connection still open after %v", d)
	}
}

// until reads messages until one whose payload contains marker arrives and
// returns those before it as "topic payload" lines.
func (c *secConn) until(tb testing.TB, marker string) []string {
	tb.Helper()
	var before []string
	deadline := time.After(10 * time.Second)
	for {
		select {
		case m := <-c.msgs:
			if strings.Contains(string(m.Payload()), marker) {
				return before
			}
			before = append(before, m.Topic()+" "+string(m.Payload()))
		case <-deadline:
			tb.Fatalf("marker %q not received within 10 s (got %q)", marker, before)
		}
	}
}

// hasAny reports whether any of msgs contains sub.
func hasAny(msgs []string, sub string) bool {
	for _, m := range msgs {
		if strings.Contains(m, sub) {
			return true
		}
	}
	return false
}

// spy records every message that reaches the gateway's own subscriptions.
// Inline handlers run on the publisher's goroutine, in the order its packets
// are processed, so a spied marker proves its predecessors were spied too.
type spy struct {
	mu   sync.Mutex
	msgs []fleet.Message
}

func newSpy(tb testing.TB, tg *TestGateway, filters ...string) *spy {
	tb.Helper()
	s := &spy{}
	for _, f := range filters {
		if err := tg.Broker().Subscribe(f, s.handle); err != nil {
			tb.Fatalf("spy on %s: %v", f, err)
		}
	}
	return s
}

func (s *spy) handle(m fleet.Message) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.msgs = append(s.msgs, m)
}

// containing returns the topics of the spied messages whose payload contains sub.
func (s *spy) containing(sub string) []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []string
	for _, m := range s.msgs {
		if strings.Contains(string(m.Payload), sub) {
			out = append(out, m.ClientID+" -> "+m.Topic)
		}
	}
	return out
}

// waitFor waits until a message containing sub was spied.
func (s *spy) waitFor(tb testing.TB, sub string) {
	tb.Helper()
	Eventually(tb, 10*time.Second, "gateway receives "+sub, func() error {
		if len(s.containing(sub)) == 0 {
			return errors.New("not yet")
		}
		return nil
	})
}

// Metric series the suite watches.
func authFailures(reason string) string {
	return `lockergate_mqtt_auth_failures_total{reason="` + reason + `"}`
}
func aclDenied(action string) string {
	return `lockergate_mqtt_acl_denied_total{action="` + action + `"}`
}
func mqttDisconnects(reason string) string {
	return `lockergate_mqtt_disconnects_total{reason="` + reason + `"}`
}
func mqttDropped(reason string) string {
	return `lockergate_mqtt_messages_dropped_total{reason="` + reason + `"}`
}
func provisioningResults(result string) string {
	return `lockergate_mqtt_provisioning_total{result="` + result + `"}`
}

// Counters whose every series a case checks: the one it expects moves by
// exactly what it expects, all others stay put.
var refusalCounters = []string{"lockergate_mqtt_auth_failures_total", "lockergate_mqtt_acl_denied_total",
	"lockergate_mqtt_connects_total"}

// scrape returns every lockergate_ sample of /metrics.
func scrape(tb testing.TB, tg *TestGateway) map[string]float64 {
	tb.Helper()
	out, err := scrapeErr(tg)
	if err != nil {
		tb.Fatal(err)
	}
	return out
}

func scrapeErr(tg *TestGateway) (map[string]float64, error) {
	resp, err := http.Get("http://" + tg.HTTPAddr() + "/metrics")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	out := map[string]float64{}
	for _, line := range strings.Split(string(b), "\n") {
		if !strings.HasPrefix(line, "lockergate_") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			return nil, fmt.Errorf("metrics line %q: %v", line, err)
		}
		out[line[:i]] = v
	}
	return out, nil
}

// wantDeltas waits until, since before, every series of the named metrics
// moved by exactly want[series] (0 when absent), and fails if it does not.
func wantDeltas(tb testing.TB, tg *TestGateway, before map[string]float64, want map[string]float64, metrics ...string) {
	tb.Helper()
	for s := range want {
		if _, ok := before[s]; !ok {
			tb.Fatalf("no series %s in /metrics", s)
		}
	}
	Eventually(tb, 5*time.Second, "metric deltas", func() error {
		now, err := scrapeErr(tg)
		if err != nil {
			return err
		}
		var bad []string
		for s, v := range now {
			name, _, _ := strings.Cut(s, "{")
			watched := false
			for _, m := range metrics {
				watched = watched || name == m
			}
			if _, ok := want[s]; !ok && !watched {
				continue
			}
			if d := v - before[s]; d != want[s] {
				bad = append(bad, fmt.Sprintf("%s moved by %v, want %v", s, d, want[s]))
			}
		}
		sort.Strings(bad)
		if len(bad) > 0 {
			return errors.New(strings.Join(bad, "; "))
		}
		return nil
	})
}

// dbState summarises what devices can change in the database, leaving out
// the rows of device exclude (the attacker's own markers land there).
func dbState(tb testing.TB, tg *TestGateway, exclude string) string {
	tb.Helper()
	const q = `SELECT concat_ws(' | ',
		'events=' || (SELECT count(*) FROM events WHERE device_id <> $1),
		'event_ids=' || (SELECT count(*) FROM event_ids WHERE device_id <> $1),
		'health=' || (SELECT count(*) FROM health WHERE device_id <> $1),
		'alerts=' || (SELECT count(*) FROM alerts WHERE device_id <> $1),
		'presence=' || (SELECT count(*) FROM presence_log WHERE device_id <> $1),
		'audit=' || (SELECT count(*) FROM audit),
		'claim_uses=' || (SELECT count(*) FROM claim_uses),
		'claims=' || (SELECT string_agg(id || ':' || uses || ':' || (revoked_at IS NULL), ',' ORDER BY id) FROM claims),
		'devices=' || (SELECT string_agg(concat_ws(':', id, serial, site, online, boot_id, fw, health_seq, creds_acked,
			disabled, replaceable, key_gen, encode(secret_hash, 'hex')), ',' ORDER BY id) FROM devices WHERE id <> $1),
		'compartments=' || (SELECT string_agg(concat_ws(':', device_id, n, size, zone, in_service, occupied, door), ','
			ORDER BY device_id, n) FROM compartments WHERE device_id <> $1),
		'commands=' || (SELECT string_agg(concat_ws(':', id, status, error), ',' ORDER BY id) FROM commands WHERE device_id <> $1))`
	var s string
	if err := tg.DB().Pool().QueryRow(context.Background(), q, exclude).Scan(&s); err != nil {
		tb.Fatalf("read database state: %v", err)
	}
	return s
}

// waitOnline waits until the API shows the locker online (or offline).
func waitOnline(tb testing.TB, tg *TestGateway, id string, online bool) {
	tb.Helper()
	Eventually(tb, 10*time.Second, fmt.Sprintf("locker %s online=%v", id, online), func() error {
		var l fleet.Locker
		if err := tg.Admin.Get(context.Background(), "/v1/lockers/"+id, nil, &l); err != nil {
			return err
		}
		if l.Online != online {
			return fmt.Errorf("online=%v", l.Online)
		}
		return nil
	})
}

// waitEvent waits until the event is stored for the device.
func waitEvent(tb testing.TB, tg *TestGateway, device, eventID string) {
	tb.Helper()
	Eventually(tb, 10*time.Second, "event "+eventID+" stored", func() error {
		var n int
		if err := tg.DB().Pool().QueryRow(context.Background(),
			`SELECT count(*) FROM events WHERE device_id = $1 AND event_id = $2`, device, eventID).Scan(&n); err != nil {
			return err
		}
		if n != 1 {
			return fmt.Errorf("%d rows", n)
		}
		return nil
	})
}

// patchLocker sends PATCH /v1/lockers/{id} as the admin.
func patchLocker(tb testing.TB, tg *TestGateway, id string, body map[string]bool) {
	tb.Helper()
	if _, err := tg.Admin.Do(context.Background(), client.Request{Method: "PATCH", Path: "/v1/lockers/" + id, Body: body}, nil); err != nil {
		tb.Fatalf("PATCH locker %s %v: %v", id, body, err)
	}
}

// newSite creates a site through the API.
func newSite(tb testing.TB, tg *TestGateway, id string) {
	tb.Helper()
	if err := tg.Admin.Post(context.Background(), "/v1/sites", map[string]string{"id": id}, nil); err != nil {
		tb.Fatalf("create site %s: %v", id, err)
	}
}

// newClaim creates a claim through the API and returns its id and token.
func newClaim(tb testing.TB, tg *TestGateway, body map[string]any) (id, token string) {
	tb.Helper()
	var c struct {
		ID    string `json:"id"`
		Token string `json:"token"`
	}
	if err := tg.Admin.Post(context.Background(), "/v1/claims", body, &c); err != nil {
		tb.Fatalf("create claim: %v", err)
	}
	return c.ID, c.Token
}

// provisionRequest is a valid request for serial.
func provisionRequest(serial string) []byte {
	return protocol.Encode(protocol.ProvisionRequest{Serial: serial, Model: "LX-2", FW: "1.0.0",
		Compartments: []protocol.CompartmentSpec{{N: 1, Size: "M", Zone: "ambient"}, {N: 2, Size: "L", Zone: "chilled"}}})
}

// claimSession connects as the provisioning client of serial and subscribes
// to its response topic.
func claimSession(tb testing.TB, tg *TestGateway, src, token, serial string) *secConn {
	tb.Helper()
	c := mustSecDial(tb, tg.MQTTAddr(), src, protocol.ProvisionClientPrefix+serial, protocol.ProvisionUsername, token)
	c.mustSubscribe(tb, protocol.ProvisionResponseTopic(serial))
	return c
}

// ask publishes a provisioning request on the session's own topic and
// returns the answer.
func (c *secConn) ask(tb testing.TB, serial string, payload []byte) protocol.ProvisionResponse {
	tb.Helper()
	c.mustPublish(tb, protocol.ProvisionRequestTopic(serial), 1, false, payload)
	select {
	case m := <-c.msgs:
		if m.Topic() != protocol.ProvisionResponseTopic(serial) {
			tb.Fatalf("message on %s, want the answer", m.Topic())
		}
		var r protocol.ProvisionResponse
		if err := json.Unmarshal(m.Payload(), &r); err != nil {
			tb.Fatalf("answer %s: %v", m.Payload(), err)
		}
		return r
	case <-time.After(15 * time.Second):
		tb.Fatal("no provisioning answer within 15 s")
	}
	panic("unreachable")
}

// secProvision provisions serial with a claim and returns the answer; the
// claim session must end once answered.
func secProvision(tb testing.TB, tg *TestGateway, src, token, serial string) protocol.ProvisionResponse {
	tb.Helper()
	const deliveredQ = `SELECT count(*) FROM claim_uses WHERE serial = $1 AND outcome = 'provision.delivered'`
	delivered := tg.Count(tb, deliveredQ, serial)
	c := claimSession(tb, tg, src, token, serial)
	r := c.ask(tb, serial, provisionRequest(serial))
	if r.Status != "ok" {
		tb.Fatalf("provision %s: %+v", serial, r)
	}
	if err := c.waitLost(5 * time.Second); err != nil {
		tb.Fatalf("claim session of %s after its answer: %v", serial, err)
	}
	// The client sees the end first; the broker counts it a moment later.
	// Callers compare counters next, so wait for the broker too.
	Eventually(tb, 5*time.Second, "claim session of "+serial+" ended at the broker", func() error {
		if v, err := tg.Metric(`lockergate_mqtt_connections{kind="provisioning"}`); err != nil || v != 0 {
			return fmt.Errorf("%v provisioning sessions (%v)", v, err)
		}
		return nil
	})
	// The answer's delivery is recorded (a claim use of its own) after the
	// session ends: callers compare database states next.
	Eventually(tb, 5*time.Second, "the delivery of "+serial+"'s answer recorded", func() error {
		if n := tg.Count(tb, deliveredQ, serial); n != delivered+1 {
			return fmt.Errorf("%d deliveries recorded, want %d", n, delivered+1)
		}
		return nil
	})
	return r
}

// TestAttackConnect tries every CONNECT that must be refused against the
// real gateway.
func TestAttackConnect(t *testing.T) {
	ctx := context.Background()
	tg := MustStart(t)
	newSite(t, tg, "s1")
	_, claim := newClaim(t, tg, map[string]any{"site": "s1", "uses": 10, "expires_in_s": 3600})
	addr := tg.MQTTAddr()

	// V: the victim, online throughout; its session must survive every attack.
	v := secProvision(t, tg, "127.0.1.1", claim, "SN-VICTIM")
	victim := mustSecDial(t, addr, "127.0.1.2", v.DeviceID, v.DeviceID, v.Password)
	waitOnline(t, tg, v.DeviceID, true)

	// D: disabled by an operator after it connected (its secret is cached).
	d := secProvision(t, tg, "127.0.1.1", claim, "SN-DISABLED")
	mustSecDial(t, addr, "127.0.1.3", d.DeviceID, d.DeviceID, d.Password).Disconnect(50)
	waitOnline(t, tg, d.DeviceID, false)
	patchLocker(t, tg, d.DeviceID, map[string]bool{"disabled": true})

	// R: re-provisioned after an operator marked it replaceable; its old
	// secret was cached by a connection before.
	r := secProvision(t, tg, "127.0.1.1", claim, "SN-REPLACED")
	mustSecDial(t, addr, "127.0.1.4", r.DeviceID, r.DeviceID, r.Password).Disconnect(50)
	waitOnline(t, tg, r.DeviceID, false) // settled: the cases compare database states
	patchLocker(t, tg, r.DeviceID, map[string]bool{"replaceable": true})
	r2 := secProvision(t, tg, "127.0.1.1", claim, "SN-REPLACED")
	if r2.DeviceID != r.DeviceID || r2.Password == r.Password || r2.CredKey == r.CredKey {
		t.Fatalf("replacement: id %s -> %s, secret changed %v, cred_key changed %v",
			r.DeviceID, r2.DeviceID, r2.Password != r.Password, r2.CredKey != r.CredKey)
	}

	// A revoked claim.
	revokedID, revoked := newClaim(t, tg, map[string]any{"site": "s1", "uses": 10, "expires_in_s": 3600})
	if _, err := tg.Admin.Do(ctx, client.Request{Method: "DELETE", Path: "/v1/claims/" + revokedID}, nil); err != nil {
		t.Fatal(err)
	}

	type attempt struct {
		name           string
		id, user, pass string
		mod            func(*paho.ClientOptions)
		reason         string
	}
	cases := []attempt{
		{name: "BadPassword", id: v.DeviceID, user: v.DeviceID, pass: v.Password + "x", reason: "bad_credentials"},
		{name: "OtherDevicesSecret", id: v.DeviceID, user: v.DeviceID, pass: r2.Password, reason: "bad_credentials"},
		{name: "UnknownDevice", id: "lk-nobody", user: "lk-nobody", pass: v.Password, reason: "unknown_device"},
		{name: "ClientIDNotUsername", id: v.DeviceID, user: r2.DeviceID, pass: r2.Password, reason: "client_id_mismatch"},
		{name: "UsernameNotClientID", id: r2.DeviceID, user: v.DeviceID, pass: v.Password, reason: "client_id_mismatch"},
		{name: "DisabledDevice", id: d.DeviceID, user: d.DeviceID, pass: d.Password, reason: "disabled"},
		{name: "EmptyCredentials", id: v.DeviceID, reason: "bad_credentials"},
		{name: "EmptyPassword", id: v.DeviceID, user: v.DeviceID, reason: "bad_credentials"},
		{name: "EmptyUsername", id: v.DeviceID, pass: v.Password, reason: "bad_credentials"},
		{name: "ProvClientWithDeviceSecret", id: "prov-SN-VICTIM", user: "claim", pass: v.Password, reason: "unknown_claim"},
		{name: "ProvClientWithDeviceIdentity", id: "prov-SN-VICTIM", user: v.DeviceID, pass: v.Password, reason: "client_id_mismatch"},
		{name: "DeviceIDAsClaim", id: "prov-SN-NEW", user: "claim", pass: v.DeviceID, reason: "unknown_claim"},
		{name: "ClaimOnDeviceClientID", id: v.DeviceID, user: "claim", pass: claim, reason: "client_id_mismatch"},
		{name: "ClaimAsDeviceSecret", id: v.DeviceID, user: v.DeviceID, pass: claim, reason: "bad_credentials"},
		{name: "RevokedClaim", id: "prov-SN-NEW", user: "claim", pass: revoked, reason: "unknown_claim"},
		{name: "ReplacedOldSecret", id: r.DeviceID, user: r.DeviceID, pass: r.Password, reason: "bad_credentials"},
		{name: "InlineClientID", id: "inline", user: "inline", pass: v.Password, reason: "invalid_client_id"},
		{name: "WildcardClientID", id: "lockers/v1/+", user: "lockers/v1/+", pass: v.Password, reason: "invalid_client_id"},
		{name: "ProvClientBadSerial", id: "prov-SN/#", user: "claim", pass: claim, reason: "invalid_client_id"},
		{name: "WillAsOtherDevice", id: r2.DeviceID, user: r2.DeviceID, pass: r2.Password, reason: "will_denied",
			mod: func(o *paho.ClientOptions) {
				o.SetWill(protocol.Topic(v.DeviceID, protocol.ChanPresence), `{"online":false}`, 1, true)
			}},
		{name: "WillOnClaimSession", id: "prov-SN-NEW", user: "claim", pass: claim, reason: "will_denied",
			mod: func(o *paho.ClientOptions) {
				o.SetWill(protocol.Topic(v.DeviceID, protocol.ChanPresence), `{"online":false}`, 1, true)
			}},
	}
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			before, state := scrape(t, tg), dbState(t, tg, "")
			src := fmt.Sprintf("127.0.2.%d", i+1)
			var mod []func(*paho.ClientOptions)
			if c.mod != nil {
				mod = append(mod, c.mod)
			}
			cl, err := secDial(addr, src, c.id, c.user, c.pass, mod...)
			if err == nil {
				cl.Disconnect(0)
				t.Fatal("connection accepted")
			}
			if !refused(err) {
				t.Fatalf("got %v, want a refused CONNACK", err)
			}
			wantDeltas(t, tg, before, map[string]float64{authFailures(c.reason): 1}, refusalCounters...)
			if got := dbState(t, tg, ""); got != state {
				t.Errorf("database changed:\n got %s\nwant %s", got, state)
			}
		})
	}

	t.Run("VictimUnaffected", func(t *testing.T) {
		if err := victim.waitLost(0); err == nil {
			t.Fatal("the victim's session was ended by an attack")
		}
		waitOnline(t, tg, v.DeviceID, true)
		victim.mustSubscribe(t, protocol.Topic(v.DeviceID, protocol.ChanCmd))
		var cmd fleet.Command
		if err := tg.Admin.Post(ctx, "/v1/lockers/"+v.DeviceID+"/commands", map[string]any{"type": "unlock", "compartment": 1}, &cmd); err != nil {
			t.Fatal(err)
		}
		victim.until(t, cmd.ID)
	})
	t.Run("NewSecretWorks", func(t *testing.T) {
		mustSecDial(t, addr, "127.0.1.5", r2.DeviceID, r2.DeviceID, r2.Password)
	})
}

// TestAttackACL: a connected device and a claim session try every publish
// and subscribe outside their own topics.
func TestAttackACL(t *testing.T) {
	ctx := context.Background()
	tg := MustStart(t)
	newSite(t, tg, "s1")
	_, claim := newClaim(t, tg, map[string]any{"site": "s1", "uses": 10, "expires_in_s": 3600})
	addr := tg.MQTTAddr()
	sp := newSpy(t, tg, "lockers/v1/#", "provision/v1/#")

	a := secProvision(t, tg, "127.0.3.1", claim, "SN-ATTACKER")
	v := secProvision(t, tg, "127.0.3.1", claim, "SN-VICTIM")
	victim := mustSecDial(t, addr, "127.0.3.2", v.DeviceID, v.DeviceID, v.Password)
	for _, ch := range []protocol.Channel{protocol.ChanCmd, protocol.ChanCreds, protocol.ChanConfig, protocol.ChanFwJob} {
		victim.mustSubscribe(t, protocol.Topic(v.DeviceID, ch))
	}
	waitOnline(t, tg, v.DeviceID, true)
	// A command the victim has not answered yet, for forged results to target.
	var vcmd fleet.Command
	if err := tg.Admin.Post(ctx, "/v1/lockers/"+v.DeviceID+"/commands",
		map[string]any{"type": "unlock", "compartment": 1, "ttl_s": 600}, &vcmd); err != nil {
		t.Fatal(err)
	}
	victim.until(t, vcmd.ID)

	now := protocol.FormatTime(time.Now())
	// Forged payloads are valid protocol messages, so they would be acted on
	// if they got through; each carries its case's tag in an ignored field.
	forged := func(ch protocol.Channel, tag string) string {
		switch ch {
		case protocol.ChanEvents:
			return `{"id":"e-` + tag + `","ts":"` + now + `","type":"door_opened","compartment":1,"by":"manual","x":"` + tag + `"}`
		case protocol.ChanHealth:
			return `{"ts":"` + now + `","seq":99,"uptime_s":5,"power":"battery","door_faults":[1],"x":"` + tag + `"}`
		case protocol.ChanPresence:
			return `{"online":false,"x":"` + tag + `"}`
		case protocol.ChanCmdResult:
			return `{"id":"` + vcmd.ID + `","status":"ok","ts":"` + now + `","x":"` + tag + `"}`
		case protocol.ChanCredsAck:
			return `{"version":1000,"x":"` + tag + `"}`
		case protocol.ChanFwStatus:
			return `{"job":"j-1","state":"succeeded","ts":"` + now + `","x":"` + tag + `"}`
		case protocol.ChanCmd:
			return `{"id":"c-` + tag + `","type":"unlock","compartment":1,"reason":"remote","issued_at":"` + now +
				`","expires_at":"` + protocol.FormatTime(time.Now().Add(time.Minute)) + `","x":"` + tag + `"}`
		case protocol.ChanCreds:
			return `{"version":1000,"ts":"` + now + `","creds":[{"id":"k-1","kind":"pin","mac":"AAAA","compartments":[1],"not_after":"` +
				protocol.FormatTime(time.Now().Add(time.Hour)) + `"}],"x":"` + tag + `"}`
		}
		return `{"x":"` + tag + `"}`
	}

	type pubCase struct {
		name   string
		topic  string
		ch     protocol.Channel // the payload's kind
		retain bool
	}
	vt := func(ch protocol.Channel) string { return protocol.Topic(v.DeviceID, ch) }
	at := func(ch protocol.Channel) string { return protocol.Topic(a.DeviceID, ch) }
	pubs := []pubCase{
		{"EventsAsOther", vt(protocol.ChanEvents), protocol.ChanEvents, false},
		{"CmdResultAsOther", vt(protocol.ChanCmdResult), protocol.ChanCmdResult, false},
		{"HealthAsOther", vt(protocol.ChanHealth), protocol.ChanHealth, false},
		{"PresenceAsOther", vt(protocol.ChanPresence), protocol.ChanPresence, true},
		{"CredsAckAsOther", vt(protocol.ChanCredsAck), protocol.ChanCredsAck, false},
		{"FwStatusAsOther", vt(protocol.ChanFwStatus), protocol.ChanFwStatus, false},
		{"CmdToOther", vt(protocol.ChanCmd), protocol.ChanCmd, false},
		{"CredsToOther", vt(protocol.ChanCreds), protocol.ChanCreds, true},
		{"ConfigToOther", vt(protocol.ChanConfig), protocol.ChanConfig, true},
		{"FwJobToOther", vt(protocol.ChanFwJob), protocol.ChanFwJob, true},
		{"OwnCmd", at(protocol.ChanCmd), protocol.ChanCmd, false},
		{"OwnCreds", at(protocol.ChanCreds), protocol.ChanCreds, true},
		{"UnknownChannel", protocol.Root + a.DeviceID + "/secrets", protocol.ChanEvents, false},
		{"BelowChannel", vt(protocol.ChanEvents) + "/x", protocol.ChanEvents, false},
		{"ProvisionRequest", protocol.ProvisionRequestTopic("SN-FORGED"), "", false},
		{"ProvisionResponse", protocol.ProvisionResponseTopic("SN-VICTIM"), "", false},
		{"SYS", "$SYS/broker/clients/connected", "", false},
	}
	// tagged adds the tag to a JSON object as an ignored field.
	tagged := func(payload []byte, tag string) []byte {
		return []byte(strings.Replace(string(payload), `{`, `{"x":"`+tag+`",`, 1))
	}

	n := 0
	for _, c := range pubs {
		for _, qos := range []byte{0, 1} {
			n++
			t.Run(fmt.Sprintf("Publish/%s/QoS%d", c.name, qos), func(t *testing.T) {
				tag := fmt.Sprintf("forged-%d", n)
				payload := tagged(provisionRequest("SN-FORGED"), tag)
				if c.ch != "" {
					payload = []byte(forged(c.ch, tag))
				}
				before, state := scrape(t, tg), dbState(t, tg, a.DeviceID)
				want := map[string]float64{aclDenied("publish"): 1, `lockergate_mqtt_connects_total{kind="device"}`: 1}
				src := fmt.Sprintf("127.0.4.%d", n)
				atk := mustSecDial(t, addr, src, a.DeviceID, a.DeviceID, a.Password)
				// MQTT 3.1.1 has no negative PUBACK: a refused QoS 1 publish
				// is acknowledged as usual and dropped, and the session goes on.
				if tok := atk.Publish(c.topic, qos, c.retain, payload); !tok.WaitTimeout(10 * time.Second) {
					t.Fatalf("QoS %d publish to %s not acknowledged", qos, c.topic)
				} else if err := tok.Error(); err != nil {
					t.Fatalf("QoS %d publish to %s: %v", qos, c.topic, err)
				}
				want[mqttDisconnects("not_authorized")] = 0
				// A later valid message on the same path: once the gateway has
				// it, the forged one would have arrived before it.
				marker := "m-" + tag
				atk.mustPublish(t, at(protocol.ChanEvents), 1, false,
					[]byte(`{"id":"`+marker+`","ts":"`+now+`","type":"reboot","reason":"marker"}`))
				sp.waitFor(t, marker)
				if got := sp.containing(`"x":"` + tag + `"`); len(got) > 0 {
					t.Errorf("forged message reached the gateway: %v", got)
				}
				// The victim's queue is flushed by a marker sent after it.
				if err := tg.Broker().Publish(ctx, vt(protocol.ChanCmd), []byte(`{"marker":"v`+marker+`"}`), 1, false); err != nil {
					t.Fatal(err)
				}
				if got := victim.until(t, "v"+marker); hasAny(got, `"x":"`+tag+`"`) {
					t.Errorf("the victim received %q", got)
				}
				waitEvent(t, tg, a.DeviceID, marker)
				wantDeltas(t, tg, before, want, refusalCounters...)
				if got := dbState(t, tg, a.DeviceID); got != state {
					t.Errorf("database changed:\n got %s\nwant %s", got, state)
				}
			})
		}
	}

	type subCase struct {
		name   string
		filter string
		probe  string // a topic the filter would match, published by the gateway ("" for none)
	}
	subs := []subCase{
		{"OthersCmd", vt(protocol.ChanCmd), vt(protocol.ChanCmd)},
		{"OthersCreds", vt(protocol.ChanCreds), vt(protocol.ChanCreds)},
		{"OthersConfig", vt(protocol.ChanConfig), vt(protocol.ChanConfig)},
		{"OthersFwJob", vt(protocol.ChanFwJob), vt(protocol.ChanFwJob)},
		{"OthersEvents", vt(protocol.ChanEvents), ""},
		{"Everything", "#", vt(protocol.ChanCmd)},
		{"AllCmd", "lockers/v1/+/cmd", vt(protocol.ChanCmd)},
		{"AllCreds", "lockers/v1/+/creds", vt(protocol.ChanCreds)},
		{"AllLockers", "lockers/v1/#", vt(protocol.ChanCmd)},
		{"AnyRootCmd", "+/+/+/cmd", vt(protocol.ChanCmd)},
		// Its own root with a wildcard, and its own outbound topics, are
		// its own topics (protocol v1) and allowed: TestOwnUplinkEcho.
		{"OwnRootNoTopic", protocol.Root + a.DeviceID + "/+/+/+", ""},
		{"SharedOthersCmd", "$share/g/" + vt(protocol.ChanCmd), vt(protocol.ChanCmd)},
		{"SYS", "$SYS/#", ""}, // the broker's own retained $SYS messages are the probe
		{"ProvisionResponses", "provision/v1/+/response", protocol.ProvisionResponseTopic("SN-PROBE")},
		{"ProvisionResponse", protocol.ProvisionResponseTopic("SN-PROBE"), protocol.ProvisionResponseTopic("SN-PROBE")},
		{"ProvisionRequests", "provision/v1/#", ""},
	}
	for i, c := range subs {
		t.Run("Subscribe/"+c.name, func(t *testing.T) {
			before, state := scrape(t, tg), dbState(t, tg, a.DeviceID)
			atk := mustSecDial(t, addr, fmt.Sprintf("127.0.5.%d", i+1), a.DeviceID, a.DeviceID, a.Password)
			atk.mustSubscribe(t, at(protocol.ChanCmd))
			if code := atk.subscribe(t, c.filter, 1); code != 0x80 {
				t.Errorf("SUBACK 0x%02x for %s, want 0x80", code, c.filter)
			}
			tag := fmt.Sprintf("probe-%d", i)
			if c.probe != "" {
				if err := tg.Broker().Publish(ctx, c.probe, []byte(`{"x":"`+tag+`"}`), 1, false); err != nil {
					t.Fatal(err)
				}
			}
			// Published after the probe into the same outbound queue.
			if err := tg.Broker().Publish(ctx, at(protocol.ChanCmd), []byte(`{"marker":"m-`+tag+`"}`), 1, false); err != nil {
				t.Fatal(err)
			}
			// Nothing but the marker: a granted $SYS/# would also bring the
			// broker's retained $SYS messages.
			if got := atk.until(t, "m-"+tag); len(got) > 0 {
				t.Errorf("attacker received %q", got)
			}
			wantDeltas(t, tg, before, map[string]float64{aclDenied("subscribe"): 1,
				`lockergate_mqtt_connects_total{kind="device"}`: 1}, refusalCounters...)
			if got := dbState(t, tg, a.DeviceID); got != state {
				t.Errorf("database changed:\n got %s\nwant %s", got, state)
			}
		})
	}

	// A claim session may only publish its own request and subscribe to its
	// own response, and it holds a valid claim for serial SN-CLAIM-n.
	claimPubs := []struct{ name, topic string }{
		{"OtherSerialsRequest", protocol.ProvisionRequestTopic("SN-OTHER")},
		{"OwnResponse", ""}, // filled per case: forging its own answer
		{"DeviceEvents", vt(protocol.ChanEvents)},
		{"DeviceCmd", vt(protocol.ChanCmd)},
		{"DevicePresence", vt(protocol.ChanPresence)},
	}
	for i, c := range claimPubs {
		t.Run("ClaimPublish/"+c.name, func(t *testing.T) {
			serial := fmt.Sprintf("SN-CLAIM-%d", i)
			topic := c.topic
			if topic == "" {
				topic = protocol.ProvisionResponseTopic(serial)
			}
			tag := fmt.Sprintf("forged-claim-%d", i)
			before, state := scrape(t, tg), dbState(t, tg, a.DeviceID)
			cs := claimSession(t, tg, fmt.Sprintf("127.0.6.%d", i+1), claim, serial)
			payload := tagged(provisionRequest("SN-OTHER"), tag)
			if !cs.Publish(topic, 0, false, payload).WaitTimeout(10 * time.Second) {
				t.Fatal("publish not written")
			}
			// The marker: a request on its own topic the gateway refuses
			// without touching the database (malformed), answered in order.
			if r := cs.ask(t, serial, []byte(`{"x":"m-`+tag+`"}`)); r.Status != "error" || r.Error != protocol.ProvInvalid {
				t.Fatalf("answer %+v, want invalid", r)
			}
			if got := sp.containing(`"x":"` + tag + `"`); len(got) > 0 {
				t.Fatalf("forged message reached the gateway: %v", got)
			}
			if err := tg.Broker().Publish(ctx, vt(protocol.ChanCmd), []byte(`{"marker":"v`+tag+`"}`), 1, false); err != nil {
				t.Fatal(err)
			}
			if got := victim.until(t, "v"+tag); hasAny(got, `"x":"`+tag+`"`) {
				t.Fatalf("the victim received %q", got)
			}
			if err := cs.waitLost(5 * time.Second); err != nil {
				t.Errorf("claim session after its answer: %v", err)
			}
			wantDeltas(t, tg, before, map[string]float64{aclDenied("publish"): 1,
				`lockergate_mqtt_connects_total{kind="provisioning"}`: 1, provisioningResults("invalid"): 1},
				append(refusalCounters, "lockergate_mqtt_provisioning_total")...)
			if got := dbState(t, tg, a.DeviceID); got != state {
				t.Errorf("database changed:\n got %s\nwant %s", got, state)
			}
		})
	}
	claimSubs := []struct{ name, filter, probe string }{
		{"OtherSerialsResponse", protocol.ProvisionResponseTopic("SN-OTHER"), protocol.ProvisionResponseTopic("SN-OTHER")},
		{"AllResponses", "provision/v1/+/response", protocol.ProvisionResponseTopic("SN-OTHER")},
		{"Everything", "#", vt(protocol.ChanCmd)},
		{"OwnRequest", "", ""}, // filled per case
		{"DeviceCmd", vt(protocol.ChanCmd), vt(protocol.ChanCmd)},
		{"DeviceCreds", vt(protocol.ChanCreds), vt(protocol.ChanCreds)},
		{"SYS", "$SYS/#", ""},
	}
	for i, c := range claimSubs {
		t.Run("ClaimSubscribe/"+c.name, func(t *testing.T) {
			serial := fmt.Sprintf("SN-CLAIMSUB-%d", i)
			filter := c.filter
			if filter == "" {
				filter = protocol.ProvisionRequestTopic(serial)
			}
			before, state := scrape(t, tg), dbState(t, tg, a.DeviceID)
			cs := claimSession(t, tg, fmt.Sprintf("127.0.7.%d", i+1), claim, serial)
			if code := cs.subscribe(t, filter, 1); code != 0x80 {
				t.Fatalf("SUBACK 0x%02x for %s, want 0x80", code, filter)
			}
			tag := fmt.Sprintf("probe-claim-%d", i)
			if c.probe != "" {
				if err := tg.Broker().Publish(ctx, c.probe, []byte(`{"x":"`+tag+`"}`), 1, false); err != nil {
					t.Fatal(err)
				}
			}
			// The answer is the first message the session gets: a probe let
			// through would have been queued before it.
			if r := cs.ask(t, serial, []byte(`{}`)); r.Status != "error" || r.Error != protocol.ProvInvalid {
				t.Fatalf("answer %+v, want invalid", r)
			}
			wantDeltas(t, tg, before, map[string]float64{aclDenied("subscribe"): 1,
				`lockergate_mqtt_connects_total{kind="provisioning"}`: 1, provisioningResults("invalid"): 1},
				append(refusalCounters, "lockergate_mqtt_provisioning_total")...)
			if got := dbState(t, tg, a.DeviceID); got != state {
				t.Errorf("database changed:\n got %s\nwant %s", got, state)
			}
		})
	}

	t.Run("OwnTopicOthersCommand", func(t *testing.T) {
		// Allowed topic, another device's command id: the result must not
		// complete the victim's command.
		var own fleet.Command
		atk := mustSecDial(t, addr, "127.0.3.3", a.DeviceID, a.DeviceID, a.Password)
		atk.mustSubscribe(t, at(protocol.ChanCmd))
		waitOnline(t, tg, a.DeviceID, true)
		if err := tg.Admin.Post(ctx, "/v1/lockers/"+a.DeviceID+"/commands",
			map[string]any{"type": "unlock", "compartment": 1, "ttl_s": 600}, &own); err != nil {
			t.Fatal(err)
		}
		atk.until(t, own.ID)
		atk.mustPublish(t, at(protocol.ChanCmdResult), 1, false, []byte(`{"id":"`+vcmd.ID+`","status":"ok","ts":"`+now+`"}`))
		atk.mustPublish(t, at(protocol.ChanCmdResult), 1, false, []byte(`{"id":"`+own.ID+`","status":"ok","ts":"`+now+`"}`))
		waitCommandStatus(t, tg, a.DeviceID, own.ID, fleet.CmdOK, "own command answered")
		var c fleet.Command
		if err := tg.Admin.Get(ctx, "/v1/lockers/"+v.DeviceID+"/commands/"+vcmd.ID, nil, &c); err != nil {
			t.Fatal(err)
		}
		if c.Status != fleet.CmdSent {
			t.Fatalf("victim's command is %s after another device answered it, want %s", c.Status, fleet.CmdSent)
		}
	})

	t.Run("PacketOverLimit", func(t *testing.T) {
		before, state := scrape(t, tg), dbState(t, tg, a.DeviceID)
		atk := mustSecDial(t, addr, "127.0.3.4", a.DeviceID, a.DeviceID, a.Password)
		big := `{"id":"e-big","ts":"` + now + `","type":"tamper","detail":"`
		big += strings.Repeat("x", broker.MaxPacketSize+1-len(big)-2) + `"}`
		atk.Publish(at(protocol.ChanEvents), 1, false, big)
		// Over the packet limit: mochi refuses it while reading and hangs up.
		if err := atk.waitLost(10 * time.Second); err != nil {
			t.Fatalf("oversize publish: %v", err)
		}
		atk = mustSecDial(t, addr, "127.0.3.4", a.DeviceID, a.DeviceID, a.Password)
		atk.mustPublish(t, at(protocol.ChanEvents), 1, false, []byte(`{"id":"m-big","ts":"`+now+`","type":"reboot"}`))
		sp.waitFor(t, "m-big")
		waitEvent(t, tg, a.DeviceID, "m-big")
		if got := sp.containing("e-big"); len(got) > 0 {
			t.Fatalf("oversize message reached the gateway: %v", got)
		}
		n := tg.Count(t, `SELECT count(*) FROM events WHERE event_id = 'e-big'`)
		if n != 0 {
			t.Fatal("oversize event stored")
		}
		wantDeltas(t, tg, before, map[string]float64{mqttDropped("too_large"): 1,
			mqttDisconnects("packet_too_large"): 1, `lockergate_mqtt_connects_total{kind="device"}`: 2},
			append(refusalCounters, "lockergate_mqtt_messages_dropped_total")...)
		if got := dbState(t, tg, a.DeviceID); got != state {
			t.Errorf("database changed:\n got %s\nwant %s", got, state)
		}
	})
	t.Run("PayloadOver16KiB", func(t *testing.T) {
		// Within the packet limit but over the protocol's 16 KiB: acknowledged
		// (so the device does not resend it forever) and dropped.
		before := scrape(t, tg)
		atk := mustSecDial(t, addr, "127.0.3.5", a.DeviceID, a.DeviceID, a.Password)
		big := `{"id":"e-big2","ts":"` + now + `","type":"tamper","detail":"`
		big += strings.Repeat("x", protocol.MaxPayload+1-len(big)-2) + `"}`
		atk.mustPublish(t, at(protocol.ChanEvents), 1, false, []byte(big))
		// Far over, as firmware with a bug might send: the session goes on.
		atk.mustPublish(t, at(protocol.ChanEvents), 1, false, bytes.Repeat([]byte("x"), 64<<10))
		atk.mustPublish(t, at(protocol.ChanEvents), 1, false, []byte(`{"id":"m-big2","ts":"`+now+`","type":"reboot"}`))
		sp.waitFor(t, "m-big2")
		waitEvent(t, tg, a.DeviceID, "m-big2")
		if got := sp.containing("e-big2"); len(got) > 0 {
			t.Fatalf("oversized message reached the gateway: %v", got)
		}
		wantDeltas(t, tg, before, map[string]float64{mqttDropped("too_large"): 2,
			`lockergate_mqtt_connects_total{kind="device"}`: 1},
			append(refusalCounters, "lockergate_mqtt_messages_dropped_total")...)
	})

	t.Run("NothingForgedReachedFleet", func(t *testing.T) {
		m := scrape(t, tg)
		if got := m[`lockergate_ingest_messages_dropped_total{channel="unknown",reason="wrong_topic"}`]; got != 0 {
			t.Errorf("the fleet dropped %v messages on another device's topic: the broker let them through", got)
		}
		if err := victim.waitLost(0); err == nil {
			t.Error("the victim's session ended")
		}
	})
}
