package gateway_test

import (
	"context"
	"encoding/json"
	"net/http"
	"net/url"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/jackc/pgx/v5"

	"github.com/lockergate/lockergate/client"
	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/gateway"
	"github.com/lockergate/lockergate/internal/pgtest"
	"github.com/lockergate/lockergate/protocol"
)

// TestGatewayRestartMidCommand: the gateway restarts between sending an
// unlock and the locker's answer. The result is not lost, and the locker is
// sent the same command again (same id, which it dedupes), never a second,
// different one.
func TestGatewayRestartMidCommand(t *testing.T) {
	ctx := context.Background()
	opts := gateway.Options{
		DataDir: t.TempDir(), DatabaseURL: pgtest.NewDB(t), MQTTAddr: "127.0.0.1:0", HTTPAddr: "127.0.0.1:0", Logger: testLogger(t),
		Config: protocol.Config{Version: 1, HealthIntervalS: 1, DoorAjarS: 120, Lockout: protocol.DefaultLockout},
	}
	tg := MustRun(t, opts)
	claim := tg.MustSiteAndClaim(t, "s1", 1)
	id := MustProvision(t, tg, claim, "SN-RESTART")

	got := make(chan protocol.Command, 16)
	device := func(addr string) paho.Client {
		c := MustConnect(t, addr, id.DeviceID, id.DeviceID, id.Password)
		if tk := c.Subscribe(protocol.Topic(id.DeviceID, protocol.ChanCmd), 1, func(_ paho.Client, m paho.Message) {
			var cmd protocol.Command
			if json.Unmarshal(m.Payload(), &cmd) == nil {
				got <- cmd
			}
		}); !tk.WaitTimeout(5*time.Second) || tk.Error() != nil {
			t.Fatalf("subscribe: %v", tk.Error())
		}
		birth := protocol.Presence{Online: true, TS: protocol.Now(), FW: "1.0.0", Model: "LX-4", BootID: "b1"}
		c.Publish(protocol.Topic(id.DeviceID, protocol.ChanPresence), 1, true, protocol.Encode(birth)).WaitTimeout(5 * time.Second)
		return c
	}
	dev := device(tg.MQTTAddr())
	waitOnline(t, tg, id.DeviceID, true)
	var cmd fleet.Command
	if err := tg.Admin.Post(ctx, "/v1/lockers/"+id.DeviceID+"/commands", map[string]any{"type": "unlock", "compartment": 2, "ttl_s": 120}, &cmd); err != nil {
		t.Fatal(err)
	}
	var first protocol.Command // the locker has it, and does not answer before the restart
	select {
	case first = <-got:
	case <-time.After(15 * time.Second):
		t.Fatal("the locker did not get the command")
	}
	if first.ID != cmd.ID {
		t.Fatalf("locker got %s, want %s", first.ID, cmd.ID)
	}
	dev.Disconnect(50)
	tg.Stop(t)

	tg2 := MustRun(t, opts)
	tg2.Admin.Token = tg.Admin.Token
	dev2 := device(tg2.MQTTAddr())
	var again protocol.Command
	select {
	case again = <-got:
	case <-time.After(15 * time.Second):
		t.Fatal("the open command was not sent again after the restart")
	}
	if again.ID != cmd.ID || again.Compartment != 2 || !again.ExpiresAt.Equal(first.ExpiresAt.Time) {
		t.Fatalf("after the restart the locker got %+v, want the same command %+v", again, first)
	}
	// The locker ran it once and answers (a repeat of its one answer).
	res := protocol.CommandResult{ID: cmd.ID, Status: protocol.StatusOK, TS: protocol.Now()}
	dev2.Publish(protocol.Topic(id.DeviceID, protocol.ChanCmdResult), 1, false, protocol.Encode(res)).WaitTimeout(5 * time.Second)
	waitCommandStatus(t, tg2, id.DeviceID, cmd.ID, fleet.CmdOK, "result recorded")
	n := tg2.Count(t, `SELECT count(*) FROM commands WHERE device_id = $1`, id.DeviceID)
	if n != 1 {
		t.Fatalf("%d commands stored, want 1", n)
	}
}

// TestRestartEndsSessionsLeftOpen: a gateway that ended without recording
// its sessions' ends (killed, crashed) left lockers online in the database.
// With the embedded broker none can be connected before the next start
// opens its listeners: that start ends them, as gateway_restart.
func TestRestartEndsSessionsLeftOpen(t *testing.T) {
	ctx := context.Background()
	opts := gateway.Options{
		DataDir: t.TempDir(), DatabaseURL: pgtest.NewDB(t), MQTTAddr: "127.0.0.1:0", HTTPAddr: "127.0.0.1:0", Logger: testLogger(t),
	}
	tg := MustRun(t, opts)
	claim := tg.MustSiteAndClaim(t, "s1", 1)
	id := MustProvision(t, tg, claim, "SN-LEFT-OPEN")
	var admins struct{ Items []fleet.Token }
	if err := tg.Admin.Get(ctx, "/v1/tokens", url.Values{"role": {"admin"}}, &admins); err != nil || len(admins.Items) != 1 {
		t.Fatalf("admin tokens: %+v %v", admins, err)
	}
	tg.Stop(t)
	// What a killed process leaves: online, no end recorded.
	conn, err := pgx.Connect(ctx, opts.DatabaseURL)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, `UPDATE devices SET online = true, connected_at = now(), disconnected_at = NULL,
		disconnect_reason = '' WHERE id = $1`, id.DeviceID); err != nil {
		t.Fatal(err)
	}

	// And a request (a site's create) whose Idempotency-Key it claimed and
	// never finished: the restart releases the claim, so the retry runs at
	// once.
	if _, err := conn.Exec(ctx, `INSERT INTO idempotency (actor, key, route, body_hash, status, response)
		VALUES ($1, 'left-claimed', 'POST /v1/sites', '\x00', 0, '')`, admins.Items[0].ID); err != nil {
		t.Fatal(err)
	}

	tg2 := MustRun(t, opts)
	tg2.Admin.Token = tg.Admin.Token
	if status, err := tg2.Admin.Do(ctx, client.Request{Method: "POST", Path: "/v1/sites", Body: map[string]any{"id": "s-retried"},
		Header: http.Header{"Idempotency-Key": {"left-claimed"}}}, nil); status != http.StatusCreated {
		t.Fatalf("the retry of a request the previous run claimed and never finished: %d %v, want 201 (not 409 for 5 minutes)", status, err)
	}
	var l fleet.Locker
	if err := tg2.Admin.Get(ctx, "/v1/lockers/"+id.DeviceID, nil, &l); err != nil {
		t.Fatal(err)
	}
	if l.Online || l.DisconnectReason != gateway.ReasonGatewayRestart || l.DisconnectedAt == nil {
		t.Fatalf("after the restart: online %v, reason %q, disconnected at %v; want offline, %s", l.Online, l.DisconnectReason,
			l.DisconnectedAt, gateway.ReasonGatewayRestart)
	}
	if n := tg2.Count(t, `SELECT count(*) FROM presence_log WHERE device_id = $1 AND NOT online AND reason = $2`,
		id.DeviceID, gateway.ReasonGatewayRestart); n != 1 {
		t.Fatalf("%d presence history rows for the session's end, want 1", n)
	}
}
