package gateway_test

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

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
	tg := MustStart(t, func(o *gateway.Options) { o.StagingTTL = 2 * time.Second })
	r, c := rawLocker(t, tg, "SN-STAGE-F")
	got := subscribeCommands(t, c, r.DeviceID)
	publishBirth(t, tg, c, r.DeviceID)
	store := MustPickupToken(t, tg, "store", "s1", "front-desk")
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
	if n, err := tg.Metric(`lockergate_pickup_alerts_total{kind="staging_failed"}`); err != nil || n != 3 {
		t.Errorf("staging_failed alerts counted: %v (%v), want 3", n, err)
	}

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
