package gateway_test

import (
	"bufio"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/lockergate/lockergate/devicesim"
	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/gateway"
	"github.com/lockergate/lockergate/internal/pgtest"
	"github.com/lockergate/lockergate/internal/subproc"
	"github.com/lockergate/lockergate/internal/testtool"
	"github.com/lockergate/lockergate/pickup"
	"github.com/lockergate/lockergate/protocol"
)

// requireTool finds an outside program, or skips loudly (fails under
// LOCKERGATE_REQUIRE_ALL=1, as in CI).
func requireTool(t *testing.T, name string) string {
	t.Helper()
	return testtool.Program(t, name, "to prove the external-broker mode", "apt-get install mosquitto mosquitto-clients")
}

// Mosquitto is a real mosquitto with the dynamic security plugin on a
// loopback port; the gateway's admin user is "lgadmin".
type Mosquitto struct {
	Addr, AdminPassword string
	cmd                 *exec.Cmd
	exited              <-chan struct{}
	bin, plugin, dir    string // as started, for Restart
	// certFile and keyFile, when set, make the listener TLS (mqtts).
	certFile, keyFile string
}

// start runs mosquitto on a free port (on Addr's, when again); false when
// it exited before it listened. Without plugin it lets anyone connect.
func (m *Mosquitto) start(t *testing.T, bin, plugin, dir string, again bool) bool {
	m.bin, m.plugin, m.dir = bin, plugin, dir
	if !again {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		m.Addr = ln.Addr().String()
		ln.Close()
	}
	_, port, _ := net.SplitHostPort(m.Addr)
	// The queueing limits are docs/deployment.md's: gateways acknowledge
	// after the store, and their sessions hold messages while they are away.
	conf := fmt.Sprintf("listener %s 127.0.0.1\npersistence false\nmax_keepalive 300\n"+
		"max_inflight_messages 10000\nmax_queued_messages 0\nmax_queued_bytes 268435456\nmax_packet_size 262144\nlog_dest stderr\n", port)
	if m.certFile != "" {
		conf += fmt.Sprintf("certfile %s\nkeyfile %s\n", m.certFile, m.keyFile)
	}
	if plugin != "" {
		conf += fmt.Sprintf("allow_anonymous false\nplugin %s\nplugin_opt_config_file %s\n", plugin, filepath.Join(dir, "dynsec.json"))
	} else {
		conf += "allow_anonymous true\n"
	}
	if os.Geteuid() == 0 {
		conf += "user root\n"
	}
	if err := os.WriteFile(filepath.Join(dir, "mosquitto.conf"), []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "-c", filepath.Join(dir, "mosquitto.conf"))
	cmd.SysProcAttr = subproc.DieWithParent(&syscall.SysProcAttr{}, syscall.SIGKILL)
	logPath := filepath.Join(dir, "mosquitto.log")
	logged := int64(0) // the log so far: an earlier start's "running" is not this one's
	if fi, err := os.Stat(logPath); err == nil {
		logged = fi.Size()
	}
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	exited, err := testtool.Start(cmd)
	if err != nil {
		t.Fatal(err)
	}
	m.cmd, m.exited = cmd, exited
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-exited
		logf.Close()
		if t.Failed() {
			b, _ := os.ReadFile(filepath.Join(dir, "mosquitto.log"))
			var keep []string
			for _, line := range strings.Split(string(b), "\n") {
				if !strings.Contains(line, "New connection") && !strings.Contains(line, "not authorised") {
					keep = append(keep, line)
				}
			}
			t.Logf("mosquitto log (connection noise left out):\n%s", tail(strings.Join(keep, "\n"), 60))
		}
	})
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case <-exited:
			return false
		default:
		}
		// Listening, and the listener is the process we started: it says
		// "running" only once its listeners are bound, while a process
		// that lost the port to another exits (that other listener would
		// answer the dial, then go away).
		if b, _ := os.ReadFile(logPath); int64(len(b)) > logged && strings.Contains(string(b[logged:]), " running") {
			if c, err := net.Dial("tcp", m.Addr); err == nil {
				c.Close()
				return true
			}
		}
		time.Sleep(20 * time.Millisecond) // polling interval of a condition wait
	}
	t.Fatal("mosquitto did not listen within 10 s")
	return false
}

