package gateway_test

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/lockergate/lockergate/client"
	"github.com/lockergate/lockergate/devicesim"
	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/gateway"
	"github.com/lockergate/lockergate/internal/pgtest"
	"github.com/lockergate/lockergate/internal/testtool"
	"github.com/lockergate/lockergate/protocol"
)

// hookAnswer is an EMQX hook answer.
type hookAnswer struct {
	Result string `json:"result"`
	Reason string `json:"reason"`
	ACL    []struct {
		Permission, Action, Topic string
	} `json:"acl"`
	Problem string `json:"-"` // the error answer, if any
}

// brokerHook calls the EMQX auth hooks of a gateway with a broker token.
type brokerHook struct{ c *client.Client }

func newBrokerHook(tb testing.TB, tg *TestGateway) brokerHook {
	_, c := tg.MustToken(tb, "broker", "", "emqx")
	return brokerHook{c}
}

func (h brokerHook) call(tb testing.TB, path string, body map[string]string) (int, hookAnswer) {
	tb.Helper()
	var out hookAnswer
	status, err := h.c.Do(context.Background(), client.Request{Method: "POST", Path: path, Body: body}, &out)
	if err != nil && status < 400 {
		tb.Fatalf("POST %s: %v", path, err)
	}
	if err != nil {
		out.Problem = err.Error()
	}
	return status, out
}

func (h brokerHook) authn(tb testing.TB, id, user, password string) hookAnswer {
	tb.Helper()
	status, a := h.call(tb, "/v1/broker-auth/emqx/authn", map[string]string{
		"clientid": id, "username": user, "password": password, "peerhost": "10.20.30.40"})
	if status != 200 {
		tb.Fatalf("authn %s: status %d: %s", id, status, a.Problem)
	}
	return a
}

func (h brokerHook) authz(tb testing.TB, id, topic, action string) string {
	tb.Helper()
	status, a := h.call(tb, "/v1/broker-auth/emqx/authz", map[string]string{
		"clientid": id, "username": id, "topic": topic, "action": action})
	if status != 200 {
		tb.Fatalf("authz %s %s %s: status %d: %s", id, action, topic, status, a.Problem)
	}
	return a.Result
}

// mustRefuse fails the test unless the broker at addr refuses id's CONNECT
// with password as bad credentials (not a timeout or a dead broker).
func mustRefuse(tb testing.TB, addr, id, password, what string) {
	tb.Helper()
	c, err := Connect(addr, id, id, password)
	if err == nil {
		c.Disconnect(50)
		tb.Fatalf("%s: connected, want refused", what)
	}
	if !refused(err) {
		tb.Fatalf("%s: %v, want a refused CONNACK", what, err)
	}
}

// waitConnects waits until id connects to addr with password (mosquitto
// applies dynamic security changes a moment after they are acknowledged).
func waitConnects(tb testing.TB, addr, id, password, what string) {
	tb.Helper()
	Eventually(tb, 10*time.Second, what, func() error {
		c, err := Connect(addr, id, id, password)
		if err != nil {
			return err
		}
		c.Disconnect(50)
		return nil
	})
}

