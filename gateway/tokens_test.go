package gateway_test

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/lockergate/lockergate/client"
	"github.com/lockergate/lockergate/devicesim"
	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/pickup"
)

// TestTokenList: GET /v1/tokens lists every token's record page by page,
// never a secret, filtered by role, site and revoked; bad filters are 400s
// and an unknown id a 404; last_used_at is written by a token's first use
// and again once the recorded one is a minute old.
func TestTokenList(t *testing.T) {
	ctx := context.Background()
	tg := MustStart(t)
	newSite(t, tg, "s1")
	newSite(t, tg, "s2")
	front, frontC := tg.MustToken(t, "store", "s1", "front")
	back, _ := tg.MustToken(t, "store", "s2", "back")
	speedy, _ := tg.MustToken(t, "platform", "", "speedy")
	ops, opsC := tg.MustToken(t, "operator", "", "ops")
	if _, err := tg.Admin.Do(ctx, client.Request{Method: "DELETE", Path: "/v1/tokens/" + back}, nil); err != nil {
		t.Fatal(err)
	}

	list := func(t *testing.T, q url.Values) []fleet.Token {
		t.Helper()
		var all []fleet.Token
		q.Set("limit", "2")
		for {
			var raw json.RawMessage
			if err := tg.Admin.Get(ctx, "/v1/tokens", q, &raw); err != nil {
				t.Fatalf("GET /v1/tokens?%s: %v", q.Encode(), err)
			}
			if s := string(raw); strings.Contains(s, "lgt_") || strings.Contains(s, `"hash"`) || strings.Contains(s, `"token"`) {
				t.Fatalf("a token list shows a secret: %s", s)
			}
			var page struct {
				Items []fleet.Token
				Next  string
			}
			if err := json.Unmarshal(raw, &page); err != nil {
				t.Fatal(err)
			}
			all = append(all, page.Items...)
			if page.Next == "" {
				return all
			}
			q.Set("after", page.Next)
		}
	}
	ids := func(ts []fleet.Token) []string {
		var out []string
		for _, tok := range ts {
			out = append(out, tok.ID)
		}
		return out
	}
	all := list(t, url.Values{})
	for _, id := range []string{front, back, speedy, ops} {
		if !slices.Contains(ids(all), id) {
			t.Errorf("GET /v1/tokens: %v without %s", ids(all), id)
		}
	}
	if len(all) != 5 || !slices.IsSortedFunc(all, func(a, b fleet.Token) int { return strings.Compare(a.ID, b.ID) }) {
		t.Errorf("GET /v1/tokens: %v, want the first admin token and the four made here, by id", ids(all))
	}
	for _, tok := range all {
		if revoked := tok.RevokedAt != nil; revoked != (tok.ID == back) {
			t.Errorf("token %s (%s): revoked_at %v", tok.ID, tok.Name, tok.RevokedAt)
		}
		if tok.ID == front && (tok.Role != "store" || tok.Site != "s1" || tok.Name != "front" || tok.CreatedBy != "admin:admin" || tok.CreatedAt.IsZero()) {
			t.Errorf("token front listed as %+v", tok)
		}
	}
	for _, c := range []struct {
		q    url.Values
		want []string
	}{
		{url.Values{"role": {"store"}}, []string{front, back}},
		{url.Values{"role": {"store"}, "revoked": {"false"}}, []string{front}},
		{url.Values{"revoked": {"true"}}, []string{back}},
		{url.Values{"site": {"s1"}}, []string{front}},
		{url.Values{"role": {"platform"}}, []string{speedy}},
		{url.Values{"role": {"broker"}}, nil},
		{url.Values{"name": {"speedy"}}, []string{speedy}},
		{url.Values{"name": {"Speedy"}}, nil}, // names are exact
		{url.Values{"name": {"back"}, "revoked": {"false"}}, nil},
	} {
		want := slices.Clone(c.want)
		slices.Sort(want)
		if got := ids(list(t, c.q)); !slices.Equal(got, want) {
			t.Errorf("GET /v1/tokens?%s: %v, want %v", c.q.Encode(), got, want)
		}
	}
	for _, c := range []struct {
		path   string
		q      url.Values
		status int
		detail string
	}{
		{"/v1/tokens", url.Values{"role": {"owner"}}, http.StatusBadRequest, "role must be"},
		{"/v1/tokens", url.Values{"revoked": {"maybe"}}, http.StatusBadRequest, "revoked must be true or false"},
		{"/v1/tokens", url.Values{"limit": {"1001"}}, http.StatusBadRequest, "limit"},
		{"/v1/tokens/tk-nobody", nil, http.StatusNotFound, ""},
	} {
		status, err := tg.Admin.Do(ctx, client.Request{Method: "GET", Path: c.path, Query: c.q}, nil)
		if status != c.status || err == nil || !strings.Contains(err.Error(), c.detail) {
			t.Errorf("GET %s?%s: %d %v, want %d with %q", c.path, c.q.Encode(), status, err, c.status, c.detail)
		}
	}

	// What the errors say: which record, and what to do.
	if status, err := tg.Admin.Do(ctx, client.Request{Method: "DELETE", Path: "/v1/tokens/" + back}, nil); status != http.StatusNotFound ||
		err == nil || !strings.Contains(err.Error(), "token "+back+" (unknown, or revoked already") {
		t.Errorf("revoking a revoked token: %d %v", status, err)
	}
	if status, err := tg.Admin.Do(ctx, client.Request{Method: "POST", Path: "/v1/sites", Body: map[string]string{"id": "s1"}}, nil); status != http.StatusConflict ||
		err == nil || !strings.Contains(err.Error(), "site s1 exists (GET /v1/sites/s1") {
		t.Errorf("creating a site that exists: %d %v", status, err)
	}

	get := func(id string) fleet.Token {
		t.Helper()
		var tok fleet.Token
		if err := tg.Admin.Get(ctx, "/v1/tokens/"+id, nil, &tok); err != nil {
			t.Fatalf("GET /v1/tokens/%s: %v", id, err)
		}
		return tok
	}
	if tok := get(back); tok.RevokedAt == nil || tok.Name != "back" {
		t.Errorf("a revoked token reads %+v, want it with revoked_at", tok)
	}
	if tok := get(front); tok.LastUsedAt != nil {
		t.Fatalf("an unused token's last_used_at = %v, want none", tok.LastUsedAt)
	}
	// Its first use checks it in the database, which writes the time
	// before the answer.
	before := time.Now().Add(-time.Second)
	if err := frontC.Get(ctx, "/v1/sites/s1", nil, nil); err != nil {
		t.Fatal(err)
	}
	if at := get(front).LastUsedAt; at == nil || at.Before(before) || at.After(time.Now().Add(time.Second)) {
		t.Fatalf("after its first use the token's last_used_at = %v, want about %v", at, before)
	}
	// A use recorded long ago (by another instance, say) is written again
	// by this one's first check of the token.
	if _, err := tg.DB().Pool().Exec(ctx, `UPDATE tokens SET last_used_at = now() - interval '1 hour' WHERE id = $1`, ops); err != nil {
		t.Fatal(err)
	}
	if err := opsC.Get(ctx, "/v1/sites", nil, nil); err != nil {
		t.Fatal(err)
	}
	if at := get(ops).LastUsedAt; at == nil || time.Since(*at) > time.Minute {
		t.Fatalf("a token used an hour ago, used again: last_used_at %v, want about now", at)
	}
}

