package gateway_test

import (
	"context"
	"fmt"
	"os/exec"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/jackc/pgx/v5"

	"github.com/lockergate/lockergate/gateway"
	"github.com/lockergate/lockergate/internal/pgtest"
	"github.com/lockergate/lockergate/internal/sdlisten"
	"github.com/lockergate/lockergate/protocol"
)

// TestEmbeddedCrashLosesNoEvent: the embedded broker acknowledges a
// locker's QoS 1 event only once it is stored. Storage stalls (a lock on
// events) while lockers publish; the gateway process, holding every event
// unstored, is killed as a crash kills it, and a new one starts on the
// same sockets (held here as systemd holds them). No locker got a PUBACK
// for an event the crash lost, so each sends its events again on its next
// connection, and every event is stored exactly once.
func TestEmbeddedCrashLosesNoEvent(t *testing.T) {
	const lockers, perLocker = 5, 20
	ctx := context.Background()
	bin := buildLockergate(t)
	dsn := pgtest.NewDB(t)
	dataDir := t.TempDir()
	b := MustStart(t, func(o *gateway.Options) { o.DataDir, o.DatabaseURL = dataDir, dsn })
	claim := b.MustSiteAndClaim(t, "s1", lockers)
	ids := make([]protocol.ProvisionResponse, lockers)
	for i := range ids {
		ids[i] = MustProvision(t, b, claim, fmt.Sprintf("CRASHE-%03d", i))
	}
	b.Stop(t)

	mqttF, mqttAddr := heldSocket(t)
	httpF, _ := heldSocket(t)
	start := func() *gatewayProcess {
		cmd := exec.Command(bin, "serve", "--data-dir", dataDir, "--database-url", dsn, "--mqtts-addr", "",
			"--log-level", "warn", "--mqtt-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0")
		sdlisten.Pass(cmd, sdlisten.Socket{Name: "mqtt", File: mqttF}, sdlisten.Socket{Name: "http", File: httpF})
		return startGatewayCmd(t, cmd)
	}
	a := start()

	// Lockers with a kept session, which send a message that got no
	// PUBACK again when they reconnect, as MQTT has them do.
	devs := make([]paho.Client, lockers)
	for i, id := range ids {
		o := paho.NewClientOptions().AddBroker("tcp://" + mqttAddr).SetClientID(id.DeviceID).SetUsername(id.DeviceID).
			SetPassword(id.Password).SetCleanSession(false).SetAutoReconnect(true).
			SetMaxReconnectInterval(500 * time.Millisecond).SetConnectTimeout(30 * time.Second)
		devs[i] = paho.NewClient(o)
		if tk := devs[i].Connect(); !tk.WaitTimeout(30*time.Second) || tk.Error() != nil {
			t.Fatalf("locker %d connect: %v", i, tk.Error())
		}
	}
	defer func() {
		for _, d := range devs {
			d.Disconnect(0)
		}
	}()

	stall, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer stall.Close(ctx)
	tx, err := stall.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, `LOCK TABLE events IN SHARE MODE`); err != nil {
		t.Fatal(err)
	}
	now := protocol.FormatTime(time.Now())
	var toks []paho.Token
	for i, d := range devs {
		for k := range perLocker {
			toks = append(toks, d.Publish(protocol.Topic(ids[i].DeviceID, protocol.ChanEvents), 1, false,
				fmt.Sprintf(`{"id":"crash-%d","ts":"%s","type":"door_closed","compartment":1,"occupied":false}`, k, now)))
		}
	}
	want := lockers * perLocker
	Eventually(t, 20*time.Second, "the gateway holds every event, unstored", func() error {
		n, err := a.metric(`lockergate_mqtt_messages_received_total{channel="events"}`)
		if err != nil || n != float64(want) {
			return fmt.Errorf("received %v of %d events (%v)", n, want, err)
		}
		return nil
	})
	for i, tk := range toks {
		if tk.WaitTimeout(0) {
			t.Fatalf("event %d acknowledged before it was stored (err %v)", i, tk.Error())
		}
	}
	a.kill()
	if err := tx.Rollback(ctx); err != nil {
		t.Fatal(err)
	}

	// paho sends its unacknowledged publishes again when it reconnects
	// (and completes the first tokens then, so they tell nothing here).
	a = start()
	var n, distinct int
	Eventually(t, 60*time.Second, "every event stored", func() error {
		if err := stall.QueryRow(ctx, `SELECT count(*), count(DISTINCT (device_id, event_id)) FROM events WHERE event_id LIKE 'crash-%'`).
			Scan(&n, &distinct); err != nil {
			return err
		}
		if distinct != want {
			return fmt.Errorf("%d of %d events stored", distinct, want)
		}
		return nil
	})
	if n != want {
		t.Fatalf("%d events stored for %d distinct, want each once", n, want)
	}
	again, err := a.metric(`lockergate_mqtt_messages_received_total{channel="events"}`)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("the new gateway received %v events (the %d the crash took, sent again)", again, want)
}
