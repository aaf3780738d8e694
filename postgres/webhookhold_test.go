package postgres_test

import (
	"bytes"
	"context"
	"fmt"
	"maps"
	"net/http"
	"net/http/httptest"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/internal/testtool"
	"github.com/lockergate/lockergate/webhook"
)

// TestUnreachableReceiverHoldsItsWebhook: receivers that are down (each
// pickup's events are a delivery of their own) cost one round of attempts,
// after which their webhooks are held: their other deliveries wait rather
// than each taking a worker (for a whole timeout, if it hangs), and an answering
// receiver's events go out meanwhile. Once a receiver answers again, its
// held deliveries go out and the hold is lifted. Real HTTP, real
// PostgreSQL, the real dispatcher.
func TestUnreachableReceiverHoldsItsWebhook(t *testing.T) {
	ctx := context.Background()
	db := MustOpen(t)
	var back atomic.Bool // the dead receivers answer again
	var deadRequests atomic.Int32
	// Down behind their load balancer: 503 at once (a timeout is the same
	// to the hold, unreachable's test; a short client timeout here could
	// also catch the answering receiver on a slow machine).
	dead := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if back.Load() {
			return
		}
		deadRequests.Add(1)
		w.WriteHeader(http.StatusServiceUnavailable)
	}))
	defer dead.Close()
	ok := httptest.NewServer(http.HandlerFunc(func(http.ResponseWriter, *http.Request) {}))
	defer ok.Close()

	d, err := webhook.New(webhook.Options{Store: db, MasterKey: bytes.Repeat([]byte{7}, 32), AllowPrivate: true,
		Workers: 2, PollInterval: 20 * time.Millisecond, BackoffBase: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	// Each webhook its own token (platform), so that perToken does not
	// make them take turns.
	create := func(token, url string) string {
		t.Helper()
		seedWebhooks(t, db, token)
		w := &webhook.Webhook{TokenID: token, Role: "platform", Platform: "speedy", URL: url, Events: []string{"pickup.ready"}}
		if _, err := d.Create(ctx, w); err != nil {
			t.Fatal(err)
		}
		// Ten pickups' events each.
		if _, err := db.Pool().Exec(ctx, `INSERT INTO webhook_deliveries (webhook_id, event_id, type, subject, body, next_attempt, created_at)
			SELECT $1, $1 || '-ev-' || i, 'pickup.ready', 'p-' || i, '{}', now(), now() FROM generate_series(1, 10) AS i`, w.ID); err != nil {
			t.Fatal(err)
		}
		return w.ID
	}
	deadIDs := []string{create("t-a", dead.URL+"/a"), create("t-b", dead.URL+"/b"), create("t-c", dead.URL+"/c")}
	okID := create("t-ok", ok.URL)
	count := func(query string, args ...any) int { t.Helper(); return countOf(t, db, query, args...) }
	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- d.Run(runCtx) }()
	defer func() { cancel(); <-done }()

	testtool.Eventually(t, 20*time.Second, "the answering receiver's ten events delivered", func() error {
		if n := count(`SELECT count(*) FROM webhook_deliveries WHERE webhook_id = $1 AND state = 'delivered'`, okID); n != 10 {
			return fmt.Errorf("%d of 10 delivered", n)
		}
		return nil
	})
	testtool.Eventually(t, 20*time.Second, "the three webhooks of dead receivers held, every attempt recorded", func() error {
		if n := count(`SELECT count(*) FROM webhooks WHERE id = ANY($1) AND held_until > now() AND failing > 0`, deadIDs); n != 3 {
			return fmt.Errorf("%d of 3 held", n)
		}
		// A round's second attempt may still be recording: it ends its
		// lease, and counts in the attempts.
		if n := count(`SELECT count(*) FROM webhook_deliveries WHERE webhook_id = ANY($1) AND leased_until > now()`, deadIDs); n != 0 {
			return fmt.Errorf("%d attempts in flight", n)
		}
		if n, sent := count(`SELECT count(*) FROM webhook_attempts a JOIN webhook_deliveries d ON d.seq = a.delivery_seq
			WHERE d.webhook_id = ANY($1)`, deadIDs), deadRequests.Load(); n != int(sent) {
			return fmt.Errorf("%d attempts recorded of %d sent", n, sent)
		}
		return nil
	})
	// A round of at most two attempts each (perToken), then none: the
	// other eight of each wait, still pending, nothing given up.
	for _, id := range deadIDs {
		if n := count(`SELECT count(*) FROM webhook_attempts a JOIN webhook_deliveries d ON d.seq = a.delivery_seq
			WHERE d.webhook_id = $1`, id); n < 1 || n > 2 {
			t.Errorf("%s: %d attempts, want 1 or 2 before the hold", id, n)
		}
		if n := count(`SELECT count(*) FROM webhook_deliveries WHERE webhook_id = $1 AND state = 'pending'`, id); n != 10 {
			t.Errorf("%s: %d pending, want all 10", id, n)
		}
	}
	if n := deadRequests.Load(); n > 6 {
		t.Errorf("the dead receivers got %d requests, want 6 at most", n)
	}
	if w, _, err := db.GetWebhook(ctx, deadIDs[0]); err != nil || w.HeldUntil == nil || w.Failing < 1 {
		t.Fatalf("a held webhook reads %+v (%v), want failing and held_until", w, err)
	}

	// The receivers answer again; the hold (an hour) and the tried
	// deliveries' own back-off are made to pass.
	back.Store(true)
	for _, q := range []string{`UPDATE webhooks SET held_until = now() WHERE id = ANY($1)`,
		`UPDATE webhook_deliveries SET next_attempt = now() WHERE state = 'pending' AND webhook_id = ANY($1)`} {
		if _, err := db.Pool().Exec(ctx, q, deadIDs); err != nil {
			t.Fatal(err)
		}
	}
	testtool.Eventually(t, 20*time.Second, "the held deliveries delivered once the receivers answer", func() error {
		if n := count(`SELECT count(*) FROM webhook_deliveries WHERE webhook_id = ANY($1) AND state = 'delivered'`, deadIDs); n != 30 {
			return fmt.Errorf("%d of 30 delivered", n)
		}
		return nil
	})
	if n := count(`SELECT count(*) FROM webhooks WHERE id = ANY($1) AND (failing > 0 OR held_until > '-infinity')`, deadIDs); n != 0 {
		t.Fatalf("%d webhooks still failing or held after their receivers answered", n)
	}
}