// TestBrokerAuthHook drives the EMQX hooks with identities issued by real
// provisioning, checked against PostgreSQL.
func TestBrokerAuthHook(t *testing.T) {
	tg := MustStart(t)
	newSite(t, tg, "s1")
	_, claim := newClaim(t, tg, map[string]any{"site": "s1", "uses": 5, "expires_in_s": 3600})
	a := secProvision(t, tg, "127.0.1.1", claim, "SN-HOOK-A")
	b := secProvision(t, tg, "127.0.1.1", claim, "SN-HOOK-B")
	hook := newBrokerHook(t, tg)

	got := hook.authn(t, a.DeviceID, a.DeviceID, a.Password)
	if got.Result != "allow" || len(got.ACL) != len(protocol.Channels)+2 {
		t.Fatalf("the locker's own secret: %+v", got)
	}
	for _, r := range got.ACL[:len(protocol.Channels)] {
		if id, _, ok := protocol.ParseTopic(r.Topic); !ok || id != a.DeviceID || r.Permission != "allow" {
			t.Errorf("rule %+v is not an allow on %s's own topic", r, a.DeviceID)
		}
	}
	for _, c := range []struct{ name, id, user, pass, result, reason string }{
		{"OtherLockersSecret", a.DeviceID, a.DeviceID, b.Password, "deny", "bad_credentials"},
		{"UnknownLocker", "lk-nobody", "lk-nobody", a.Password, "deny", "unknown_device"},
		{"GatewayUser", "gw-a", "lockergate", "x", "ignore", ""},
		{"UsernameOfAnother", a.DeviceID, b.DeviceID, b.Password, "deny", "client_id_mismatch"},
		{"ToolWithALockersClientID", a.DeviceID, "ops-tool", "its-password", "deny", "client_id_mismatch"},
	} {
		if got := hook.authn(t, c.id, c.user, c.pass); got.Result != c.result || got.Reason != c.reason || got.ACL != nil {
			t.Errorf("%s: %+v, want %s %q", c.name, got, c.result, c.reason)
		}
	}
	if v, err := tg.Metric(`lockergate_mqtt_auth_failures_total{reason="unknown_device"}`); err != nil || v != 1 {
		t.Errorf("auth failures{unknown_device} = %v (%v), want 1", v, err)
	}

	for _, c := range []struct{ topic, action, want string }{
		{protocol.Topic(a.DeviceID, protocol.ChanEvents), "publish", "allow"},
		{protocol.Topic(a.DeviceID, protocol.ChanCreds), "subscribe", "allow"},
		{protocol.Topic(b.DeviceID, protocol.ChanEvents), "publish", "deny"},
		{protocol.Topic(b.DeviceID, protocol.ChanCmd), "subscribe", "deny"},
		{"lockers/v1/#", "subscribe", "deny"},
	} {
		if got := hook.authz(t, a.DeviceID, c.topic, c.action); got != c.want {
			t.Errorf("authz %s %s: %s, want %s", c.action, c.topic, got, c.want)
		}
	}

	// An operator disables the locker: its cached secret no longer admits
	// it, at once; enabled again, it is admitted again.
	patchLocker(t, tg, a.DeviceID, map[string]bool{"disabled": true})
	if got := hook.authn(t, a.DeviceID, a.DeviceID, a.Password); got.Result != "deny" || got.Reason != "disabled" {
		t.Fatalf("disabled locker: %+v", got)
	}
	patchLocker(t, tg, a.DeviceID, map[string]bool{"disabled": false})
	if got := hook.authn(t, a.DeviceID, a.DeviceID, a.Password); got.Result != "allow" {
		t.Fatalf("enabled again: %+v", got)
	}
}

