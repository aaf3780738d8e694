package gateway_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/lockergate/lockergate/client"
	"github.com/lockergate/lockergate/devicesim"
	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/gateway"
	"github.com/lockergate/lockergate/postgres"
	"github.com/lockergate/lockergate/protocol"
)

// TestCommandWaitsForReconnect: an unlock to a locker that is offline for
// less than its ttl is delivered when it comes back, and runs once.
func TestCommandWaitsForReconnect(t *testing.T) {
	ctx := context.Background()
	tg := MustStart(t)
	l := disconnectedLocker(t, tg)
	id := l.DeviceID()
	var cmd fleet.Command
	if err := tg.Admin.Post(ctx, "/v1/lockers/"+id+"/commands", map[string]any{"type": "unlock", "compartment": 2, "ttl_s": 60}, &cmd); err != nil {
		t.Fatal(err)
	}
	if cmd.Status != fleet.CmdPending {
		t.Fatalf("status %q, want pending while offline", cmd.Status)
	}
	rctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	if err := l.Reconnect(rctx); err != nil {
		t.Fatal(err)
	}
	waitCommandStatus(t, tg, id, cmd.ID, fleet.CmdOK, "command answered after reconnect")
	if n := l.CommandsRun(cmd.ID); n != 1 {
		t.Fatalf("ran %d times, want 1", n)
	}
}

// disconnectedLocker is a simulated locker of a new site of tg that was
// online and has disconnected, as the gateway shows it: offline after
// having been online (a locker not yet marked online at all, its connect
// still queued, would read as offline too).
func disconnectedLocker(t *testing.T, tg *TestGateway) *devicesim.Locker {
	t.Helper()
	sim := MustFleet(t, tg, tg.MustSiteAndClaim(t, "s1", 1), 1)
	l := sim.Lockers()[0]
	l.Disconnect()
	Eventually(t, 10*time.Second, "locker offline", func() error {
		if got := lockerOf(t, tg, l.DeviceID()); got.Online || got.DisconnectedAt == nil {
			return fmt.Errorf("online %v, disconnected at %v", got.Online, got.DisconnectedAt)
		}
		return nil
	})
	return l
}

// TestCommandReachesLateSubscriber: protocol v1 has the birth "right after
// connecting", so a plain client may publish it before it subscribes to
// its cmd topic. An unlock sent before that subscription (at the birth,
// or to the online locker) still reaches it once it subscribes.
func TestCommandReachesLateSubscriber(t *testing.T) {
	ctx := context.Background()
	tg := MustStart(t)
	r, c := rawLocker(t, tg, "SN-LATE-1")
	publishBirth(t, tg, c, r.DeviceID)
	var cmd fleet.Command
	if err := tg.Admin.Post(ctx, "/v1/lockers/"+r.DeviceID+"/commands", map[string]any{"type": "unlock", "compartment": 1, "ttl_s": 60}, &cmd); err != nil {
		t.Fatal(err)
	}
	wantCommand(t, subscribeCommands(t, c, r.DeviceID), cmd.ID, "the unlock sent before the locker subscribed")
}

// subscribeCommands subscribes c to locker id's cmd topic and returns the
// ids of the commands that arrive.
func subscribeCommands(t *testing.T, c paho.Client, id string) <-chan string {
	t.Helper()
	got := make(chan string, 4)
	tok := c.Subscribe(protocol.Topic(id, protocol.ChanCmd), 1, func(_ paho.Client, m paho.Message) {
		var in protocol.Command
		if json.Unmarshal(m.Payload(), &in) == nil {
			got <- in.ID
		}
	})
	if !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("subscribe: %v", tok.Error())
	}
	return got
}

// wantCommand waits for the next command on got and checks it is id,
// passing over repeats: commands sent before it that the gateway may send
// again (an unanswered one is resent) ahead of it.
func wantCommand(t *testing.T, got <-chan string, id, what string, repeats ...string) {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		select {
		case in := <-got:
			if in == id {
				return
			}
			if !slices.Contains(repeats, in) {
				t.Fatalf("got command %s, want %s", in, id)
			}
		case <-deadline:
			t.Fatalf("%s never reached the locker", what)
		}
	}
}

