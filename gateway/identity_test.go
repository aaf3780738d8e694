package gateway_test

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/lockergate/lockergate/client"
	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/gateway"
	"github.com/lockergate/lockergate/internal/testtool"
	"github.com/lockergate/lockergate/protocol"
)

// Device identity over its life: disabled, replaced, hammered with guesses.

// birth publishes the retained presence a locker sends after connecting.
func (c *secConn) birth(tb testing.TB, id string) {
	tb.Helper()
	c.mustPublish(tb, protocol.Topic(id, protocol.ChanPresence), 1, true,
		[]byte(`{"online":true,"ts":"`+protocol.FormatTime(time.Now())+`","fw":"1.0.0","model":"LX-2","boot_id":"b-1"}`))
}

// lockerOf reads a locker through the API.
func lockerOf(tb testing.TB, tg *TestGateway, id string) fleet.Locker {
	tb.Helper()
	var l fleet.Locker
	if err := tg.Admin.Get(context.Background(), "/v1/lockers/"+id, nil, &l); err != nil {
		tb.Fatalf("get locker %s: %v", id, err)
	}
	return l
}

// TestSecurityDisableKicks: disabling a locker ends its live session within
// 1 s, and neither its cached secret nor a retry lets it back in.
func TestSecurityDisableKicks(t *testing.T) {
	tg := MustStart(t)
	newSite(t, tg, "s1")
	_, claim := newClaim(t, tg, map[string]any{"site": "s1", "uses": 5, "expires_in_s": 3600})
	addr := tg.MQTTAddr()
	d := secProvision(t, tg, "127.0.8.1", claim, "SN-DISABLE")
	dev := mustSecDial(t, addr, "127.0.8.2", d.DeviceID, d.DeviceID, d.Password)
	dev.birth(t, d.DeviceID)
	waitOnline(t, tg, d.DeviceID, true)

	before := scrape(t, tg)
	// The issue asks for the session to end within 1 s of the disable. A
	// test on a loaded machine cannot hold a wall-clock bound; it checks the
	// mechanism instead: the session is ended by the disable itself, well
	// before the 10 s for which a cached secret is trusted, and the time
	// it took is logged.
	asked := time.Now()
	var answer fleet.Locker
	if _, err := tg.Admin.Do(context.Background(), client.Request{Method: "PATCH", Path: "/v1/lockers/" + d.DeviceID,
		Body: map[string]bool{"disabled": true}}, &answer); err != nil {
		t.Fatal(err)
	}
	// The answer is the locker after the change: offline, kicked.
	if !answer.Disabled || answer.Online || answer.DisconnectReason != "kicked" {
		t.Errorf("the disable's answer: disabled=%v online=%v disconnect_reason=%q, want true, false and kicked",
			answer.Disabled, answer.Online, answer.DisconnectReason)
	}
	select {
	case <-dev.lost:
		t.Logf("live session ended %v after the disable was asked for", time.Since(asked).Round(time.Millisecond))
	case <-time.After(5 * time.Second):
		t.Fatal("live session not ended within 5 s of the disable")
	}
	wantDeltas(t, tg, before, map[string]float64{mqttDisconnects("kicked"): 1}, refusalCounters...)
	waitOnline(t, tg, d.DeviceID, false)
	if l := lockerOf(t, tg, d.DeviceID); !l.Disabled || l.DisconnectReason != "kicked" {
		t.Errorf("locker disabled=%v disconnect_reason=%q, want true and kicked", l.Disabled, l.DisconnectReason)
	}

	t.Run("CacheDoesNotReadmit", func(t *testing.T) {
		// The secret was verified (and cached) a moment ago; the disable
		// must have dropped it: every retry is asked of the database.
		before := scrape(t, tg)
		for i := 0; i < 3; i++ {
			if _, err := secDial(addr, "127.0.8.2", d.DeviceID, d.DeviceID, d.Password); !refused(err) {
				t.Fatalf("attempt %d: got %v, want a refused CONNACK", i+1, err)
			}
		}
		wantDeltas(t, tg, before, map[string]float64{authFailures("disabled"): 3,
			`lockergate_mqtt_auth_cache_total{result="miss"}`: 3},
			append(refusalCounters, "lockergate_mqtt_auth_cache_total")...)
	})
	t.Run("DisabledWhileOffline", func(t *testing.T) {
		e := secProvision(t, tg, "127.0.8.1", claim, "SN-DISABLE-OFFLINE")
		mustSecDial(t, addr, "127.0.8.3", e.DeviceID, e.DeviceID, e.Password).Disconnect(50)
		waitOnline(t, tg, e.DeviceID, false)
		patchLocker(t, tg, e.DeviceID, map[string]bool{"disabled": true})
		before := scrape(t, tg)
		if _, err := secDial(addr, "127.0.8.3", e.DeviceID, e.DeviceID, e.Password); !refused(err) {
			t.Fatalf("got %v, want a refused CONNACK", err)
		}
		wantDeltas(t, tg, before, map[string]float64{authFailures("disabled"): 1}, refusalCounters...)
	})
	t.Run("Reenabled", func(t *testing.T) {
		patchLocker(t, tg, d.DeviceID, map[string]bool{"disabled": false})
		mustSecDial(t, addr, "127.0.8.2", d.DeviceID, d.DeviceID, d.Password).birth(t, d.DeviceID)
		waitOnline(t, tg, d.DeviceID, true)
	})
}

