package gateway_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/lockergate/lockergate/gateway"
	"github.com/lockergate/lockergate/internal/pgcluster"
	"github.com/lockergate/lockergate/internal/pgtest"
	"github.com/lockergate/lockergate/internal/testtool"
	"github.com/lockergate/lockergate/protocol"
)

// restartablePG is a private PostgreSQL cluster behind a pgtest.Proxy: a test
// stops and starts it while the gateway keeps one DSN.
type restartablePG struct {
	opts     pgcluster.Options
	cluster  *pgcluster.Cluster
	proxy    *pgtest.Proxy
	viaProxy string // the DSN through the proxy
}

func mustRestartablePG(t *testing.T) *restartablePG {
	t.Helper()
	p := &restartablePG{opts: pgcluster.Options{DataDir: filepath.Join(testtool.PostgresDir(t), "pg"), Fast: true, Database: "lockergate", Logger: testLogger(t)},
		proxy: pgtest.NewProxy(t)}
	p.start(t)
	t.Cleanup(func() { p.cluster.Stop() })
	return p
}

func (p *restartablePG) dsn() string { return p.viaProxy }

// stop stops the cluster and cuts every connection through the proxy.
func (p *restartablePG) stop(t *testing.T) {
	t.Helper()
	if err := p.cluster.Stop(); err != nil {
		t.Fatal(err)
	}
	p.proxy.DropAll()
}

func (p *restartablePG) start(t *testing.T) {
	t.Helper()
	c, err := pgcluster.Start(context.Background(), p.opts)
	if err != nil {
		t.Fatal(err)
	}
	p.cluster = c
	p.proxy.SetTarget(t, c.DSN("lockergate"))
	p.viaProxy = p.proxy.DSN(t, c.DSN("lockergate"))
}

// TestDatabaseRestartDuringIngest restarts PostgreSQL while a locker sends
// QoS 1 events: the gateway reconnects and stores every one of them, and
// acknowledges none before it is stored. A
// locker that asks to be provisioned during the outage gets no answer (any
// answer is final for it) but a closed session, and is provisioned when it
// tries again after the restart.
func TestDatabaseRestartDuringIngest(t *testing.T) {
	ctx := context.Background()
	pg := mustRestartablePG(t)
	tg := MustStart(t, func(o *gateway.Options) { o.DatabaseURL = pg.dsn() })
	claim := tg.MustSiteAndClaim(t, "s1", 2)
	id := MustProvision(t, tg, claim, "SN-DB-1")
	dev := MustConnect(t, tg.MQTTAddr(), id.DeviceID, id.DeviceID, id.Password)
	// publish sends events from..to-1 and returns their tokens, which
	// complete once each event is stored.
	publish := func(from, to int) []paho.Token {
		var toks []paho.Token
		for i := from; i < to; i++ {
			p := fmt.Sprintf(`{"id":"e-%d","ts":"%s","type":"door_opened","compartment":1,"by":"manual"}`, i, protocol.FormatTime(time.Now()))
			toks = append(toks, dev.Publish(protocol.Topic(id.DeviceID, protocol.ChanEvents), 1, false, p))
		}
		return toks
	}
	acked := func(toks []paho.Token, within time.Duration) {
		t.Helper()
		for i, tk := range toks {
			if !tk.WaitTimeout(within) || tk.Error() != nil {
				t.Fatalf("event %d of %d: no PUBACK (%v)", i, len(toks), tk.Error())
			}
		}
	}
	count := func() (int, error) {
		var n int
		err := tg.DB().Pool().QueryRow(ctx, `SELECT count(*) FROM events WHERE device_id = $1`, id.DeviceID).Scan(&n)
		return n, err
	}
	acked(publish(0, 50), 10*time.Second)
	Eventually(t, 10*time.Second, "first 50 events", func() error {
		n, err := count()
		if err == nil && n != 50 {
			err = fmt.Errorf("%d stored", n)
		}
		return err
	})

	// A new locker's claim session is accepted while the database is up.
	prov := MustConnect(t, tg.MQTTAddr(), "prov-SN-DB-2", "claim", claim)
	answers := make(chan []byte, 1)
	if tk := prov.Subscribe(protocol.ProvisionResponseTopic("SN-DB-2"), 1, func(_ paho.Client, m paho.Message) { answers <- m.Payload() }); !tk.WaitTimeout(5*time.Second) || tk.Error() != nil {
		t.Fatalf("subscribe: %v", tk.Error())
	}

	// PostgreSQL goes away; the gateway keeps taking QoS 1 events, and
	// acknowledges each once it is stored.
	pg.stop(t)
	held := publish(50, 150)
	Eventually(t, 10*time.Second, "150 events received", func() error {
		if v, err := tg.Metric(`lockergate_mqtt_messages_received_total{channel="events"}`); err != nil || v != 150 {
			return fmt.Errorf("%v received (%v)", v, err)
		}
		return nil
	})
	for i, tk := range held {
		if tk.WaitTimeout(0) {
			t.Fatalf("event %d acknowledged while the database is down (%v)", 50+i, tk.Error())
		}
	}
	req := protocol.ProvisionRequest{Serial: "SN-DB-2", Model: "LX-1", FW: "1.0.0", Compartments: []protocol.CompartmentSpec{{N: 1, Size: "S", Zone: "ambient"}}}
	MustPublish(t, prov, protocol.ProvisionRequestTopic("SN-DB-2"), false, protocol.Encode(req))
	Eventually(t, 30*time.Second, "claim session ended without an answer", func() error {
		if prov.IsConnectionOpen() {
			return errors.New("still connected")
		}
		return nil
	})
	select {
	case b := <-answers:
		t.Fatalf("answered during the outage: %s", b)
	default:
	}
	if v, err := tg.Metric(`lockergate_mqtt_provisioning_total{result="unavailable"}`); err != nil || v != 1 {
		t.Errorf("provisioning{unavailable} = %v (%v), want 1", v, err)
	}
	pg.start(t)

	acked(held, 30*time.Second)
	Eventually(t, 30*time.Second, "all 150 events after the restart", func() error {
		n, err := count()
		if err == nil && n != 150 {
			err = fmt.Errorf("%d stored", n)
		}
		return err
	})
	if v, err := tg.Metric(`lockergate_db_errors_total{op="insert_events"}`); err != nil || v < 1 {
		t.Errorf("database errors during the outage were not counted: %v (%v)", v, err)
	}
	// The locker's retry, as its back-off would make it.
	MustProvision(t, tg, claim, "SN-DB-2")
}

