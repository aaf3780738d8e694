package postgres

import (
	"context"
	"fmt"
	"time"
)

// historyTables are what PruneHistory deletes: per table, one statement
// that deletes up to $2 rows keyed at or after the cursor $3 and before
// the cutoff $1, in key order through the key's btree (so no batch reads
// what an earlier one deleted), and returns how many it deleted and the
// last key. None of it is live state: open alerts, pending or sent
// commands and pending deliveries are passed over. A delivery's attempts
// go in the statement that deletes it (its foreign key is checked at the
// statement's end).
var historyTables = []struct{ name, sql string }{
	{"presence_log", `WITH d AS (DELETE FROM presence_log WHERE ctid = ANY (ARRAY(
			SELECT ctid FROM presence_log WHERE ts >= $3 AND ts < $1 ORDER BY ts LIMIT $2)) RETURNING ts)
		SELECT count(*), max(ts) FROM d`},
	{"alerts", `WITH d AS (DELETE FROM alerts WHERE id = ANY (ARRAY(
			SELECT id FROM alerts WHERE cleared_at >= $3 AND cleared_at < $1 ORDER BY cleared_at LIMIT $2)) RETURNING cleared_at)
		SELECT count(*), max(cleared_at) FROM d`},
	{"commands", `WITH d AS (DELETE FROM commands WHERE id = ANY (ARRAY(
			SELECT id FROM commands WHERE created_at >= $3 AND created_at < $1 AND status NOT IN ('pending', 'sent')
			ORDER BY created_at LIMIT $2)) RETURNING created_at)
		SELECT count(*), max(created_at) FROM d`},
	{"webhook_deliveries", `WITH s AS (SELECT seq, created_at FROM webhook_deliveries
			WHERE created_at >= $3 AND created_at < $1 AND state <> 'pending' ORDER BY created_at LIMIT $2),
		a AS (DELETE FROM webhook_attempts WHERE delivery_seq IN (SELECT seq FROM s)),
		d AS (DELETE FROM webhook_deliveries WHERE seq IN (SELECT seq FROM s) RETURNING created_at)
		SELECT count(*), max(created_at) FROM d`},
	{"claim_uses", `WITH d AS (DELETE FROM claim_uses WHERE ctid = ANY (ARRAY(
			SELECT ctid FROM claim_uses WHERE ts >= $3 AND ts < $1 ORDER BY ts LIMIT $2)) RETURNING ts)
		SELECT count(*), max(ts) FROM d`},
	{"idempotency", `WITH d AS (DELETE FROM idempotency WHERE (actor, key) IN (
			SELECT actor, key FROM idempotency WHERE created_at >= $3 AND created_at < $1 ORDER BY created_at LIMIT $2) RETURNING created_at)
		SELECT count(*), max(created_at) FROM d`},
}

// PruneHistoryBatch is how many rows one statement of PruneHistory deletes:
// small enough that no statement holds its locks or its WAL for long.
const PruneHistoryBatch = 5000

// pruneLock is the session advisory lock that lets one instance at a time
// prune (several instances may share the database).
const pruneLock = 0x4c475052554e45 // "LGPRUNE"

// PruneHistory deletes history older than cutoff that day partitions do
// not cover: presence changes, cleared alerts, finished commands, settled
// webhook deliveries (with their attempts), claim uses (provisioning
// requests) and Idempotency-Key answers.
// Pickups, credentials, the audit log, rollouts and firmware are kept. It
// deletes in batches, for at most budget (a backlog of years is taken on
// pass by pass), and not at all while another instance prunes (busy). It
// returns the rows deleted per table.
func (db *DB) PruneHistory(ctx context.Context, cutoff time.Time, budget time.Duration) (n map[string]int64, busy bool, err error) {
	conn, err := db.pool.Acquire(ctx)
	if err != nil {
		return nil, false, err
	}
	defer conn.Release()
	var locked bool
	if err := conn.QueryRow(ctx, `SELECT pg_try_advisory_lock($1)`, int64(pruneLock)).Scan(&locked); err != nil {
		return nil, false, err
	}
	if !locked {
		return nil, true, nil
	}
	defer conn.Exec(context.WithoutCancel(ctx), `SELECT pg_advisory_unlock($1)`, int64(pruneLock))
	n = map[string]int64{}
	for _, t := range historyTables {
		// Each table its share of the budget, so a long backlog in one
		// does not hold up the others.
		deadline := time.Now().Add(budget / time.Duration(len(historyTables)))
		from := time.Time{} // before every row
		for time.Now().Before(deadline) {
			var k int64
			var last *time.Time
			if err := conn.QueryRow(ctx, t.sql, cutoff, PruneHistoryBatch, from).Scan(&k, &last); err != nil {
				return n, false, fmt.Errorf("prune %s: %w", t.name, err)
			}
			n[t.name] += k
			if k < PruneHistoryBatch || last == nil {
				break
			}
			from = *last
		}
	}
	return n, false, nil
}
