package bench

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/lockergate/lockergate/internal/pgtest"
)

// TestMarkersPollerSession: a poll whose session breaks (its backend is
// ended) fails, and the next one works on a new session, whose backend
// PollerCPU then follows; a marker stored meanwhile is found.
func TestMarkersPollerSession(t *testing.T) {
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, pgtest.NewDB(t))
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	// The columns of the gateway's health table that the poll reads.
	if _, err := pool.Exec(ctx, `CREATE TABLE health (device_id text, received_at timestamptz, seq bigint)`); err != nil {
		t.Fatal(err)
	}
	m, err := NewMarkers(ctx, nil, pool)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	k := markerKey{"lk-1", markerBase + 1}
	m.sent[k] = time.Now()
	if _, err := pool.Exec(ctx, `INSERT INTO health VALUES ($1, now(), $2)`, k.id, k.seq); err != nil {
		t.Fatal(err)
	}
	before := m.PollerCPU()
	if _, err := pool.Exec(ctx, "SELECT pg_terminate_backend($1)", before.PID); err != nil {
		t.Fatal(err)
	}
	if err := m.pollOnce(ctx, []string{k.id}); err == nil {
		t.Fatal("a poll on a terminated session succeeded")
	}
	if err := m.pollOnce(ctx, []string{k.id}); err != nil {
		t.Fatalf("the poll after: %v", err)
	}
	if len(m.lags) != 1 || len(m.sent) != 0 {
		t.Fatalf("%d lags, %d outstanding; want the marker found", len(m.lags), len(m.sent))
	}
	if after := m.PollerCPU(); !after.OK || after.PID == before.PID {
		t.Fatalf("poller backend %+v after %+v: want a new, readable one", after, before)
	}
}
