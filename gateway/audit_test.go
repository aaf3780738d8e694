package gateway_test

import (
	"context"
	"fmt"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/lockergate/lockergate/client"
	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/pickup"
)

// TestSecurityAudit: provisioning, replacement, disable, token changes and
// every unlock leave an audit entry with actor and time (GET /v1/audit).
func TestSecurityAudit(t *testing.T) {
	ctx := context.Background()
	start := time.Now().Add(-time.Second)
	tg := MustStart(t)
	newSite(t, tg, "s1")
	claimID, claim := newClaim(t, tg, map[string]any{"site": "s1", "uses": 5, "expires_in_s": 3600})
	addr := tg.MQTTAddr()

	d := secProvision(t, tg, "127.0.12.1", claim, "SN-AUDIT")
	// Connected once, so the next request is a replacement, not a retry of a
	// lost answer.
	mustSecDial(t, addr, "127.0.12.2", d.DeviceID, d.DeviceID, d.Password).Disconnect(50)
	Eventually(t, 10*time.Second, "connection counted", func() error {
		if l := lockerOf(t, tg, d.DeviceID); l.ConnectCount == 0 {
			return fmt.Errorf("connect_count 0")
		}
		return nil
	})
	patchLocker(t, tg, d.DeviceID, map[string]bool{"replaceable": true})
	d2 := secProvision(t, tg, "127.0.12.1", claim, "SN-AUDIT")
	dev := mustSecDial(t, addr, "127.0.12.2", d2.DeviceID, d2.DeviceID, d2.Password)
	dev.birth(t, d2.DeviceID)
	waitOnline(t, tg, d.DeviceID, true)

	unlock := func(c *client.Client) string {
		t.Helper()
		var cmd fleet.Command
		if err := c.Post(ctx, "/v1/lockers/"+d.DeviceID+"/commands", map[string]any{"type": "unlock", "compartment": 2}, &cmd); err != nil {
			t.Fatalf("unlock: %v", err)
		}
		return cmd.ID
	}
	adminCmd := unlock(tg.Admin)
	storeTok, store := tg.MustToken(t, "store", "s1", "front-desk")
	storeCmd := unlock(store)
	_, operator := tg.MustToken(t, "operator", "", "ops")
	patchLocker(t, tg, d.DeviceID, map[string]bool{"disabled": true})
	if _, err := tg.Admin.Do(ctx, client.Request{Method: "DELETE", Path: "/v1/tokens/" + storeTok}, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := tg.Admin.Do(ctx, client.Request{Method: "DELETE", Path: "/v1/claims/" + claimID}, nil); err != nil {
		t.Fatal(err)
	}
	end := time.Now().Add(time.Second)

	list := func(t *testing.T, c *client.Client, q url.Values) []fleet.AuditEntry {
		t.Helper()
		q.Set("limit", "1000")
		var out struct {
			Items []fleet.AuditEntry `json:"items"`
		}
		if err := c.Get(ctx, "/v1/audit", q, &out); err != nil {
			t.Fatalf("GET /v1/audit?%s: %v", q.Encode(), err)
		}
		return out.Items
	}
	// find returns the entries with actor and action whose detail holds want.
	find := func(es []fleet.AuditEntry, actor, action, locker string, want map[string]any) []fleet.AuditEntry {
		var out []fleet.AuditEntry
	next:
		for _, e := range es {
			if e.Actor != actor || e.Action != action || e.Locker != locker {
				continue
			}
			for k, v := range want {
				if fmt.Sprint(e.Detail[k]) != fmt.Sprint(v) {
					continue next
				}
			}
			out = append(out, e)
		}
		return out
	}

	all := list(t, tg.Admin, url.Values{})
	byClaim := "claim:" + claimID
	cases := []struct {
		name, actor, action, locker string
		detail                      map[string]any
	}{
		{"ClaimCreated", "admin:admin", "claim.create", "", map[string]any{"claim": claimID}},
		{"Provisioned", byClaim, "provision", d.DeviceID, map[string]any{"serial": "SN-AUDIT"}},
		{"MarkedReplaceable", "admin:admin", "locker.update", d.DeviceID, map[string]any{"replaceable": true}},
		{"Replaced", byClaim, "provision.replace", d.DeviceID, map[string]any{"serial": "SN-AUDIT"}},
		{"AdminUnlock", "admin:admin", "unlock", d.DeviceID, map[string]any{"command": adminCmd, "compartment": 2}},
		{"StoreUnlock", "store:front-desk", "unlock", d.DeviceID, map[string]any{"command": storeCmd, "compartment": 2}},
		{"StoreTokenCreated", "admin:admin", "token.create", "", map[string]any{"token": storeTok, "role": "store"}},
		{"OperatorTokenCreated", "admin:admin", "token.create", "", map[string]any{"role": "operator", "name": "ops"}},
		{"Disabled", "admin:admin", "locker.update", d.DeviceID, map[string]any{"disabled": true}},
		{"TokenRevoked", "admin:admin", "token.revoke", "", map[string]any{"token": storeTok}},
		{"ClaimRevoked", "admin:admin", "claim.revoke", "", map[string]any{"claim": claimID}},
		{"FirstAdminToken", "system", "token.create", "", map[string]any{"role": "admin"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got := find(all, c.actor, c.action, c.locker, c.detail)
			if len(got) != 1 {
				t.Fatalf("%d entries by %s of %s at %q with %v, want 1", len(got), c.actor, c.action, c.locker, c.detail)
			}
			if ts := got[0].TS; ts.Before(start) || ts.After(end) {
				t.Errorf("entry time %v outside the test (%v .. %v)", ts, start, end)
			}
		})
	}

	t.Run("ByLocker", func(t *testing.T) {
		es := list(t, tg.Admin, url.Values{"locker": {d.DeviceID}})
		var actions []string
		for _, e := range es {
			if e.Locker != d.DeviceID {
				t.Errorf("entry of locker %q in a list for %s", e.Locker, d.DeviceID)
			}
			actions = append(actions, e.Action)
		}
		if got, want := strings.Join(actions, ","), "provision,locker.update,provision.replace,unlock,unlock,locker.update"; got != want {
			t.Errorf("actions %s, want %s (in order)", got, want)
		}
	})
	t.Run("ByActor", func(t *testing.T) {
		es := list(t, operator, url.Values{"actor": {"store:front-desk"}})
		if len(es) != 1 || es[0].Action != "unlock" {
			t.Errorf("entries of the store token: %+v, want its one unlock", es)
		}
	})
	t.Run("StoreMayNotRead", func(t *testing.T) {
		_, other := tg.MustToken(t, "store", "s1", "other-desk")
		if code, err := other.Do(ctx, client.Request{Method: "GET", Path: "/v1/audit"}, nil); code != 403 {
			t.Errorf("store token: %d %v, want 403", code, err)
		}
	})
}

// TestAuditNamesTheToken: two store tokens may share a name; the audit
// entries of each one's actions name its token's id (and GET /v1/audit
// filters by it), the unlock's included. One code made for several
// pickups is audited as credential.create.
func TestAuditNamesTheToken(t *testing.T) {
	ctx := context.Background()
	e := newPickupEnv(t, 1, 0)
	a, b := e.create(t, "AT-1", "S", time.Hour), e.create(t, "AT-2", "S", time.Hour)
	a, b = e.waitState(t, a.ID, pickup.Ready), e.waitState(t, b.ID, pickup.Ready)
	twinID, twin := e.tg.MustToken(t, "store", "store-042", "front-desk") // e.store's name too
	var cmd fleet.Command
	if err := twin.Post(ctx, "/v1/lockers/"+a.Locker+"/commands", map[string]any{"type": "unlock", "compartment": 4, "wait_s": 10}, &cmd); err != nil {
		t.Fatal(err)
	}
	var cred pickup.CredentialView
	if err := twin.Post(ctx, "/v1/credentials", map[string]any{"pickups": []string{a.ID, b.ID}}, &cred); err != nil {
		t.Fatal(err)
	}
	var out struct {
		Items []fleet.AuditEntry `json:"items"`
	}
	if err := e.tg.Admin.Get(ctx, "/v1/audit", url.Values{"token": {twinID}}, &out); err != nil {
		t.Fatal(err)
	}
	actions := map[string]fleet.AuditEntry{}
	for _, en := range out.Items {
		if en.Token != twinID || en.Actor != "store:front-desk" {
			t.Errorf("entry %+v under ?token=%s", en, twinID)
		}
		actions[en.Action] = en
	}
	if _, ok := actions["unlock"]; !ok || len(out.Items) != 2 {
		t.Fatalf("the twin token's entries %+v, want its unlock and credential.create", out.Items)
	}
	made := actions["credential.create"]
	if made.Locker != a.Locker || made.Detail["credential"] != cred.ID || fmt.Sprint(made.Detail["pickups"]) != fmt.Sprint([]string{a.ID, b.ID}) ||
		len(made.Detail["compartments"].([]any)) != 2 {
		t.Fatalf("credential.create %+v, want locker %s, credential %s, both pickups and compartments", made, a.Locker, cred.ID)
	}
	// The other front-desk token's own entries (its pickups) name it, not the twin.
	if n := e.tg.Count(t, `SELECT count(*) FROM audit WHERE actor = 'store:front-desk' AND action = 'pickup.create' AND token <> ''
		AND token <> $1`, twinID); n != 2 {
		t.Fatalf("pickup.create entries naming the first front-desk token: %d, want 2", n)
	}
}