// TestExternalHTTPDeviceAuth runs the fleet on a real external broker with
// --device-auth http: no dynamic security on the broker, identities issued
// and checked by the gateway alone. mosquitto cannot call an HTTP hook, so
// it admits anyone here and the test asks the hook what EMQX would.
func TestExternalHTTPDeviceAuth(t *testing.T) {
	ctx := context.Background()
	mq := MustOpenMosquitto(t)
	// EMQX's REST API, as far as the gateway uses it: ending a session.
	var mu sync.Mutex
	var kicked []string
	emqxAPI := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id, ok := strings.CutPrefix(r.URL.Path, "/api/v5/clients/")
		if user, pass, _ := r.BasicAuth(); r.Method != "DELETE" || !ok || user != "lg" || pass != "api-secret" {
			http.Error(w, "unexpected "+r.Method+" "+r.URL.Path, http.StatusBadRequest)
			return
		}
		mu.Lock()
		kicked = append(kicked, id)
		mu.Unlock()
		w.WriteHeader(http.StatusNoContent)
	}))
	t.Cleanup(emqxAPI.Close)
	kicks := func() []string {
		mu.Lock()
		defer mu.Unlock()
		return slices.Clone(kicked)
	}
	dataDir, dsn := t.TempDir(), pgtest.NewDB(t) // shared: both instances use one master key
	shared := func(o *gateway.Options) {
		o.DataDir, o.DatabaseURL = dataDir, dsn
		o.BrokerAPIURL, o.BrokerAPIKey = emqxAPI.URL, "lg:api-secret"
	}
	gw := MustStart(t, onExternal(mq, "gw-h"), shared)
	other := MustStart(t, onExternal(mq, "gw-i"), shared)
	claim := gw.MustSiteAndClaim(t, "s1", 2)
	r := MustProvision(t, gw, claim, "HTTP-000000")
	if r.Broker != "mqtt://"+mq.Addr {
		t.Fatalf("locker told to use %q, want the external broker", r.Broker)
	}
	// The embedded listener provisions only, even for the right secret.
	mustRefuse(t, gw.MQTTAddr(), r.DeviceID, r.Password, "a locker identity at the provisioning listener")
	hook := newBrokerHook(t, gw)
	if got := hook.authn(t, r.DeviceID, r.DeviceID, r.Password); got.Result != "allow" {
		t.Fatalf("hook on the issued identity: %+v", got)
	}

	key, _ := base64.StdEncoding.DecodeString(r.CredKey)
	sim := MustFleet(t, gw, "", 1, func(o *devicesim.Options) {
		o.Broker = "tcp://" + mq.Addr
		o.SerialPrefix = "HTTP"
		o.Identities = map[string]devicesim.Identity{"HTTP-000000": {DeviceID: r.DeviceID, Password: r.Password, CredKey: key, Broker: r.Broker}}
	})
	waitOnline(t, gw, r.DeviceID, true)
	l := sim.Lockers()[0]
	var cmd fleet.Command
	if err := gw.Admin.Post(ctx, "/v1/lockers/"+r.DeviceID+"/commands", map[string]any{"type": "unlock", "compartment": 1, "wait_s": 15}, &cmd); err != nil {
		t.Fatal(err)
	}
	if cmd.Status != fleet.CmdOK || l.CommandsRun(cmd.ID) != 1 {
		t.Fatalf("unlock through the external broker: status %s, ran %d times", cmd.Status, l.CommandsRun(cmd.ID))
	}

	// The other instance has the secret cached (trusted for 10 s); the
	// disable through this one reaches it at once, by NOTIFY.
	otherHook := brokerHook{client.New("http://"+other.HTTPAddr(), hook.c.Token)}
	if got := otherHook.authn(t, r.DeviceID, r.DeviceID, r.Password); got.Result != "allow" {
		t.Fatalf("hook at the other instance: %+v", got)
	}
	patchLocker(t, gw, r.DeviceID, map[string]bool{"disabled": true})
	if got := hook.authn(t, r.DeviceID, r.DeviceID, r.Password); got.Result != "deny" || got.Reason != "disabled" {
		t.Fatalf("disabled locker: %+v", got)
	}
	// Its live session on the broker is ended through EMQX's API (and
	// again 6 s later while it stays disabled).
	if got := kicks(); !slices.Equal(got, []string{r.DeviceID}) {
		t.Fatalf("sessions ended through EMQX's API: %v, want [%s]", got, r.DeviceID)
	}
	// Well inside the 10 s its cache would trust the secret.
	Eventually(t, 8*time.Second, "the other instance refuses the disabled locker", func() error {
		if got := otherHook.authn(t, r.DeviceID, r.DeviceID, r.Password); got.Result != "deny" {
			return fmt.Errorf("answer %+v", got)
		}
		return nil
	})

	// A replaced locker's old board is put off the broker too.
	patchLocker(t, gw, r.DeviceID, map[string]bool{"disabled": false, "replaceable": true})
	// The disable's follow-up is due 6 s after it: on a slow machine it
	// may have come before the enable (once enabled it is dropped, see
	// TestEMQXKicker/EnabledSince), so count from here.
	before := len(kicks())
	r2 := MustProvision(t, gw, claim, "HTTP-000000")
	if r2.DeviceID != r.DeviceID || r2.Password == r.Password {
		t.Fatalf("replacement: %+v", r2)
	}
	// Ended once, before the new board was answered.
	if got := kicks(); len(got) != before+1 || got[len(got)-1] != r.DeviceID {
		t.Fatalf("sessions ended through EMQX's API: %v, want one more (for %s) than the %d before the replacement", got, r.DeviceID, before)
	}
}

