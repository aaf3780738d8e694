package gateway_test

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/lockergate/lockergate/client"
	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/gateway"
	"github.com/lockergate/lockergate/pickup"
	"github.com/lockergate/lockergate/protocol"
)

// TestStagingFailedAlert: a staging unlock that does not end ok (the locker
// answers failed, a jammed door; or expired, its clock ahead; or does not
// answer in time) raises staging_failed on the compartment, saying how it
// ended; the pickup waits in staging for staff. One that ends ok raises
// none.
func TestStagingFailedAlert(t *testing.T) {
	ctx := context.Background()
	tg, r, c, got, store := stagingEnv(t, "SN-STAGE-F")
	// Commands reach the locker at least once (QoS 1): a repeat of an
	// earlier one may come before the next.
	var seen []string
	await := func(want, what string) {
		t.Helper()
		for {
			select {
			case id := <-got:
				if id == want {
					seen = append(seen, id)
					return
				}
				if !slices.Contains(seen, id) {
					t.Fatalf("got command %s, want %s (%s)", id, want, what)
				}
			case <-time.After(10 * time.Second):
				t.Fatalf("%s never reached the locker", what)
			}
		}
	}
	create := func(ref string) pickup.Pickup {
		t.Helper()
		p := customerPickup(t, store, "s1", ref)
		await(p.CommandID, ref+"'s staging unlock")
		return p
	}
	answer := func(p pickup.Pickup, status, errText string) {
		t.Helper()
		res := fmt.Sprintf(`{"id":"%s","status":"%s","error":"%s","ts":"%s"}`, p.CommandID, status, errText, protocol.FormatTime(time.Now()))
		MustPublish(t, c, protocol.Topic(r.DeviceID, protocol.ChanCmdResult), false, res)
	}
	alertOf := func(p pickup.Pickup) (string, error) {
		var detail string
		err := tg.DB().Pool().QueryRow(ctx, `SELECT detail FROM alerts WHERE kind = 'staging_failed' AND device_id = $1
			AND compartment = $2 AND cleared_at IS NULL`, r.DeviceID, p.Compartment).Scan(&detail)
		return detail, err
	}

	// One at a time (the locker has two ambient compartments): each is
	// cancelled once its alert is in, which frees its compartment.
	for _, w := range []struct {
		ref, status, errText string // status "": never answered (timed_out after 2 s and the grace)
		want                 string
		cancelAlert          bool // cancelled: whether its compartment may hold the order
	}{{"JAM-1", "failed", "door_jammed", "ended failed: door_jammed", false}, {"AHEAD-1", "expired", "", "ended expired", false},
		{"SILENT-1", "", "", "ended unanswered", true}} {
		p := create(w.ref)
		if w.status != "" {
			answer(p, w.status, w.errText)
		}
		var detail string
		Eventually(t, 20*time.Second, w.ref+"'s staging_failed alert", func() (err error) {
			detail, err = alertOf(p)
			return err
		})
		if !strings.Contains(detail, p.ID) || !strings.Contains(detail, w.want) {
			t.Errorf("%s: alert detail %q, want the pickup and %q", w.ref, detail, w.want)
		}
		var now pickup.Pickup
		if err := store.Get(ctx, "/v1/pickups/"+p.ID, nil, &now); err != nil || now.State != pickup.Staging {
			t.Errorf("%s: %s %v, want it staging", w.ref, now.State, err)
		}
		if err := store.Post(ctx, "/v1/pickups/"+p.ID+"/cancel", nil, nil); err != nil {
			t.Fatal(err)
		}
		// A compartment whose unlock was refused never opened for the
		// order: no pickup_cancelled; one unanswered may have.
		if n := tg.Count(t, `SELECT count(*) FROM alerts WHERE kind = 'pickup_cancelled' AND device_id = $1 AND compartment = $2
			AND cleared_at IS NULL`, r.DeviceID, p.Compartment); (n == 1) != w.cancelAlert {
			t.Errorf("%s cancelled: %d pickup_cancelled alerts, want one: %v", w.ref, n, w.cancelAlert)
		}
		if _, err := tg.DB().Pool().Exec(ctx, `UPDATE alerts SET cleared_at = now() WHERE device_id = $1`, r.DeviceID); err != nil {
			t.Fatal(err)
		}
	}
	// Counted after each alert's commit.
	tg.WaitMetric(t, 10*time.Second, `lockergate_pickup_alerts_total{kind="staging_failed"}`, 3)

	// An unlock that opened raises none; nor does a remote unlock that
	// failed (staff's own, answered to them).
	opened := create("OK-1")
	answer(opened, "ok", "")
	waitCommandStatus(t, tg, r.DeviceID, opened.CommandID, fleet.CmdOK, "the staging unlock answered ok")
	var remote fleet.Command
	if err := tg.Admin.Post(ctx, "/v1/lockers/"+r.DeviceID+"/commands", map[string]any{"type": "unlock", "compartment": opened.Compartment}, &remote); err != nil {
		t.Fatal(err)
	}
	await(remote.ID, "the remote unlock")
	MustPublish(t, c, protocol.Topic(r.DeviceID, protocol.ChanCmdResult), false,
		fmt.Sprintf(`{"id":"%s","status":"failed","error":"door_jammed","ts":"%s"}`, remote.ID, protocol.FormatTime(time.Now())))
	waitCommandStatus(t, tg, r.DeviceID, remote.ID, fleet.CmdFailed, "the remote unlock answered failed")
	if detail, err := alertOf(opened); err == nil {
		t.Errorf("an alert for %s, whose staging unlock opened: %q", opened.OrderRef, detail)
	}
}

