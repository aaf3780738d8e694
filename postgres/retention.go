package postgres

import (
	"context"
	"fmt"
	"time"
)

// historyTables are what PruneHistory deletes, in order (a delivery's
// attempts before the delivery): each a statement that deletes up to $2
// rows older than the cutoff $1, none of them live state (an open alert,
// a pending or sent command, a pending delivery).
var historyTables = []struct{ name, sql string }{
	{"presence_log", `DELETE FROM presence_log WHERE ctid = ANY (ARRAY(
		SELECT ctid FROM presence_log WHERE ts < $1 LIMIT $2))`},
	{"alerts", `DELETE FROM alerts WHERE id = ANY (ARRAY(
		SELECT id FROM alerts WHERE cleared_at < $1 LIMIT $2))`},
	{"commands", `DELETE FROM commands WHERE id = ANY (ARRAY(
		SELECT id FROM commands WHERE created_at < $1 AND status NOT IN ('pending', 'sent') LIMIT $2))`},
	{"webhook_attempts", `DELETE FROM webhook_attempts WHERE ctid = ANY (ARRAY(
		SELECT a.ctid FROM webhook_attempts a JOIN webhook_deliveries d ON d.seq = a.delivery_seq
		WHERE d.created_at < $1 AND d.state <> 'pending' LIMIT $2))`},
	{"webhook_deliveries", `DELETE FROM webhook_deliveries WHERE seq = ANY (ARRAY(
		SELECT d.seq FROM webhook_deliveries d WHERE d.created_at < $1 AND d.state <> 'pending'
			AND NOT EXISTS (SELECT 1 FROM webhook_attempts a WHERE a.delivery_seq = d.seq) LIMIT $2))`},
	{"idempotency", `DELETE FROM idempotency WHERE (actor, key) IN (
		SELECT actor, key FROM idempotency WHERE created_at < $1 LIMIT $2)`},
}

// PruneHistoryBatch is how many rows one statement of PruneHistory deletes:
// small enough that no statement holds its locks or its WAL for long.
const PruneHistoryBatch = 5000

// PruneHistory deletes history older than cutoff that day partitions do
// not cover: presence changes, cleared alerts, finished commands, webhook
// deliveries that are settled (with their attempts) and Idempotency-Key
// answers. Pickups, credentials, the audit log, rollouts and firmware are
// kept. It deletes in batches until nothing older is left or ctx ends, and
// returns the rows deleted per table.
func (db *DB) PruneHistory(ctx context.Context, cutoff time.Time) (map[string]int64, error) {
	n := map[string]int64{}
	for _, t := range historyTables {
		for {
			tag, err := db.pool.Exec(ctx, t.sql, cutoff, PruneHistoryBatch)
			if err != nil {
				return n, fmt.Errorf("prune %s: %w", t.name, err)
			}
			n[t.name] += tag.RowsAffected()
			if tag.RowsAffected() < PruneHistoryBatch {
				break
			}
		}
	}
	return n, nil
}