// TestDeviceAuthOptions: a device-auth setting that cannot work is a
// start-up error that says what to change.
func TestDeviceAuthOptions(t *testing.T) {
	for _, c := range []struct {
		name string
		o    gateway.Options
		want string
	}{
		{"WithoutExternalBroker", gateway.Options{DeviceAuth: gateway.DeviceAuthHTTP}, "need --broker-url"},
		{"APIWithoutExternalBroker", gateway.Options{BrokerAPIURL: "http://127.0.0.1:18083"}, "need --broker-url"},
		{"APIWithDynSec", gateway.Options{ExternalBroker: "mqtt://127.0.0.1:1", BrokerAPIURL: "http://127.0.0.1:18083", BrokerAPIKey: "k:s"},
			"is for --device-auth http"},
		{"APIURL", gateway.Options{ExternalBroker: "mqtt://127.0.0.1:1", DeviceAuth: gateway.DeviceAuthHTTP,
			BrokerAPIURL: "emqx:18083", BrokerAPIKey: "k:s"}, "want http(s)://host:port"},
		{"APIURLWithUser", gateway.Options{ExternalBroker: "mqtt://127.0.0.1:1", DeviceAuth: gateway.DeviceAuthHTTP,
			BrokerAPIURL: "http://k:s@127.0.0.1:18083", BrokerAPIKey: "k:s"}, "no user, query or fragment"},
		{"APIKey", gateway.Options{ExternalBroker: "mqtt://127.0.0.1:1", DeviceAuth: gateway.DeviceAuthHTTP,
			BrokerAPIURL: "http://127.0.0.1:18083", BrokerAPIKey: "no-secret"}, "want key:secret"},
		{"Unknown", gateway.Options{ExternalBroker: "mqtt://127.0.0.1:1", DeviceAuth: "ldap"}, `want dynsec`},
		{"InstanceIsUser", gateway.Options{ExternalBroker: "mqtt://127.0.0.1:1", DeviceAuth: gateway.DeviceAuthHTTP,
			ExternalUser: "lockergate", InstanceID: "lockergate"}, "must differ"},
		{"StaleWindowWithoutHook", gateway.Options{ExternalBroker: "mqtt://127.0.0.1:1", AuthStaleWindow: time.Minute},
			"is for --device-auth http"},
		{"StaleWindowTooLong", gateway.Options{ExternalBroker: "mqtt://127.0.0.1:1", DeviceAuth: gateway.DeviceAuthHTTP,
			AuthStaleWindow: 25 * time.Hour}, "at most 24h0m0s"},
	} {
		t.Run(c.name, func(t *testing.T) {
			c.o.DataDir, c.o.Logger = t.TempDir(), testLogger(t)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			g, err := gateway.New(ctx, c.o)
			if err == nil {
				g.Close()
				t.Fatal("started")
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Fatalf("error %q does not say %q", err, c.want)
			}
		})
	}
}

// dynsecLockerOnline starts gateway instance id on a mosquitto with
// dynamic security, provisions serial with a claim for two lockers at s1
// and connects it to mosquitto with its birth sent.
func dynsecLockerOnline(t *testing.T, id, serial string) (*Mosquitto, *TestGateway, string, protocol.ProvisionResponse, paho.Client) {
	t.Helper()
	mq := MustMosquitto(t)
	gw := MustStart(t, onExternal(mq, id))
	claim := gw.MustSiteAndClaim(t, "s1", 2)
	r := MustProvision(t, gw, claim, serial)
	c, err := Connect(mq.Addr, r.DeviceID, r.DeviceID, r.Password)
	if err != nil {
		t.Fatalf("the issued identity on mosquitto: %v", err)
	}
	t.Cleanup(func() { c.Disconnect(50) })
	publishBirth(t, gw, c, r.DeviceID)
	return mq, gw, claim, r, c
}

