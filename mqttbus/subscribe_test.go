package mqttbus

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/internal/testtool"
)

// dynsecMosquitto runs mosquitto with its dynamic security plugin, whose
// admin user is lgadmin, and returns its address and lgadmin's password.
func dynsecMosquitto(t *testing.T) (addr, adminPassword string) {
	t.Helper()
	ctrl := testtool.Program(t, "mosquitto_ctrl", "to prove subscriptions refused by the broker", "apt-get install mosquitto-clients")
	plugin := testtool.DynsecPlugin(t)
	dir := t.TempDir()
	cf := filepath.Join(dir, "dynsec.json")
	adminPassword = fmt.Sprint("admin-", time.Now().UnixNano())
	if out, err := exec.Command(ctrl, "dynsec", "init", cf, "lgadmin", adminPassword).CombinedOutput(); err != nil {
		t.Fatalf("dynsec init: %v: %s", err, out)
	}
	return mosquitto(t, fmt.Sprintf("plugin %s\nplugin_opt_config_file %s\n", plugin, cf)), adminPassword
}

// dialBus connects a Bus to the broker at addr as client id, in group g,
// with the rest of o; it is closed when the test ends.
func dialBus(t *testing.T, addr, id string, o Options) *Bus {
	t.Helper()
	o.URL, o.ClientID, o.Group, o.Logger = "mqtt://"+addr, id, "g", quiet()
	b, err := Dial(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(b.Close)
	return b
}

// refusingBroker runs mosquitto with dynamic security and a user gw (password
// gw-pw) whose role gw lets it do nothing yet; do runs a dynsec command.
func refusingBroker(t *testing.T) (addr string, ds *DynSec, do func(map[string]any)) {
	t.Helper()
	addr, adminPassword := dynsecMosquitto(t)
	ds, err := NewDynSec(dialBus(t, addr, "admin", Options{Username: "lgadmin", Password: adminPassword}))
	if err != nil {
		t.Fatal(err)
	}
	do = func(cmd map[string]any) {
		t.Helper()
		if err := ds.do(context.Background(), cmd); err != nil {
			t.Fatalf("%s: %v", cmd["command"], err)
		}
	}
	do(map[string]any{"command": "createRole", "rolename": "gw"})
	do(map[string]any{"command": "createClient", "username": "gw", "password": "gw-pw", "roles": []any{map[string]any{"rolename": "gw"}}})
	return addr, ds, do
}

// TestRefusedBeforeTheFirstHandler: paho runs a connection's handler on a
// goroutine of its own, and Dial's may run only after a subscription's
// answer came; a refusal then still leaves the bus not ready (it was lost:
// the subscription took the uncounted connection for a replaced one).
func TestRefusedBeforeTheFirstHandler(t *testing.T) {
	addr, _, _ := refusingBroker(t)
	release := make(chan struct{})
	var once sync.Once
	free := func() { once.Do(func() { close(release) }) }
	t.Cleanup(free)
	gw := dialBus(t, addr, "gw-1", Options{Username: "gw", Password: "gw-pw", onConnect: func() { <-release }})
	r := &received{got: map[string]int{}}
	if err := gw.Subscribe("lockers/v1/+/events", r.handler); err == nil || !strings.Contains(err.Error(), "SUBACK 0x80") {
		t.Fatalf("subscribe without the right: %v, want refused", err)
	}
	free()
	testtool.Eventually(t, 10*time.Second, "the first connection's handler run", func() error {
		gw.mu.Lock()
		defer gw.mu.Unlock()
		if gw.conns != 1 {
			return fmt.Errorf("%d connections counted", gw.conns)
		}
		return nil
	})
	if err := gw.Ready(); err == nil || !strings.Contains(err.Error(), "refused") {
		t.Fatalf("ready with the subscription refused: %v", err)
	}
}

// TestSubscriptionRefusedThenRestored: a subscription the broker refuses
// (SUBACK 0x80: the user's roles do not allow it) is an error, not a
// subscription that silently takes nothing, and the bus is not ready. Once
// allowed it is restored on the next connection, and one refused on a
// reconnect is tried again while connected until it is in.
func TestSubscriptionRefusedThenRestored(t *testing.T) {
	// The gateway's user, with a role that does not yet let it subscribe
	// to device topics; a locker that publishes its events.
	addr, ds, do := refusingBroker(t)
	ctx := context.Background()
	dial := func(id, user, password string, cut *cuttable) *Bus {
		t.Helper()
		o := Options{Username: user, Password: password}
		if cut != nil {
			o.openConn = cut.open
		}
		return dialBus(t, addr, id, o)
	}
	if err := ds.PutDevice(ctx, "lk-1", "lk-pw"); err != nil {
		t.Fatal(err)
	}
	locker := dial("lk-1", "lk-1", "lk-pw", nil)
	publish := func(payload string) {
		t.Helper()
		if err := locker.Publish(ctx, "lockers/v1/lk-1/events", []byte(payload), 1, false); err != nil {
			t.Fatal(err)
		}
	}
	allow := map[string]any{"rolename": "gw", "acltype": "subscribePattern", "topic": "$share/+/lockers/v1/#"}

	cut := &cuttable{}
	gw := dial("gw-1", "gw", "gw-pw", cut)
	drop := cut.drop
	r := &received{got: map[string]int{}}
	err := gw.Subscribe("lockers/v1/+/events", r.handler)
	if err == nil || !strings.Contains(err.Error(), "refused the subscription to $share/g/lockers/v1/+/events (SUBACK 0x80)") {
		t.Fatalf("subscribe without the right: %v, want refused", err)
	}
	if err := gw.Ready(); err == nil || !strings.Contains(err.Error(), "refused") {
		t.Fatalf("ready with the subscription refused: %v", err)
	}

	// Allowed: the next connection restores it.
	do(map[string]any{"command": "addRoleACL", "rolename": "gw", "acltype": "subscribePattern", "topic": allow["topic"], "allow": true})
	drop()
	waitReady := func(what string) {
		t.Helper()
		testtool.Eventually(t, 20*time.Second, what, gw.Ready)
	}
	waitReady("the subscription restored on the next connection")
	publish("e-1")
	testtool.Eventually(t, 10*time.Second, "the event delivered", func() error {
		if r.count() != 1 {
			return errors.New("not yet")
		}
		return nil
	})

	// Refused on a reconnect: tried again while connected.
	do(map[string]any{"command": "removeRoleACL", "rolename": "gw", "acltype": "subscribePattern", "topic": allow["topic"]})
	drop()
	testtool.Eventually(t, 20*time.Second, "the refusal on the reconnect seen", func() error {
		if err := gw.Ready(); err == nil || !strings.Contains(err.Error(), "refused") || !gw.Connected() {
			return fmt.Errorf("ready: %v, connected %v", err, gw.Connected())
		}
		return nil
	})
	conns := func() int {
		gw.mu.Lock()
		defer gw.mu.Unlock()
		return gw.conns
	}
	before := conns()
	do(map[string]any{"command": "addRoleACL", "rolename": "gw", "acltype": "subscribePattern", "topic": allow["topic"], "allow": true})
	waitReady("the subscription restored without a new connection")
	if n := conns(); n != before {
		// A broker that ends a role's sessions when its ACL changes would
		// restore it through a reconnect, which proves nothing here.
		t.Fatalf("connection %d after the grant, %d before: restored by a reconnect, not by the retries", n, before)
	}
	publish("e-2")
	testtool.Eventually(t, 10*time.Second, "the event after the restore delivered", func() error {
		if r.count() != 2 {
			return fmt.Errorf("%d delivered", r.count())
		}
		return nil
	})
}

// TestRetained: Retained reads a topic's retained message through a
// connection of its own, without taking from the shared group (whose
// handler gets every message once): nil for a topic with none, or with its
// retained message cleared and a message published since not retained.
func TestRetained(t *testing.T) {
	addr := mosquitto(t, "")
	ctx := context.Background()
	pub := dialBus(t, addr, "pub", Options{})
	gw := dialBus(t, addr, "gw", Options{peekWait: time.Second})
	r := &received{got: map[string]int{}}
	if err := gw.Subscribe("lockers/v1/+/presence", r.handler); err != nil {
		t.Fatal(err)
	}
	const topic = "lockers/v1/lk-1/presence"
	if err := pub.Publish(ctx, topic, []byte(`{"online":true}`), 1, true); err != nil {
		t.Fatal(err)
	}
	testtool.Eventually(t, 10*time.Second, "the birth through the group", func() error {
		if r.count() != 1 {
			return errors.New("not yet")
		}
		return nil
	})
	got, err := gw.Retained(ctx, topic)
	if err != nil || string(got) != `{"online":true}` {
		t.Fatalf("retained: %q %v", got, err)
	}
	if got, err := gw.Retained(ctx, "lockers/v1/lk-2/presence"); err != nil || got != nil {
		t.Fatalf("a topic with nothing retained: %q %v, want nil", got, err)
	}
	if err := pub.Publish(ctx, topic, nil, 1, true); err != nil { // cleared
		t.Fatal(err)
	}
	if err := pub.Publish(ctx, topic, []byte(`{"online":false}`), 1, false); err != nil { // not retained
		t.Fatal(err)
	}
	testtool.Eventually(t, 10*time.Second, "both through the group", func() error {
		if r.count() != 3 {
			return fmt.Errorf("%d through the group", r.count())
		}
		return nil
	})
	if got, err := gw.Retained(ctx, topic); err != nil || got != nil {
		t.Fatalf("after the retained message was cleared: %q %v, want nil", got, err)
	}
	if r.dups != 0 {
		t.Fatalf("%d messages delivered twice to the group's handler", r.dups)
	}
	// After Close nothing is read, and no connection is made for it. The
	// session was clean: what the read was for is not kept by the broker,
	// so the error is not fleet.ErrBusClosed (the caller applies it).
	fresh := dialBus(t, addr, "gw-2", Options{})
	fresh.Close()
	if got, err := fresh.Retained(ctx, topic); err == nil || errors.Is(err, fleet.ErrBusClosed) || got != nil {
		t.Fatalf("a read after Close: %q %v, want an error other than fleet.ErrBusClosed", got, err)
	}
	if fresh.peek != nil {
		t.Fatal("a read after Close dialled the broker")
	}
}

// TestRetainedReadsInParallel: a read waiting on a topic with nothing
// retained holds up neither reads of other topics nor several reads of
// one topic (they take turns), and Close ends it with fleet.ErrBusClosed
// (the bus's session is persistent: the broker keeps what it was given).
func TestRetainedReadsInParallel(t *testing.T) {
	addr := mosquitto(t, "")
	ctx := context.Background()
	pub := dialBus(t, addr, "pub", Options{})
	gw, err := Dial(ctx, Options{URL: "mqtt://" + addr, ClientID: "gw", Group: "g", Logger: quiet(), Persistent: true, peekWait: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	closed := make(chan struct{})
	closeBus := sync.OnceFunc(func() {
		go func() {
			gw.Close()
			close(closed)
		}()
	})
	t.Cleanup(func() {
		closeBus()
		select {
		case <-closed:
		case <-time.After(10 * time.Second):
			t.Error("Close still waiting 10 s on")
		}
	})
	const birth = `{"online":true}`
	if err := pub.Publish(ctx, "lockers/v1/lk-b/presence", []byte(birth), 1, true); err != nil {
		t.Fatal(err)
	}
	type result struct {
		got []byte
		err error
	}
	waiting := make(chan result, 1)
	go func() {
		got, err := gw.Retained(ctx, "lockers/v1/lk-a/presence") // nothing retained: waits its hour
		waiting <- result{got, err}
	}()
	testtool.Eventually(t, 10*time.Second, "the read of lk-a subscribed and waiting", func() error {
		if n := gw.peekWaiting.Load(); n != 1 {
			return fmt.Errorf("%d reads waiting", n)
		}
		return nil
	})
	const n = 3
	results := make(chan result, n)
	for range n {
		go func() {
			ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			defer cancel()
			got, err := gw.Retained(ctx, "lockers/v1/lk-b/presence")
			results <- result{got, err}
		}()
	}
	for range n {
		if r := <-results; r.err != nil || string(r.got) != birth {
			t.Fatalf("a read of lk-b beside the waiting one: %q %v, want %s", r.got, r.err, birth)
		}
	}
	select {
	case r := <-waiting:
		t.Fatalf("the read of lk-a ended before Close: %q %v", r.got, r.err)
	default:
	}
	closeBus()
	select {
	case r := <-waiting:
		if !errors.Is(r.err, fleet.ErrBusClosed) || r.got != nil {
			t.Fatalf("the read of lk-a at Close: %q %v, want fleet.ErrBusClosed", r.got, r.err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not end the read of lk-a in progress")
	}
	if got, err := gw.Retained(ctx, "lockers/v1/lk-b/presence"); !errors.Is(err, fleet.ErrBusClosed) || got != nil {
		t.Fatalf("a read after Close: %q %v, want fleet.ErrBusClosed", got, err)
	}
}

// TestDynSecClientsPaged: Clients reads every client the plugin holds, past
// the 1,000 one answer holds.
func TestDynSecClientsPaged(t *testing.T) {
	addr, adminPassword := dynsecMosquitto(t)
	b := dialBus(t, addr, "admin", Options{Username: "lgadmin", Password: adminPassword})
	ds, err := NewDynSec(b)
	if err != nil {
		t.Fatal(err)
	}
	const n = 1234
	cmds := make([]any, n)
	for i := range cmds {
		cmds[i] = map[string]any{"command": "createClient", "username": fmt.Sprintf("c-%04d", i)}
	}
	body, _ := json.Marshal(map[string]any{"commands": cmds})
	if err := b.Publish(context.Background(), dynsecTopic, body, 1, false); err != nil {
		t.Fatal(err)
	}
	var got []string
	testtool.Eventually(t, 30*time.Second, fmt.Sprintf("%d clients and lgadmin listed", n), func() error {
		if got, err = ds.Clients(context.Background()); err != nil {
			return err
		}
		if len(got) != n+1 {
			return fmt.Errorf("%d listed", len(got))
		}
		return nil
	})
	seen := map[string]bool{}
	for _, c := range got {
		seen[c] = true
	}
	for i := range n {
		if c := fmt.Sprintf("c-%04d", i); !seen[c] {
			t.Fatalf("%s not listed (%d distinct of %d)", c, len(seen), len(got))
		}
	}
}