// TestCommandAfterMinimalBirth: a birth of {"online":true} alone (protocol
// v1 shows the other fields but does not require them) still brings the
// locker its open commands, and keeps the firmware version known before.
func TestCommandAfterMinimalBirth(t *testing.T) {
	ctx := context.Background()
	tg := MustStart(t)
	claim := tg.MustSiteAndClaim(t, "s1", 1)
	r := MustProvision(t, tg, claim, "SN-MIN-1")
	var cmd fleet.Command // to the locker before it ever connected: pending
	if err := tg.Admin.Post(ctx, "/v1/lockers/"+r.DeviceID+"/commands", map[string]any{"type": "unlock", "compartment": 1, "ttl_s": 60}, &cmd); err != nil {
		t.Fatal(err)
	}
	c := MustConnect(t, tg.MQTTAddr(), r.DeviceID, r.DeviceID, r.Password)
	got := subscribeCommands(t, c, r.DeviceID)
	if tok := c.Publish(protocol.Topic(r.DeviceID, protocol.ChanPresence), 1, true, `{"online":true}`); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("birth: %v", tok.Error())
	}
	wantCommand(t, got, cmd.ID, "the open command, after a birth without fw,")
	var l fleet.Locker
	if err := tg.Admin.Get(ctx, "/v1/lockers/"+r.DeviceID, nil, &l); err != nil || l.FW != "1.0.0" {
		t.Fatalf("fw %q (%v), want the provisioned 1.0.0 kept", l.FW, err)
	}
}

// TestCommandSentAgainUntilAnswered: a sent command that an online locker
// has not answered (its publish lost, or dropped by the session) is sent
// again, by the same id, until the locker answers; then no more.
func TestCommandSentAgainUntilAnswered(t *testing.T) {
	tg := MustStart(t, func(o *gateway.Options) { o.CommandResend = 200 * time.Millisecond })
	// The locker takes the command and does not answer: it comes again.
	r, c, got, cmd := rawLockerUnlocked(t, tg, "SN-RESEND-1", 60)
	wantCommand(t, got, cmd.ID, "the unlock sent again")
	wantCommand(t, got, cmd.ID, "the unlock sent a third time")
	Eventually(t, 5*time.Second, "the resends counted", func() error { // counted after the publish
		if n, err := tg.Metric("lockergate_commands_resent_total"); err != nil || n < 2 {
			return fmt.Errorf("lockergate_commands_resent_total = %v (%v), want 2 or more", n, err)
		}
		return nil
	})
	publishResult(t, c, r.DeviceID, cmd.ID)
	waitCommandStatus(t, tg, r.DeviceID, cmd.ID, fleet.CmdOK, "the answer stored")
	// Answered: not sent again. Anything already on its way arrives
	// within a few resend periods; then nothing more comes.
	quiet := time.NewTimer(time.Second)
	defer quiet.Stop()
	for drained := false; !drained; {
		select {
		case <-got:
			quiet.Reset(time.Second)
		case <-quiet.C:
			drained = true
		}
	}
	before, _ := tg.Metric("lockergate_commands_resent_total")
	select {
	case id := <-got:
		t.Fatalf("command %s sent again after its answer", id)
	case <-time.After(time.Second): // five resend periods
	}
	if after, _ := tg.Metric("lockergate_commands_resent_total"); after != before {
		t.Fatalf("resent %v more times after the answer", after-before)
	}
}

