package httpapi

import (
	"bytes"
	"errors"
	"log/slog"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/lockergate/lockergate/fleet"
)

// TestTokenUseRecorded: a token checked in the database has its use
// recorded unless the recorded one is under a minute old; a failure to
// record it is logged and the request still answered.
func TestTokenUseRecorded(t *testing.T) {
	recent := time.Now().Add(-30 * time.Second)
	old := time.Now().Add(-2 * time.Minute)
	defer func(saved map[string]*fleet.Token) { testTokens = saved }(testTokens)
	testTokens = map[string]*fleet.Token{
		"never":  {ID: "t-never", Role: fleet.RoleAdmin, Name: "never"},
		"recent": {ID: "t-recent", Role: fleet.RoleAdmin, Name: "recent", LastUsedAt: &recent},
		"old":    {ID: "t-old", Role: fleet.RoleAdmin, Name: "old", LastUsedAt: &old},
	}
	st := &fakeStore{sites: []fleet.Site{{ID: "a"}}}
	s := New(Options{Store: st, Logger: slog.New(slog.DiscardHandler)})
	for _, secret := range []string{"never", "recent", "old", "never"} {
		if a := call(t, s, "GET", "/v1/sites/a", secret); a.status != http.StatusOK {
			t.Fatalf("GET with %s: %d %s", secret, a.status, a.raw)
		}
	}
	// The second "never" was answered from the cache: no check, no write.
	if want := []string{"t-never", "t-old"}; !slices.Equal(st.used, want) {
		t.Errorf("uses recorded for %v, want %v", st.used, want)
	}
	// Checked in the database again, "old" still reads as used two minutes
	// ago (as it would with this gateway's clock ahead of the database's):
	// this instance wrote it a moment ago, and does not again.
	s.tokens.reset()
	if a := call(t, s, "GET", "/v1/sites/a", "old"); a.status != http.StatusOK {
		t.Fatalf("GET with old again: %d %s", a.status, a.raw)
	}
	if want := []string{"t-never", "t-old"}; !slices.Equal(st.used, want) {
		t.Errorf("after a second check of old: uses recorded for %v, want %v", st.used, want)
	}

	var logs bytes.Buffer
	st = &fakeStore{sites: []fleet.Site{{ID: "a"}}, usedErr: errors.New("read-only transaction")}
	s = New(Options{Store: st, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	if a := call(t, s, "GET", "/v1/sites/a", "old"); a.status != http.StatusOK {
		t.Fatalf("GET when the use cannot be recorded: %d %s, want 200", a.status, a.raw)
	}
	if !strings.Contains(logs.String(), "could not record a token's use") || !strings.Contains(logs.String(), "t-old") {
		t.Errorf("log %q, want the failed record named", logs.String())
	}
}
