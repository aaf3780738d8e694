package postgres_test

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/lockergate/lockergate/fleet"
)

// TestTokenUsed: a use is written when none is recorded or the recorded one
// is fleet.TokenUseResolution old; a use within it is not written again; a
// revoked token's record is left as it was.
func TestTokenUsed(t *testing.T) {
	ctx := context.Background()
	db := MustOpen(t)
	for _, tok := range []*fleet.Token{
		{ID: "tk-a", Role: fleet.RoleOperator, Name: "a"},
		{ID: "tk-b", Role: fleet.RoleOperator, Name: "b"},
	} {
		if err := db.CreateToken(ctx, tok, []byte("hash-"+tok.ID)); err != nil {
			t.Fatal(err)
		}
	}
	lastUsed := func(id string) *time.Time {
		t.Helper()
		tok, err := db.GetToken(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		return tok.LastUsedAt
	}
	setLastUsed := func(id, ago string) time.Time {
		t.Helper()
		var at time.Time
		if err := db.Pool().QueryRow(ctx, `UPDATE tokens SET last_used_at = now() - $2::interval WHERE id = $1 RETURNING last_used_at`,
			id, ago).Scan(&at); err != nil {
			t.Fatal(err)
		}
		return at
	}
	used := func(id string) {
		t.Helper()
		if err := db.TokenUsed(ctx, id); err != nil {
			t.Fatal(err)
		}
	}

	if at := lastUsed("tk-a"); at != nil {
		t.Fatalf("a new token's last_used_at = %v, want none", at)
	}
	before := time.Now().Add(-time.Second)
	used("tk-a")
	if at := lastUsed("tk-a"); at == nil || at.Before(before) {
		t.Fatalf("first use: last_used_at = %v, want about now", at)
	}

	recent := setLastUsed("tk-a", "50 seconds")
	used("tk-a")
	if at := lastUsed("tk-a"); at == nil || !at.Equal(recent) {
		t.Fatalf("a use 50 s after the recorded one: last_used_at = %v, want it kept (%v)", at, recent)
	}
	old := setLastUsed("tk-a", "61 seconds")
	used("tk-a")
	if at := lastUsed("tk-a"); at == nil || !at.After(old.Add(time.Minute)) {
		t.Fatalf("a use 61 s after the recorded one: last_used_at = %v, want about now (was %v)", at, old)
	}

	revokedUse := setLastUsed("tk-b", "2 hours")
	if err := db.RevokeToken(ctx, "tk-b"); err != nil {
		t.Fatal(err)
	}
	used("tk-b")
	if at := lastUsed("tk-b"); at == nil || !at.Equal(revokedUse) {
		t.Fatalf("revoked token: last_used_at = %v, want it left (%v)", at, revokedUse)
	}
	if err := db.TokenUsed(ctx, "tk-none"); err != nil {
		t.Fatalf("unknown token: %v, want nothing done and no error", err)
	}
	if _, err := db.GetToken(ctx, "tk-none"); !errors.Is(err, fleet.ErrNotFound) {
		t.Fatalf("GetToken of an unknown id: %v, want ErrNotFound", err)
	}
}

// TestCredsVersions: each existing locker's credential-set version, as
// Retained reads it; an unknown locker is left out.
func TestCredsVersions(t *testing.T) {
	ctx := context.Background()
	db := MustOpen(t)
	seedFleet(t, db, 2)
	if _, err := db.Pool().Exec(ctx, `UPDATE devices SET creds_version = 7 WHERE id = 'lk-2'`); err != nil {
		t.Fatal(err)
	}
	vs, err := db.CredsVersions(ctx, []string{"lk-1", "lk-2", "lk-none"})
	if err != nil {
		t.Fatal(err)
	}
	r, err := db.Retained(ctx, "lk-2")
	if err != nil {
		t.Fatal(err)
	}
	if len(vs) != 2 || vs["lk-2"] != 7 || vs["lk-2"] != r.Creds.Version || vs["lk-1"] == 7 {
		t.Fatalf("versions %v (Retained: %d), want lk-1's and lk-2's 7 only", vs, r.Creds.Version)
	}
}

// TestTokenSites: a platform token is made with sites that exist and gets
// them back as given (the API sorts them: fleet.TokenSites); SetTokenSites replaces them and returns the token before
// and after; an unknown site, an unknown, revoked or non-platform token are
// refused with what to do, changing nothing; ListTokens by site finds the
// platform tokens that list it.
func TestTokenSites(t *testing.T) {
	ctx := context.Background()
	db := MustOpen(t)
	for _, s := range []string{"s1", "s2", "s3"} {
		if err := db.CreateSite(ctx, &fleet.Site{ID: s, Name: s, Timezone: "UTC"}); err != nil {
			t.Fatal(err)
		}
	}
	create := func(tok *fleet.Token) error { return db.CreateToken(ctx, tok, []byte("hash-"+tok.ID)) }
	if err := create(&fleet.Token{ID: "tk-p", Role: fleet.RolePlatform, Name: "p", Sites: []string{"s1", "s2"}}); err != nil {
		t.Fatal(err)
	}
	for _, tok := range []*fleet.Token{
		{ID: "tk-any", Role: fleet.RolePlatform, Name: "any"},
		{ID: "tk-store", Role: fleet.RoleStore, Site: "s1", Name: "front"},
		{ID: "tk-gone", Role: fleet.RolePlatform, Name: "gone"},
	} {
		if err := create(tok); err != nil {
			t.Fatal(err)
		}
	}
	if err := db.RevokeToken(ctx, "tk-gone"); err != nil {
		t.Fatal(err)
	}
	err := create(&fleet.Token{ID: "tk-bad", Role: fleet.RolePlatform, Name: "bad", Sites: []string{"s1", "nowhere", "s2"}})
	if !errors.Is(err, fleet.ErrNotFound) || !strings.Contains(err.Error(), "site nowhere") {
		t.Fatalf("a token with an unknown site: %v, want ErrNotFound naming it", err)
	}
	if _, err := db.GetToken(ctx, "tk-bad"); !errors.Is(err, fleet.ErrNotFound) {
		t.Fatalf("the refused token was stored: %v", err)
	}
	sitesOf := func(id string) []string {
		t.Helper()
		tok, err := db.GetToken(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		return tok.Sites
	}
	if got := sitesOf("tk-p"); !slices.Equal(got, []string{"s1", "s2"}) {
		t.Fatalf("sites = %v, want [s1 s2]", got)
	}
	if got := sitesOf("tk-any"); got != nil {
		t.Fatalf("a token made without sites has %#v, want nil (every site)", got)
	}
	listed := func(site string) []string {
		t.Helper()
		ts, err := db.ListTokens(ctx, fleet.TokenFilter{Site: site})
		if err != nil {
			t.Fatal(err)
		}
		var ids []string
		for _, tok := range ts {
			ids = append(ids, tok.ID)
		}
		return ids
	}
	if got := listed("s1"); !slices.Equal(got, []string{"tk-p", "tk-store"}) {
		t.Fatalf("tokens of site s1: %v, want the platform token that lists it and the store's", got)
	}

	was, now, err := db.SetTokenSites(ctx, "tk-p", []string{"s3"})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(was.Sites, []string{"s1", "s2"}) || !slices.Equal(now.Sites, []string{"s3"}) || now.ID != "tk-p" || now.Name != "p" {
		t.Fatalf("SetTokenSites: was %+v, now %+v", was, now)
	}
	if got := listed("s1"); !slices.Equal(got, []string{"tk-store"}) {
		t.Fatalf("tokens of site s1 after the change: %v, want the store's only", got)
	}
	if _, now, err := db.SetTokenSites(ctx, "tk-p", []string{}); err != nil || now.Sites != nil {
		t.Fatalf("SetTokenSites to every site: %v, %v", now, err)
	}
	if got := sitesOf("tk-p"); got != nil {
		t.Fatalf("sites after []: %v, want none (every site)", got)
	}

	for _, c := range []struct {
		id    string
		sites []string
		want  error
		says  string
	}{
		{"tk-none", []string{"s1"}, fleet.ErrNotFound, "token tk-none"},
		{"tk-gone", []string{"s1"}, fleet.ErrConflict, "revoked"},
		{"tk-store", []string{"s1"}, fleet.ErrInvalid, "only platform tokens"},
		{"tk-any", []string{"s2", "elsewhere"}, fleet.ErrNotFound, "site elsewhere"},
	} {
		if _, _, err := db.SetTokenSites(ctx, c.id, c.sites); !errors.Is(err, c.want) || !strings.Contains(err.Error(), c.says) {
			t.Errorf("SetTokenSites(%s, %v): %v, want %v saying %q", c.id, c.sites, err, c.want, c.says)
		}
	}
	if got := sitesOf("tk-any"); got != nil {
		t.Fatalf("a refused change was stored: %v", got)
	}
	if n := countOf(t, db, `SELECT count(*) FROM tokens WHERE sites <> '{}'`); n != 0 {
		t.Fatalf("tokens with sites: %d, want none", n)
	}
}
