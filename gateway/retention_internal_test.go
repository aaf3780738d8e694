package gateway

import (
	"context"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/lockergate/lockergate/internal/pgtest"
	"github.com/lockergate/lockergate/internal/testtool"
	"github.com/lockergate/lockergate/postgres"
)

// TestPruneHistoryWiring: the hourly pass prunes by HistoryRetentionDays
// and logs what it deleted; a negative setting keeps everything.
func TestPruneHistoryWiring(t *testing.T) {
	ctx := context.Background()
	db, err := postgres.Open(ctx, postgres.Options{DSN: pgtest.NewDB(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(db.Close)
	if _, err := db.Pool().Exec(ctx, `INSERT INTO presence_log (device_id, ts, online) VALUES
		('lk-1', now() - interval '40 days', true), ('lk-1', now() - interval '20 days', false)`); err != nil {
		t.Fatal(err)
	}
	var logs testtool.LockedBuffer
	g := &Gateway{db: db, log: slog.New(slog.NewTextHandler(&logs, nil))}
	count := func() int {
		var n int
		if err := db.Pool().QueryRow(ctx, `SELECT count(*) FROM presence_log`).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	g.opts.HistoryRetentionDays = -1
	if err := g.pruneHistory(ctx); err != nil || count() != 2 {
		t.Fatalf("kept forever: %v, %d rows left, want 2", err, count())
	}
	g.opts.HistoryRetentionDays = 30
	if err := g.pruneHistory(ctx); err != nil || count() != 1 {
		t.Fatalf("30 days: %v, %d rows left, want 1", err, count())
	}
	if !strings.Contains(logs.String(), "history retention pruned rows") || !strings.Contains(logs.String(), "presence_log=1") {
		t.Fatalf("log %q, want the rows pruned per table", logs.String())
	}
	// A pass that cannot reach the database says so (the hourly loop logs
	// it and tries at the next hour).
	db.Close()
	if err := g.pruneHistory(ctx); err == nil {
		t.Fatal("a pass on a closed database reported no error")
	}
}

// TestWipeReplaySecretsWiring: the hourly pass wipes the sealed secrets
// of Idempotency-Key answers past fleet.ReplaySecretsFor and logs how many.
func TestWipeReplaySecretsWiring(t *testing.T) {
	ctx := context.Background()
	db, err := postgres.Open(ctx, postgres.Options{DSN: pgtest.NewDB(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(db.Close)
	if _, err := db.Pool().Exec(ctx, `INSERT INTO idempotency (actor, key, route, body_hash, status, response, sealed, created_at) VALUES
		('t-1', 'old', 'POST /v1/tokens', '', 201, '{}', 'box', now() - interval '25 hours'),
		('t-1', 'young', 'POST /v1/tokens', '', 201, '{}', 'box', now())`); err != nil {
		t.Fatal(err)
	}
	var logs testtool.LockedBuffer
	g := &Gateway{db: db, log: slog.New(slog.NewTextHandler(&logs, nil))}
	g.wipeReplaySecrets(ctx)
	var left []string
	rows, err := db.Pool().Query(ctx, `SELECT key FROM idempotency WHERE sealed IS NOT NULL`)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var k string
		if err := rows.Scan(&k); err != nil {
			t.Fatal(err)
		}
		left = append(left, k)
	}
	if rows.Err() != nil || len(left) != 1 || left[0] != "young" {
		t.Fatalf("sealed answers left %v (%v), want [young]", left, rows.Err())
	}
	if !strings.Contains(logs.String(), "answers=1") {
		t.Fatalf("log %q, want the answers wiped counted", logs.String())
	}
	db.Close()
	g.wipeReplaySecrets(ctx)
	if !strings.Contains(logs.String(), "level=ERROR") {
		t.Fatalf("a pass on a closed database logged no error: %q", logs.String())
	}
}

// TestPickupSilence: a locker's silence bound for new pickups is its
// staleness (three health intervals: fleet's TestSilentAfter), never
// under two minutes.
func TestPickupSilence(t *testing.T) {
	for _, c := range []struct{ stale, want time.Duration }{
		{3 * time.Minute, 3 * time.Minute},   // the default 60 s interval
		{15 * time.Minute, 15 * time.Minute}, // 300 s
		{3 * time.Second, 2 * time.Minute},   // 1 s
	} {
		if got := pickupSilence(c.stale); got != c.want {
			t.Errorf("stale after %v: %v, want %v", c.stale, got, c.want)
		}
	}
}
