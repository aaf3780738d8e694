package postgres_test

import (
	"context"
	"testing"
	"time"

	"github.com/lockergate/lockergate/postgres"
)

// TestPruneHistory: history older than the cutoff goes, in batches; what
// is newer, and old rows that are live state (an open alert, a command not
// yet answered, a delivery still pending, with its attempts), stay.
func TestPruneHistory(t *testing.T) {
	ctx := context.Background()
	db := MustOpen(t)
	dev := MustDevice(t, db, "s1", "SN-RET-1", 1)
	now := time.Now().UTC()
	old, recent, cutoff := now.AddDate(0, 0, -400), now.AddDate(0, 0, -10), now.AddDate(0, 0, -365)
	exec := func(sql string, args ...any) {
		t.Helper()
		if _, err := db.Pool().Exec(ctx, sql, args...); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}
	// More old presence rows than one batch, so that the loop must go on.
	exec(`INSERT INTO presence_log (device_id, ts, online) SELECT $1, $2::timestamptz + g * interval '1 second', g % 2 = 0
		FROM generate_series(1, $3::int) g`, dev, old, postgres.PruneHistoryBatch+7)
	exec(`INSERT INTO presence_log (device_id, ts, online) VALUES ($1, $2, true)`, dev, recent)
	exec(`INSERT INTO alerts (device_id, kind, raised_at, cleared_at) VALUES
		($1, 'tamper', $2, $2), ($1, 'tamper', $2, NULL), ($1, 'tamper', $3, $3)`, dev, old, recent)
	exec(`INSERT INTO commands (id, device_id, type, status, created_at, expires_at) VALUES
		('c-old-ok', $1, 'unlock', 'ok', $2, $2), ('c-old-sent', $1, 'unlock', 'sent', $2, $2), ('c-new', $1, 'unlock', 'ok', $3, $3)`,
		dev, old, recent)
	exec(`INSERT INTO tokens (id, hash, role, name) VALUES ('t-1', '\x01', 'platform', 'speedy')`)
	exec(`INSERT INTO webhooks (id, token_id, role, platform, url, events, secret_enc) VALUES
		('wh-1', 't-1', 'platform', 'speedy', 'https://ok.example/', '{pickup.ready}', '\x00')`)
	for _, d := range []struct {
		seq   int
		state string
		at    time.Time
	}{{1, "delivered", old}, {2, "failed", old}, {3, "pending", old}, {4, "delivered", recent}} {
		exec(`INSERT INTO webhook_deliveries (seq, webhook_id, event_id, type, subject, body, state, next_attempt, created_at)
			VALUES ($1::bigint, 'wh-1', 'ev-' || $1::bigint, 'pickup.ready', 'p-1', '{}', $2, $3, $3)`, d.seq, d.state, d.at)
		exec(`INSERT INTO webhook_attempts (delivery_seq, ts, status, duration_ms) VALUES ($1, $2, 500, 1), ($1, $2, 200, 1)`, d.seq, d.at)
	}
	// Provisioning requests, refused ones too (MustDevice's is recent).
	exec(`INSERT INTO claim_uses (claim_id, ts, serial, outcome) VALUES
		('cl-SN-RET-1', $1, 'SN-X', 'claim_expired'), ('cl-SN-RET-1', $1, 'SN-Y', 'serial_taken'), ('cl-SN-RET-1', $2, 'SN-Z', 'claim_expired')`,
		old, recent)
	exec(`INSERT INTO idempotency (actor, key, route, body_hash, status, response, created_at) VALUES
		('admin:a', 'k-old', 'POST /v1/sites', '\x00', 201, '', $1), ('admin:a', 'k-new', 'POST /v1/sites', '\x00', 201, '', $2)`, old, recent)

	got, busy, err := db.PruneHistory(ctx, cutoff, time.Minute)
	if err != nil || busy {
		t.Fatal(err, busy)
	}
	want := map[string]int64{"presence_log": int64(postgres.PruneHistoryBatch + 7), "alerts": 1, "commands": 1,
		"webhook_deliveries": 2, "claim_uses": 2, "idempotency": 1}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("pruned %d %s, want %d (all: %v)", got[k], k, v, got)
		}
	}
	for sql, want := range map[string]int{
		`SELECT count(*) FROM presence_log`:                                    1,
		`SELECT count(*) FROM alerts WHERE cleared_at IS NULL`:                 1,
		`SELECT count(*) FROM alerts`:                                          2,
		`SELECT count(*) FROM commands WHERE id IN ('c-old-sent', 'c-new')`:    2,
		`SELECT count(*) FROM commands`:                                        2,
		`SELECT count(*) FROM webhook_deliveries WHERE seq IN (3, 4)`:          2,
		`SELECT count(*) FROM webhook_attempts WHERE delivery_seq IN (3, 4)`:   4,
		`SELECT count(*) FROM webhook_attempts`:                                4,
		`SELECT count(*) FROM idempotency WHERE key = 'k-new'`:                 1,
		`SELECT count(*) FROM claim_uses WHERE ts > now() - interval '1 year'`: 2,
		`SELECT count(*) FROM claim_uses`:                                      2,
	} {
		if n := countOf(t, db, sql); n != want {
			t.Errorf("%s: %d, want %d", sql, n, want)
		}
	}
	// Nothing left to prune: a second pass deletes nothing.
	if again, _, err := db.PruneHistory(ctx, cutoff, time.Minute); err != nil {
		t.Fatal(err)
	} else {
		for k, v := range again {
			if v != 0 {
				t.Errorf("second pass pruned %d %s", v, k)
			}
		}
	}
}

// TestPruneHistoryTakesTurns: while another instance prunes (holds the
// lock) a pass does nothing and says so; a pass without budget deletes
// nothing, the next one goes on.
func TestPruneHistoryTakesTurns(t *testing.T) {
	ctx := context.Background()
	db := MustOpen(t)
	dev := MustDevice(t, db, "s1", "SN-RET-2", 1)
	old := time.Now().AddDate(-2, 0, 0)
	if _, err := db.Pool().Exec(ctx, `INSERT INTO presence_log (device_id, ts, online) VALUES ($1, $2, true)`, dev, old); err != nil {
		t.Fatal(err)
	}
	cutoff := time.Now().AddDate(-1, 0, 0)
	other, err := db.Pool().Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := other.Exec(ctx, `SELECT pg_advisory_lock($1)`, int64(postgres.PruneLock)); err != nil {
		t.Fatal(err)
	}
	if n, busy, err := db.PruneHistory(ctx, cutoff, time.Minute); err != nil || !busy || n["presence_log"] != 0 {
		t.Fatalf("while another prunes: %v busy=%v err=%v; want nothing done, busy", n, busy, err)
	}
	if _, err := other.Exec(ctx, `SELECT pg_advisory_unlock($1)`, int64(postgres.PruneLock)); err != nil {
		t.Fatal(err)
	}
	other.Release()
	if n, busy, err := db.PruneHistory(ctx, cutoff, 0); err != nil || busy || n["presence_log"] != 0 {
		t.Fatalf("no budget: %v busy=%v err=%v; want nothing deleted", n, busy, err)
	}
	if n, _, err := db.PruneHistory(ctx, cutoff, time.Minute); err != nil || n["presence_log"] != 1 {
		t.Fatalf("next pass: %v %v; want the old row deleted", n, err)
	}
}
