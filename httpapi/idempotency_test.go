package httpapi

import (
	"bytes"
	"context"
	"crypto/sha256"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/lockergate/lockergate/fleet"
)

// The Idempotency-Key answers that depend on timing between two requests,
// against a fake store that holds the claim state a test sets. The gateway
// tests cover the same header against PostgreSQL (replay, another body,
// concurrent first requests).

// idemStore answers ClaimIdempotent and GetIdempotent from its fields and
// counts what the create handler would have done.
type idemStore struct {
	fakeStore
	claimed  bool              // ClaimIdempotent's answer
	prev     *fleet.Idempotent // GetIdempotent's answer; nil: ErrNotFound
	created  int               // CreateSite calls
	released int               // ReleaseIdempotent calls
	finished map[string]int    // FinishIdempotent statuses by key
}

func (f *idemStore) ClaimIdempotent(context.Context, string, string, string, []byte) (bool, error) {
	return f.claimed, nil
}

func (f *idemStore) GetIdempotent(context.Context, string, string) (*fleet.Idempotent, error) {
	if f.prev == nil {
		return nil, fleet.ErrNotFound
	}
	return f.prev, nil
}

func (f *idemStore) CreateSite(context.Context, *fleet.Site) error {
	f.created++
	return nil
}

func (f *idemStore) Audit(context.Context, fleet.AuditEntry) error { return nil }

func (f *idemStore) ReleaseIdempotent(context.Context, string, string) error {
	f.released++
	return nil
}

func (f *idemStore) FinishIdempotent(_ context.Context, _, key string, status int, _, _ []byte) error {
	if f.finished == nil {
		f.finished = map[string]int{}
	}
	f.finished[key] = status
	return nil
}

func postSite(t *testing.T, s *Server, key, body string) *httptest.ResponseRecorder {
	t.Helper()
	req := httptest.NewRequest("POST", "/v1/sites", strings.NewReader(body))
	req.Header.Set("Authorization", "Bearer admin")
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Idempotency-Key", key)
	w := httptest.NewRecorder()
	s.ServeHTTP(w, req)
	return w
}

func TestIdempotencyKeyRaces(t *testing.T) {
	const body = `{"id":"s1"}`
	sum := sha256.Sum256([]byte(body))
	// Another request holds the key: this one is told to retry and runs
	// nothing, whether the other is still running or has just failed and
	// released the key between this request's claim and its read.
	for _, tc := range []struct {
		name string
		prev *fleet.Idempotent
		want string
	}{
		{"ClaimReleasedBeforeTheRead", nil, "just ended"},
		{"FirstStillRunning", &fleet.Idempotent{Route: "POST /v1/sites", BodyHash: sum[:]}, "in progress"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st := &idemStore{claimed: false, prev: tc.prev}
			w := postSite(t, New(Options{Store: st}), "k1", body)
			if w.Code != http.StatusConflict || w.Header().Get("Retry-After") != "1" || !strings.Contains(w.Body.String(), tc.want) {
				t.Fatalf("got %d Retry-After %q %s; want 409, Retry-After 1, %q", w.Code, w.Header().Get("Retry-After"), w.Body, tc.want)
			}
			if st.created != 0 || st.released != 0 {
				t.Errorf("created %d, released %d; want neither (the claim is not ours)", st.created, st.released)
			}
		})
	}
	// A key claimed before bodies were compared by value holds the hash
	// of the body as written: the same bytes are still the same request.
	t.Run("KeyFromBeforeBodiesByValue", func(t *testing.T) {
		const spaced = `{ "id": "s1" }`
		raw := sha256.Sum256([]byte(spaced))
		prev := &fleet.Idempotent{Route: "POST /v1/sites", BodyHash: raw[:], Status: http.StatusCreated, Response: []byte(`{"id":"s1"}`)}
		st := &idemStore{claimed: false, prev: prev}
		if w := postSite(t, New(Options{Store: st}), "k1", spaced); w.Code != http.StatusCreated || w.Header().Get("Idempotent-Replayed") != "true" {
			t.Fatalf("the same bytes: %d %s, want the first answer replayed", w.Code, w.Body)
		}
		if w := postSite(t, New(Options{Store: st}), "k1", `{"id":"s2"}`); w.Code != http.StatusConflict {
			t.Fatalf("another body: %d %s, want 409", w.Code, w.Body)
		}
		if st.created != 0 {
			t.Errorf("created %d sites, want none", st.created)
		}
	})
	t.Run("FailureReleasesTheClaim", func(t *testing.T) {
		st := &idemStore{claimed: true}
		w := postSite(t, New(Options{Store: st}), "k1", `{"id":"bad id"}`)
		if w.Code != http.StatusBadRequest {
			t.Fatalf("got %d %s, want 400", w.Code, w.Body)
		}
		if st.released != 1 || len(st.finished) != 0 {
			t.Errorf("released %d, finished %v; want the claim released and no answer kept", st.released, st.finished)
		}
	})
}

