package gateway_test

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"testing"

	"github.com/lockergate/lockergate/client"
	"github.com/lockergate/lockergate/devicesim"
	"github.com/lockergate/lockergate/fleet"
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
	own, other            string
	ownLockers, othLocker []string
	ownCmd, otherCmd      string // a command at ownLockers[0] / othLocker[0]
}

// roleCase is one request tried with every role. want holds the status per
// role (admin, operator, store, platform); "store" applies to both stores,
// a request without a token always gets 401, and 0 skips the role.
type roleCase struct {
	name  string // subtest name: "METHOD pattern" and what it is about
	op    string // the documented operation: "METHOD pattern"
	req   func(e roleEnv) client.Request
	want  map[string]int
	check func(t *testing.T, e roleEnv, body json.RawMessage)
}

// TestRoles checks each role against each endpoint over a real gateway with
// two lockers at each of two sites.
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
	cmdAt := func(locker string) string {
		var c fleet.Command
		if err := tg.Admin.Post(ctx, "/v1/lockers/"+locker+"/commands", map[string]any{"type": "unlock", "compartment": 1}, &c); err != nil {
			t.Fatal(err)
		}
		return c.ID
	}
	cmdA, cmdB := cmdAt(lockersA[0]), cmdAt(lockersB[0])

	_, operator := tg.MustToken(t, "operator", "", "ops")
	_, storeA := tg.MustToken(t, "store", "site-a", "front-desk-a")
	_, storeB := tg.MustToken(t, "store", "site-b", "front-desk-b")
	_, platform := tg.MustToken(t, "platform", "", "speedy")
	anon := client.New("http://"+tg.HTTPAddr(), "")

	siteA := func(role string, c *client.Client) roleEnv {
		return roleEnv{role: role, c: c, own: "site-a", other: "site-b", ownLockers: lockersA, othLocker: lockersB, ownCmd: cmdA, otherCmd: cmdB}
	}
	envs := []roleEnv{
		siteA("admin", tg.Admin),
		siteA("operator", operator),
		siteA("store", storeA),
		{role: "store-b", c: storeB, own: "site-b", other: "site-a", ownLockers: lockersB, othLocker: lockersA, ownCmd: cmdB, otherCmd: cmdA},
		siteA("platform", platform),
		siteA("none", anon),
	}

	const (
		ok      = http.StatusOK
		created = http.StatusCreated
		gone    = http.StatusNoContent
		denied  = http.StatusForbidden
		hidden  = http.StatusNotFound
	)
	fleetOnly := func(s int) map[string]int {
		return map[string]int{"admin": s, "operator": s, "store": denied, "platform": denied}
	}
	siteWide := func(s, store int) map[string]int {
		return map[string]int{"admin": s, "operator": s, "store": store, "platform": denied}
	}
	get := func(path string) client.Request { return client.Request{Method: "GET", Path: path} }
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
			req: func(e roleEnv) client.Request { return get("/v1/lockers/" + e.othLocker[1]) }, want: siteWide(ok, hidden)},
		{name: "PATCH /v1/lockers/{id}", op: "PATCH /v1/lockers/{id}",
			req: func(e roleEnv) client.Request {
				return client.Request{Method: "PATCH", Path: "/v1/lockers/" + e.ownLockers[1], Body: map[string]bool{"replaceable": false}}
			},
			want: fleetOnly(ok)},
		{name: "GET /v1/lockers/{id}/health own", op: "GET /v1/lockers/{id}/health",
			req: func(e roleEnv) client.Request { return get("/v1/lockers/" + e.ownLockers[0] + "/health") }, want: siteWide(ok, ok)},
		{name: "GET /v1/lockers/{id}/health other", op: "GET /v1/lockers/{id}/health",
			req: func(e roleEnv) client.Request { return get("/v1/lockers/" + e.othLocker[0] + "/health") }, want: siteWide(ok, hidden)},
		{name: "GET /v1/lockers/{id}/events own", op: "GET /v1/lockers/{id}/events",
			req: func(e roleEnv) client.Request { return get("/v1/lockers/" + e.ownLockers[0] + "/events") }, want: siteWide(ok, ok)},
		{name: "GET /v1/lockers/{id}/events other", op: "GET /v1/lockers/{id}/events",
			req: func(e roleEnv) client.Request { return get("/v1/lockers/" + e.othLocker[0] + "/events") }, want: siteWide(ok, hidden)},

		{name: "POST /v1/lockers/{id}/commands unlock own", op: "POST /v1/lockers/{id}/commands",
			req: func(e roleEnv) client.Request { return command(e.ownLockers[0], unlock) }, want: siteWide(created, created)},
		{name: "POST /v1/lockers/{id}/commands unlock other", op: "POST /v1/lockers/{id}/commands",
			req: func(e roleEnv) client.Request { return command(e.othLocker[0], unlock) }, want: siteWide(created, hidden)},
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
			want: siteWide(ok, hidden)},

		{name: "POST /v1/tokens", op: "POST /v1/tokens",
			req: func(e roleEnv) client.Request {
				return client.Request{Method: "POST", Path: "/v1/tokens", Body: map[string]string{"role": "platform", "name": "by-" + e.role}}
			},
			want: map[string]int{"admin": created, "operator": denied, "store": denied, "platform": denied}},
		{name: "DELETE /v1/tokens/{id}", op: "DELETE /v1/tokens/{id}",
			req:  func(roleEnv) client.Request { return client.Request{Method: "DELETE", Path: "/v1/tokens/" + victim} },
			want: map[string]int{"admin": gone, "operator": denied, "store": denied, "platform": denied}},
		{name: "GET /v1/audit", op: "GET /v1/audit", req: func(roleEnv) client.Request { return get("/v1/audit") }, want: fleetOnly(ok)},
	}

	t.Run("MatrixCoversDocumentedRoles", func(t *testing.T) {
		checkMatrixAgainstOpenAPI(t, tg, cases)
	})

	for _, e := range envs {
		t.Run(e.role, func(t *testing.T) {
			for _, c := range cases {
				want := c.want[strings.TrimSuffix(e.role, "-b")]
				if e.role == "none" {
					want = http.StatusUnauthorized
				}
				if want == 0 {
					continue
				}
				t.Run(c.name, func(t *testing.T) {
					var body json.RawMessage
					status, err := e.c.Do(ctx, c.req(e), &body)
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

	// A store asking about another site's locker gets exactly what it gets
	// for a locker that does not exist.
	t.Run("store/OtherSiteLockerLooksAbsent", func(t *testing.T) {
		for _, path := range []string{"", "/health", "/events", "/commands/" + cmdB} {
			_, errOther := storeA.Do(ctx, get("/v1/lockers/"+lockersB[0]+path), nil)
			_, errNone := storeA.Do(ctx, get("/v1/lockers/lk-does-not-exist"+path), nil)
			var po, pn *client.Error
			if !errors.As(errOther, &po) || !errors.As(errNone, &pn) || *po != *pn {
				t.Errorf("%s: other site's locker: %v; no such locker: %v", path, errOther, errNone)
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
