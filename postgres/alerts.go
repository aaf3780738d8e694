package postgres

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/lockergate/lockergate/fleet"
)

const alertCols = `a.id, a.device_id, coalesce(d.site, ''), a.kind, coalesce(a.compartment, 0), a.detail, a.raised_at, a.cleared_at, a.cleared_by`

func scanAlert(row pgx.Row) (fleet.Alert, error) {
	var a fleet.Alert
	err := row.Scan(&a.ID, &a.DeviceID, &a.Site, &a.Kind, &a.Compartment, &a.Detail, &a.RaisedAt, &a.ClearedAt, &a.ClearedBy)
	return a, err
}

// QueryAlerts lists alerts newest first (by id, the cursor).
func (db *DB) QueryAlerts(ctx context.Context, f fleet.AlertFilter) ([]fleet.Alert, error) {
	rows, err := db.pool.Query(ctx, `SELECT `+alertCols+` FROM alerts a LEFT JOIN devices d ON d.id = a.device_id
		WHERE ($1 = 0 OR a.id < $1) AND ($2 = '' OR d.site = $2) AND ($3 = '' OR a.device_id = $3) AND ($4 = '' OR a.kind = $4)
			AND ($5::bool IS NULL OR (a.cleared_at IS NULL) = $5) AND a.raised_at >= $6
		ORDER BY a.id DESC LIMIT $7`,
		f.Before, f.Site, f.Locker, f.Kind, f.Open, f.Since, limit(f.Limit))
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(row pgx.CollectableRow) (fleet.Alert, error) { return scanAlert(row) })
}

// GetAlert returns one alert.
func (db *DB) GetAlert(ctx context.Context, id int64) (*fleet.Alert, error) {
	a, err := scanAlert(db.pool.QueryRow(ctx, `SELECT `+alertCols+` FROM alerts a LEFT JOIN devices d ON d.id = a.device_id
		WHERE a.id = $1`, id))
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, fmt.Errorf("alert %d: %w", id, fleet.ErrNotFound)
	}
	return &a, err
}

// ClearAlert clears an open alert by hand and audits it as alert.clear:
// fleet.ErrNotFound for no such alert, fleet.ErrConflict when it is
// cleared already (by hand or because its condition ended).
func (db *DB) ClearAlert(ctx context.Context, id int64, actor string, at time.Time) (*fleet.Alert, error) {
	var a fleet.Alert
	err := pgx.BeginFunc(ctx, db.pool, func(tx pgx.Tx) error {
		var err error
		a, err = scanAlert(tx.QueryRow(ctx, `WITH u AS (UPDATE alerts SET cleared_at = $2, cleared_by = $3
				WHERE id = $1 AND cleared_at IS NULL RETURNING *)
			SELECT `+alertCols+` FROM u a LEFT JOIN devices d ON d.id = a.device_id`, id, at, actor))
		if errors.Is(err, pgx.ErrNoRows) {
			cur, gerr := db.GetAlert(ctx, id)
			if gerr != nil {
				return gerr
			}
			if cur.ClearedAt == nil {
				return fmt.Errorf("%w: alert %d changed meanwhile; try again", fleet.ErrConflict, id)
			}
			return fmt.Errorf("%w: alert %d was cleared at %s", fleet.ErrConflict, id, cur.ClearedAt.UTC().Format(time.RFC3339))
		}
		if err != nil {
			return err
		}
		return audit(ctx, tx, fleet.AuditEntry{Actor: actor, Action: "alert.clear", Locker: a.DeviceID, Site: a.Site,
			Detail: map[string]any{"alert": strconv.FormatInt(a.ID, 10), "kind": a.Kind}})
	})
	if err != nil {
		return nil, err
	}
	return &a, nil
}
