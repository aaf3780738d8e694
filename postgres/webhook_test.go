package postgres_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/lockergate/lockergate/postgres"
	"github.com/lockergate/lockergate/webhook"
)

// seedWebhooks adds platform token (speedy), unless it exists, and its
// webhooks ids, of pickup.ready, at https://{id}.example/ (never called),
// straight into the tables.
func seedWebhooks(tb testing.TB, db *postgres.DB, token string, ids ...string) {
	tb.Helper()
	ctx := context.Background()
	if _, err := db.Pool().Exec(ctx, `INSERT INTO tokens (id, hash, role, name) VALUES ($1, decode(md5($1), 'hex'), 'platform', 'speedy')
		ON CONFLICT DO NOTHING`, token); err != nil {
		tb.Fatal(err)
	}
	for _, id := range ids {
		if _, err := db.Pool().Exec(ctx, `INSERT INTO webhooks (id, token_id, role, platform, url, events, secret_enc)
			VALUES ($1, $2, 'platform', 'speedy', 'https://' || $1 || '.example/', '{pickup.ready}', '\x00')`, id, token); err != nil {
			tb.Fatal(err)
		}
	}
}

// TestWebhookLeases: a lease takes at most perToken deliveries of one
// token's webhooks (receivers that hang, however many webhooks the token
// made for them, do not take every worker), the oldest pending one per
// pickup, each with its token; what is leased is not leased again until
// the lease ends; and an attempt recorded after the delivery was settled
// (a copy sent under an expired lease, finishing late) changes nothing.
func TestWebhookLeases(t *testing.T) {
	ctx := context.Background()
	db := MustOpen(t)
	now := time.Now().UTC().Truncate(time.Microsecond)
	seedWebhooks(t, db, "t-slow", "wh-slow", "wh-slow2")
	seedWebhooks(t, db, "t-ok", "wh-ok")
	// t-slow: four pickups, the first with two events, over two webhooks;
	// t-ok: one.
	for i, d := range []struct{ webhook, subject string }{
		{"wh-slow", "p-1"}, {"wh-slow", "p-1"}, {"wh-slow", "p-2"}, {"wh-slow2", "p-3"}, {"wh-slow2", "p-4"}, {"wh-ok", "p-9"},
	} {
		if _, err := db.Pool().Exec(ctx, `INSERT INTO webhook_deliveries (webhook_id, event_id, type, subject, body, next_attempt, created_at)
			VALUES ($1, $2, 'pickup.ready', $3, '{}', $4, $4)`, d.webhook, fmt.Sprintf("ev-%d", i), d.subject, now); err != nil {
			t.Fatal(err)
		}
	}
	lease := func(at time.Time, busy ...string) []string {
		t.Helper()
		ds, err := db.LeaseDue(ctx, at, time.Minute, 16, 2, busy)
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for _, d := range ds {
			if want := map[string]string{"wh-slow": "t-slow", "wh-slow2": "t-slow", "wh-ok": "t-ok"}[d.WebhookID]; d.TokenID != want {
				t.Errorf("%s leased with token %q, want %q", d.EventID, d.TokenID, want)
			}
			got = append(got, d.WebhookID+"/"+d.Subject+"/"+d.EventID)
		}
		slices.Sort(got)
		return got
	}
	first := lease(now)
	if want := []string{"wh-ok/p-9/ev-5", "wh-slow/p-1/ev-0", "wh-slow/p-2/ev-2"}; !slices.Equal(first, want) {
		t.Fatalf("leased %v, want %v", first, want)
	}
	if got := lease(now.Add(time.Second)); len(got) != 2 || got[0] != "wh-slow2/p-3/ev-3" || got[1] != "wh-slow2/p-4/ev-4" {
		t.Fatalf("leased next %v, want the other two of t-slow's pickups, and nothing leased already", got)
	}
	if got := lease(now.Add(2 * time.Second)); len(got) != 0 {
		t.Fatalf("leased while every due delivery is leased: %v", got)
	}
	// Leases past: a token whose webhooks the caller is still sending to
	// is left out.
	if got := lease(now.Add(2*time.Minute), "t-slow"); !slices.Equal(got, []string{"wh-ok/p-9/ev-5"}) {
		t.Fatalf("leased with t-slow busy: %v, want wh-ok's only", got)
	}

	var seq int64
	if err := db.Pool().QueryRow(ctx, `SELECT seq FROM webhook_deliveries WHERE event_id = 'ev-5'`).Scan(&seq); err != nil {
		t.Fatal(err)
	}
	ok, failed := 200, 500
	// Recorded twice (a retry after a commit whose answer was lost): one attempt.
	for range 2 {
		if _, err := db.RecordAttempt(ctx, seq, webhook.Outcome{At: now, Status: &ok, Delivered: true}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := db.RecordAttempt(ctx, seq, webhook.Outcome{At: now.Add(time.Second), Status: &failed, Error: "receiver answered 500",
		Next: now.Add(time.Minute)}); err != nil {
		t.Fatal(err)
	}
	var state string
	var attempts int
	if err := db.Pool().QueryRow(ctx, `SELECT state, (SELECT count(*) FROM webhook_attempts WHERE delivery_seq = $1)
		FROM webhook_deliveries WHERE seq = $1`, seq).Scan(&state, &attempts); err != nil {
		t.Fatal(err)
	}
	if state != "delivered" || attempts != 2 {
		t.Fatalf("after a late failed copy: %s with %d attempts logged, want delivered with 2", state, attempts)
	}
}

// TestWebhookCapConcurrent: creates racing for one token stop at the
// limit, whichever connections they run on.
func TestWebhookCapConcurrent(t *testing.T) {
	ctx := context.Background()
	db := MustOpen(t)
	if _, err := db.Pool().Exec(ctx, `INSERT INTO tokens (id, hash, role, name) VALUES ('t-1', '\x01', 'platform', 'speedy')`); err != nil {
		t.Fatal(err)
	}
	const limit, tries = 5, 24
	errs := make(chan error, tries)
	start := make(chan struct{})
	for i := range tries {
		go func() {
			<-start
			w := &webhook.Webhook{ID: fmt.Sprintf("wh-%d", i), TokenID: "t-1", Role: "platform", Platform: "speedy",
				URL: "https://hooks.example/", Events: []string{"pickup.ready"}}
			errs <- db.CreateWebhook(ctx, w, []byte{0}, limit)
		}()
	}
	close(start)
	created := 0
	for range tries {
		switch err := <-errs; {
		case err == nil:
			created++
		case !errors.Is(err, webhook.ErrTooMany):
			t.Errorf("create: %v, want nil or ErrTooMany", err)
		}
	}
	if created != limit {
		t.Fatalf("%d webhooks created, want %d", created, limit)
	}
	ws, err := db.ListWebhooks(ctx, "t-1", "", 100)
	if err != nil || len(ws) != limit {
		t.Fatalf("listed %d (%v), want %d", len(ws), err, limit)
	}
	// A deleted one frees its place.
	if err := db.DeleteWebhook(ctx, ws[0].ID); err != nil {
		t.Fatal(err)
	}
	if err := db.CreateWebhook(ctx, &webhook.Webhook{ID: "wh-again", TokenID: "t-1", Role: "platform", Platform: "speedy",
		URL: "https://hooks.example/", Events: []string{"pickup.ready"}}, []byte{0}, limit); err != nil {
		t.Fatalf("after a delete: %v", err)
	}
}