// TestExternalDisable: on mosquitto with dynamic security, disabling a
// locker ends its live session and refuses it from then on, and the
// gateway's own auth hook forgets its secret too; enabling lets it back.
func TestExternalDisable(t *testing.T) {
	mq, gw, claim, r, c := dynsecLockerOnline(t, "gw-d", "DIS-000000")
	hook := newBrokerHook(t, gw)
	if got := hook.authn(t, r.DeviceID, r.DeviceID, r.Password); got.Result != "allow" {
		t.Fatalf("hook before the disable: %+v", got)
	}

	// mosquitto ends the session without a Last Will; the gateway that
	// ended it records the end, and sets the retained presence offline.
	patchLocker(t, gw, r.DeviceID, map[string]bool{"disabled": true})
	wantKicked(t, gw, c, r.DeviceID, "the disabled locker")
	// An instance subscribing afresh is handed the retained presence: the
	// will, not the locker's last birth (which would read as a live session).
	if p := mustRetainedPresence(t, mq, r.DeviceID); p != `{"online":false}` {
		t.Fatalf("retained presence after the disable %s, want the will", p)
	}
	mustRefuse(t, mq.Addr, r.DeviceID, r.Password, "a disabled locker on mosquitto")
	if got := hook.authn(t, r.DeviceID, r.DeviceID, r.Password); got.Result != "deny" || got.Reason != "disabled" {
		t.Fatalf("hook after the disable: %+v", got)
	}

	patchLocker(t, gw, r.DeviceID, map[string]bool{"disabled": false})
	waitConnects(t, mq.Addr, r.DeviceID, r.Password, "the enabled locker connects again")

	// A replacement: the new board gets in with its new secret (and stays
	// in), the old secret is refused.
	patchLocker(t, gw, r.DeviceID, map[string]bool{"replaceable": true})
	r2 := MustProvision(t, gw, claim, "DIS-000000")
	if r2.DeviceID != r.DeviceID || r2.Password == r.Password {
		t.Fatalf("replacement: %+v", r2)
	}
	c4, err := Connect(mq.Addr, r2.DeviceID, r2.DeviceID, r2.Password)
	if err != nil {
		t.Fatalf("the new board on mosquitto: %v", err)
	}
	defer c4.Disconnect(50)
	mustRefuse(t, mq.Addr, r.DeviceID, r.Password, "the old board's secret on mosquitto")

	// A disabled locker whose board is replaced stays disabled there.
	patchLocker(t, gw, r.DeviceID, map[string]bool{"disabled": true, "replaceable": true})
	_, again := newClaim(t, gw, map[string]any{"site": "s1", "uses": 1, "expires_in_s": 600})
	r3 := MustProvision(t, gw, again, "DIS-000000")
	mustRefuse(t, mq.Addr, r3.DeviceID, r3.Password, "a disabled locker's new board on mosquitto")
	// Enabled, the new board gets in: its secret did reach mosquitto.
	patchLocker(t, gw, r3.DeviceID, map[string]bool{"disabled": false})
	waitConnects(t, mq.Addr, r3.DeviceID, r3.Password, "the new board connects once enabled")
}

// mustRetainedPresence is locker id's retained presence on mq, as an
// instance subscribing afresh is handed it.
func mustRetainedPresence(t *testing.T, mq *Mosquitto, id string) string {
	t.Helper()
	retained := make(chan string, 1)
	peek := MustConnect(t, mq.Addr, "retained-reader", "lgadmin", mq.AdminPassword)
	defer peek.Disconnect(50)
	if tok := peek.Subscribe(protocol.Topic(id, protocol.ChanPresence), 1, func(_ paho.Client, m paho.Message) {
		if m.Retained() {
			select {
			case retained <- string(m.Payload()):
			default:
			}
		}
	}); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("subscribe to the presence: %v", tok.Error())
	}
	select {
	case p := <-retained:
		return p
	case <-time.After(10 * time.Second):
		t.Fatal("no retained presence")
		return ""
	}
}

// wantKicked waits for mosquitto to end c, what's session (locker id),
// and wants the gateway to have recorded its end: offline, kicked.
func wantKicked(t *testing.T, gw *TestGateway, c paho.Client, id, what string) {
	t.Helper()
	Eventually(t, 10*time.Second, "mosquitto ends "+what+"'s session", func() error {
		if c.IsConnectionOpen() {
			return errors.New("still connected")
		}
		return nil
	})
	if l := lockerOf(t, gw, id); l.Online || l.DisconnectReason != "kicked" {
		t.Fatalf("%s: online %v, disconnect_reason %q; want offline, kicked", what, l.Online, l.DisconnectReason)
	}
}