// TestUnansweredCommandReadsExpired: a command delivered but never
// answered ends timed_out in the store and the metrics, and reads as
// api-v1 lists it, status expired ("the device did not run it before
// expires_at"), with timed_out true; a late answer still replaces it.
func TestUnansweredCommandReadsExpired(t *testing.T) {
	ctx := context.Background()
	tg := MustStart(t)
	r, c, _, cmd := rawLockerUnlocked(t, tg, "SN-UNANSWERED-1", 1)
	path := "/v1/lockers/" + r.DeviceID + "/commands/" + cmd.ID
	Eventually(t, 20*time.Second, "the unanswered unlock ended", func() error {
		var body map[string]any
		if err := tg.Admin.Get(ctx, path, nil, &body); err != nil {
			return err
		}
		if body["status"] != fleet.CmdExpired || body["timed_out"] != true || body["sent_at"] == nil {
			return fmt.Errorf("status %v, timed_out %v, sent_at %v; want expired, true, set", body["status"], body["timed_out"], body["sent_at"])
		}
		return nil
	})
	if n := tg.Count(t, `SELECT count(*) FROM commands WHERE id = $1 AND status = 'timed_out'`, cmd.ID); n != 1 {
		t.Fatalf("stored as timed_out: %d rows, want 1", n)
	}
	// Counted after the sweep's commit.
	tg.WaitMetric(t, 10*time.Second, `lockergate_commands_total{status="timed_out",type="unlock"}`, 1)
	// The door did open after all: the late answer replaces it.
	publishResult(t, c, r.DeviceID, cmd.ID)
	Eventually(t, 10*time.Second, "the late answer taken", func() error {
		var body map[string]any
		if err := tg.Admin.Get(ctx, path, nil, &body); err != nil {
			return err
		}
		if _, ok := body["timed_out"]; body["status"] != fleet.CmdOK || ok {
			return fmt.Errorf("status %v, timed_out %v; want ok and no timed_out", body["status"], body["timed_out"])
		}
		return nil
	})
}

// waitCommandStatus waits for command cmdID of locker deviceID to read
// status through the API (fleet.CmdTimedOut: expired with timed_out).
func waitCommandStatus(t *testing.T, tg *TestGateway, deviceID, cmdID, status, what string) {
	t.Helper()
	Eventually(t, 10*time.Second, what, func() error {
		var c fleet.Command
		if err := tg.Admin.Get(context.Background(), "/v1/lockers/"+deviceID+"/commands/"+cmdID, nil, &c); err != nil {
			return err
		}
		if status == fleet.CmdTimedOut {
			if c.Status != fleet.CmdExpired || !c.TimedOut {
				return fmt.Errorf("status %s, timed_out %v; want expired, timed out", c.Status, c.TimedOut)
			}
			return nil
		}
		if c.Status != status {
			return fmt.Errorf("status %s", c.Status)
		}
		return nil
	})
}

// rawLocker provisions locker serial at a new site of tg and connects it as
// a plain MQTT client (no birth yet).
func rawLocker(t *testing.T, tg *TestGateway, serial string) (protocol.ProvisionResponse, paho.Client) {
	t.Helper()
	claim := tg.MustSiteAndClaim(t, "s1", 1)
	r := MustProvision(t, tg, claim, serial)
	return r, MustConnect(t, tg.MQTTAddr(), r.DeviceID, r.DeviceID, r.Password)
}

// rawLockerUnlocked is rawLocker online (its birth), subscribed to its
// commands, and sent an unlock of compartment 1 with ttlS that it
// received; got has its later commands.
func rawLockerUnlocked(t *testing.T, tg *TestGateway, serial string, ttlS int) (protocol.ProvisionResponse, paho.Client, <-chan string, fleet.Command) {
	t.Helper()
	r, c := rawLocker(t, tg, serial)
	got := subscribeCommands(t, c, r.DeviceID)
	publishBirth(t, tg, c, r.DeviceID)
	var cmd fleet.Command
	if err := tg.Admin.Post(context.Background(), "/v1/lockers/"+r.DeviceID+"/commands",
		map[string]any{"type": "unlock", "compartment": 1, "ttl_s": ttlS}, &cmd); err != nil {
		t.Fatal(err)
	}
	wantCommand(t, got, cmd.ID, "the unlock")
	return r, c, got, cmd
}