// TestAPIDatabaseDown: while PostgreSQL is down the API answers 503 with
// Retry-After (a client retries), not 500, and serves again after it is
// back.
func TestAPIDatabaseDown(t *testing.T) {
	pg := mustRestartablePG(t)
	tg := MustStart(t, func(o *gateway.Options) { o.DatabaseURL = pg.dsn() })
	tg.MustSiteAndClaim(t, "s1", 1)
	get := func() (int, string) {
		t.Helper()
		req, err := http.NewRequest("GET", tg.Admin.BaseURL+"/v1/sites", nil)
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Authorization", "Bearer "+tg.Admin.Token)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		io.Copy(io.Discard, resp.Body)
		return resp.StatusCode, resp.Header.Get("Retry-After")
	}
	if status, _ := get(); status != http.StatusOK {
		t.Fatalf("database up: %d", status)
	}
	pg.stop(t)
	// Every answer during the outage, the first ones included (pooled
	// connections broken, new ones refused), is a 503 to retry.
	for i := range 5 {
		if status, ra := get(); status != http.StatusServiceUnavailable || ra == "" {
			t.Fatalf("request %d during the outage: status %d, Retry-After %q; want 503 with Retry-After", i, status, ra)
		}
	}
	pg.start(t)
	Eventually(t, 30*time.Second, "the API serving after the restart", func() error {
		if status, _ := get(); status != http.StatusOK {
			return fmt.Errorf("status %d", status)
		}
		return nil
	})
}

// TestCommandAnsweredWhenDatabaseGoesDown: a command that was stored is
// answered 201 with its last known state even when waiting for its result
// fails (here: PostgreSQL stops while the unlock waits for an offline
// locker). An error would invite a retry: a second unlock.
func TestCommandAnsweredWhenDatabaseGoesDown(t *testing.T) {
	pg := mustRestartablePG(t)
	tg := MustStart(t, func(o *gateway.Options) { o.DatabaseURL = pg.dsn() })
	r := MustProvision(t, tg, tg.MustSiteAndClaim(t, "s1", 1), "SN-CMD-DOWN") // never connects
	type answer struct {
		status int
		body   string
		err    error
		at     time.Time
	}
	done := make(chan answer, 1)
	go func() {
		// The wait ends (and the command is read again) with PostgreSQL
		// down, long before the command could expire. The other failed read,
		// of a command expired while pending, is fleet's
		// TestWaitCommandExpiredReadFails.
		body := strings.NewReader(`{"type":"unlock","compartment":1,"ttl_s":120,"wait_s":8}`)
		req, _ := http.NewRequest("POST", tg.Admin.BaseURL+"/v1/lockers/"+r.DeviceID+"/commands", body)
		req.Header.Set("Authorization", "Bearer "+tg.Admin.Token)
		req.Header.Set("Content-Type", "application/json")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			done <- answer{err: err}
			return
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		done <- answer{status: resp.StatusCode, body: string(b), at: time.Now()}
	}()
	Eventually(t, 10*time.Second, "the command stored", func() error {
		if n := tg.Count(t, `SELECT count(*) FROM commands WHERE device_id = $1`, r.DeviceID); n != 1 {
			return fmt.Errorf("%d commands", n)
		}
		return nil
	})
	pg.stop(t)
	stopped := time.Now()
	select {
	case a := <-done:
		if a.err != nil || a.status != http.StatusCreated || !strings.Contains(a.body, `"id":"c`) {
			t.Fatalf("answer %d %q (%v), want 201 with the command", a.status, a.body, a.err)
		}
		if !a.at.After(stopped) {
			t.Fatal("answered before PostgreSQL stopped: the failed read was not exercised")
		}
		if !strings.Contains(a.body, `"status":"pending"`) {
			t.Errorf("answer %s, want the last known state, pending", a.body)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("no answer within 30 s")
	}
	pg.start(t)
}