// loseIdentity deletes locker id's client from mq's dynamic security, as
// a broker that could not save its dynsec file loses it at a restart, and
// dates every locker's registration two minutes back, past the minute in
// which an identity is still being put on the broker (one just made is
// not counted missing).
func loseIdentity(t *testing.T, gw *TestGateway, mq *Mosquitto, id string) {
	t.Helper()
	ctrl := requireTool(t, "mosquitto_ctrl")
	host, port, _ := net.SplitHostPort(mq.Addr)
	if out, err := exec.Command(ctrl, "-h", host, "-p", port, "-u", "lgadmin", "-P", mq.AdminPassword,
		"dynsec", "deleteClient", id).CombinedOutput(); err != nil {
		t.Fatalf("mosquitto_ctrl deleteClient: %v: %s", err, out)
	}
	if _, err := gw.DB().Pool().Exec(context.Background(), `UPDATE devices SET created_at = created_at - interval '2 minutes'`); err != nil {
		t.Fatal(err)
	}
}

// TestExternalReplacementReadsOffline: re-provisioning a connected
// locker's serial ends the old board's session on mosquitto (its password
// changes), which reports no session end and publishes no will: the
// gateway records the end itself ("kicked") and sets the retained presence
// offline, so the locker does not read online with no session (commands
// "sent" to nobody) until the new board connects.
func TestExternalReplacementReadsOffline(t *testing.T) {
	mq, gw, claim, r, c := dynsecLockerOnline(t, "gw-r", "REP-000000")
	waitOnline(t, gw, r.DeviceID, true)
	patchLocker(t, gw, r.DeviceID, map[string]bool{"replaceable": true})
	if r2 := MustProvision(t, gw, claim, "REP-000000"); r2.DeviceID != r.DeviceID {
		t.Fatalf("replacement answered locker %s, want %s", r2.DeviceID, r.DeviceID)
	}
	wantKicked(t, gw, c, r.DeviceID, "the replaced locker")
	if p := mustRetainedPresence(t, mq, r.DeviceID); p != `{"online":false}` {
		t.Fatalf("retained presence after the replacement %s, want the will", p)
	}
}

// TestExternalMissingIdentitiesReported: a locker whose identity
// mosquitto's dynamic security lost (a dynsec file the broker could not
// write, then a restart) cannot connect, and nothing else says so: the
// gateway compares the lockers on record with the broker's clients at
// start (and after each reconnect, hourly) and reports the missing ones.
func TestExternalMissingIdentitiesReported(t *testing.T) {
	const missing = "lockergate_broker_identities_missing"
	mq := MustMosquitto(t)
	var opts gateway.Options
	gw := MustStart(t, onExternal(mq, "gw-ids"), func(o *gateway.Options) { opts = *o })
	claim := gw.MustSiteAndClaim(t, "s1", 2)
	kept := MustProvision(t, gw, claim, "IDS-000000")
	lost := MustProvision(t, gw, claim, "IDS-000001")
	// Registered past the minute in which an identity is still being put
	// on the broker (a registration just made is not counted missing).
	if _, err := gw.DB().Pool().Exec(context.Background(), `UPDATE devices SET created_at = created_at - interval '2 minutes'`); err != nil {
		t.Fatal(err)
	}
	restart := func() *testtool.LockedBuffer {
		t.Helper()
		gw.Stop(t)
		logs := &testtool.LockedBuffer{}
		opts.Logger = slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
		gw = MustRun(t, opts)
		return logs
	}
	logs := restart()
	Eventually(t, 10*time.Second, "the start's check with both identities there", func() error {
		if !strings.Contains(logs.String(), `msg="every locker has its identity on the broker" lockers=2`) {
			return errors.New("not checked yet")
		}
		return nil
	})
	if v, err := gw.Metric(missing); err != nil || v != 0 {
		t.Fatalf("%s = %v (%v) with every identity there, want 0", missing, v, err)
	}

	loseIdentity(t, gw, mq, lost.DeviceID)
	mustRefuse(t, mq.Addr, lost.DeviceID, lost.Password, "a locker whose identity the broker lost")
	logs = restart()
	gw.WaitMetric(t, 10*time.Second, missing, 1) // the kept one is not counted
	Eventually(t, 10*time.Second, "the ERROR line naming the lost locker", func() error {
		if out := logs.String(); !strings.Contains(out, "level=ERROR msg=\"lockers without an identity") || !strings.Contains(out, lost.DeviceID) {
			return errors.New("not logged yet")
		}
		return nil
	})
	for _, line := range strings.Split(logs.String(), "\n") {
		if strings.Contains(line, "lockers without an identity") && strings.Contains(line, kept.DeviceID) {
			t.Errorf("the line names the locker whose identity is there: %s", line)
		}
	}
}