// TestPlatformTokenSharingAName: a platform token made with the name of a
// live one (a rotation, or a typo of another platform's name) sees that
// platform's pickups and codes; its answer says so (shares_platform), and
// only then: not for a first token, another case, a revoked namesake or
// another role.
func TestPlatformTokenSharingAName(t *testing.T) {
	ctx := context.Background()
	tg := MustStart(t)
	create := func(role, name string) (string, bool) {
		t.Helper()
		var out map[string]any
		if err := tg.Admin.Post(ctx, "/v1/tokens", map[string]any{"role": role, "name": name}, &out); err != nil {
			t.Fatalf("token %s %s: %v", role, name, err)
		}
		shares, _ := out["shares_platform"].(bool)
		return out["id"].(string), shares
	}
	first, shares := create("platform", "speedy")
	if shares {
		t.Fatal("the first speedy token said it shares its platform")
	}
	second, shares := create("platform", "speedy")
	if !shares {
		t.Fatal("a second live speedy token did not say it shares its platform")
	}
	if _, shares := create("platform", "Speedy"); shares {
		t.Fatal("a Speedy token said it shares speedy's platform (names are exact)")
	}
	if _, shares := create("operator", "speedy"); shares {
		t.Fatal("an operator token named speedy said it shares a platform")
	}
	for _, id := range []string{first, second} {
		if _, err := tg.Admin.Do(ctx, client.Request{Method: "DELETE", Path: "/v1/tokens/" + id}, nil); err != nil {
			t.Fatal(err)
		}
	}
	if _, shares := create("platform", "speedy"); shares {
		t.Fatal("a speedy token made after every other was revoked said it shares its platform")
	}
}

