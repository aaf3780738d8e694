package postgres

import (
	"context"
	"errors"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/lockergate/lockergate/fleet"
)

const commandCols = `id, device_id, type, coalesce(compartment, 0), reason, in_service, status, error, actor,
	created_at, expires_at, sent_at, done_at`

func scanCommand(row pgx.Row) (*fleet.Command, error) {
	var c fleet.Command
	err := row.Scan(&c.ID, &c.DeviceID, &c.Type, &c.Compartment, &c.Reason, &c.InService, &c.Status, &c.Error, &c.Actor,
		&c.CreatedAt, &c.ExpiresAt, &c.SentAt, &c.DoneAt)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, fleet.ErrNotFound
	}
	return &c, err
}

func collectCommands(rows pgx.Rows, err error) ([]fleet.Command, error) {
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []fleet.Command
	for rows.Next() {
		c, err := scanCommand(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, *c)
	}
	return out, rows.Err()
}

// CreateCommand implements fleet.Store.
func (db *DB) CreateCommand(ctx context.Context, c *fleet.Command) error {
	var comp *int
	if c.Compartment > 0 {
		comp = &c.Compartment
	}
	_, err := db.pool.Exec(ctx, `INSERT INTO commands (id, device_id, type, compartment, reason, in_service, status, actor, created_at, expires_at)
		VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)`,
		c.ID, c.DeviceID, c.Type, comp, c.Reason, c.InService, c.Status, c.Actor, c.CreatedAt, c.ExpiresAt)
	if isFKViolation(err) {
		return fleet.ErrNotFound
	}
	return err
}

// GetCommand implements fleet.Store.
func (db *DB) GetCommand(ctx context.Context, deviceID, id string) (*fleet.Command, error) {
	return scanCommand(db.pool.QueryRow(ctx, "SELECT "+commandCols+" FROM commands WHERE id = $1 AND device_id = $2", id, deviceID))
}

// MarkCommandSent implements fleet.Store.
func (db *DB) MarkCommandSent(ctx context.Context, id string, at time.Time) (bool, error) {
	tag, err := db.pool.Exec(ctx, "UPDATE commands SET status = 'sent', sent_at = $2 WHERE id = $1 AND status = 'pending'", id, at)
	return tag.RowsAffected() == 1, err
}

// CompleteCommand implements fleet.Store. A device's answer is taken while
// the command is open; a late "ok" after the gateway gave up is kept too
// (the door did open), but never overwrites another answer.
func (db *DB) CompleteCommand(ctx context.Context, deviceID, id, status, errText string, at time.Time) (*fleet.Command, error) {
	var c *fleet.Command
	err := pgx.BeginFunc(ctx, db.pool, func(tx pgx.Tx) (err error) {
		c, err = scanCommand(tx.QueryRow(ctx, `UPDATE commands SET status = $3, error = $4, done_at = $5
			WHERE id = $1 AND device_id = $2 AND (status IN ('pending', 'sent') OR (status = 'timed_out' AND $3 <> 'expired'))
			RETURNING `+commandCols, id, deviceID, status, errText, at))
		if err != nil {
			return err
		}
		return notifyCommand(ctx, tx, id)
	})
	return c, err
}

// commandChannel carries the ids of commands that changed, on commit, to
// every gateway instance (one instance may wait on a result another took).
const commandChannel = "lockergate_command"

func notifyCommand(ctx context.Context, tx pgx.Tx, ids ...string) error {
	_, err := tx.Exec(ctx, `SELECT pg_notify($1, id) FROM unnest($2::text[]) AS id`, commandChannel, ids)
	return err
}

// WatchCommands implements fleet.Store: it LISTENs on a dedicated
// connection and calls fn with each changed command id until ctx ends,
// reconnecting after errors.
func (db *DB) WatchCommands(ctx context.Context, fn func(id string)) error {
	backoff := 100 * time.Millisecond
	for ctx.Err() == nil {
		err := db.listen(ctx, commandChannel, fn)
		if ctx.Err() != nil {
			break
		}
		db.log.Warn("command notifications interrupted; reconnecting", "err", err, "retry_in", backoff)
		select {
		case <-ctx.Done():
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, 5*time.Second)
	}
	return nil
}

func (db *DB) listen(ctx context.Context, channel string, fn func(string)) error {
	conn, err := db.pool.Acquire(ctx)
	if err != nil {
		return err
	}
	// The connection is left in LISTEN state: close it rather than return it.
	defer conn.Release()
	defer conn.Conn().Close(context.Background())
	if _, err := conn.Exec(ctx, "LISTEN "+pgx.Identifier{channel}.Sanitize()); err != nil {
		return err
	}
	for {
		n, err := conn.Conn().WaitForNotification(ctx)
		if err != nil {
			return err
		}
		fn(n.Payload)
	}
}

// ExpireCommands implements fleet.Store.
func (db *DB) ExpireCommands(ctx context.Context, now time.Time, grace time.Duration) ([]fleet.Command, error) {
	var cs []fleet.Command
	err := pgx.BeginFunc(ctx, db.pool, func(tx pgx.Tx) (err error) {
		cs, err = collectCommands(tx.Query(ctx, `UPDATE commands SET
				status = CASE WHEN status = 'pending' THEN 'expired' ELSE 'timed_out' END, done_at = $1
			WHERE (status = 'pending' AND expires_at <= $1) OR (status = 'sent' AND expires_at <= $2)
			RETURNING `+commandCols, now, now.Add(-grace)))
		if err != nil || len(cs) == 0 {
			return err
		}
		ids := make([]string, len(cs))
		for i := range cs {
			ids[i] = cs[i].ID
		}
		return notifyCommand(ctx, tx, ids...)
	})
	return cs, err
}

// OpenCommands implements fleet.Store.
func (db *DB) OpenCommands(ctx context.Context, deviceID string, now time.Time) ([]fleet.Command, error) {
	return collectCommands(db.pool.Query(ctx, `SELECT `+commandCols+` FROM commands
		WHERE device_id = $1 AND status IN ('pending', 'sent') AND expires_at > $2 ORDER BY created_at`, deviceID, now))
}
