package postgres

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/pickup"
)

// conds builds a WHERE clause of the filters given, numbering their
// parameters in order.
type conds struct {
	where []string
	args  []any
}

// add appends cond, whose %d is the parameter number of v.
func (c *conds) add(cond string, v any) {
	c.args = append(c.args, v)
	c.where = append(c.where, fmt.Sprintf(cond, len(c.args)))
}

func (c *conds) and() string { return strings.Join(c.where, " AND ") }

const alertCols = `a.id, a.device_id, coalesce(d.site, ''), a.kind, coalesce(a.compartment, 0), a.detail, a.raised_at, a.cleared_at, a.cleared_by,
	a.repeats, a.last_raised_at`

func scanAlert(row pgx.Row) (fleet.Alert, error) {
	var a fleet.Alert
	err := row.Scan(&a.ID, &a.DeviceID, &a.Site, &a.Kind, &a.Compartment, &a.Detail, &a.RaisedAt, &a.ClearedAt, &a.ClearedBy,
		&a.Repeats, &a.LastRaisedAt)
	return a, err
}

// QueryAlerts lists alerts newest first (by id, the cursor). The WHERE
// clause holds only the filters given, so each shape of query gets a plan
// of its own (a catch-all "$n = ” OR ..." plan, once generic, would walk
// the whole primary key for a filter that matches little).
func (db *DB) QueryAlerts(ctx context.Context, f fleet.AlertFilter) ([]fleet.Alert, error) {
	var w conds
	w.add("a.raised_at >= $%d", f.Since)
	if f.Before > 0 {
		w.add("a.id < $%d::bigint", f.Before)
	}
	if f.Site != "" {
		w.add("d.site = $%d", f.Site)
	}
	if f.Locker != "" {
		w.add("a.device_id = $%d", f.Locker)
	}
	if f.Kind != "" {
		w.add("a.kind = $%d", f.Kind)
	}
	if f.Open != nil && *f.Open {
		w.where = append(w.where, "a.cleared_at IS NULL")
	} else if f.Open != nil {
		w.where = append(w.where, "a.cleared_at IS NOT NULL")
	}
	w.args = append(w.args, limit(f.Limit))
	rows, err := db.pool.Query(ctx, `SELECT `+alertCols+` FROM alerts a LEFT JOIN devices d ON d.id = a.device_id
		WHERE `+w.and()+fmt.Sprintf(` ORDER BY a.id DESC LIMIT $%d`, len(w.args)), w.args...)
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
// cleared already (by hand or because its condition ended). Clearing a
// creds_not_applied alert vouches that the locker holds its set: its
// compartments waiting for one (compartment_clears) are released with it,
// counted in the audit entry (compartments_released).
func (db *DB) ClearAlert(ctx context.Context, id int64, actor string, at time.Time) (*fleet.Alert, error) {
	return db.clearAlert(ctx, id, actor, "", at)
}

// clearAlert is ClearAlert, with reason (when not empty) in the audit entry.
func (db *DB) clearAlert(ctx context.Context, id int64, actor, reason string, at time.Time) (*fleet.Alert, error) {
	var a fleet.Alert
	err := pgx.BeginFunc(ctx, db.pool, func(tx pgx.Tx) error {
		// A creds_not_applied alert's locker is locked first (lockLocker:
		// the lock order), for its compartment_clears.
		var locker string
		if err := tx.QueryRow(ctx, `SELECT device_id FROM alerts WHERE id = $1 AND kind = $2`,
			id, fleet.AlertCredsNotApplied).Scan(&locker); err == nil {
			if _, err := lockLocker(ctx, tx, locker); err != nil && !errors.Is(err, fleet.ErrNotFound) {
				return err
			}
		} else if !errors.Is(err, pgx.ErrNoRows) {
			return err
		}
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
		detail := map[string]any{"alert": strconv.FormatInt(a.ID, 10), "kind": a.Kind}
		if reason != "" {
			detail["reason"] = reason
		}
		if locker != "" {
			tag, err := tx.Exec(ctx, `DELETE FROM compartment_clears x USING devices d
				WHERE x.device_id = $1 AND d.id = x.device_id AND x.version > d.creds_acked`, locker)
			if err != nil {
				return err
			}
			detail["compartments_released"] = tag.RowsAffected()
		}
		return audit(ctx, tx, fleet.AuditEntry{Actor: actor, Action: "alert.clear", Locker: a.DeviceID, Site: a.Site, Detail: detail})
	})
	if err != nil {
		return nil, err
	}
	return &a, nil
}

// WithdrawAlert implements pickup.Store.
func (db *DB) WithdrawAlert(ctx context.Context, a fleet.Alert, actor, reason string, at time.Time) (bool, error) {
	return db.withdrawFound(ctx, db.pool.QueryRow(ctx, `SELECT id FROM alerts WHERE device_id = $1 AND kind = $2
		AND coalesce(compartment, 0) = $3 AND raised_at = $4 AND cleared_at IS NULL`, a.DeviceID, a.Kind, a.Compartment, a.RaisedAt),
		actor, reason, at)
}

// withdrawFound clears the open alert whose id row holds, if it found one
// and it is still open: whether it did.
func (db *DB) withdrawFound(ctx context.Context, row pgx.Row, actor, reason string, at time.Time) (bool, error) {
	var id int64
	err := row.Scan(&id)
	if errors.Is(err, pgx.ErrNoRows) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	_, err = db.clearAlert(ctx, id, actor, reason, at)
	if errors.Is(err, fleet.ErrConflict) {
		return false, nil // cleared meanwhile
	}
	return err == nil, err
}

// WithdrawStagingFailed implements pickup.Store: the alert is the one on
// the compartment raised since the pickup that command staged was made.
// Another pickup's is older: a compartment goes to no new order while an
// unlock of it may still fire, so an earlier staging unlock had ended, and
// raised its alert, before this pickup took it.
func (db *DB) WithdrawStagingFailed(ctx context.Context, deviceID string, n int, command, reason string, at time.Time) (bool, error) {
	return db.withdrawFound(ctx, db.pool.QueryRow(ctx, `SELECT a.id FROM alerts a JOIN pickups p ON p.command_id = $3
			AND p.device_id = a.device_id AND p.compartment = a.compartment
		WHERE a.device_id = $1 AND a.kind = '`+pickup.AlertStagingFailed+`' AND a.compartment = $2 AND a.cleared_at IS NULL
			AND a.raised_at >= p.created_at
		ORDER BY a.id DESC LIMIT 1`, deviceID, n, command), "gateway", reason, at)
}