// TestSecurityReplaceKicks: re-provisioning a replaceable locker gives it a
// new secret, ends the session of the old one and refuses the old secret at
// once; the mark is good for one replacement.
func TestSecurityReplaceKicks(t *testing.T) {
	tg := MustStart(t)
	newSite(t, tg, "s1")
	_, claim := newClaim(t, tg, map[string]any{"site": "s1", "uses": 5, "expires_in_s": 3600})
	addr := tg.MQTTAddr()
	r := secProvision(t, tg, "127.0.10.1", claim, "SN-REPLACE")
	old := mustSecDial(t, addr, "127.0.10.2", r.DeviceID, r.DeviceID, r.Password)
	old.birth(t, r.DeviceID)
	waitOnline(t, tg, r.DeviceID, true)

	t.Run("SerialTakenWithoutMark", func(t *testing.T) {
		cs := claimSession(t, tg, "127.0.10.1", claim, "SN-REPLACE")
		if got := cs.ask(t, "SN-REPLACE", provisionRequest("SN-REPLACE")); got.Status != "error" || got.Error != protocol.ProvSerialTaken {
			t.Fatalf("answer %+v, want serial_taken", got)
		}
		old.birth(t, r.DeviceID) // a round trip: the session is untouched
	})

	patchLocker(t, tg, r.DeviceID, map[string]bool{"replaceable": true})
	old.birth(t, r.DeviceID) // marking alone ends nothing

	t.Run("NotByAnotherSitesClaim", func(t *testing.T) {
		// A replacement would move the locker, and the orders in it, under
		// the other site's staff.
		newSite(t, tg, "s2")
		_, other := newClaim(t, tg, map[string]any{"site": "s2", "uses": 5, "expires_in_s": 3600})
		cs := claimSession(t, tg, "127.0.10.1", other, "SN-REPLACE")
		if got := cs.ask(t, "SN-REPLACE", provisionRequest("SN-REPLACE")); got.Status != "error" || got.Error != protocol.ProvSerialTaken {
			t.Fatalf("answer %+v, want serial_taken", got)
		}
		old.birth(t, r.DeviceID) // the session is untouched
		if l := lockerOf(t, tg, r.DeviceID); !l.Replaceable || l.Site != "s1" {
			t.Fatalf("after another site's claim: replaceable %v, site %s; want still replaceable at s1", l.Replaceable, l.Site)
		}
	})

	before := scrape(t, tg)
	cs := claimSession(t, tg, "127.0.10.1", claim, "SN-REPLACE")
	got := cs.ask(t, "SN-REPLACE", provisionRequest("SN-REPLACE"))
	// The kick happens before the answer is sent (the bound is
	// 1 s; a loaded machine gets 5 s to notice, as for the disable).
	answered := time.Now()
	if got.Status != "ok" || got.DeviceID != r.DeviceID || got.Password == r.Password || got.CredKey == r.CredKey {
		t.Fatalf("replacement answer %+v: want ok, the same id, a new secret and a new cred_key", got)
	}
	select {
	case <-old.lost:
		t.Logf("old session seen ended %v after the answer", time.Since(answered).Round(time.Millisecond))
	case <-time.After(5 * time.Second):
		t.Fatal("the old identity's session was not ended within 5 s of the replacement")
	}
	if _, err := secDial(addr, "127.0.10.2", r.DeviceID, r.DeviceID, r.Password); !refused(err) {
		t.Fatalf("old secret: got %v, want a refused CONNACK", err)
	}
	mustSecDial(t, addr, "127.0.10.3", got.DeviceID, got.DeviceID, got.Password).birth(t, got.DeviceID)
	wantDeltas(t, tg, before, map[string]float64{mqttDisconnects("kicked"): 1, authFailures("bad_credentials"): 1,
		`lockergate_mqtt_connects_total{kind="provisioning"}`: 1, `lockergate_mqtt_connects_total{kind="device"}`: 1},
		refusalCounters...)
	if l := lockerOf(t, tg, r.DeviceID); l.Replaceable {
		t.Error("still replaceable after the replacement")
	}

	t.Run("MarkUsedUp", func(t *testing.T) {
		cs := claimSession(t, tg, "127.0.10.1", claim, "SN-REPLACE")
		if got := cs.ask(t, "SN-REPLACE", provisionRequest("SN-REPLACE")); got.Status != "error" || got.Error != protocol.ProvSerialTaken {
			t.Fatalf("answer %+v, want serial_taken", got)
		}
	})
}