// TestExternalIdentitiesCheckedAfterABrokerRestart: the broker's restart
// is when a lost identity shows (a dynsec file it could not write): the
// gateway's reconnect checks identities again, without its own restart.
func TestExternalIdentitiesCheckedAfterABrokerRestart(t *testing.T) {
	const missing = "lockergate_broker_identities_missing"
	mq := MustMosquitto(t)
	gw := MustStart(t, onExternal(mq, "gw-rs"))
	lost := MustProvision(t, gw, gw.MustSiteAndClaim(t, "s1", 1), "IDR-000000")
	loseIdentity(t, gw, mq, lost.DeviceID)
	mq.Restart(t)
	gw.WaitMetric(t, 30*time.Second, missing, 1)
}

// TestBrokerAuthHookDatabaseDown: while PostgreSQL is down the broker's
// token keeps working, a locker verified before is still admitted once its
// cached secret has expired (on the secret last verified: a stale
// admission), and one never verified gets a 503 (EMQX: ignore), not a
// final deny; after the restart it is admitted.
func TestBrokerAuthHookDatabaseDown(t *testing.T) {
	pg := mustRestartablePG(t)
	tg := MustStart(t, onExternal(MustOpenMosquitto(t), "gw-db"), func(o *gateway.Options) { o.DatabaseURL = pg.dsn() })
	claim := tg.MustSiteAndClaim(t, "s1", 2)
	seen := MustProvision(t, tg, claim, "SN-HDB-1")
	unseen := MustProvision(t, tg, claim, "SN-HDB-2")
	hook := newBrokerHook(t, tg)
	// The stale rule holds only while kicks are heard: wait for the first
	// heartbeat (LISTEN is in place by then, so what is verified now stays
	// cached).
	Eventually(t, 30*time.Second, "a kick heartbeat heard", func() error {
		if v, err := tg.Metric("lockergate_kicks_last_heard_timestamp_seconds"); err != nil || v == 0 {
			return fmt.Errorf("last heard %v (%v)", v, err)
		}
		return nil
	})
	if got := hook.authn(t, seen.DeviceID, seen.DeviceID, seen.Password); got.Result != "allow" {
		t.Fatalf("before the outage: %+v", got)
	}

	pg.stop(t)
	// Past the token cache's 1 s and the hook's 10 s secret cache, every
	// answer still comes from the hook, until one is a stale admission.
	Eventually(t, 30*time.Second, "a stale admission during the outage", func() error {
		if got := hook.authn(t, seen.DeviceID, seen.DeviceID, seen.Password); got.Result != "allow" {
			t.Fatalf("verified locker during the outage: %+v", got)
		}
		status, _ := hook.call(t, "/v1/broker-auth/emqx/authn", map[string]string{
			"clientid": unseen.DeviceID, "username": unseen.DeviceID, "password": unseen.Password})
		if status != http.StatusServiceUnavailable {
			t.Fatalf("never verified locker during the outage: status %d, want 503", status)
		}
		if v, err := tg.Metric(`lockergate_mqtt_auth_cache_total{result="stale"}`); err != nil || v < 1 {
			return fmt.Errorf("stale admissions %v (%v)", v, err)
		}
		return nil
	})

	pg.start(t)
	Eventually(t, 30*time.Second, "the never verified locker admitted after the restart", func() error {
		status, got := hook.call(t, "/v1/broker-auth/emqx/authn", map[string]string{
			"clientid": unseen.DeviceID, "username": unseen.DeviceID, "password": unseen.Password})
		if status != 200 || got.Result != "allow" {
			return fmt.Errorf("status %d, %+v", status, got)
		}
		return nil
	})
}
