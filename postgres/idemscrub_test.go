package postgres_test

import (
	"context"
	"encoding/json"
	"os"
	"testing"
)

// TestMigrationScrubsReplaySecrets: migration 036 takes the secrets out of
// Idempotency-Key answers stored in clear by earlier releases (a combined
// code and QR, a token, a webhook's secret), and leaves every other answer
// as it was: other routes', sealed ones', and one that is not JSON.
func TestMigrationScrubsReplaySecrets(t *testing.T) {
	ctx := context.Background()
	sql, err := os.ReadFile("migrations/036_idempotency_scrub.sql")
	if err != nil {
		t.Fatal(err)
	}
	db := MustOpen(t)
	rows := []struct {
		key, route, response string
		sealed               []byte
		want                 map[string]any // nil: the response unchanged
	}{
		{"cred", "POST /v1/credentials", `{"id":"k-1","code":"17058439","qr":"lgq_x","compartments":[1,2]}` + "\n", nil,
			map[string]any{"id": "k-1", "compartments": []any{1.0, 2.0}}},
		{"tok", "POST /v1/tokens", `{"id":"t-1","token":"lgt_secret","role":"store"}`, nil, map[string]any{"id": "t-1", "role": "store"}},
		{"claim", "POST /v1/claims", `{"id":"cl-1","token":"lgc_secret"}`, nil, map[string]any{"id": "cl-1"}},
		{"hook", "POST /v1/webhooks", `{"id":"w-1","secret":"whsec","token":"t-1"}`, nil, map[string]any{"id": "w-1", "token": "t-1"}},
		{"sealed", "POST /v1/credentials", `{"id":"k-2"}`, []byte{1, 2, 3}, nil},
		{"pickup", "POST /v1/pickups", `{"id":"p-1","code":"kept: not a secret route"}`, nil, nil},
		{"notjson", "POST /v1/credentials", `code: not json`, nil, nil},
		{"array", "POST /v1/credentials", `["code"]`, nil, nil},
		{"clean", "POST /v1/credentials", `{"id":"k-3"}`, nil, nil},
	}
	for _, r := range rows {
		if _, err := db.Pool().Exec(ctx, `INSERT INTO idempotency (actor, key, route, body_hash, status, response, sealed)
			VALUES ('store:s1', $1, $2, '\x00', 201, $3, $4)`, r.key, r.route, []byte(r.response), r.sealed); err != nil {
			t.Fatal(err)
		}
	}
	for range 2 { // as a migration runs once, and again harmlessly
		if _, err := db.Pool().Exec(ctx, string(sql)); err != nil {
			t.Fatal(err)
		}
	}
	for _, r := range rows {
		var got []byte
		if err := db.Pool().QueryRow(ctx, `SELECT response FROM idempotency WHERE actor = 'store:s1' AND key = $1`, r.key).Scan(&got); err != nil {
			t.Fatal(err)
		}
		if r.want == nil {
			if string(got) != r.response {
				t.Errorf("%s: response %q, want it unchanged %q", r.key, got, r.response)
			}
			continue
		}
		var m map[string]any
		if err := json.Unmarshal(got, &m); err != nil {
			t.Fatalf("%s: %q: %v", r.key, got, err)
		}
		if b1, b2 := mustJSON(t, m), mustJSON(t, r.want); b1 != b2 {
			t.Errorf("%s: response %s, want %s", r.key, b1, b2)
		}
	}
}

func mustJSON(t *testing.T, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
