package gateway_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/lockergate/lockergate/client"
	"github.com/lockergate/lockergate/devicesim"
	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/pickup"
	"github.com/lockergate/lockergate/webhook"
)

// MustToken creates an API token with the admin client and returns its id
// and a client that uses it.
func (tg *TestGateway) MustToken(tb testing.TB, role, site, name string) (string, *client.Client) {
	tb.Helper()
	var out struct {
		ID    string `json:"id"`
		Token string `json:"token"`
	}
	if err := tg.Admin.Post(context.Background(), "/v1/tokens", map[string]string{"role": role, "site": site, "name": name}, &out); err != nil {
		tb.Fatalf("create %s token: %v", role, err)
	}
	if out.ID == "" || out.Token == "" {
		tb.Fatalf("token answer without id or token: %+v", out)
	}
	return out.ID, client.New("http://"+tg.HTTPAddr(), out.Token)
}

// roleEnv is what one role's requests are about: "own" is site-a for every
// role but the site-b store, "other" the other site.
type roleEnv struct {
	role                  string // the subtest name
	c                     *client.Client
	tokenID               string // "" for the first admin token and for none
	own, other            string
	ownLockers, othLocker []string
	ownCmd, otherCmd      string // a command at ownLockers[0] / othLocker[0]
	// ownPickup is a ready pickup the role may see: at site-a for platform
	// speedy, or (site-b store) at site-b for platform rival. otherPickup is
	// the other one, which only admins and operators may see.
	ownPickup, otherPickup pickup.Pickup
	// webhook and spare are the role's own webhooks (spare is deleted);
	// otherWebhook is another token's: the platform's for the admin, the
	// admin's for everyone else.
	webhook, spare, otherWebhook string
}

// roleOf is the token role of a subtest: "store-b" is a store.
func (e roleEnv) roleOf() string { return strings.TrimSuffix(e.role, "-b") }

// roleCase is one request tried with every role. want holds the status per
// role (admin, operator, store, platform); "store" applies to both stores,
// a request without a token always gets 401, and 0 skips the role.
type roleCase struct {
	name  string // subtest name: "METHOD pattern" and what it is about
	op    string // the documented operation: "METHOD pattern"
	req   func(e roleEnv) client.Request
	want  map[string]int
	check func(t *testing.T, e roleEnv, body json.RawMessage)
	// binary: the answer is not JSON (a firmware image), so it is not decoded.
	binary bool
}