// TestSecurityRateLimit: repeated failures from one client id or address are
// refused without asking the database, while the real locker still gets in,
// and the refusals are logged with the client id but without secrets.
func TestSecurityRateLimit(t *testing.T) {
	logs := &testtool.LockedBuffer{}
	tg := MustStart(t, func(o *gateway.Options) {
		o.Logger = slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	})
	newSite(t, tg, "s1")
	_, claim := newClaim(t, tg, map[string]any{"site": "s1", "uses": 5, "expires_in_s": 3600})
	addr := tg.MQTTAddr()
	r := secProvision(t, tg, "127.0.9.1", claim, "SN-HAMMERED")
	mustSecDial(t, addr, "127.0.9.1", r.DeviceID, r.DeviceID, r.Password).Disconnect(50)
	fresh := secProvision(t, tg, "127.0.9.1", claim, "SN-FRESH") // never connected

	t.Run("ByClientID", func(t *testing.T) {
		before := scrape(t, tg)
		for i := 0; i < 6; i++ {
			_, err := secDial(addr, "127.0.9.2", r.DeviceID, r.DeviceID, fmt.Sprintf("guess-%d", i))
			// Five wrong secrets are refused as such; the sixth is not checked
			// and is told to come back later.
			if ok := refused(err); i < 5 && !ok || i == 5 && !refusedForNow(err) {
				t.Fatalf("guess %d: got %v, want a refused CONNACK (server unavailable for the sixth)", i, err)
			}
		}
		wantDeltas(t, tg, before, map[string]float64{authFailures("bad_credentials"): 5, authFailures("rate_limited"): 1},
			refusalCounters...)
		// The locker itself, with the secret it was given, is not locked out.
		mustSecDial(t, addr, "127.0.9.3", r.DeviceID, r.DeviceID, r.Password)
	})
	t.Run("ByAddress", func(t *testing.T) {
		before := scrape(t, tg)
		for i := 0; i < 30; i++ {
			id := fmt.Sprintf("lk-probe-%d", i)
			if _, err := secDial(addr, "127.0.9.4", id, id, "guess"); !refused(err) {
				t.Fatalf("probe %d: got %v, want a refused CONNACK", i, err)
			}
		}
		// A valid identity never verified here is held back at that address...
		if _, err := secDial(addr, "127.0.9.4", fresh.DeviceID, fresh.DeviceID, fresh.Password); !refusedForNow(err) {
			t.Fatalf("from the blocked address: got %v, want server unavailable (retry later)", err)
		}
		wantDeltas(t, tg, before, map[string]float64{authFailures("unknown_device"): 30, authFailures("rate_limited"): 1},
			refusalCounters...)
		// ...and welcome from another; a locker this gateway verified before
		// gets in from the blocked address too (lockers share carrier NAT).
		mustSecDial(t, addr, "127.0.9.5", fresh.DeviceID, fresh.DeviceID, fresh.Password)
		mustSecDial(t, addr, "127.0.9.4", r.DeviceID, r.DeviceID, r.Password)
	})
	t.Run("LoggedWithoutSecrets", func(t *testing.T) {
		out := logs.String()
		for _, want := range []string{"mqtt connect refused", "client_id=" + r.DeviceID, "reason=bad_credentials", "reason=rate_limited"} {
			if !strings.Contains(out, want) {
				t.Errorf("log lacks %q", want)
			}
		}
		for _, secret := range []string{"guess-", r.Password, fresh.Password, claim, r.CredKey} {
			if strings.Contains(out, secret) {
				t.Errorf("log holds a secret (%.8s...)", secret)
			}
		}
	})
}