// TestWebhookHoldGivesUpWhatIsOutOfTime: an attempt that holds its webhook
// gives up the webhook's pending deliveries whose time ran out (not the
// young ones, nor one leased right now), since none would be tried again
// in time; a late outcome of a settled delivery changes nothing; the hold
// doubles with the failures in a row as the store counts them, so that a
// failure recorded after a success holds briefly; a shorter hold does not
// shorten a longer one; an answered attempt lifts the hold.
func TestWebhookHoldGivesUpWhatIsOutOfTime(t *testing.T) {
	ctx := context.Background()
	db := MustOpen(t)
	now := time.Now().UTC().Truncate(time.Microsecond)
	seedWebhooks(t, db, "t-1", "wh-1")
	seqs := map[string]int64{}
	for _, d := range []struct {
		event string
		age   time.Duration
		lease time.Duration
	}{{"tried", 26 * time.Hour, time.Minute}, {"old", 26 * time.Hour, 0}, {"old-leased", 26 * time.Hour, time.Minute},
		{"young", time.Hour, 0}, {"young-2", time.Hour, 0}, {"young-3", time.Hour, 0}} {
		var seq int64
		if err := db.Pool().QueryRow(ctx, `INSERT INTO webhook_deliveries (webhook_id, event_id, type, subject, body, next_attempt, created_at, leased_until)
			VALUES ('wh-1', $1, 'pickup.ready', $1, '{}', $2, $2, CASE WHEN $3 THEN $4::timestamptz ELSE '-infinity' END) RETURNING seq`,
			d.event, now.Add(-d.age), d.lease > 0, now.Add(d.lease)).Scan(&seq); err != nil {
			t.Fatal(err)
		}
		seqs[d.event] = seq
	}
	states := func() map[string]string {
		t.Helper()
		rows, err := db.Pool().Query(ctx, `SELECT event_id, state FROM webhook_deliveries`)
		if err != nil {
			t.Fatal(err)
		}
		defer rows.Close()
		out := map[string]string{}
		for rows.Next() {
			var e, s string
			if err := rows.Scan(&e, &s); err != nil {
				t.Fatal(err)
			}
			out[e] = s
		}
		return out
	}
	// held returns the webhook's failures in a row and how far past now
	// it is held (0: not held).
	held := func() (int, time.Duration) {
		t.Helper()
		w, _, err := db.GetWebhook(ctx, "wh-1")
		if err != nil {
			t.Fatal(err)
		}
		if w.HeldUntil == nil {
			return w.Failing, 0
		}
		return w.Failing, w.HeldUntil.Sub(now)
	}
	within := func(what string, got, lo, hi time.Duration) {
		t.Helper()
		if got < lo || got > hi {
			t.Fatalf("%s: held %v past the attempt, want %v to %v", what, got, lo, hi)
		}
	}
	hold := func(base time.Duration, giveUpBefore time.Time) *webhook.Hold {
		return &webhook.Hold{Base: base, Max: 4 * time.Hour, GiveUpBefore: giveUpBefore}
	}
	// record records o for the delivery of event and wants wantGaveUp of
	// the webhook's pending deliveries given up by its hold.
	record := func(event string, o webhook.Outcome, wantGaveUp int) {
		t.Helper()
		gaveUp, err := db.RecordAttempt(ctx, seqs[event], o)
		if err != nil {
			t.Fatal(err)
		}
		if gaveUp != wantGaveUp {
			t.Fatalf("recording %s's attempt: its hold gave up %d deliveries, want %d", event, gaveUp, wantGaveUp)
		}
	}
	unavailable := 503
	record("tried", webhook.Outcome{At: now, Status: &unavailable, Error: "receiver answered 503",
		Hold: hold(time.Hour, now.Add(-25*time.Hour))}, 1) // "old"; "tried" gives up itself
	want := map[string]string{"tried": "failed", "old": "failed", "old-leased": "pending", "young": "pending", "young-2": "pending", "young-3": "pending"}
	if got := states(); !maps.Equal(got, want) {
		t.Fatalf("states %v, want %v", got, want)
	}
	failing, until := held()
	if failing != 1 {
		t.Fatalf("failing %d, want 1", failing)
	}
	within("the first failure", until, 30*time.Minute, time.Hour)
	heldNow := func() int {
		t.Helper()
		b, err := db.Backlog(ctx, now)
		if err != nil {
			t.Fatal(err)
		}
		return b.Held
	}
	if n := heldNow(); n != 1 {
		t.Fatalf("the backlog counts %d webhooks held, want 1", n)
	}
	// The waiting deliveries wait by their own next attempt too (out of
	// the due deliveries LeaseDue scans).
	if n := countOf(t, db, `SELECT count(*) FROM webhook_deliveries d JOIN webhooks w ON w.id = d.webhook_id
		WHERE d.state = 'pending' AND d.event_id LIKE 'young%' AND d.next_attempt >= w.held_until`); n != 3 {
		t.Fatalf("%d of the 3 young deliveries wait until the hold's end, want all", n)
	}
	// The settled delivery's outcome again, as a copy finishing late.
	record("tried", webhook.Outcome{At: now.Add(time.Second), Error: "timeout", Hold: hold(time.Hour, now.Add(-time.Minute))}, 0)
	if failing, _ := held(); failing != 1 || states()["young"] != "pending" {
		t.Fatalf("a settled delivery's late outcome counted (failing %d) or gave up the young one (%s)", failing, states()["young"])
	}
	// A second failure in a row: twice as long (from the same time here).
	record("old-leased", webhook.Outcome{At: now, Error: "timeout", Next: now.Add(time.Hour),
		Hold: hold(time.Hour, now.Add(-25*time.Hour))}, 1) // itself: asked to retry, out of time for the hold
	failing, until = held()
	if failing != 2 {
		t.Fatalf("failing %d after two failures, want 2", failing)
	}
	within("the second failure", until, time.Hour, 2*time.Hour)
	if s := states()["old-leased"]; s != "failed" {
		t.Fatalf("old-leased, tried once its lease was over and out of time: %s, want failed", s)
	}
	ok := 200
	record("young", webhook.Outcome{At: now, Status: &ok, Delivered: true}, 0)
	if failing, until := held(); failing != 0 || until != 0 {
		t.Fatalf("after an answered attempt: failing %d, held %v; want 0, not held", failing, until)
	}
	if later := countOf(t, db, `SELECT count(*) FROM webhook_deliveries WHERE state = 'pending' AND next_attempt > $1`, now); later != 0 {
		t.Fatalf("%d pending deliveries still wait after the receiver answered, want none", later)
	}
	if n := heldNow(); n != 0 {
		t.Fatalf("the backlog counts %d webhooks held after the receiver answered, want 0", n)
	}
	// A failure recorded after that success (its attempt started before
	// it) counts from the success's 0: a short hold, not the outage's.
	record("young-2", webhook.Outcome{At: now, Error: "timeout", Next: now.Add(time.Minute), Hold: hold(time.Hour, now.Add(-25*time.Hour))}, 0)
	failing, until = held()
	if failing != 1 {
		t.Fatalf("failing %d after a success and a failure, want 1", failing)
	}
	within("a failure after a success", until, 30*time.Minute, time.Hour)
	// A shorter hold does not shorten the one set.
	record("young-3", webhook.Outcome{At: now, Error: "timeout", Next: now.Add(time.Minute), Hold: hold(time.Millisecond, now.Add(-25*time.Hour))}, 0)
	if _, after := held(); after != until {
		t.Fatalf("held %v past the attempt after a shorter hold, want %v as before", after, until)
	}
}

