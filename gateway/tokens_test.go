package gateway_test

import (
	"context"
	"encoding/json"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/lockergate/lockergate/client"
	"github.com/lockergate/lockergate/fleet"
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