// publishResult publishes a plain client's answer ok to command id as
// locker deviceID.
func publishResult(t *testing.T, c paho.Client, deviceID, id string) {
	t.Helper()
	res := fmt.Sprintf(`{"id":"%s","status":"ok","ts":"%s"}`, id, protocol.FormatTime(time.Now()))
	if tok := c.Publish(protocol.Topic(deviceID, protocol.ChanCmdResult), 1, false, res); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("result: %v", tok.Error())
	}
}

// publishBirthHandled is publishBirth that also waits until the gateway
// has done what the connect and the birth bring (the retained state and the
// open commands sent): that runs on the locker's control shard, and an
// answer to an unknown command queued behind it shows it done.
func publishBirthHandled(t *testing.T, tg *TestGateway, c paho.Client, id string) {
	t.Helper()
	const unknown = `lockergate_ingest_messages_dropped_total{channel="cmd/result",reason="unknown_or_repeated"}`
	before, _ := tg.Metric(unknown) // absent before the first: 0
	publishBirth(t, tg, c, id)
	publishResult(t, c, id, "c-none")
	tg.WaitMetric(t, 10*time.Second, unknown, before+1)
}

// publishBirth publishes a plain client's birth as locker id and waits for
// the gateway to show it online.
func publishBirth(t *testing.T, tg *TestGateway, c paho.Client, id string) {
	t.Helper()
	birth := fmt.Sprintf(`{"online":true,"ts":"%s","fw":"1.0.0","model":"LX-4","boot_id":"b-1"}`, protocol.FormatTime(time.Now()))
	if tok := c.Publish(protocol.Topic(id, protocol.ChanPresence), 1, true, birth); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("birth: %v", tok.Error())
	}
	waitOnline(t, tg, id, true)
}

// TestPendingCommandDeliveredToOnlineLocker: a command stored pending while
// its locker came online (the create read the locker offline, and committed
// after the birth's delivery had read the open commands) is delivered all
// the same, while it has not expired.
func TestPendingCommandDeliveredToOnlineLocker(t *testing.T) {
	ctx := context.Background()
	tg := MustStart(t, func(o *gateway.Options) { o.CommandResend = 200 * time.Millisecond })
	r, c := rawLocker(t, tg, "SN-PENDING-1")
	got := subscribeCommands(t, c, r.DeviceID)
	publishBirthHandled(t, tg, c, r.DeviceID)
	// The command as that create stored it.
	now := time.Now()
	if _, err := tg.DB().Pool().Exec(ctx, `INSERT INTO commands (id, device_id, type, compartment, reason, status, actor, created_at, expires_at)
		VALUES ('c-late', $1, 'unlock', 1, 'remote', 'pending', 'test', $2, $3)`, r.DeviceID, now, now.Add(time.Minute)); err != nil {
		t.Fatal(err)
	}
	wantCommand(t, got, "c-late", "the pending command")
	waitCommandStatus(t, tg, r.DeviceID, "c-late", fleet.CmdSent, "the command marked sent")
}