// MustOpenMosquitto is a real mosquitto that lets anyone connect: a
// stand-in for a broker whose auth hook is the gateway's (EMQX), which
// mosquitto cannot call.
func MustOpenMosquitto(t *testing.T) *Mosquitto {
	t.Helper()
	bin := requireTool(t, "mosquitto")
	dir := t.TempDir()
	m := &Mosquitto{}
	m.mustStart(t, bin, "", dir)
	return m
}

// MustTLSMosquitto is MustOpenMosquitto on TLS, with a self-signed
// certificate for 127.0.0.1, whose PEM file (the CA to trust) it returns.
func MustTLSMosquitto(t *testing.T) (m *Mosquitto, caFile string) {
	t.Helper()
	bin := requireTool(t, "mosquitto")
	dir := t.TempDir()
	certPEM, keyPEM := testtool.SelfSigned(t)
	write := func(name string, b []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	caFile = write("server.pem", certPEM)
	m = &Mosquitto{certFile: caFile, keyFile: write("server.key", keyPEM)}
	m.mustStart(t, bin, "", dir)
	return m, caFile
}

// mustStart starts mosquitto. The port is picked free and handed to
// mosquitto; another process may take it in between, so a mosquitto that
// exits at once is started again.
func (m *Mosquitto) mustStart(t *testing.T, bin, plugin, dir string) {
	t.Helper()
	for attempt := 0; !m.start(t, bin, plugin, dir, false); attempt++ {
		if attempt == 3 {
			b, _ := os.ReadFile(filepath.Join(dir, "mosquitto.log"))
			t.Fatalf("mosquitto did not start:\n%s", tail(string(b), 20))
		}
	}
}

// onExternal runs a gateway on mq as instance id: with mosquitto's dynamic
// security when mq has it (MustMosquitto), else with the HTTP auth hook
// (MustOpenMosquitto, standing in for EMQX).
func onExternal(mq *Mosquitto, id string) func(*gateway.Options) {
	return func(o *gateway.Options) {
		o.ExternalBroker, o.InstanceID = "mqtt://"+mq.Addr, id
		if mq.AdminPassword != "" {
			o.ExternalUser, o.ExternalPassword = "lgadmin", mq.AdminPassword
		} else {
			o.ExternalUser, o.DeviceAuth = "lockergate", gateway.DeviceAuthHTTP
		}
	}
}

func MustMosquitto(t *testing.T) *Mosquitto {
	t.Helper()
	bin := requireTool(t, "mosquitto")
	ctrl := requireTool(t, "mosquitto_ctrl")
	plugin := testtool.DynsecPlugin(t)
	dir := t.TempDir()
	m := &Mosquitto{AdminPassword: "admin-" + fmt.Sprint(time.Now().UnixNano())}
	if out, err := exec.Command(ctrl, "dynsec", "init", filepath.Join(dir, "dynsec.json"), "lgadmin", m.AdminPassword).CombinedOutput(); err != nil {
		t.Fatalf("dynsec init: %v: %s", err, out)
	}
	m.mustStart(t, bin, plugin, dir)
	return m
}

// Restart stops mosquitto and starts it again on the same port with the
// same configuration (the dynsec file as the broker left it), as a broker
// restart: its clients lose their connections and reconnect.
func (m *Mosquitto) Restart(t *testing.T) {
	t.Helper()
	if err := m.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	<-m.exited
	if !m.start(t, m.bin, m.plugin, m.dir, true) {
		t.Fatalf("mosquitto did not start again on %s", m.Addr)
	}
}

func tail(s string, n int) string {
	var lines []string
	sc := bufio.NewScanner(strings.NewReader(s))
	for sc.Scan() {
		lines = append(lines, sc.Text())
	}
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// TestExternalBroker runs two gateway instances on one PostgreSQL against
// Debian's mosquitto: lockers provisioned through an instance connect to
// mosquitto, their events are processed exactly once across the instances,
// commands from either instance reach them, and when one instance is killed
// the other carries on.
func TestExternalBroker(t *testing.T) {
	const lockers = 500
	ctx := context.Background()
	mq := MustMosquitto(t)
	dsn := pgtest.NewDB(t)
	dataDir := t.TempDir() // shared: both instances use one master key
	shared := func(o *gateway.Options) { o.DataDir, o.DatabaseURL = dataDir, dsn }
	a := MustStart(t, onExternal(mq, "gw-a"), shared)
	b := MustStart(t, onExternal(mq, "gw-b"), shared)
	b.Admin.Token = a.Admin.Token
	claim := a.MustSiteAndClaim(t, "s1", lockers)

	// Provision through instance A's embedded listener (claims only there);
	// the answer tells lockers to use mosquitto.
	ids := map[string]devicesim.Identity{}
	var mu sync.Mutex
	var wg sync.WaitGroup
	sem := make(chan struct{}, 16)
	for i := 0; i < lockers; i++ {
		serial := fmt.Sprintf("EXT-%06d", i)
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			r := MustProvision(t, a, claim, serial)
			key, _ := base64.StdEncoding.DecodeString(r.CredKey)
			mu.Lock()
			ids[serial] = devicesim.Identity{DeviceID: r.DeviceID, Password: r.Password, CredKey: key, Broker: r.Broker}
			mu.Unlock()
		}()
	}
	wg.Wait()
	for _, id := range ids {
		if id.Broker != "mqtt://"+mq.Addr {
			t.Fatalf("lockers told to use %q, want the external broker", id.Broker)
		}
		break
	}
	sim := MustFleet(t, a, "", lockers, func(o *devicesim.Options) {
		o.Broker = "tcp://" + mq.Addr
		o.SerialPrefix = "EXT"
		o.Identities = ids
		o.HealthInterval = time.Second
	})
	Eventually(t, 60*time.Second, "all lockers online through mosquitto", func() error {
		n := 0
		after := ""
		for {
			var l lockerList
			if err := b.Admin.Get(ctx, "/v1/lockers", url.Values{"online": {"true"}, "limit": {"1000"}, "after": {after}}, &l); err != nil {
				return err
			}
			n += len(l.Items)
			if l.Next == "" {
				break
			}
			after = l.Next
		}
		if n != lockers {
			return fmt.Errorf("%d of %d online", n, lockers)
		}
		return nil
	})

	// A device cannot act as another on mosquitto either (dynsec ACL), but
	// may subscribe to its own topics with a wildcard.
	first, second := sim.Lockers()[0], sim.Lockers()[1]
	spy, err := Connect(mq.Addr, first.DeviceID(), first.DeviceID(), ids[first.Serial()].Password)
	if err == nil {
		own := make(chan string, 16)
		tok := spy.Subscribe(protocol.Root+first.DeviceID()+"/#", 1, func(_ paho.Client, m paho.Message) {
			select {
			case own <- m.Topic():
			default:
			}
		})
		if !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
			t.Fatalf("subscribe to its own topics with a wildcard: %v", tok.Error())
		}
		select {
		case topic := <-own: // its retained creds, config or fw/job
			if !strings.HasPrefix(topic, protocol.Root+first.DeviceID()+"/") {
				t.Fatalf("the wildcard brought %s", topic)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("no retained message of its own through lockers/v1/{id}/# on mosquitto")
		}
		// Connected with the same id (a takeover of the sim's session is
		// fine here); publishing as the second locker must not land.
		spy.Publish(protocol.Topic(second.DeviceID(), protocol.ChanEvents), 1, false,
			fmt.Sprintf(`{"id":"e-forged","ts":"%s","type":"tamper"}`, protocol.FormatTime(time.Now()))).WaitTimeout(5 * time.Second)
		spy.Disconnect(50)
	}

	// Commands from either instance reach their lockers, once.
	for i, gw := range []*TestGateway{a, b} {
		l := sim.Lockers()[10+i]
		var cmd fleet.Command
		if err := gw.Admin.Post(ctx, "/v1/lockers/"+l.DeviceID()+"/commands",
			map[string]any{"type": "unlock", "compartment": 1, "wait_s": 15}, &cmd); err != nil {
			t.Fatal(err)
		}
		if cmd.Status != fleet.CmdOK || l.CommandsRun(cmd.ID) != 1 {
			t.Fatalf("unlock via instance %d: status %s, ran %d times", i, cmd.Status, l.CommandsRun(cmd.ID))
		}
	}

	// Every locker's door events are recorded exactly once across both
	// instances (each unlock emits door_opened and door_closed).
	count := func(q string, args ...any) int {
		var n int
		if err := b.DB().Pool().QueryRow(ctx, q, args...).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	Eventually(t, 20*time.Second, "door events of both unlocks", func() error {
		if n := count(`SELECT count(*) FROM events WHERE type IN ('door_opened', 'door_closed')`); n != 4 {
			return fmt.Errorf("%d door events", n)
		}
		return nil
	})
	if n := count(`SELECT count(*) FROM events WHERE event_id = 'e-forged'`); n != 0 {
		t.Fatal("a locker published an event as another through mosquitto")
	}
	// Both instances took a share of the telemetry.
	ha, _ := a.Metric(`lockergate_mqtt_messages_received_total{channel="health"}`)
	hb, _ := b.Metric(`lockergate_mqtt_messages_received_total{channel="health"}`)
	if ha == 0 || hb == 0 {
		t.Fatalf("health split: instance A %v, B %v; want both > 0 (shared subscription)", ha, hb)
	}

	// Kill instance A; B carries on: commands and events keep flowing.
	a.Stop(t)
	before := count(`SELECT count(*) FROM health`)
	Eventually(t, 20*time.Second, "health still stored by B", func() error {
		if n := count(`SELECT count(*) FROM health`); n < before+lockers {
			return fmt.Errorf("%d new rows", n-before)
		}
		return nil
	})
	l := sim.Lockers()[20]
	var cmd fleet.Command
	if err := b.Admin.Post(ctx, "/v1/lockers/"+l.DeviceID()+"/commands",
		map[string]any{"type": "unlock", "compartment": 1, "wait_s": 15}, &cmd); err != nil || cmd.Status != fleet.CmdOK {
		t.Fatalf("unlock after A stopped: %+v, %v", cmd, err)
	}
}

// TestExternalBrokerReadiness: /readyz says not ready while the external
// broker cannot be reached (the contract: "database and broker are ready").
func TestExternalBrokerReadiness(t *testing.T) {
	mq := MustOpenMosquitto(t)
	tg := MustStart(t, onExternal(mq, "gw-ready"))
	readyz := func() (int, string) {
		resp, err := http.Get("http://" + tg.HTTPAddr() + "/readyz")
		if err != nil {
			return 0, err.Error()
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, body := readyz(); code != http.StatusOK {
		t.Fatalf("/readyz with the broker up: %d %s", code, body)
	}
	if err := mq.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	testtool.Eventually(t, 15*time.Second, "/readyz not ready without the broker", func() error {
		if code, body := readyz(); code != http.StatusServiceUnavailable || !strings.Contains(body, "external broker") {
			return fmt.Errorf("%d %s", code, body)
		}
		return nil
	})
}

// oneExternalLocker provisions a locker at site through tg's embedded
// listener and runs it as a simulated locker on mq, online once returned.
func oneExternalLocker(t *testing.T, tg *TestGateway, mq *Mosquitto, site string) (protocol.ProvisionResponse, *devicesim.Fleet) {
	t.Helper()
	const serial = "ONE-000000"
	r := MustProvision(t, tg, tg.MustSiteAndClaim(t, site, 1), serial)
	key, _ := base64.StdEncoding.DecodeString(r.CredKey)
	sim := MustFleet(t, tg, "", 1, func(o *devicesim.Options) {
		o.Broker = "tcp://" + mq.Addr
		o.SerialPrefix = "ONE"
		o.Identities = map[string]devicesim.Identity{serial: {DeviceID: r.DeviceID, Password: r.Password, CredKey: key}}
	})
	waitOnline(t, tg, r.DeviceID, true)
	return r, sim
}

// externalPickupEnv is a pickup environment on gateway tg behind mosquitto
// mq: one simulated locker at store-042 (oneExternalLocker), a store token
// and a platform token (speedy), no webhook.
func externalPickupEnv(t *testing.T, tg *TestGateway, mq *Mosquitto) (*pickupEnv, protocol.ProvisionResponse) {
	t.Helper()
	r, sim := oneExternalLocker(t, tg, mq, "store-042")
	return &pickupEnv{tg: tg, sim: sim,
		store:    MustPickupToken(t, tg, "store", "store-042", "front-desk"),
		platform: MustPickupToken(t, tg, "platform", "", "speedy")}, r
}

// TestExternalEffectsTakeTurns: with an external broker a locker's events
// are shared among instances, so an instance applies their effects under
// the locker's effects lock in PostgreSQL. While another holder has it (as
// a second instance applying the closing that a code's use judges again
// would), the code's use and the closing wait, and are applied once it is
// released: the pickup is picked up and no alert stands.
func TestExternalEffectsTakeTurns(t *testing.T) {
	ctx := context.Background()
	mq := MustOpenMosquitto(t)
	tg := MustStart(t, onExternal(mq, "gw-a"))
	e, r := externalPickupEnv(t, tg, mq)
	sim := e.sim
	p := e.waitState(t, e.create(t, "ORD-1", "S", time.Hour).ID, pickup.Ready)
	e.waitCreds(t, p.Locker)

	_, release, err := tg.DB().LockEffects(ctx, p.Locker)
	if err != nil {
		t.Fatal(err)
	}
	held := true
	defer func() {
		if held {
			release()
		}
	}()
	sim.Locker(p.Locker).Disconnect()
	dev := MustConnect(t, mq.Addr, r.DeviceID, r.DeviceID, r.Password)
	topic := protocol.Topic(r.DeviceID, protocol.ChanEvents)
	used := time.Now().UTC()
	MustPublish(t, dev, topic, false, fmt.Sprintf(`{"id":"e-close","ts":"%s","type":"door_closed","compartment":%d,"occupied":false}`,
		protocol.FormatTime(used.Add(3*time.Second)), p.Compartment))
	MustPublish(t, dev, topic, false, fmt.Sprintf(`{"id":"e-code","ts":"%s","type":"code_accepted","credential":"%s","compartments":[%d]}`,
		protocol.FormatTime(used), p.Credential.ID+".p", p.Compartment))
	Eventually(t, 10*time.Second, "the gateway waiting for the locker's effects lock", func() error {
		if n := tg.Count(t, pgtest.AdvisoryLocksSQL, false); n != 1 {
			return fmt.Errorf("%d waiting", n)
		}
		return nil
	})
	if n := tg.Count(t, `SELECT count(*) FROM events WHERE device_id = $1 AND event_id IN ('e-close', 'e-code')`, r.DeviceID); n == 0 {
		t.Fatal("no event stored while the effects wait")
	}
	var got pickup.Pickup
	if err := e.platform.Get(ctx, "/v1/pickups/"+p.ID, nil, &got); err != nil || got.State != pickup.Ready {
		t.Fatalf("pickup %q (%v) while its effects wait, want ready", got.State, err)
	}
	held = false
	release()
	e.waitState(t, p.ID, pickup.PickedUp)
	Eventually(t, 10*time.Second, "no pickup_removed alert open", func() error {
		if n := tg.Count(t, `SELECT count(*) FROM alerts WHERE kind = 'pickup_removed' AND cleared_at IS NULL`); n != 0 {
			return fmt.Errorf("%d open", n)
		}
		return nil
	})
}

// TestExternalLateCollection: behind an external broker, a driver collects
// with the code while the locker is offline, before expires_at, and the
// gateway expires the pickup meanwhile. The locker's report, a burst that
// the bus may apply out of its order, makes the pickup picked up after all.
func TestExternalLateCollection(t *testing.T) {
	mq := MustOpenMosquitto(t)
	e, _ := externalPickupEnv(t, MustStart(t, onExternal(mq, "gw-a")), mq)
	p := e.usedOfflineThenExpired(t, "LATE-X", 3*time.Second)
	e.waitState(t, p.ID, pickup.PickedUp)
	if n := e.openAlerts(t, p, fleet.AlertPickupExpired); n != 0 {
		t.Fatalf("%d pickup_expired alerts open, want none", n)
	}
}

// TestExternalDoorStateByClock: behind an external broker a locker's door
// events can be applied out of the locker's order, so there a
// compartment's door and occupancy follow the locker's clock. A closing
// (occupied) applied before the opening that came first leaves the
// compartment closed and occupied; applied in arrival order it would read
// open (TestDoorStateInArrivalOrder).
func TestExternalDoorStateByClock(t *testing.T) {
	mq := MustOpenMosquitto(t)
	tg := MustStart(t, onExternal(mq, "gw-a"))
	r, sim := oneExternalLocker(t, tg, mq, "s1")
	sim.Lockers()[0].Disconnect()
	dev := MustConnect(t, mq.Addr, r.DeviceID, r.DeviceID, r.Password)
	if door, occupied := closeThenOpenLate(t, tg, dev, r.DeviceID); door != "closed" || !occupied {
		t.Fatalf("compartment 1: door %q occupied %v, want closed and occupied: the opening applied after a later closing", door, occupied)
	}
}

// TestExternalLateWill: through an external broker a Last Will can reach
// the gateway after the locker's next birth (held in a crashed instance's
// session until it returns). Such a will, here published again by hand
// after the birth (not retained, as a late delivery is), leaves the locker
// online: the broker's retained presence is the later birth. A real
// connection loss still marks it offline, and a late birth of an earlier
// session does not mark it online again; its next birth on time does.
func TestExternalLateWill(t *testing.T) {
	mq := MustOpenMosquitto(t)
	tg := MustStart(t, onExternal(mq, "gw-a"))
	r, sim := oneExternalLocker(t, tg, mq, "s1")
	online := func() int { return tg.Count(t, `SELECT count(*) FROM devices WHERE id = $1 AND online`, r.DeviceID) }
	const stale = "lockergate_presence_stale_wills_total"
	late := MustConnect(t, mq.Addr, "late-delivery", "", "")
	MustPublish(t, late, protocol.Topic(r.DeviceID, protocol.ChanPresence), false, `{"online":false}`)
	tg.WaitMetric(t, 10*time.Second, stale, 1) // the late will judged
	if online() != 1 {
		t.Fatal("a will older than the locker's birth marked it offline")
	}
	sim.Lockers()[0].LoseNetwork()
	waitOnline(t, tg, r.DeviceID, false) // the real will marks it offline
	if v, err := tg.Metric(stale); err != nil || v != 1 {
		t.Fatalf("%s = %v (%v) after a real will, want 1", stale, v, err)
	}

	// A birth of the session before, delivered late (its ts minutes old):
	// the locker stays offline, its retained presence being the will.
	const staleBirths = "lockergate_presence_stale_births_total"
	MustPublish(t, late, protocol.Topic(r.DeviceID, protocol.ChanPresence), false,
		fmt.Sprintf(`{"online":true,"ts":"%s","fw":"1.4.2","model":"LX-24","boot_id":"b-before"}`, protocol.FormatTime(time.Now().Add(-10*time.Minute))))
	tg.WaitMetric(t, 10*time.Second, staleBirths, 1) // the late birth judged
	if online() != 0 {
		t.Fatal("a birth older than the locker's last will marked it online")
	}
	sim.Lockers()[0].RestoreNetwork()
	Eventually(t, 20*time.Second, "a birth on time marks it online", func() error {
		if online() != 1 {
			return errors.New("offline")
		}
		return nil
	})
}

// TestExternalReplacementWithTheBrokerDown: a board replaced while the
// external broker is down gets its provisioning answer (on the embedded
// listener) after a short wait on the broker, not the provisioning call's
// whole bound (the re-keyed retained state that could not go out is
// published at the board's first connect, as for any locker).
func TestExternalReplacementWithTheBrokerDown(t *testing.T) {
	mq := MustOpenMosquitto(t)
	tg := MustStart(t, onExternal(mq, "gw-swap"))
	claim := tg.MustSiteAndClaim(t, "swap-site", 2)
	r := MustProvision(t, tg, claim, "SWAP-EXT-1")
	patchLocker(t, tg, r.DeviceID, map[string]bool{"replaceable": true})
	if err := mq.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	testtool.Eventually(t, 15*time.Second, "the gateway's broker connection lost", func() error {
		resp, err := http.Get("http://" + tg.HTTPAddr() + "/readyz")
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusServiceUnavailable {
			return fmt.Errorf("/readyz %d", resp.StatusCode)
		}
		return nil
	})
	// The publish's wait is 2 s; without the bound the answer waited for
	// the provisioning call's own 10 s (9 s leaves a loaded machine time
	// for the rest of the round trip and still tells the two apart).
	nr := provisionWithin(t, tg, claim, "SWAP-EXT-1", 9*time.Second)
	if nr.DeviceID != r.DeviceID || nr.Password == r.Password {
		t.Fatalf("replacement answer %s with a new secret: %v; want the same locker, re-keyed", nr.DeviceID, nr.Password != r.Password)
	}
}

// TestExternalBrokerPrivateCA: a broker whose certificate comes from a
// private CA is refused at start, with what to do, unless --broker-ca-file
// gives that CA; with it the gateway runs on the broker over TLS.
func TestExternalBrokerPrivateCA(t *testing.T) {
	mq, ca := MustTLSMosquitto(t)
	over := func(caFile string) func(*gateway.Options) {
		return func(o *gateway.Options) {
			onExternal(mq, "gw-tls")(o)
			o.ExternalBroker, o.ExternalCAFile = "mqtts://"+mq.Addr, caFile
		}
	}
	o := gateway.Options{DataDir: t.TempDir(), DatabaseURL: pgtest.NewDB(t), MQTTAddr: "127.0.0.1:0", HTTPAddr: "127.0.0.1:0",
		Logger: testLogger(t)}
	over("")(&o)
	g, err := gateway.New(context.Background(), o)
	if err == nil {
		g.Close()
		t.Fatal("started on a broker whose certificate no trusted CA signed")
	}
	if !strings.Contains(err.Error(), "x509") || !strings.Contains(err.Error(), "--broker-ca-file") {
		t.Fatalf("error %q does not say the certificate is unknown and what to do", err)
	}
	MustStart(t, over(ca)) // ready: connected and subscribed over TLS
}

// TestExternalRestartKeepsSessions: a gateway that subscribes anew behind
// mosquitto is handed every locker's retained birth. Those are the
// broker's record of sessions already counted, not new ones: a restart
// leaves a connected locker's session (its start, its connect count, its
// presence history) as it was.
func TestExternalRestartKeepsSessions(t *testing.T) {
	mq := MustOpenMosquitto(t)
	var opts gateway.Options
	tg := MustStart(t, onExternal(mq, "gw-sessions"), func(o *gateway.Options) { opts = *o })
	r, _ := oneExternalLocker(t, tg, mq, "s1")
	type session struct {
		Connects, Starts int
		Since            time.Time
	}
	read := func(tg *TestGateway) (s session) {
		t.Helper()
		if err := tg.DB().Pool().QueryRow(context.Background(), `SELECT connect_count, connected_at,
			(SELECT count(*) FROM presence_log WHERE device_id = $1 AND online) FROM devices WHERE id = $1`, r.DeviceID).Scan(&s.Connects, &s.Since, &s.Starts); err != nil {
			t.Fatal(err)
		}
		return s
	}
	before := read(tg)
	for i := range 2 {
		tg.Stop(t)
		tg = MustRun(t, opts)
		// The new instance judged the retained birth the one on record.
		tg.WaitMetric(t, 10*time.Second, "lockergate_presence_retained_births_known_total", 1)
		if got := read(tg); got != before {
			t.Fatalf("restart %d: session %+v, want %+v as before", i+1, got, before)
		}
	}
}

// TestExternalCleanStopReadsOffline: a broker that reports no session
// ends drops the Last Will at a clean DISCONNECT, so a locker that leaves
// cleanly says so itself first ({"online":false} on presence, as the
// simulator does): the gateway marks it offline.
func TestExternalCleanStopReadsOffline(t *testing.T) {
	mq := MustOpenMosquitto(t)
	tg := MustStart(t, onExternal(mq, "gw-bye"))
	r, sim := oneExternalLocker(t, tg, mq, "s1")
	sim.Close()
	waitOnline(t, tg, r.DeviceID, false)
}