// TestRoles checks each role against each endpoint over a real gateway with
// two lockers at each of two sites, a ready pickup at each site and
// webhooks of every role.
func TestRoles(t *testing.T) {
	ctx := context.Background()
	tg := MustStart(t)
	claimA := tg.MustSiteAndClaim(t, "site-a", 2)
	claimB := tg.MustSiteAndClaim(t, "site-b", 2)
	simA := MustFleet(t, tg, claimA, 2, func(o *devicesim.Options) { o.SerialPrefix = "A" })
	simB := MustFleet(t, tg, claimB, 2, func(o *devicesim.Options) { o.SerialPrefix = "B" })
	ids := func(f *devicesim.Fleet) []string {
		var out []string
		for _, l := range f.Lockers() {
			out = append(out, l.DeviceID())
		}
		return out
	}
	lockersA, lockersB := ids(simA), ids(simB)

	// Fixtures made by the admin: a claim to read and revoke, a token to
	// revoke, and a command at one locker of each site.
	var claim struct{ ID string }
	if err := tg.Admin.Post(ctx, "/v1/claims", map[string]any{"site": "site-a"}, &claim); err != nil {
		t.Fatal(err)
	}
	victim, _ := tg.MustToken(t, "platform", "", "victim")
	scoped, _ := tg.MustToken(t, "platform", "", "scoped") // its sites are changed
	cmdAt := func(locker string) string {
		var c fleet.Command
		if err := tg.Admin.Post(ctx, "/v1/lockers/"+locker+"/commands", map[string]any{"type": "unlock", "compartment": 1}, &c); err != nil {
			t.Fatal(err)
		}
		return c.ID
	}
	cmdA, cmdB := cmdAt(lockersA[0]), cmdAt(lockersB[0])

	operatorID, operator := tg.MustToken(t, "operator", "", "ops")
	storeAID, storeA := tg.MustToken(t, "store", "site-a", "front-desk-a")
	storeBID, storeB := tg.MustToken(t, "store", "site-b", "front-desk-b")
	platformID, platform := tg.MustToken(t, "platform", "", "speedy")
	brokerID, brokerC := tg.MustToken(t, "broker", "", "emqx")
	anon := client.New("http://"+tg.HTTPAddr(), "")

	siteA := func(role string, c *client.Client, tokenID string) roleEnv {
		return roleEnv{role: role, c: c, tokenID: tokenID, own: "site-a", other: "site-b", ownLockers: lockersA, othLocker: lockersB, ownCmd: cmdA, otherCmd: cmdB}
	}
	envs := []roleEnv{
		siteA("admin", tg.Admin, ""),
		siteA("operator", operator, operatorID),
		siteA("store", storeA, storeAID),
		{role: "store-b", c: storeB, tokenID: storeBID, own: "site-b", other: "site-a", ownLockers: lockersB, othLocker: lockersA, ownCmd: cmdB, otherCmd: cmdA},
		siteA("platform", platform, platformID),
		siteA("none", anon, ""),
		siteA("broker", brokerC, brokerID), // may call the broker auth hooks only
	}

	// Every role's webhooks, made before the pickups so that their
	// pickup.ready events are queued to the webhooks in scope.
	hook := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusNoContent) }))
	t.Cleanup(hook.Close)
	newWebhook := func(c *client.Client) string {
		var wh webhook.Webhook
		if err := c.Post(ctx, "/v1/webhooks", map[string]any{"url": hook.URL}, &wh); err != nil || wh.ID == "" {
			t.Fatalf("create webhook: %v", err)
		}
		return wh.ID
	}
	webhooks := map[string][2]string{}
	for _, e := range envs[:5] {
		webhooks[e.role] = [2]string{newWebhook(e.c), newWebhook(e.c)}
	}

	// A pickup at each site, for two platforms; made by the admin once the
	// lockers are online, and used once ready (the simulated staff load a
	// staged compartment at once). Size M: never compartment 1, which the
	// command cases unlock.
	tg.WaitOnline(t, len(lockersA)+len(lockersB))
	newPickup := func(site, ref, platform string) map[string]any {
		return map[string]any{"site": site, "order_ref": ref, "size": "M", "zone": "ambient",
			"recipient": map[string]string{"kind": "driver", "platform": platform}}
	}
	readyPickup := func(site, ref, platform string) pickup.Pickup {
		var p pickup.Pickup
		if err := tg.Admin.Post(ctx, "/v1/pickups", newPickup(site, ref, platform), &p); err != nil {
			t.Fatalf("create pickup %s: %v", ref, err)
		}
		Eventually(t, 15*time.Second, "pickup "+ref+" ready", func() error {
			if err := tg.Admin.Get(ctx, "/v1/pickups/"+p.ID, nil, &p); err != nil {
				return err
			}
			if p.State != pickup.Ready {
				return fmt.Errorf("state %s", p.State)
			}
			return nil
		})
		return p
	}
	pickupA, pickupB := readyPickup("site-a", "FIX-A", "speedy"), readyPickup("site-b", "FIX-B", "rival")
	for i := range envs {
		e := &envs[i]
		e.ownPickup, e.otherPickup = pickupA, pickupB
		if e.role == "store-b" {
			e.ownPickup, e.otherPickup = pickupB, pickupA
		}
		e.otherWebhook = webhooks["admin"][0]
		if e.role == "admin" {
			e.otherWebhook = webhooks["platform"][0]
		}
		own, ok := webhooks[e.role]
		if !ok { // none: its requests are refused before they are looked at
			own = webhooks["admin"]
		}
		e.webhook, e.spare = own[0], own[1]
	}

	const (
		ok      = http.StatusOK
		created = http.StatusCreated
		gone    = http.StatusNoContent
		bad     = http.StatusBadRequest
		denied  = http.StatusForbidden
		hidden  = http.StatusNotFound
		clash   = http.StatusConflict
		unfit   = http.StatusUnprocessableEntity
	)
	fleetOnly := func(s int) map[string]int {
		return map[string]int{"admin": s, "operator": s, "store": denied, "platform": denied}
	}
	siteWide := func(s, store int) map[string]int {
		return map[string]int{"admin": s, "operator": s, "store": store, "platform": denied}
	}
	everyone := func(s int) map[string]int {
		return map[string]int{"admin": s, "operator": s, "store": s, "platform": s}
	}
	// othersDenied is for another's pickup or webhook: stores and platforms
	// get 403 (0 skips a role).
	othersDenied := func(admin, operator int) map[string]int {
		return map[string]int{"admin": admin, "operator": operator, "store": denied, "platform": denied}
	}
	// codeHolders hand orders over: they create and cancel pickups and may
	// hold their codes; operators may not.
	codeHolders := func(s int) map[string]int {
		return map[string]int{"admin": s, "operator": denied, "store": s, "platform": s}
	}
	get := func(path string) client.Request { return client.Request{Method: "GET", Path: path} }
	// newAlert opens an alert at locker, as an event would, and returns its id.
	newKindAlert := func(locker, kind string) string {
		var id int64
		// One open alert of a kind per locker: an earlier role's, left open, is closed first.
		if _, err := tg.DB().Pool().Exec(ctx, `UPDATE alerts SET cleared_at = now() WHERE device_id = $1 AND kind = $2 AND cleared_at IS NULL`,
			locker, kind); err != nil {
			t.Fatal(err)
		}
		if err := tg.DB().Pool().QueryRow(ctx, `INSERT INTO alerts (device_id, kind, detail) VALUES ($1, $2, 'role matrix') RETURNING id`,
			locker, kind).Scan(&id); err != nil {
			t.Fatal(err)
		}
		return strconv.FormatInt(id, 10)
	}
	newAlert := func(locker string) string { return newKindAlert(locker, "staged_empty") }
	newAlert(lockersA[0]) // for the lists
	newAlert(lockersB[0])
	command := func(locker string, body map[string]any) client.Request {
		return client.Request{Method: "POST", Path: "/v1/lockers/" + locker + "/commands", Body: body}
	}
	unlock := map[string]any{"type": "unlock", "compartment": 1}
	// lockersOf checks a locker list holds exactly the given lockers.
	lockersOf := func(t *testing.T, body json.RawMessage, site string, want []string) {
		t.Helper()
		var l lockerList
		if err := json.Unmarshal(body, &l); err != nil {
			t.Fatal(err)
		}
		var got []string
		for _, it := range l.Items {
			if it.Site != site {
				t.Errorf("locker %s of %s in a list of %s", it.ID, it.Site, site)
			}
			got = append(got, it.ID)
		}
		slices.Sort(got)
		if want = slices.Sorted(slices.Values(want)); !slices.Equal(got, want) {
			t.Errorf("lockers %v, want %v", got, want)
		}
	}

	// made holds the pickup each role made in "POST /v1/pickups own",
	// which its later cases cancel.
	made := map[string]string{}
	madeBy := func(e roleEnv) string {
		if id, ok := made[e.role]; ok {
			return id
		}
		return "p-none"
	}
	post := func(path string, body any) client.Request {
		return client.Request{Method: "POST", Path: path, Body: body}
	}
	del := func(path string) client.Request { return client.Request{Method: "DELETE", Path: path} }
	// seesPickup checks a GET /v1/pickups/{id} answer: the ready pickup, its
	// transitions, and its code for everyone but operators.
	seesPickup := func(want func(roleEnv) pickup.Pickup) func(*testing.T, roleEnv, json.RawMessage) {
		return func(t *testing.T, e roleEnv, body json.RawMessage) {
			var p pickup.Pickup
			if err := json.Unmarshal(body, &p); err != nil {
				t.Fatal(err)
			}
			if w := want(e); p.ID != w.ID || p.State != pickup.Ready || p.Locker != w.Locker || p.Compartment != w.Compartment {
				t.Errorf("pickup %s %s at %s/%d, want %s ready at %s/%d", p.ID, p.State, p.Locker, p.Compartment, w.ID, w.Locker, w.Compartment)
			}
			var states []string
			for _, tr := range p.Transitions {
				states = append(states, tr.To)
			}
			if !slices.Equal(states, []string{pickup.Staging, pickup.Ready}) {
				t.Errorf("transitions %v, want [staging ready]", states)
			}
			switch {
			case e.roleOf() == "operator" && p.Credential != nil:
				t.Errorf("an operator sees the code %+v", p.Credential)
			case e.roleOf() != "operator" && (p.Credential == nil || len(p.Credential.Code) != 8):
				t.Errorf("credential %+v, want the pickup's code", p.Credential)
			}
		}
	}
	pickupsOf := func(t *testing.T, body json.RawMessage) []pickup.Pickup {
		t.Helper()
		var l struct{ Items []pickup.Pickup }
		if err := json.Unmarshal(body, &l); err != nil {
			t.Fatal(err)
		}
		for _, p := range l.Items {
			if p.Credential != nil {
				t.Errorf("a list shows the code of %s", p.ID)
			}
		}
		return l.Items
	}
	// inScope reports whether a role's list may hold p: stores see their
	// site's pickups, the platform its own, admins and operators all.
	inScope := func(e roleEnv, p pickup.Pickup) bool {
		switch e.roleOf() {
		case "store":
			return p.Site == e.own
		case "platform":
			return p.Platform == "speedy"
		}
		return true
	}

	cases := []roleCase{
		{name: "POST /v1/sites", op: "POST /v1/sites",
			req: func(e roleEnv) client.Request {
				return client.Request{Method: "POST", Path: "/v1/sites", Body: map[string]string{"id": "new-" + e.role}}
			},
			want: fleetOnly(created)},
		{name: "GET /v1/sites", op: "GET /v1/sites", req: func(roleEnv) client.Request { return get("/v1/sites") },
			want: siteWide(ok, ok),
			check: func(t *testing.T, e roleEnv, body json.RawMessage) {
				var l struct{ Items []fleet.Site }
				if err := json.Unmarshal(body, &l); err != nil {
					t.Fatal(err)
				}
				var got []string
				for _, s := range l.Items {
					got = append(got, s.ID)
				}
				if strings.HasPrefix(e.role, "store") {
					if !slices.Equal(got, []string{e.own}) {
						t.Errorf("a store sees sites %v, want only [%s]", got, e.own)
					}
				} else if !slices.Contains(got, "site-a") || !slices.Contains(got, "site-b") {
					t.Errorf("sites %v, want site-a and site-b among them", got)
				}
			}},
		{name: "GET /v1/sites/{site} own", op: "GET /v1/sites/{site}",
			req: func(e roleEnv) client.Request { return get("/v1/sites/" + e.own) }, want: siteWide(ok, ok)},
		{name: "GET /v1/sites/{site} other", op: "GET /v1/sites/{site}",
			req: func(e roleEnv) client.Request { return get("/v1/sites/" + e.other) }, want: siteWide(ok, denied)},

		{name: "POST /v1/claims", op: "POST /v1/claims",
			req: func(e roleEnv) client.Request {
				return client.Request{Method: "POST", Path: "/v1/claims", Body: map[string]any{"site": e.own, "uses": 1}}
			},
			want: fleetOnly(created)},
		{name: "GET /v1/claims", op: "GET /v1/claims", req: func(roleEnv) client.Request { return get("/v1/claims") }, want: fleetOnly(ok)},
		{name: "GET /v1/claims/{id}", op: "GET /v1/claims/{id}",
			req: func(roleEnv) client.Request { return get("/v1/claims/" + claim.ID) }, want: fleetOnly(ok)},
		// Revoking a revoked claim is a 204 again, so both fleet roles can.
		{name: "DELETE /v1/claims/{id}", op: "DELETE /v1/claims/{id}",
			req:  func(roleEnv) client.Request { return client.Request{Method: "DELETE", Path: "/v1/claims/" + claim.ID} },
			want: fleetOnly(gone)},

		{name: "GET /v1/lockers", op: "GET /v1/lockers", req: func(roleEnv) client.Request { return get("/v1/lockers") },
			want: siteWide(ok, ok),
			check: func(t *testing.T, e roleEnv, body json.RawMessage) {
				if strings.HasPrefix(e.role, "store") {
					lockersOf(t, body, e.own, e.ownLockers)
				}
			}},
		{name: "GET /v1/lockers?site=own", op: "GET /v1/lockers",
			req: func(e roleEnv) client.Request {
				return client.Request{Method: "GET", Path: "/v1/lockers", Query: url.Values{"site": {e.own}}}
			},
			want:  siteWide(ok, ok),
			check: func(t *testing.T, e roleEnv, body json.RawMessage) { lockersOf(t, body, e.own, e.ownLockers) }},
		{name: "GET /v1/lockers?site=other", op: "GET /v1/lockers",
			req: func(e roleEnv) client.Request {
				return client.Request{Method: "GET", Path: "/v1/lockers", Query: url.Values{"site": {e.other}}}
			},
			want:  siteWide(ok, denied),
			check: func(t *testing.T, e roleEnv, body json.RawMessage) { lockersOf(t, body, e.other, e.othLocker) }},
		{name: "GET /v1/lockers/{id} own", op: "GET /v1/lockers/{id}",
			req: func(e roleEnv) client.Request { return get("/v1/lockers/" + e.ownLockers[1]) }, want: siteWide(ok, ok)},
		{name: "GET /v1/lockers/{id} other", op: "GET /v1/lockers/{id}",
			req: func(e roleEnv) client.Request { return get("/v1/lockers/" + e.othLocker[1]) }, want: siteWide(ok, denied)},
		{name: "PATCH /v1/lockers/{id}", op: "PATCH /v1/lockers/{id}",
			req: func(e roleEnv) client.Request {
				return client.Request{Method: "PATCH", Path: "/v1/lockers/" + e.ownLockers[1], Body: map[string]bool{"replaceable": false}}
			},
			want: fleetOnly(ok)},
		{name: "POST /v1/lockers/{id}/rotate-codes own", op: "POST /v1/lockers/{id}/rotate-codes",
			req: func(e roleEnv) client.Request {
				return client.Request{Method: "POST", Path: "/v1/lockers/" + e.ownLockers[1] + "/rotate-codes"}
			},
			want: siteWide(ok, ok)},
		{name: "POST /v1/lockers/{id}/rotate-codes other", op: "POST /v1/lockers/{id}/rotate-codes",
			req: func(e roleEnv) client.Request {
				return client.Request{Method: "POST", Path: "/v1/lockers/" + e.othLocker[1] + "/rotate-codes"}
			},
			want: siteWide(ok, denied)},
		{name: "GET /v1/lockers/{id}/health own", op: "GET /v1/lockers/{id}/health",
			req: func(e roleEnv) client.Request { return get("/v1/lockers/" + e.ownLockers[0] + "/health") }, want: siteWide(ok, ok)},
		{name: "GET /v1/lockers/{id}/health other", op: "GET /v1/lockers/{id}/health",
			req: func(e roleEnv) client.Request { return get("/v1/lockers/" + e.othLocker[0] + "/health") }, want: siteWide(ok, denied)},
		{name: "GET /v1/lockers/{id}/events own", op: "GET /v1/lockers/{id}/events",
			req: func(e roleEnv) client.Request { return get("/v1/lockers/" + e.ownLockers[0] + "/events") }, want: siteWide(ok, ok)},
		{name: "GET /v1/lockers/{id}/events other", op: "GET /v1/lockers/{id}/events",
			req: func(e roleEnv) client.Request { return get("/v1/lockers/" + e.othLocker[0] + "/events") }, want: siteWide(ok, denied)},
		{name: "GET /v1/lockers/{id}/uptime own", op: "GET /v1/lockers/{id}/uptime",
			req: func(e roleEnv) client.Request { return get("/v1/lockers/" + e.ownLockers[0] + "/uptime") }, want: siteWide(ok, ok)},
		{name: "GET /v1/lockers/{id}/uptime other", op: "GET /v1/lockers/{id}/uptime",
			req: func(e roleEnv) client.Request { return get("/v1/lockers/" + e.othLocker[0] + "/uptime") }, want: siteWide(ok, denied)},

		{name: "POST /v1/lockers/{id}/commands unlock own", op: "POST /v1/lockers/{id}/commands",
			req: func(e roleEnv) client.Request { return command(e.ownLockers[0], unlock) }, want: siteWide(created, created)},
		{name: "POST /v1/lockers/{id}/commands unlock other", op: "POST /v1/lockers/{id}/commands",
			req: func(e roleEnv) client.Request { return command(e.othLocker[0], unlock) }, want: siteWide(created, denied)},
		{name: "POST /v1/lockers/{id}/commands set_service own", op: "POST /v1/lockers/{id}/commands",
			req: func(e roleEnv) client.Request {
				return command(e.ownLockers[0], map[string]any{"type": "set_service", "compartment": 1, "in_service": true})
			},
			want: siteWide(created, denied)},
		// The fleet roles are not asked to reboot: it would restart a
		// simulated locker in the middle of the matrix.
		{name: "POST /v1/lockers/{id}/commands reboot own", op: "POST /v1/lockers/{id}/commands",
			req:  func(e roleEnv) client.Request { return command(e.ownLockers[0], map[string]any{"type": "reboot"}) },
			want: siteWide(0, denied)},
		{name: "GET /v1/lockers/{id}/commands/{cmd} own", op: "GET /v1/lockers/{id}/commands/{cmd}",
			req:  func(e roleEnv) client.Request { return get("/v1/lockers/" + e.ownLockers[0] + "/commands/" + e.ownCmd) },
			want: siteWide(ok, ok)},
		{name: "GET /v1/lockers/{id}/commands/{cmd} other", op: "GET /v1/lockers/{id}/commands/{cmd}",
			req: func(e roleEnv) client.Request {
				return get("/v1/lockers/" + e.othLocker[0] + "/commands/" + e.otherCmd)
			},
			want: siteWide(ok, denied)},

		{name: "POST /v1/tokens", op: "POST /v1/tokens",
			req: func(e roleEnv) client.Request {
				return client.Request{Method: "POST", Path: "/v1/tokens", Body: map[string]string{"role": "platform", "name": "by-" + e.role}}
			},
			want: map[string]int{"admin": created, "operator": denied, "store": denied, "platform": denied}},
		{name: "GET /v1/tokens", op: "GET /v1/tokens", req: func(roleEnv) client.Request { return get("/v1/tokens") },
			want: map[string]int{"admin": ok, "operator": denied, "store": denied, "platform": denied}},
		{name: "GET /v1/tokens/{id}", op: "GET /v1/tokens/{id}", req: func(roleEnv) client.Request { return get("/v1/tokens/" + victim) },
			want: map[string]int{"admin": ok, "operator": denied, "store": denied, "platform": denied}},
		{name: "PATCH /v1/tokens/{id}", op: "PATCH /v1/tokens/{id}",
			req: func(e roleEnv) client.Request {
				return client.Request{Method: "PATCH", Path: "/v1/tokens/" + scoped, Body: map[string]any{"sites": []string{e.own}}}
			},
			want: map[string]int{"admin": ok, "operator": denied, "store": denied, "platform": denied}},
		{name: "DELETE /v1/tokens/{id}", op: "DELETE /v1/tokens/{id}",
			req:  func(roleEnv) client.Request { return client.Request{Method: "DELETE", Path: "/v1/tokens/" + victim} },
			want: map[string]int{"admin": gone, "operator": denied, "store": denied, "platform": denied}},
		{name: "GET /v1/audit", op: "GET /v1/audit", req: func(roleEnv) client.Request { return get("/v1/audit") }, want: fleetOnly(ok)},

		// Alerts: stores see and clear their site's. Each clear is of an
		// alert made for that request, so every role that may clear can.
		{name: "GET /v1/alerts", op: "GET /v1/alerts", req: func(roleEnv) client.Request { return get("/v1/alerts") }, want: siteWide(ok, ok),
			check: func(t *testing.T, e roleEnv, body json.RawMessage) {
				var l struct{ Items []fleet.Alert }
				if err := json.Unmarshal(body, &l); err != nil {
					t.Fatal(err)
				}
				sites := map[string]bool{}
				for _, a := range l.Items {
					sites[a.Site] = true
				}
				// The fixture alerts: one at a locker of each site.
				if want := e.roleOf() != "store"; !sites[e.own] || sites[e.other] != want {
					t.Errorf("alerts of sites %v; want %s's, and %s's: %v", sites, e.own, e.other, want)
				}
			}},
		{name: "GET /v1/alerts?site=other", op: "GET /v1/alerts",
			req: func(e roleEnv) client.Request { return get("/v1/alerts?site=" + e.other) }, want: siteWide(ok, denied)},
		{name: "POST /v1/alerts/{id}/clear own", op: "POST /v1/alerts/{id}/clear",
			req: func(e roleEnv) client.Request { return post("/v1/alerts/"+newAlert(e.ownLockers[0])+"/clear", nil) }, want: siteWide(ok, ok)},
		{name: "POST /v1/alerts/{id}/clear other", op: "POST /v1/alerts/{id}/clear",
			req: func(e roleEnv) client.Request { return post("/v1/alerts/"+newAlert(e.othLocker[0])+"/clear", nil) }, want: siteWide(ok, denied)},
		// Clearing creds_not_applied releases compartments a stale code may
		// still open: the fleet's roles only.
		{name: "POST /v1/alerts/{id}/clear creds_not_applied own", op: "POST /v1/alerts/{id}/clear",
			req: func(e roleEnv) client.Request {
				return post("/v1/alerts/"+newKindAlert(e.ownLockers[0], fleet.AlertCredsNotApplied)+"/clear", nil)
			}, want: fleetOnly(ok)},

		// Pickups: the roles that hand orders over create them (stores at
		// their site, the platform for itself); operators do not.
		{name: "POST /v1/pickups own", op: "POST /v1/pickups",
			req:  func(e roleEnv) client.Request { return post("/v1/pickups", newPickup(e.own, "R-"+e.role, "speedy")) },
			want: codeHolders(created),
			check: func(t *testing.T, e roleEnv, body json.RawMessage) {
				var p pickup.Pickup
				if err := json.Unmarshal(body, &p); err != nil {
					t.Fatal(err)
				}
				if p.ID == "" || p.State != pickup.Staging || p.Site != e.own || p.Platform != "speedy" || p.Compartment == 0 {
					t.Errorf("created %+v", p)
				}
				made[e.role] = p.ID
			}},
		{name: "POST /v1/pickups other site, other platform", op: "POST /v1/pickups",
			req:  func(e roleEnv) client.Request { return post("/v1/pickups", newPickup(e.other, "X-"+e.role, "rival")) },
			want: map[string]int{"admin": 0, "operator": denied, "store": denied, "platform": denied}},
		{name: "POST /v1/pickups order_ref taken", op: "POST /v1/pickups",
			req: func(e roleEnv) client.Request {
				return post("/v1/pickups", newPickup(e.own, e.ownPickup.OrderRef, e.ownPickup.Platform))
			},
			want: codeHolders(clash)},
		{name: "POST /v1/pickups nothing fits", op: "POST /v1/pickups",
			req: func(e roleEnv) client.Request {
				return post("/v1/pickups", map[string]any{"site": e.own, "order_ref": "N-" + e.role, "size": "XL", "zone": "chilled",
					"recipient": map[string]string{"kind": "driver", "platform": "speedy"}})
			},
			want: codeHolders(unfit)},
		{name: "GET /v1/pickups", op: "GET /v1/pickups", req: func(roleEnv) client.Request { return get("/v1/pickups") },
			want: everyone(ok),
			check: func(t *testing.T, e roleEnv, body json.RawMessage) {
				var ids []string
				for _, p := range pickupsOf(t, body) {
					if !inScope(e, p) {
						t.Errorf("lists pickup %s of %s for platform %q", p.ID, p.Site, p.Platform)
					}
					ids = append(ids, p.ID)
				}
				if !slices.Contains(ids, e.ownPickup.ID) {
					t.Errorf("pickups %v without %s", ids, e.ownPickup.ID)
				}
				if sees := slices.Contains(ids, e.otherPickup.ID); sees != (e.roleOf() == "admin" || e.roleOf() == "operator") {
					t.Errorf("lists %s (of %s, platform %s): %v", e.otherPickup.ID, e.otherPickup.Site, e.otherPickup.Platform, sees)
				}
			}},
		{name: "GET /v1/pickups?site=other", op: "GET /v1/pickups",
			req: func(e roleEnv) client.Request {
				return client.Request{Method: "GET", Path: "/v1/pickups", Query: url.Values{"site": {e.other}}}
			},
			want: map[string]int{"admin": ok, "operator": ok, "store": denied, "platform": ok},
			check: func(t *testing.T, e roleEnv, body json.RawMessage) {
				for _, p := range pickupsOf(t, body) {
					if p.Site != e.other || (e.role == "platform" && p.Platform != "speedy") {
						t.Errorf("lists pickup %s of %s for platform %q", p.ID, p.Site, p.Platform)
					}
				}
			}},
		{name: "GET /v1/pickups?state=bogus", op: "GET /v1/pickups",
			req: func(roleEnv) client.Request {
				return client.Request{Method: "GET", Path: "/v1/pickups", Query: url.Values{"state": {"bogus"}}}
			},
			want: everyone(bad)},
		{name: "GET /v1/pickups/{id} own", op: "GET /v1/pickups/{id}",
			req:   func(e roleEnv) client.Request { return get("/v1/pickups/" + e.ownPickup.ID) },
			want:  everyone(ok),
			check: seesPickup(func(e roleEnv) pickup.Pickup { return e.ownPickup })},
		{name: "GET /v1/pickups/{id} other", op: "GET /v1/pickups/{id}",
			req:   func(e roleEnv) client.Request { return get("/v1/pickups/" + e.otherPickup.ID) },
			want:  othersDenied(ok, ok),
			check: seesPickup(func(e roleEnv) pickup.Pickup { return e.otherPickup })},
		{name: "POST /v1/pickups/{id}/cancel own", op: "POST /v1/pickups/{id}/cancel",
			req:  func(e roleEnv) client.Request { return post("/v1/pickups/"+madeBy(e)+"/cancel", nil) },
			want: codeHolders(ok),
			check: func(t *testing.T, e roleEnv, body json.RawMessage) {
				var p pickup.Pickup
				if err := json.Unmarshal(body, &p); err != nil {
					t.Fatal(err)
				}
				if p.ID != madeBy(e) || p.State != pickup.Cancelled {
					t.Errorf("cancelled %s is %s", p.ID, p.State)
				}
			}},
		{name: "POST /v1/pickups/{id}/cancel again", op: "POST /v1/pickups/{id}/cancel",
			req:  func(e roleEnv) client.Request { return post("/v1/pickups/"+madeBy(e)+"/cancel", nil) },
			want: codeHolders(clash)},
		// Admins are not asked: it would end the fixture.
		{name: "POST /v1/pickups/{id}/cancel other", op: "POST /v1/pickups/{id}/cancel",
			req:  func(e roleEnv) client.Request { return post("/v1/pickups/"+e.otherPickup.ID+"/cancel", nil) },
			want: othersDenied(0, denied)},

		// Credentials: whoever may hold a pickup's code may combine it.
		{name: "POST /v1/credentials own", op: "POST /v1/credentials",
			req: func(e roleEnv) client.Request {
				return post("/v1/credentials", map[string]any{"pickups": []string{e.ownPickup.ID}, "kind": "pin"})
			},
			want: codeHolders(created),
			check: func(t *testing.T, e roleEnv, body json.RawMessage) {
				var v pickup.CredentialView
				if err := json.Unmarshal(body, &v); err != nil {
					t.Fatal(err)
				}
				p := e.ownPickup
				if len(v.Code) != 8 || v.QR != "" || v.Locker != p.Locker || !slices.Equal(v.Compartments, []int{p.Compartment}) ||
					!slices.Equal(v.Pickups, []string{p.ID}) {
					t.Errorf("credential %+v for pickup %s at %s/%d", v, p.ID, p.Locker, p.Compartment)
				}
			}},
		{name: "POST /v1/credentials other", op: "POST /v1/credentials",
			req: func(e roleEnv) client.Request {
				return post("/v1/credentials", map[string]any{"pickups": []string{e.otherPickup.ID}})
			},
			want: map[string]int{"admin": created, "operator": denied, "store": denied, "platform": denied}},
		{name: "POST /v1/credentials not ready", op: "POST /v1/credentials",
			req: func(e roleEnv) client.Request {
				return post("/v1/credentials", map[string]any{"pickups": []string{madeBy(e)}})
			},
			want: codeHolders(clash)},
		{name: "POST /v1/credentials no pickups", op: "POST /v1/credentials",
			req:  func(roleEnv) client.Request { return post("/v1/credentials", map[string]any{"pickups": []string{}}) },
			want: codeHolders(bad)},

		// Webhooks: every role has its own, scoped by its token.
		{name: "POST /v1/webhooks", op: "POST /v1/webhooks",
			req:  func(roleEnv) client.Request { return post("/v1/webhooks", map[string]any{"url": hook.URL}) },
			want: everyone(created),
			check: func(t *testing.T, e roleEnv, body json.RawMessage) {
				var wh struct {
					webhook.Webhook
					Secret string `json:"secret"`
				}
				if err := json.Unmarshal(body, &wh); err != nil {
					t.Fatal(err)
				}
				wantSite, wantPlatform := "", ""
				switch e.roleOf() {
				case "store":
					wantSite = e.own
				case "platform":
					wantPlatform = "speedy"
				}
				if !strings.HasPrefix(wh.Secret, "whsec_") || wh.Role != e.roleOf() || wh.Site != wantSite || wh.Platform != wantPlatform ||
					!slices.Equal(wh.Events, pickup.EventTypes) || (e.tokenID != "" && wh.TokenID != e.tokenID) {
					t.Errorf("webhook %+v", wh)
				}
			}},
		{name: "POST /v1/webhooks bad url", op: "POST /v1/webhooks",
			req: func(roleEnv) client.Request {
				return post("/v1/webhooks", map[string]any{"url": "ftp://hooks.example/x"})
			},
			want: everyone(bad)},
		{name: "GET /v1/webhooks", op: "GET /v1/webhooks", req: func(roleEnv) client.Request { return get("/v1/webhooks") },
			want: everyone(ok),
			check: func(t *testing.T, e roleEnv, body json.RawMessage) {
				var l struct{ Items []webhook.Webhook }
				if err := json.Unmarshal(body, &l); err != nil {
					t.Fatal(err)
				}
				var ids []string
				for _, wh := range l.Items {
					if e.tokenID != "" && wh.TokenID != e.tokenID {
						t.Errorf("lists webhook %s of token %s", wh.ID, wh.TokenID)
					}
					ids = append(ids, wh.ID)
				}
				if !slices.Contains(ids, e.webhook) {
					t.Errorf("webhooks %v without its own %s", ids, e.webhook)
				}
				if sees := slices.Contains(ids, e.otherWebhook); sees != (e.role == "admin") {
					t.Errorf("lists another token's webhook: %v", sees)
				}
			}},
		{name: "GET /v1/webhooks/{id}/deliveries own", op: "GET /v1/webhooks/{id}/deliveries",
			req:  func(e roleEnv) client.Request { return get("/v1/webhooks/" + e.webhook + "/deliveries") },
			want: everyone(ok),
			check: func(t *testing.T, e roleEnv, body json.RawMessage) {
				var l struct{ Items []webhook.Delivery }
				if err := json.Unmarshal(body, &l); err != nil {
					t.Fatal(err)
				}
				var subjects []string
				for _, d := range l.Items {
					if d.WebhookID != e.webhook || !slices.Contains(pickup.EventTypes, d.Type) {
						t.Errorf("delivery %+v in the log of %s", d, e.webhook)
					}
					subjects = append(subjects, d.Subject)
				}
				// Both fixtures became ready after the webhook was made.
				if !slices.Contains(subjects, e.ownPickup.ID) {
					t.Errorf("no event about %s (deliveries about %v)", e.ownPickup.ID, subjects)
				}
				if got := slices.Contains(subjects, e.otherPickup.ID); got != (e.roleOf() == "admin" || e.roleOf() == "operator") {
					t.Errorf("events about %s (of %s, platform %s): %v", e.otherPickup.ID, e.otherPickup.Site, e.otherPickup.Platform, got)
				}
			}},
		{name: "GET /v1/webhooks/{id}/deliveries other", op: "GET /v1/webhooks/{id}/deliveries",
			req:  func(e roleEnv) client.Request { return get("/v1/webhooks/" + e.otherWebhook + "/deliveries") },
			want: othersDenied(ok, denied)},
		{name: "DELETE /v1/webhooks/{id} own", op: "DELETE /v1/webhooks/{id}",
			req: func(e roleEnv) client.Request { return del("/v1/webhooks/" + e.spare) }, want: everyone(gone)},
		{name: "DELETE /v1/webhooks/{id} again", op: "DELETE /v1/webhooks/{id}",
			req: func(e roleEnv) client.Request { return del("/v1/webhooks/" + e.spare) }, want: everyone(hidden)},
		// The admin is not asked: it would delete the platform's webhook.
		{name: "DELETE /v1/webhooks/{id} other", op: "DELETE /v1/webhooks/{id}",
			req: func(e roleEnv) client.Request { return del("/v1/webhooks/" + e.otherWebhook) }, want: othersDenied(0, denied)},
	}
	cases = append(cases, firmwareRoleCases(t, tg, lockersA, lockersB)...)
	brokerOnly := map[string]int{"admin": denied, "operator": denied, "store": denied, "platform": denied, "broker": ok}
	cases = append(cases,
		roleCase{name: "POST /v1/broker-auth/emqx/authn", op: "POST /v1/broker-auth/emqx/authn", want: brokerOnly,
			req: func(e roleEnv) client.Request {
				return post("/v1/broker-auth/emqx/authn", map[string]string{"clientid": "gw-x", "username": "lockergate", "password": "x"})
			},
			check: func(t *testing.T, e roleEnv, body json.RawMessage) {
				if !strings.Contains(string(body), `"result":"ignore"`) {
					t.Errorf("the gateway's own user: %s, want ignore", body)
				}
			}},
		roleCase{name: "POST /v1/broker-auth/emqx/authz", op: "POST /v1/broker-auth/emqx/authz", want: brokerOnly,
			req: func(e roleEnv) client.Request {
				return post("/v1/broker-auth/emqx/authz", map[string]string{"clientid": e.ownLockers[0], "username": e.ownLockers[0],
					"topic": "lockers/v1/" + e.ownLockers[0] + "/health", "action": "publish"})
			},
			check: func(t *testing.T, e roleEnv, body json.RawMessage) {
				if !strings.Contains(string(body), `"result":"allow"`) {
					t.Errorf("a locker's own health: %s, want allow", body)
				}
			}},
	)

	t.Run("MatrixCoversDocumentedRoles", func(t *testing.T) {
		checkMatrixAgainstOpenAPI(t, tg, cases)
	})

	for _, e := range envs {
		t.Run(e.role, func(t *testing.T) {
			for _, c := range cases {
				want, listed := c.want[e.roleOf()]
				if !listed && e.role == "broker" {
					want = denied // a broker token may do nothing else
				}
				if e.role == "none" {
					want = http.StatusUnauthorized
				}
				if want == 0 {
					continue
				}
				t.Run(c.name, func(t *testing.T) {
					var body json.RawMessage
					var out any = &body
					if c.binary {
						out = nil
					}
					status, err := e.c.Do(ctx, c.req(e), out)
					if status != want {
						t.Fatalf("got %d (%v), want %d", status, err, want)
					}
					if status >= 300 {
						var pe *client.Error
						if !errors.As(err, &pe) || pe.Status != status {
							t.Fatalf("answer is not a problem detail: %v", err)
						}
						return
					}
					if err != nil {
						t.Fatal(err)
					}
					if c.check != nil {
						c.check(t, e, body)
					}
				})
			}
		})
	}

	// A store asking about another site's locker gets 403, as the
	// contract says ("a token outside its role or site"); about a locker
	// that does not exist, 404.
	t.Run("store/OtherSiteLockerForbidden", func(t *testing.T) {
		for _, path := range []string{"", "/health", "/events", "/uptime", "/commands/" + cmdB} {
			_, errOther := storeA.Do(ctx, get("/v1/lockers/"+lockersB[0]+path), nil)
			_, errNone := storeA.Do(ctx, get("/v1/lockers/lk-does-not-exist"+path), nil)
			var po, pn *client.Error
			if !errors.As(errOther, &po) || !errors.As(errNone, &pn) || po.Status != denied || pn.Status != hidden {
				t.Errorf("%s: other site's locker: %v (want 403); no such locker: %v (want 404)", path, errOther, errNone)
			}
		}
	})

	// Every 403 says why: the token's site or role, not a bare "forbidden".
	t.Run("ForbiddenSaysWhy", func(t *testing.T) {
		for _, c := range []struct {
			c    *client.Client
			req  client.Request
			want string
		}{
			{storeA, get("/v1/sites/site-b"), "this store token is for site site-a, not site-b"},
			{storeA, get("/v1/lockers?site=site-b"), "this store token is for site site-a, not site-b"},
			{storeB, get("/v1/pickups?site=site-a"), "this store token is for site site-b, not site-a"},
			{storeA, get("/v1/alerts?site=site-b"), "this store token is for site site-a, not site-b"},
			{storeA, client.Request{Method: "POST", Path: "/v1/lockers/" + lockersA[0] + "/commands", Body: map[string]any{"type": "reboot"}},
				"a store token may send unlock commands only (reboot is for operator or admin tokens)"},
			{storeA, client.Request{Method: "POST", Path: "/v1/pickups", Body: map[string]any{"site": "site-b", "order_ref": "X-1",
				"recipient": map[string]string{"platform": "speedy"}}}, "this store token is for site site-a, not site-b"},
			{platform, client.Request{Method: "POST", Path: "/v1/pickups", Body: map[string]any{"site": "site-a", "order_ref": "X-2",
				"recipient": map[string]string{"kind": "driver", "platform": "zoom"}}}, "this platform token is speedy's: it makes pickups for speedy only"},
		} {
			_, err := c.c.Do(ctx, c.req, nil)
			var ce *client.Error
			if !errors.As(err, &ce) || ce.Status != denied || !strings.Contains(ce.Detail, c.want) {
				t.Errorf("%s %s: %v, want 403 saying %q", c.req.Method, c.req.Path, err, c.want)
			}
		}
	})

	t.Run("RevokedToken", func(t *testing.T) {
		id, c := tg.MustToken(t, "store", "site-a", "temp")
		if err := c.Get(ctx, "/v1/lockers", nil, nil); err != nil {
			t.Fatalf("before revocation: %v", err)
		}
		if status, err := tg.Admin.Do(ctx, client.Request{Method: "DELETE", Path: "/v1/tokens/" + id}, nil); status != gone {
			t.Fatalf("revoke: %d %v", status, err)
		}
		if status, _ := c.Do(ctx, get("/v1/lockers"), nil); status != http.StatusUnauthorized {
			t.Fatalf("after revocation: %d, want 401", status)
		}
		if status, _ := tg.Admin.Do(ctx, client.Request{Method: "DELETE", Path: "/v1/tokens/" + id}, nil); status != hidden {
			t.Fatalf("revoking twice: %d, want 404", status)
		}
	})
}