// TestIdempotentUnlockRerunAfterItsGatewayDied: an unlock whose answer was
// lost with its gateway (the Idempotency-Key claimed, never finished) is run
// again once the claim is taken over: the run finds the command the first
// made (its id derives from the key) and answers it. The locker is never
// unlocked twice.
func TestIdempotentUnlockRerunAfterItsGatewayDied(t *testing.T) {
	ctx := context.Background()
	tg := MustStart(t)
	r, c := rawLocker(t, tg, "SN-IDEM-1")
	got := subscribeCommands(t, c, r.DeviceID)
	publishBirth(t, tg, c, r.DeviceID)
	unlock := func() (fleet.Command, int) {
		t.Helper()
		var cmd fleet.Command
		status, err := tg.Admin.Do(ctx, client.Request{Method: "POST", Path: "/v1/lockers/" + r.DeviceID + "/commands",
			Body: map[string]any{"type": "unlock", "compartment": 2}, Header: http.Header{"Idempotency-Key": {"unlock-once"}}}, &cmd)
		if err != nil {
			t.Fatalf("unlock: %d %v", status, err)
		}
		return cmd, status
	}
	first, _ := unlock()
	wantCommand(t, got, first.ID, "the unlock")
	publishResult(t, c, r.DeviceID, first.ID)
	waitCommandStatus(t, tg, r.DeviceID, first.ID, fleet.CmdOK, "the unlock answered")
	// Its gateway died before it stored the answer: the claim is left
	// unfinished, and old enough to be taken over.
	if _, err := tg.DB().Pool().Exec(ctx, `UPDATE idempotency SET status = 0, response = '', created_at = now() - make_interval(secs => $1)
		WHERE key = 'unlock-once'`, (postgres.IdempotencyAbandoned + time.Minute).Seconds()); err != nil {
		t.Fatal(err)
	}
	again, status := unlock()
	if status != http.StatusCreated || again.ID != first.ID || again.Status != fleet.CmdOK {
		t.Fatalf("the unlock run again answered %d %s %s, want 201 and the first command %s, ok", status, again.ID, again.Status, first.ID)
	}
	var commands, unlocks int
	if err := tg.DB().Pool().QueryRow(ctx, `SELECT (SELECT count(*) FROM commands WHERE device_id = $1),
		(SELECT count(*) FROM audit WHERE locker = $1 AND action = 'unlock')`, r.DeviceID).Scan(&commands, &unlocks); err != nil {
		t.Fatal(err)
	}
	if commands != 1 || unlocks != 1 {
		t.Fatalf("%d commands, %d unlocks audited; want one of each", commands, unlocks)
	}
	// The run's answer is kept: a repeat now is its replay.
	if replay, status := unlock(); status != http.StatusCreated || replay.ID != first.ID {
		t.Fatalf("the repeat answered %d %s, want the first command", status, replay.ID)
	}
}

// TestDisabledLockerGetsNoCommands: disabling a locker withdraws its open
// commands (an unlock queued while it was offline reads expired, withdrawn,
// and does not run when it is enabled and back), and a command to a
// disabled locker is refused (409), not queued for after its enabling.
func TestDisabledLockerGetsNoCommands(t *testing.T) {
	ctx := context.Background()
	tg := MustStart(t)
	l := disconnectedLocker(t, tg)
	id := l.DeviceID()
	unlock := map[string]any{"type": "unlock", "compartment": 2, "ttl_s": 120}
	var queued fleet.Command
	if err := tg.Admin.Post(ctx, "/v1/lockers/"+id+"/commands", unlock, &queued); err != nil || queued.Status != fleet.CmdPending {
		t.Fatalf("unlock for the offline locker: %s, %v; want pending", queued.Status, err)
	}
	patchLocker(t, tg, id, map[string]bool{"disabled": true})
	var c fleet.Command
	if err := tg.Admin.Get(ctx, "/v1/lockers/"+id+"/commands/"+queued.ID, nil, &c); err != nil ||
		c.Status != fleet.CmdExpired || c.Error != "withdrawn: locker disabled" {
		t.Fatalf("the queued unlock after the disable: %s %q (%v), want expired, withdrawn", c.Status, c.Error, err)
	}
	var pe *client.Error
	if err := tg.Admin.Post(ctx, "/v1/lockers/"+id+"/commands", unlock, nil); !errors.As(err, &pe) || pe.Status != http.StatusConflict ||
		!strings.Contains(pe.Detail, "disabled") {
		t.Fatalf("unlock for the disabled locker: %v, want a 409 saying it is disabled", err)
	}
	patchLocker(t, tg, id, map[string]bool{"disabled": false})
	rctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	if err := l.Reconnect(rctx); err != nil {
		t.Fatal(err)
	}
	waitOnline(t, tg, id, true)
	unlock["wait_s"] = 10
	var after fleet.Command
	if err := tg.Admin.Post(ctx, "/v1/lockers/"+id+"/commands", unlock, &after); err != nil || after.Status != fleet.CmdOK {
		t.Fatalf("unlock once enabled: %s, %v; want ok", after.Status, err)
	}
	if n := l.CommandsRun(queued.ID); n != 0 {
		t.Fatalf("the unlock withdrawn at the disable ran %d times", n)
	}
}