// Every route with secret fields is an idempotent create (a misspelt
// pattern would store its secrets in clear), and scrubbing removes only
// those fields.
func TestSecretFields(t *testing.T) {
	idem := map[string]bool{}
	for _, rt := range (&Server{}).table() {
		if rt.idempotent && rt.method == "POST" {
			idem[rt.pattern] = true
		}
	}
	for pattern := range secretFields {
		if !idem[pattern] {
			t.Errorf("secretFields names %s, which is not an idempotent POST route", pattern)
		}
	}
	// Every idempotent create is decided: its answer has secrets (listed in
	// secretFields) or it has none (listed here). A new one must be added
	// to one of the two, or its secrets would be stored in clear.
	noSecrets := map[string]bool{"/v1/sites": true, "/v1/lockers/{id}/rotate-codes": true, "/v1/lockers/{id}/commands": true,
		"/v1/pickups": true, "/v1/rollouts": true, "/v1/firmware": true}
	for pattern := range idem {
		if _, listed := secretFields[pattern]; !listed && !noSecrets[pattern] {
			t.Errorf("idempotent route %s: say whether its answer holds secrets (secretFields) or not (this test)", pattern)
		}
	}
	clean, held := splitSecrets([]byte(`{"id":"wh-1","token":"tok-9","secret":"s3cr3t"}`), secretFields["/v1/webhooks"].fields)
	if got := string(clean); strings.Contains(got, "s3cr3t") || !strings.Contains(got, `"token":"tok-9"`) || !strings.Contains(got, `"id":"wh-1"`) {
		t.Errorf("webhook answer scrubbed to %s: want the secret gone, the owner token id and id kept", got)
	}
	// api-v1: tokens (API and claim) are shown once: never in a replay.
	for _, route := range []string{"/v1/tokens", "/v1/claims"} {
		if !secretFields[route].shownOnce {
			t.Errorf("%s: its token would be repeated by a replay; api-v1 shows tokens once", route)
		}
	}
	if string(held) != `{"secret":"s3cr3t"}` {
		t.Errorf("held %s, want the secret alone", held)
	}
	if got := string(restoreSecrets(clean, held)); got != `{"id":"wh-1","secret":"s3cr3t","token":"tok-9"}`+"\n" {
		t.Errorf("restored %s", got)
	}
	if body := `{"id":"c-1","code":"12345678"}`; func() bool { c, h := splitSecrets([]byte(body), nil); return string(c) != body || h != nil }() {
		t.Error("a route without secret fields had its answer changed")
	}
}

// TestReplaySecretsSealedToTheirKey: a replay puts back the secrets sealed
// for its own actor, key and route under its own master key; a box that
// does not open (moved to another row, another master key) gives the
// answer without them, logged, and never a failed request.
func TestReplaySecretsSealedToTheirKey(t *testing.T) {
	const body = `{"id":"s1"}`
	sum := sha256.Sum256([]byte(body))
	master := bytes.Repeat([]byte{7}, 32)
	sealer := newReplaySealer(master)
	held := []byte(`{"secret":"s3cr3t"}`)
	for _, tc := range []struct {
		name       string
		sealed     []byte
		master     []byte
		wantSecret bool
	}{
		{"OwnBox", sealer.seal(held, "t-admin", "k1", "POST /v1/sites"), master, true},
		{"AnotherActorsBox", sealer.seal(held, "t-store", "k1", "POST /v1/sites"), master, false},
		{"AnotherKeysBox", sealer.seal(held, "t-admin", "k2", "POST /v1/sites"), master, false},
		{"AnotherRoutesBox", sealer.seal(held, "t-admin", "k1", "POST /v1/tokens"), master, false},
		{"AnotherMasterKey", sealer.seal(held, "t-admin", "k1", "POST /v1/sites"), bytes.Repeat([]byte{8}, 32), false},
		{"Truncated", []byte{1, 2, 3}, master, false},
		{"NoMasterKey", sealer.seal(held, "t-admin", "k1", "POST /v1/sites"), nil, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			prev := &fleet.Idempotent{Route: "POST /v1/sites", BodyHash: sum[:], Status: http.StatusCreated,
				Response: []byte(`{"id":"s1"}`), Sealed: tc.sealed}
			var logs bytes.Buffer
			s := New(Options{Store: &idemStore{prev: prev}, MasterKey: tc.master, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
			w := postSite(t, s, "k1", body)
			if w.Code != http.StatusCreated || w.Header().Get("Idempotent-Replayed") != "true" {
				t.Fatalf("got %d %s, want the first answer replayed", w.Code, w.Body)
			}
			if got := strings.Contains(w.Body.String(), `"secret":"s3cr3t"`); got != tc.wantSecret || !strings.Contains(w.Body.String(), `"id":"s1"`) {
				t.Fatalf("replayed %s; secret in it: %v, want %v", w.Body, got, tc.wantSecret)
			}
			if warned := strings.Contains(logs.String(), "replayed without its secrets"); warned != (!tc.wantSecret && tc.master != nil) {
				t.Errorf("warning logged %v; log:\n%s", warned, logs.String())
			}
		})
	}
}
