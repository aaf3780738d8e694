package gateway_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/lockergate/lockergate/client"
	"github.com/lockergate/lockergate/protocol"
)

// TestSecurityClaims: what a claim token does and does not buy. Every
// refused request is answered with the protocol's error code, ends the claim
// session, registers nothing and is recorded as a claim use.
func TestSecurityClaims(t *testing.T) {
	ctx := context.Background()
	tg := MustStart(t)
	newSite(t, tg, "s1")
	db := tg.DB().Pool()

	// refusedWith asks for serial with the claim token (payload: a valid
	// request unless given) and checks the answer, the session's end and that
	// no device or claim use was made.
	src := 0
	refusedWith := func(t *testing.T, token, serial, code string, payload []byte) {
		t.Helper()
		if payload == nil {
			payload = provisionRequest(serial)
		}
		var devices, uses int
		db.QueryRow(ctx, `SELECT (SELECT count(*) FROM devices), (SELECT coalesce(sum(uses), 0) FROM claims)`).Scan(&devices, &uses)
		before := scrape(t, tg)
		src++
		cs := claimSession(t, tg, fmt.Sprintf("127.0.11.%d", src), token, serial)
		if got := cs.ask(t, serial, payload); got.Status != "error" || got.Error != code || got.Password != "" || got.DeviceID != "" {
			t.Fatalf("answer %+v, want error %s and no identity", got, code)
		}
		if err := cs.waitLost(5 * time.Second); err != nil {
			t.Errorf("claim session after a refusal: %v", err)
		}
		wantDeltas(t, tg, before, map[string]float64{provisioningResults(code): 1,
			`lockergate_mqtt_connects_total{kind="provisioning"}`: 1, mqttDisconnects("provisioned"): 1},
			append(refusalCounters, "lockergate_mqtt_provisioning_total")...)
		var devicesAfter, usesAfter int
		db.QueryRow(ctx, `SELECT (SELECT count(*) FROM devices), (SELECT coalesce(sum(uses), 0) FROM claims)`).Scan(&devicesAfter, &usesAfter)
		if devicesAfter != devices || usesAfter != uses {
			t.Errorf("devices %d -> %d, claim uses %d -> %d: want no change", devices, devicesAfter, uses, usesAfter)
		}
	}
	// recorded checks the claim's use log holds serial with outcome.
	recorded := func(t *testing.T, claimID, serial, outcome string) {
		t.Helper()
		var n int
		db.QueryRow(ctx, `SELECT count(*) FROM claim_uses WHERE claim_id = $1 AND serial = $2 AND outcome = $3`,
			claimID, serial, outcome).Scan(&n)
		if n != 1 {
			t.Errorf("claim %s: %d uses recorded for %s with outcome %s, want 1", claimID, n, serial, outcome)
		}
	}

	t.Run("Expired", func(t *testing.T) {
		// The shortest lifetime the API takes, a second: waited out.
		before := time.Now()
		id, token := newClaim(t, tg, map[string]any{"site": "s1", "uses": 5, "expires_in_s": 1})
		var c struct {
			ExpiresAt time.Time `json:"expires_at"`
		}
		if err := tg.Admin.Get(ctx, "/v1/claims/"+id, nil, &c); err != nil {
			t.Fatal(err)
		}
		if life := c.ExpiresAt.Sub(before); life < 900*time.Millisecond || life > time.Minute {
			t.Fatalf("a claim of 1 s expires %v after it was asked for", life)
		}
		for time.Now().Before(c.ExpiresAt.Add(10 * time.Millisecond)) { // the clock's condition, not a sync
			time.Sleep(10 * time.Millisecond)
		}
		refusedWith(t, token, "SN-LATE", protocol.ProvClaimExpired, nil)
		recorded(t, id, "SN-LATE", "claim_expired")
	})
	t.Run("Exhausted", func(t *testing.T) {
		id, token := newClaim(t, tg, map[string]any{"site": "s1", "uses": 1, "expires_in_s": 3600})
		secProvision(t, tg, "127.0.11.200", token, "SN-FIRST")
		refusedWith(t, token, "SN-SECOND", protocol.ProvClaimExhausted, nil)
		recorded(t, id, "SN-FIRST", "provision")
		recorded(t, id, "SN-SECOND", "claim_exhausted")
	})
	t.Run("SerialPattern", func(t *testing.T) {
		id, token := newClaim(t, tg, map[string]any{"site": "s1", "uses": 10, "expires_in_s": 3600,
			"serial_pattern": "SN-BATCH7-*, SN-SPARE-??"})
		secProvision(t, tg, "127.0.11.200", token, "SN-BATCH7-0001")
		secProvision(t, tg, "127.0.11.200", token, "SN-SPARE-01")
		for _, serial := range []string{"SN-BATCH8-0001", "SN-SPARE-001", "XSN-BATCH7-0001", "SN-BATCH7"} {
			t.Run(serial, func(t *testing.T) {
				refusedWith(t, token, serial, protocol.ProvInvalid, nil)
				recorded(t, id, serial, "invalid")
			})
		}
	})
	t.Run("SerialTaken", func(t *testing.T) {
		id, token := newClaim(t, tg, map[string]any{"site": "s1", "uses": 10, "expires_in_s": 3600})
		first := secProvision(t, tg, "127.0.11.200", token, "SN-TAKEN")
		mustSecDial(t, tg.MQTTAddr(), "127.0.11.201", first.DeviceID, first.DeviceID, first.Password).Disconnect(50)
		Eventually(t, 10*time.Second, "first connection counted", func() error {
			if l := lockerOf(t, tg, first.DeviceID); l.ConnectCount == 0 {
				return fmt.Errorf("connect_count 0")
			}
			return nil
		})
		refusedWith(t, token, "SN-TAKEN", protocol.ProvSerialTaken, nil)
		recorded(t, id, "SN-TAKEN", "serial_taken")
		// The registered locker keeps its identity.
		mustSecDial(t, tg.MQTTAddr(), "127.0.11.201", first.DeviceID, first.DeviceID, first.Password)
	})
	t.Run("SerialTakenOnceAnswered", func(t *testing.T) {
		// The contract: a registered serial is not handed a new identity
		// by claim alone. Once the locker acknowledged its answer, asking
		// again (before it ever connected) is serial_taken, and the
		// identity it was given keeps working.
		id, token := newClaim(t, tg, map[string]any{"site": "s1", "uses": 10, "expires_in_s": 3600})
		first := secProvision(t, tg, "127.0.11.200", token, "SN-ASKED")
		Eventually(t, 10*time.Second, "the answer recorded delivered", func() error {
			var n int
			if err := db.QueryRow(ctx, `SELECT count(*) FROM claim_uses WHERE claim_id = $1 AND serial = 'SN-ASKED'
				AND outcome = 'provision.delivered'`, id).Scan(&n); err != nil || n != 1 {
				return fmt.Errorf("%d delivered marks (%v)", n, err)
			}
			return nil
		})
		refusedWith(t, token, "SN-ASKED", protocol.ProvSerialTaken, nil)
		recorded(t, id, "SN-ASKED", "serial_taken")
		mustSecDial(t, tg.MQTTAddr(), "127.0.11.201", first.DeviceID, first.DeviceID, first.Password)
	})
	t.Run("PayloadForAnotherSerial", func(t *testing.T) {
		_, token := newClaim(t, tg, map[string]any{"site": "s1", "uses": 10, "expires_in_s": 3600})
		refusedWith(t, token, "SN-TOPIC", protocol.ProvInvalid, provisionRequest("SN-PAYLOAD"))
	})
	t.Run("Malformed", func(t *testing.T) {
		_, token := newClaim(t, tg, map[string]any{"site": "s1", "uses": 10, "expires_in_s": 3600})
		refusedWith(t, token, "SN-BAD", protocol.ProvInvalid, []byte(`{"serial":"SN-BAD","compartments":[{"n":1,"size":"XXL"}]}`))
	})
	t.Run("RevokedDuringSession", func(t *testing.T) {
		id, token := newClaim(t, tg, map[string]any{"site": "s1", "uses": 10, "expires_in_s": 3600})
		cs := claimSession(t, tg, "127.0.11.202", token, "SN-REVOKED")
		if _, err := tg.Admin.Do(ctx, client.Request{Method: "DELETE", Path: "/v1/claims/" + id}, nil); err != nil {
			t.Fatal(err)
		}
		if got := cs.ask(t, "SN-REVOKED", provisionRequest("SN-REVOKED")); got.Status != "error" || got.Error != protocol.ProvInvalid {
			t.Fatalf("answer %+v, want invalid", got)
		}
		if err := cs.waitLost(5 * time.Second); err != nil {
			t.Error(err)
		}
		n := tg.Count(t, `SELECT count(*) FROM devices WHERE serial = 'SN-REVOKED'`)
		if n != 0 {
			t.Error("registered with a revoked claim")
		}
	})
	t.Run("NoPatternAnySerial", func(t *testing.T) {
		// What docs/security.md warns about: without a serial pattern a
		// claim registers whatever serial its holder names.
		_, token := newClaim(t, tg, map[string]any{"site": "s1", "uses": 10, "expires_in_s": 3600})
		secProvision(t, tg, "127.0.11.200", token, "ANYTHING-AT-ALL")
	})
}