// TestStagingFailedWithdrawnWhenItOpenedLate: a staging unlock that went
// unanswered raised staging_failed; the locker's ok that comes after (a
// late answer: the door did open for loading) withdraws it, as the
// gateway and audited. Another pickup's alert on that compartment stays.
func TestStagingFailedWithdrawnWhenItOpenedLate(t *testing.T) {
	ctx := context.Background()
	tg, r, c, got, store := stagingEnv(t, "SN-STAGE-LATE")
	p := customerPickup(t, store, "s1", "LATE-OK-1")
	wantCommand(t, got, p.CommandID, "the staging unlock")
	open := func() int {
		return tg.Count(t, `SELECT count(*) FROM alerts WHERE kind = 'staging_failed' AND device_id = $1 AND compartment = $2
			AND cleared_at IS NULL`, r.DeviceID, p.Compartment)
	}
	Eventually(t, 20*time.Second, "the unanswered staging unlock's alert", func() error {
		if n := open(); n != 1 {
			return fmt.Errorf("%d open", n)
		}
		return nil
	})
	// An older alert of another pickup on the compartment, not yet
	// cleared by staff: not this unlock's.
	if _, err := tg.DB().Pool().Exec(ctx, `INSERT INTO alerts (device_id, kind, compartment, detail, raised_at)
		VALUES ($1, 'staging_failed', $2, 'the staging unlock of pickup p-older (X-0) ended unanswered: ...', now() - interval '1 hour')`,
		r.DeviceID, p.Compartment); err != nil {
		t.Fatal(err)
	}
	publishResult(t, c, r.DeviceID, p.CommandID)
	Eventually(t, 10*time.Second, "the alert withdrawn by the late ok", func() error {
		if n := tg.Count(t, `SELECT count(*) FROM alerts WHERE kind = 'staging_failed' AND device_id = $1 AND cleared_by = 'gateway'
			AND detail LIKE '%' || $2 || '%'`, r.DeviceID, p.ID); n != 1 {
			return fmt.Errorf("%d withdrawn", n)
		}
		return nil
	})
	if n := open(); n != 1 {
		t.Fatalf("%d staging_failed alerts open, want the other pickup's", n)
	}
	if n := tg.Count(t, `SELECT count(*) FROM audit WHERE action = 'alert.clear' AND actor = 'gateway' AND locker = $1`, r.DeviceID); n != 1 {
		t.Fatalf("%d alert.clear audit entries by the gateway, want 1", n)
	}
}

// stagingEnv is a gateway whose staging unlocks live 2 s, a plain client
// online as its one locker (serial) at site s1 with the commands it gets,
// and a store token of s1.
func stagingEnv(t *testing.T, serial string) (*TestGateway, protocol.ProvisionResponse, paho.Client, <-chan string, *client.Client) {
	t.Helper()
	tg := MustStart(t, func(o *gateway.Options) { o.StagingTTL = 2 * time.Second })
	r, c := rawLocker(t, tg, serial)
	got := subscribeCommands(t, c, r.DeviceID)
	publishBirth(t, tg, c, r.DeviceID)
	return tg, r, c, got, MustPickupToken(t, tg, "store", "s1", "front-desk")
}