// checkMatrixAgainstOpenAPI holds the matrix to the served OpenAPI document:
// every authenticated operation has a case, a role outside an operation's
// x-roles expects 403 in each of its cases, and a role inside it succeeds in
// at least one.
func checkMatrixAgainstOpenAPI(t *testing.T, tg *TestGateway, cases []roleCase) {
	t.Helper()
	var doc struct {
		Paths map[string]map[string]struct {
			Roles    []string          `json:"x-roles"`
			Security []json.RawMessage `json:"security"`
		} `json:"paths"`
	}
	if err := tg.Admin.Get(context.Background(), "/v1/openapi.json", nil, &doc); err != nil {
		t.Fatal(err)
	}
	n := 0
	for path, ops := range doc.Paths {
		for method, op := range ops {
			if op.Security != nil && len(op.Security) == 0 {
				continue // served without a token
			}
			n++
			key := strings.ToUpper(method) + " " + path
			covered := map[string]bool{}
			found := false
			for _, c := range cases {
				if c.op != key {
					continue
				}
				found = true
				for role, want := range c.want {
					if !slices.Contains(op.Roles, role) && want != http.StatusForbidden {
						t.Errorf("%s: role %s is not in x-roles %v, but the matrix expects %d", c.name, role, op.Roles, want)
					}
					if want >= 200 && want < 300 {
						covered[role] = true
					}
				}
			}
			if !found {
				t.Errorf("%s is documented but not in the role matrix", key)
				continue
			}
			for _, role := range op.Roles {
				if !covered[role] {
					t.Errorf("%s: x-roles has %s, but no case expects it to succeed", key, role)
				}
			}
		}
	}
	if n == 0 {
		t.Fatal("the OpenAPI document has no authenticated operations")
	}
}