// TestPlatformTokenSites: a platform token made with sites makes pickups
// and codes there and nowhere else (403 naming what to do); PATCH
// /v1/tokens/{id} moves it at once, keeping its earlier pickups visible and
// cancellable but giving them no new code outside its sites; [] gives it
// every site. Bad sites and tokens are refused with a clear problem, and
// every change is audited with the sites before and after.
func TestPlatformTokenSites(t *testing.T) {
	ctx := context.Background()
	tg := MustStart(t)
	lockers := map[string]*devicesim.Locker{}
	for _, site := range []string{"s1", "s2"} {
		lockers[site] = MustFleet(t, tg, tg.MustSiteAndClaim(t, site, 1), 1, func(o *devicesim.Options) { o.SerialPrefix = site }).Lockers()[0]
	}
	tg.WaitOnline(t, 2)
	storeID, _ := tg.MustToken(t, "store", "s1", "front")
	gone, _ := tg.MustToken(t, "platform", "", "gone")
	if _, err := tg.Admin.Do(ctx, client.Request{Method: "DELETE", Path: "/v1/tokens/" + gone}, nil); err != nil {
		t.Fatal(err)
	}

	var made struct {
		fleet.Token
		Secret string `json:"token"`
	}
	if err := tg.Admin.Post(ctx, "/v1/tokens", map[string]any{"role": "platform", "name": "speedy", "sites": []string{"s1", "s1"}}, &made); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(made.Sites, []string{"s1"}) {
		t.Fatalf("made with sites [s1 s1]: %v, want [s1]", made.Sites)
	}
	speedy := client.New("http://"+tg.HTTPAddr(), made.Secret)
	refused := func(c *client.Client, req client.Request, status int, says string) {
		t.Helper()
		got, err := c.Do(ctx, req, nil)
		var pe *client.Error
		if got != status || !errors.As(err, &pe) || !strings.Contains(pe.Detail, says) {
			t.Errorf("%s %s %v: %d %v, want %d saying %q", req.Method, req.Path, req.Body, got, err, status, says)
		}
	}
	pickupAt := func(site, ref string) client.Request {
		return client.Request{Method: "POST", Path: "/v1/pickups", Body: map[string]any{"site": site, "order_ref": ref, "size": "S", "zone": "ambient"}}
	}
	create := func(site, ref string) pickup.Pickup {
		t.Helper()
		var p pickup.Pickup
		if _, err := speedy.Do(ctx, pickupAt(site, ref), &p); err != nil {
			t.Fatalf("speedy's pickup %s at %s: %v", ref, site, err)
		}
		return p
	}
	codes := func(p pickup.Pickup) client.Request {
		return client.Request{Method: "POST", Path: "/v1/credentials", Body: map[string]any{"pickups": []string{p.ID}}}
	}
	patch := func(id string, body any) client.Request {
		return client.Request{Method: "PATCH", Path: "/v1/tokens/" + id, Body: body}
	}

	at1 := create("s1", "A-1")
	(&pickupEnv{tg: tg, platform: speedy}).stage(t, lockers["s1"], at1) // ready: codes may be made for it
	refused(speedy, pickupAt("s2", "A-2"), 403, "makes pickups at s1 only, not at s2 (an admin may add the site: PATCH /v1/tokens/"+made.ID)
	if _, err := speedy.Do(ctx, codes(at1), nil); err != nil {
		t.Fatalf("a code for speedy's own pickup at its site: %v", err)
	}

	var now fleet.Token
	if _, err := tg.Admin.Do(ctx, patch(made.ID, map[string]any{"sites": []string{"s2"}}), &now); err != nil || !slices.Equal(now.Sites, []string{"s2"}) {
		t.Fatalf("PATCH sites [s2]: %+v, %v", now, err)
	}
	create("s2", "A-3") // at once: the instance forgets its cached tokens
	refused(speedy, pickupAt("s1", "A-4"), 403, "makes pickups at s2 only, not at s1")
	refused(speedy, pickupAt("nowhere", "A-4"), 403, "not at nowhere") // not even whether it exists
	refused(speedy, codes(at1), 403, "makes codes at s2 only, not at s1 (an admin may add the site: PATCH /v1/tokens/"+made.ID)
	var seen pickup.Pickup
	if err := speedy.Get(ctx, "/v1/pickups/"+at1.ID, nil, &seen); err != nil || seen.ID != at1.ID || seen.Credential == nil || seen.Credential.Code == "" {
		t.Fatalf("speedy's pickup at the site it left: %+v, %v (want it still visible, with its code: sites limit what it makes)", seen, err)
	}
	if err := speedy.Post(ctx, "/v1/pickups/"+at1.ID+"/cancel", nil, nil); err != nil {
		t.Fatalf("cancel speedy's pickup at the site it left: %v", err)
	}

	now = fleet.Token{}
	if _, err := tg.Admin.Do(ctx, patch(made.ID, map[string]any{"sites": []string{}}), &now); err != nil || now.ID != made.ID || now.Sites != nil {
		t.Fatalf("PATCH sites []: %+v, %v", now, err)
	}
	create("s1", "A-5")
	refused(speedy, pickupAt("nowhere", "A-6"), 404, "site nowhere")

	tooMany := make([]string, fleet.MaxTokenSites+1)
	for i := range tooMany {
		tooMany[i] = fmt.Sprintf("s%d", i)
	}
	tokens := client.Request{Method: "POST", Path: "/v1/tokens"}
	with := func(r client.Request, body any) client.Request { r.Body = body; return r }
	for _, c := range []struct {
		req    client.Request
		status int
		says   string
	}{
		{with(tokens, map[string]any{"role": "store", "site": "s1", "name": "x", "sites": []string{"s1"}}), 400, "only a platform token has sites"},
		{with(tokens, map[string]any{"role": "platform", "name": "x", "sites": []string{"s1", "nowhere"}}), 404, "site nowhere"},
		{with(tokens, map[string]any{"role": "platform", "name": "x", "sites": []string{"a b"}}), 400, `"a b" is not a site id`},
		{with(tokens, map[string]any{"role": "platform", "name": "x", "sites": tooMany}), 400, "over the limit of 1000"},
		{with(tokens, map[string]any{"role": "platform", "name": "x", "sites": "s1"}), 400, `"sites"`},
		{patch(made.ID, map[string]any{}), 400, `nothing to change: give "sites"`},
		{patch(made.ID, map[string]any{"sites": nil}), 400, `nothing to change`},
		{patch(made.ID, map[string]any{"sites": []string{"nowhere"}}), 404, "site nowhere"},
		{patch(storeID, map[string]any{"sites": []string{"s1"}}), 400, "only platform tokens have sites"},
		{patch(gone, map[string]any{"sites": []string{"s1"}}), 409, "revoked (make a new one)"},
		{patch("tk-none", map[string]any{"sites": []string{"s1"}}), 404, "token tk-none"},
	} {
		refused(tg.Admin, c.req, c.status, c.says)
	}
	var tok fleet.Token
	if err := tg.Admin.Get(ctx, "/v1/tokens/"+made.ID, nil, &tok); err != nil || tok.Sites != nil {
		t.Fatalf("after the refused changes: %+v, %v; want every site", tok, err)
	}
	defer func() { // after the audit trail is read: kept sorted, without repeats
		now = fleet.Token{}
		if _, err := tg.Admin.Do(ctx, patch(made.ID, map[string]any{"sites": []string{"s2", "s1", "s2"}}), &now); err != nil ||
			!slices.Equal(now.Sites, []string{"s1", "s2"}) {
			t.Errorf("PATCH sites [s2 s1 s2]: %+v, %v; want [s1 s2]", now, err)
		}
	}()

	var audit struct{ Items []fleet.AuditEntry }
	if err := tg.Admin.Get(ctx, "/v1/audit", url.Values{"actor": {"admin:admin"}}, &audit); err != nil {
		t.Fatal(err)
	}
	slices.SortFunc(audit.Items, func(a, b fleet.AuditEntry) int { return cmp.Compare(a.ID, b.ID) })
	var trail []string
	for _, e := range audit.Items {
		if e.Detail["token"] == made.ID {
			trail = append(trail, fmt.Sprintf("%s %v %v", e.Action, e.Detail["sites_before"], e.Detail["sites"]))
		}
	}
	if want := []string{"token.create <nil> [s1]", "token.update [s1] [s2]", "token.update [s2] []"}; !slices.Equal(trail, want) {
		t.Errorf("the token's audit trail:\n%s\nwant\n%s", strings.Join(trail, "\n"), strings.Join(want, "\n"))
	}
}
