package postgres_test

import (
	"context"
	"errors"
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