// TestSecurityRetryVoidsOldSecret: a locker whose provisioning answer was
// lost asks again with the same claim and gets a new secret; the first one
// must stop working at once even if it was already used (connections are
// counted asynchronously, so the retry window can overlap a first session).
func TestSecurityRetryVoidsOldSecret(t *testing.T) {
	ctx := context.Background()
	tg := MustStart(t)
	newSite(t, tg, "s1")
	_, claim := newClaim(t, tg, map[string]any{"site": "s1", "uses": 5, "expires_in_s": 3600})
	addr := tg.MQTTAddr()
	first := secProvision(t, tg, "127.0.13.1", claim, "SN-RETRY")
	live := mustSecDial(t, addr, "127.0.13.2", first.DeviceID, first.DeviceID, first.Password)
	waitOnline(t, tg, first.DeviceID, true)
	// The session exists and the secret is cached, but the connection is not
	// counted yet, and the answer counts as lost (no delivered mark): the
	// state the retry rule sees when the acknowledgement of the answer was
	// lost with the connection and the locker reconnects at once.
	Eventually(t, 10*time.Second, "the answer recorded delivered", func() error {
		if n := tg.Count(t, `SELECT count(*) FROM claim_uses WHERE device_id = $1 AND outcome = 'provision.delivered'`, first.DeviceID); n != 1 {
			return fmt.Errorf("%d delivered marks", n)
		}
		return nil
	})
	for _, q := range []string{`UPDATE devices SET connect_count = 0, connected_at = NULL WHERE id = $1`,
		`DELETE FROM claim_uses WHERE device_id = $1 AND outcome = 'provision.delivered'`} {
		if _, err := tg.DB().Pool().Exec(ctx, q, first.DeviceID); err != nil {
			t.Fatal(err)
		}
	}
	before := scrape(t, tg)
	again := secProvision(t, tg, "127.0.13.1", claim, "SN-RETRY")
	if again.DeviceID != first.DeviceID || again.Password == first.Password {
		t.Fatalf("retry answer: id %s -> %s, new secret %v", first.DeviceID, again.DeviceID, again.Password != first.Password)
	}
	if err := live.waitLost(5 * time.Second); err != nil {
		t.Fatalf("session of the first secret: %v", err)
	}
	if _, err := secDial(addr, "127.0.13.2", first.DeviceID, first.DeviceID, first.Password); !refused(err) {
		t.Fatalf("first secret: got %v, want a refused CONNACK", err)
	}
	mustSecDial(t, addr, "127.0.13.3", again.DeviceID, again.DeviceID, again.Password)
	wantDeltas(t, tg, before, map[string]float64{mqttDisconnects("kicked"): 1, authFailures("bad_credentials"): 1,
		`lockergate_mqtt_connects_total{kind="provisioning"}`: 1, `lockergate_mqtt_connects_total{kind="device"}`: 1},
		refusalCounters...)
}