// firmwareRoleCases are the role cases of firmware and rollouts (admin and
// operator only). Their fixtures: images for the lockers' models, a rollout
// held in a far maintenance window (nothing installs), and one whose jobs
// fail (a corrupted recorded hash), to retry. Cases that need a rollout in
// a given status put it there through the admin before the request.
func firmwareRoleCases(t *testing.T, tg *TestGateway, lockersA, lockersB []string) []roleCase {
	ctx := context.Background()
	modelOf := func(id string) string {
		var l fleet.Locker
		if err := tg.Admin.Get(ctx, "/v1/lockers/"+id, nil, &l); err != nil {
			t.Fatal(err)
		}
		return l.Model
	}
	upload := func(c *client.Client, model, version string) (int, string) {
		var a struct{ ID string }
		status, _ := c.Do(ctx, client.Request{Method: "POST", Path: "/v1/firmware",
			Query: url.Values{"model": {model}, "version": {version}}, Body: []byte("image " + version)}, &a)
		return status, a.ID
	}
	loc, _ := time.LoadLocation("America/Chicago")
	h := time.Now().In(loc).Hour()
	farWindow := fmt.Sprintf("%02d:00-%02d:00", (h+3)%24, (h+4)%24)
	rollout := func(fw, locker string, extra map[string]any) string {
		body := map[string]any{"firmware": fw, "selector": map[string]any{"lockers": []string{locker}}, "waves": []int{100}, "window": farWindow}
		for k, v := range extra {
			body[k] = v
		}
		var r struct{ ID string }
		if err := tg.Admin.Post(ctx, "/v1/rollouts", body, &r); err != nil {
			t.Fatalf("create rollout: %v", err)
		}
		return r.ID
	}
	statusOf := func(id string) string {
		var r struct{ Status string }
		if err := tg.Admin.Get(ctx, "/v1/rollouts/"+id, nil, &r); err != nil {
			t.Fatal(err)
		}
		return r.Status
	}
	action := func(id, what string) { tg.Admin.Post(ctx, "/v1/rollouts/"+id+"/"+what, nil, nil) } // errors: already there

	_, fwA := upload(tg.Admin, modelOf(lockersA[0]), "9.0.0")
	_, fwB := upload(tg.Admin, modelOf(lockersB[0]), "9.1.0")
	_, fwBad := upload(tg.Admin, modelOf(lockersA[1]), "9.2.0")
	if _, err := tg.DB().Pool().Exec(ctx, `UPDATE firmware SET sha256 = repeat('0', 64) WHERE id = $1`, fwBad); err != nil {
		t.Fatal(err)
	}
	held := rollout(fwA, lockersA[0], nil)
	failing := rollout(fwBad, lockersA[1], map[string]any{"window": "", "max_failure_pct": 100})
	fleetCan := func(e roleEnv) bool { return e.roleOf() == "admin" || e.roleOf() == "operator" }

	const ok, created, denied = http.StatusOK, http.StatusCreated, http.StatusForbidden
	fleetOnly := func(s int) map[string]int {
		return map[string]int{"admin": s, "operator": s, "store": denied, "platform": denied}
	}
	get := func(path string) client.Request { return client.Request{Method: "GET", Path: path} }
	post := func(path string, body any) client.Request {
		return client.Request{Method: "POST", Path: path, Body: body}
	}
	return []roleCase{
		{name: "POST /v1/firmware", op: "POST /v1/firmware", want: fleetOnly(created),
			req: func(e roleEnv) client.Request {
				return client.Request{Method: "POST", Path: "/v1/firmware",
					Query: url.Values{"model": {"LX-24"}, "version": {"9.9.0-" + e.role}}, Body: []byte("image")}
			}},
		{name: "GET /v1/firmware", op: "GET /v1/firmware", req: func(roleEnv) client.Request { return get("/v1/firmware") },
			want: fleetOnly(ok)},
		{name: "GET /v1/firmware/{id}", op: "GET /v1/firmware/{id}", req: func(roleEnv) client.Request { return get("/v1/firmware/" + fwA) },
			want: fleetOnly(ok)},
		{name: "GET /v1/firmware/{id}/blob", op: "GET /v1/firmware/{id}/blob", binary: true,
			req: func(roleEnv) client.Request { return get("/v1/firmware/" + fwA + "/blob") }, want: fleetOnly(ok)},
		{name: "POST /v1/rollouts", op: "POST /v1/rollouts", want: fleetOnly(created),
			req: func(roleEnv) client.Request {
				return post("/v1/rollouts", map[string]any{"firmware": fwB, "selector": map[string]any{"lockers": []string{lockersB[0]}},
					"waves": []int{100}, "window": farWindow})
			},
			check: func(t *testing.T, e roleEnv, body json.RawMessage) {
				var r struct{ ID, Status string }
				if err := json.Unmarshal(body, &r); err != nil || r.Status != "running" {
					t.Fatalf("rollout %s: %v", body, err)
				}
				action(r.ID, "cancel") // frees the locker for the next role
			}},
		{name: "GET /v1/rollouts", op: "GET /v1/rollouts", req: func(roleEnv) client.Request { return get("/v1/rollouts") },
			want: fleetOnly(ok)},
		{name: "GET /v1/rollouts/{id}", op: "GET /v1/rollouts/{id}", req: func(roleEnv) client.Request { return get("/v1/rollouts/" + held) },
			want: fleetOnly(ok)},
		{name: "GET /v1/rollouts/{id}/jobs", op: "GET /v1/rollouts/{id}/jobs",
			req: func(roleEnv) client.Request { return get("/v1/rollouts/" + held + "/jobs") }, want: fleetOnly(ok)},
		{name: "POST /v1/rollouts/{id}/pause", op: "POST /v1/rollouts/{id}/pause", want: fleetOnly(ok),
			req: func(roleEnv) client.Request { action(held, "resume"); return post("/v1/rollouts/"+held+"/pause", nil) }},
		{name: "POST /v1/rollouts/{id}/resume", op: "POST /v1/rollouts/{id}/resume", want: fleetOnly(ok),
			req: func(roleEnv) client.Request { action(held, "pause"); return post("/v1/rollouts/"+held+"/resume", nil) }},
		{name: "POST /v1/rollouts/{id}/cancel", op: "POST /v1/rollouts/{id}/cancel", want: fleetOnly(ok),
			req: func(e roleEnv) client.Request {
				id := held
				if fleetCan(e) {
					id = rollout(fwB, lockersB[0], nil)
				}
				return post("/v1/rollouts/"+id+"/cancel", nil)
			}},
		{name: "POST /v1/rollouts/{id}/retry-failed", op: "POST /v1/rollouts/{id}/retry-failed", want: fleetOnly(ok),
			req: func(e roleEnv) client.Request {
				if fleetCan(e) {
					Eventually(t, 20*time.Second, "failing rollout completed", func() error {
						if s := statusOf(failing); s != "completed" {
							return fmt.Errorf("status %s", s)
						}
						return nil
					})
				}
				return post("/v1/rollouts/"+failing+"/retry-failed", nil)
			}},
	}
}