// TestSpentClaimCannotTakeOverAProvisioning: a claim that could not
// provision a serial (expired, here: one pulled from old firmware) may not
// take over a live claim session of that serial (MQTT's session takeover
// would end it), so it cannot keep a locker that provisions with a valid
// claim from its answer: refused "not now", the locker's session kept.
// With no live session it still connects, and its request gets the
// precise refusal.
func TestSpentClaimCannotTakeOverAProvisioning(t *testing.T) {
	ctx := context.Background()
	tg := MustStart(t)
	valid := tg.MustSiteAndClaim(t, "s1", 1)
	spentID, spent := newClaim(t, tg, map[string]any{"site": "s1", "uses": 5, "expires_in_s": 3600})
	if _, err := tg.DB().Pool().Exec(ctx, `UPDATE claims SET expires_at = now() - interval '1 hour' WHERE id = $1`, spentID); err != nil {
		t.Fatal(err)
	}
	const serial = "SN-VICTIM-1"
	locker := claimSession(t, tg, "127.0.14.1", valid, serial)
	before := scrape(t, tg)
	_, err := secDial(tg.MQTTAddr(), "127.0.14.2", protocol.ProvisionClientPrefix+serial, protocol.ProvisionUsername, spent)
	if !refusedForNow(err) {
		t.Fatalf("the spent claim's CONNECT as the live session: %v, want server unavailable", err)
	}
	wantDeltas(t, tg, before, map[string]float64{authFailures("claim_session_live"): 1},
		refusalCounters...)
	// The locker's session was not taken over: it gets its identity.
	if r := locker.ask(t, serial, provisionRequest(serial)); r.Status != "ok" || r.DeviceID == "" {
		t.Fatalf("the locker's answer after the attempt: %+v, want its identity", r)
	}
	// No session live: the spent claim connects and is told why it gets
	// nothing.
	cs := claimSession(t, tg, "127.0.14.3", spent, "SN-VICTIM-2")
	if r := cs.ask(t, "SN-VICTIM-2", provisionRequest("SN-VICTIM-2")); r.Status != "error" || r.Error != protocol.ProvClaimExpired {
		t.Fatalf("the spent claim's own request: %+v, want %s", r, protocol.ProvClaimExpired)
	}
}
