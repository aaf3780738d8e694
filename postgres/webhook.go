package postgres

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/webhook"
)

var _ webhook.Store = (*DB)(nil)

const webhookCols = `id, token_id, role, site, platform, url, events, created_at, failing,
	CASE WHEN held_until > now() THEN held_until END`

func scanWebhook(row pgx.Row, extra ...any) (*webhook.Webhook, error) {
	var w webhook.Webhook
	err := row.Scan(append([]any{&w.ID, &w.TokenID, &w.Role, &w.Site, &w.Platform, &w.URL, &w.Events, &w.CreatedAt,
		&w.Failing, &w.HeldUntil}, extra...)...)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, fleet.ErrNotFound
	}
	return &w, err
}

// webhookSees is the condition on webhooks w that an event at a site (the
// SQL expression site) may go to: a live webhook of a token not revoked, in
// that token's scope (admins and operators see every site, a store its
// own). platform, when not empty, is the expression of the pickup's
// platform, whose webhooks see their own orders; events about a locker
// itself (alerts) have none.
func webhookSees(site, platform string) string {
	scope := `w.role IN ('admin', 'operator') OR (w.role = 'store' AND w.site = ` + site + `)`
	if platform != "" {
		scope += ` OR (w.role = 'platform' AND w.platform = ` + platform + `)`
	}
	return `w.deleted_at IS NULL AND EXISTS (SELECT 1 FROM tokens t WHERE t.id = w.token_id AND t.revoked_at IS NULL)
		AND (` + scope + `)`
}