// TestEventForAHeldWebhookWaits: an event queued while its webhook is held
// is not leased until the hold ends; another webhook's copy is at once.
func TestEventForAHeldWebhookWaits(t *testing.T) {
	ctx := context.Background()
	db := MustOpen(t)
	dev := MustDevice(t, db, "s1", "SN-HELD-1", 1)
	if _, err := db.Pool().Exec(ctx, `INSERT INTO tokens (id, hash, role, name) VALUES ('t-op', '\x02', 'operator', 'ops')`); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Pool().Exec(ctx, `INSERT INTO webhooks (id, token_id, role, url, events, secret_enc, held_until) VALUES
			('wh-held', 't-op', 'operator', 'https://held.example/', '{alert.raised}', '\x00', now() + interval '1 hour'),
			('wh-live', 't-op', 'operator', 'https://live.example/', '{alert.raised}', '\x00', '-infinity')`); err != nil {
		t.Fatal(err)
	}
	if raised, err := db.RaiseAlert(ctx, fleet.Alert{DeviceID: dev, Kind: "tamper", RaisedAt: time.Now()}); err != nil || !raised {
		t.Fatalf("raise: %v %v", raised, err)
	}
	leased := func() []string {
		t.Helper()
		ds, err := db.LeaseDue(ctx, time.Now(), time.Millisecond, 16, 2, nil)
		if err != nil {
			t.Fatal(err)
		}
		var ids []string
		for _, d := range ds {
			ids = append(ids, d.WebhookID)
		}
		return ids
	}
	if got := leased(); !slices.Equal(got, []string{"wh-live"}) {
		t.Fatalf("leased %v while wh-held is held, want wh-live's only", got)
	}
	if _, err := db.Pool().Exec(ctx, `UPDATE webhooks SET held_until = '-infinity' WHERE id = 'wh-held'`); err != nil {
		t.Fatal(err)
	}
	if got := leased(); !slices.Contains(got, "wh-held") {
		t.Fatalf("leased %v once wh-held's hold ended, want its delivery", got)
	}
}