// CreateWebhook implements webhook.Store. The token's advisory lock makes
// the count and the insert one step: concurrent creates (on any instance)
// take turns. The count is a statement of its own after the lock, so that
// its snapshot holds what the lock's last holder committed.
func (db *DB) CreateWebhook(ctx context.Context, w *webhook.Webhook, secretEnc []byte, limit int) error {
	return pgx.BeginFunc(ctx, db.pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock(hashtextextended('lockergate/webhooks/' || $1, 0))`, w.TokenID); err != nil {
			return err
		}
		var n int
		if err := tx.QueryRow(ctx, `SELECT count(*) FROM webhooks WHERE token_id = $1 AND deleted_at IS NULL`, w.TokenID).Scan(&n); err != nil {
			return err
		}
		if n >= limit {
			return webhook.ErrTooMany
		}
		return tx.QueryRow(ctx, `INSERT INTO webhooks (id, token_id, role, site, platform, url, events, secret_enc)
			VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING created_at`,
			w.ID, w.TokenID, w.Role, w.Site, w.Platform, w.URL, w.Events, secretEnc).Scan(&w.CreatedAt)
	})
}

// GetWebhook implements webhook.Store: a webhook whose token was revoked
// is gone too (the dispatcher reads it before each delivery, so events
// queued before the revocation, codes and all, are not sent).
func (db *DB) GetWebhook(ctx context.Context, id string) (*webhook.Webhook, []byte, error) {
	var enc []byte
	w, err := scanWebhook(db.pool.QueryRow(ctx, `SELECT `+webhookCols+`, secret_enc FROM webhooks
		WHERE id = $1 AND deleted_at IS NULL
			AND EXISTS (SELECT 1 FROM tokens t WHERE t.id = webhooks.token_id AND t.revoked_at IS NULL)`, id), &enc)
	return w, enc, err
}

// ListWebhooks implements webhook.Store: like GetWebhook, without those of
// revoked tokens (listed, an admin could neither read nor delete them).
func (db *DB) ListWebhooks(ctx context.Context, tokenID, after string, n int) ([]webhook.Webhook, error) {
	rows, err := db.pool.Query(ctx, `SELECT `+webhookCols+` FROM webhooks WHERE deleted_at IS NULL AND ($1 = '' OR token_id = $1)
		AND EXISTS (SELECT 1 FROM tokens t WHERE t.id = webhooks.token_id AND t.revoked_at IS NULL)
		AND id > $2 ORDER BY id LIMIT $3`, tokenID, after, limit(n))
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []webhook.Webhook
	for rows.Next() {
		w, err := scanWebhook(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, *w)
	}
	return out, rows.Err()
}

// DeleteWebhook implements webhook.Store.
func (db *DB) DeleteWebhook(ctx context.Context, id string) error {
	return pgx.BeginFunc(ctx, db.pool, func(tx pgx.Tx) error {
		tag, err := tx.Exec(ctx, `UPDATE webhooks SET deleted_at = now() WHERE id = $1 AND deleted_at IS NULL`, id)
		if err != nil {
			return err
		}
		if tag.RowsAffected() == 0 {
			return fmt.Errorf("webhook %s (unknown, or deleted already): %w", id, fleet.ErrNotFound)
		}
		_, err = tx.Exec(ctx, `UPDATE webhook_deliveries SET state = 'failed', last_error = 'webhook deleted' WHERE webhook_id = $1 AND state = 'pending'`, id)
		return err
	})
}

const deliveryCols = `seq, webhook_id, event_id, type, subject, body, state, attempts, next_attempt, last_status, last_error, created_at, delivered_at`

func scanDelivery(row pgx.Row, extra ...any) (webhook.Delivery, error) {
	var d webhook.Delivery
	var body []byte
	err := row.Scan(append([]any{&d.Seq, &d.WebhookID, &d.EventID, &d.Type, &d.Subject, &body, &d.State, &d.Attempts, &d.NextAttempt,
		&d.LastStatus, &d.LastError, &d.CreatedAt, &d.DeliveredAt}, extra...)...)
	d.Body = body
	return d, err
}

// LeaseDue implements webhook.Store. A delivery is due only when no older
// delivery of the same webhook and subject (pickup) is pending, so a
// receiver sees each pickup's events in order even after an outage, and
// while its webhook is not held (Outcome.Hold). The oldest due deliveries
// of tokens not busy are looked at (64 per delivery asked for, so a
// backlog costs a bounded scan), the oldest perToken of each token taken,
// and the update checks the lease again on each row it takes, so of two
// callers at once the second skips what the first leased.
func (db *DB) LeaseDue(ctx context.Context, now time.Time, lease time.Duration, n, perToken int, busy []string) ([]webhook.Delivery, error) {
	if busy == nil {
		busy = []string{}
	}
	rows, err := db.pool.Query(ctx, `
		WITH cand AS (
			SELECT c.seq, w.token_id FROM webhook_deliveries c JOIN webhooks w ON w.id = c.webhook_id
			WHERE c.state = 'pending' AND c.next_attempt <= $1 AND c.leased_until < $1
				AND w.token_id <> ALL($5) AND w.held_until <= $1
				AND NOT EXISTS (SELECT 1 FROM webhook_deliveries e WHERE e.webhook_id = c.webhook_id
					AND e.subject = c.subject AND e.state = 'pending' AND e.seq < c.seq)
			ORDER BY c.seq LIMIT $3 * 64),
		due AS (SELECT seq AS due_seq, token_id AS due_token, row_number() OVER (PARTITION BY token_id ORDER BY seq) AS k FROM cand),
		picked AS (SELECT due_seq, due_token FROM due WHERE k <= $4 ORDER BY due_seq LIMIT $3)
		UPDATE webhook_deliveries d SET leased_until = $1::timestamptz + $2::interval
		FROM picked WHERE d.seq = picked.due_seq AND d.state = 'pending' AND d.leased_until < $1
		RETURNING `+deliveryCols+`, due_token`, now, lease, n, perToken, busy)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(row pgx.CollectableRow) (webhook.Delivery, error) {
		var token string
		d, err := scanDelivery(row, &token)
		d.TokenID = token
		return d, err
	})
}

// RecordAttempt implements webhook.Store. Recording one outcome again (a
// retry after a commit whose answer was lost) changes nothing: an attempt
// is known by its delivery and time. The webhook's row is locked first,
// as DeleteWebhook locks it before the deliveries.
func (db *DB) RecordAttempt(ctx context.Context, seq int64, o webhook.Outcome) (gaveUp int, err error) {
	err = pgx.BeginFunc(ctx, db.pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `SELECT 1 FROM webhooks w JOIN webhook_deliveries d ON d.webhook_id = w.id
			WHERE d.seq = $1 FOR NO KEY UPDATE OF w`, seq); err != nil {
			return err
		}
		tag, err := tx.Exec(ctx, `INSERT INTO webhook_attempts (delivery_seq, ts, status, error, duration_ms)
			SELECT $1, $2, $3, $4, $5 WHERE NOT EXISTS (SELECT 1 FROM webhook_attempts WHERE delivery_seq = $1 AND ts = $2)`,
			seq, o.At, o.Status, o.Error, float64(o.Duration.Microseconds())/1000)
		if err != nil || tag.RowsAffected() == 0 {
			return err
		}
		state := "pending"
		switch {
		case o.Delivered:
			state = "delivered"
		case o.Next.IsZero():
			state = "failed"
		}
		var webhookID string
		err = tx.QueryRow(ctx, `UPDATE webhook_deliveries SET state = $2, attempts = attempts + 1, last_status = $3, last_error = $4,
			next_attempt = CASE WHEN $5::timestamptz IS NULL THEN next_attempt ELSE $5 END, leased_until = '-infinity',
			delivered_at = CASE WHEN $2 = 'delivered' THEN $6::timestamptz ELSE NULL END
			WHERE seq = $1 AND state = 'pending' RETURNING webhook_id`, seq, state, o.Status, o.Error, nullTime(o.Next), o.At).Scan(&webhookID)
		switch {
		case errors.Is(err, pgx.ErrNoRows):
			return nil // settled already: a copy's late outcome says nothing new of the receiver
		case err != nil:
			return err
		case o.Delivered:
			// The receiver answers: what its hold kept waiting goes now.
			// Rows a lease is taking are skipped (they go anyway), in seq
			// order: LeaseDue's order, so the two cannot deadlock.
			_, err = tx.Exec(ctx, `WITH w AS (UPDATE webhooks SET failing = 0, held_until = '-infinity'
					WHERE id = $1 AND failing > 0 RETURNING id)
				UPDATE webhook_deliveries d SET next_attempt = $2
				WHERE d.seq IN (SELECT s.seq FROM webhook_deliveries s, w WHERE s.webhook_id = w.id AND s.state = 'pending'
					AND s.next_attempt > $2 ORDER BY s.seq FOR NO KEY UPDATE OF s SKIP LOCKED)`, webhookID, o.At)
		case o.Hold != nil:
			// The hold's length from the failures as they stand now (a
			// success recorded meanwhile reset them), in seconds (an
			// interval times 2^30 can leave the interval's range). The
			// webhook's pending deliveries not leased now are given up
			// when their time is up, else wait for the hold's end, each by
			// its own next attempt too: that keeps a dead receiver's
			// backlog out of LeaseDue's scan of due deliveries for the
			// hold. Rows a lease is taking are skipped, in LeaseDue's
			// order (no deadlock); rows already waiting as long are not
			// written again.
			err = tx.QueryRow(ctx, `WITH h AS (UPDATE webhooks SET failing = failing + 1,
					held_until = greatest(held_until, $2::timestamptz +
						least($4::float8, $3::float8 * power(2, least(failing, 30))) * (0.5 + random() / 2) * interval '1 second')
					WHERE id = $1 RETURNING held_until),
				u AS (UPDATE webhook_deliveries d SET
					state = CASE WHEN d.created_at < $5 THEN 'failed' ELSE d.state END,
					last_error = CASE WHEN d.created_at < $5 THEN $6 ELSE d.last_error END,
					next_attempt = CASE WHEN d.created_at < $5 THEN d.next_attempt ELSE greatest(d.next_attempt, h.held_until) END
				FROM h WHERE d.seq IN (SELECT s.seq FROM webhook_deliveries s, h WHERE s.webhook_id = $1 AND s.state = 'pending'
					AND s.leased_until < $2 AND (s.created_at < $5 OR s.next_attempt < h.held_until)
					ORDER BY s.seq FOR NO KEY UPDATE OF s SKIP LOCKED)
				RETURNING d.state)
				SELECT count(*) FILTER (WHERE state = 'failed') FROM u`,
				webhookID, o.At, o.Hold.Base.Seconds(), o.Hold.Max.Seconds(), nullTime(o.Hold.GiveUpBefore),
				"given up: the receiver was unreachable until its time ran out ("+o.Error+")").Scan(&gaveUp)
		}
		return err
	})
	if err != nil {
		return 0, err
	}
	return gaveUp, nil
}

func nullTime(t time.Time) *time.Time {
	if t.IsZero() {
		return nil
	}
	return &t
}

// ListDeliveries implements webhook.Store.
func (db *DB) ListDeliveries(ctx context.Context, webhookID string, after int64, n int) ([]webhook.Delivery, error) {
	rows, err := db.pool.Query(ctx, `SELECT `+deliveryCols+` FROM webhook_deliveries WHERE webhook_id = $1 AND seq > $2 ORDER BY seq LIMIT $3`,
		webhookID, after, limit(n))
	if err != nil {
		return nil, err
	}
	ds, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (webhook.Delivery, error) { return scanDelivery(row) })
	if err != nil || len(ds) == 0 {
		return ds, err
	}
	idx := make(map[int64]int, len(ds))
	seqs := make([]int64, len(ds))
	for i, d := range ds {
		idx[d.Seq], seqs[i] = i, d.Seq
	}
	rows, err = db.pool.Query(ctx, `SELECT delivery_seq, ts, status, error, duration_ms FROM webhook_attempts
		WHERE delivery_seq = ANY ($1) ORDER BY delivery_seq, ts`, seqs)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	for rows.Next() {
		var seq int64
		var a webhook.Attempt
		if err := rows.Scan(&seq, &a.TS, &a.Status, &a.Error, &a.DurationMS); err != nil {
			return nil, err
		}
		ds[idx[seq]].Log = append(ds[idx[seq]].Log, a)
	}
	return ds, rows.Err()
}

// Backlog implements webhook.Store.
func (db *DB) Backlog(ctx context.Context, now time.Time) (webhook.Backlog, error) {
	var b webhook.Backlog
	var oldest *time.Time
	err := db.pool.QueryRow(ctx, `SELECT count(*), min(created_at),
			(SELECT count(*) FROM webhooks WHERE deleted_at IS NULL AND held_until > $1)
		FROM webhook_deliveries WHERE state = 'pending'`, now).Scan(&b.Pending, &oldest, &b.Held)
	if err == nil && oldest != nil {
		b.Oldest = now.Sub(*oldest)
	}
	return b, err
}
