package postgres

import (
	"context"
	"fmt"
	"time"

	"github.com/lockergate/lockergate/fleet"
)

// Census implements fleet.Store. One pass over devices; the flapping test
// reads at most fleet.FlappingConnects presence_log entries of a locker
// through its (device_id, ts) index, and only for lockers that connected
// that often at all. Open alerts come from the partial open-alert index.
func (db *DB) Census(ctx context.Context, staleBefore, flapSince time.Time, kinds []string) (*fleet.Census, error) {
	c := &fleet.Census{OpenAlerts: map[string]int{}}
	err := db.pool.QueryRow(ctx, `
		SELECT count(*), count(*) FILTER (WHERE d.online),
			count(*) FILTER (WHERE d.online AND (d.last_seen IS NULL OR d.last_seen < $1)),
			count(*) FILTER (WHERE CASE WHEN d.connect_count < $3 THEN false ELSE
				(SELECT count(*) FROM (SELECT 1 FROM presence_log p
					WHERE p.device_id = d.id AND p.online AND p.ts > $2 LIMIT $3) r) >= $3 END)
		FROM devices d WHERE NOT d.disabled`, staleBefore, flapSince, fleet.FlappingConnects).
		Scan(&c.Registered, &c.Connected, &c.Stale, &c.Flapping)
	if err != nil {
		return nil, fmt.Errorf("count lockers: %w", err)
	}
	rows, err := db.pool.Query(ctx, `SELECT kind, count(*) FROM alerts
		WHERE cleared_at IS NULL AND kind = ANY($1) GROUP BY kind`, kinds)
	if err != nil {
		return nil, fmt.Errorf("count open alerts: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var kind string
		var n int
		if err := rows.Scan(&kind, &n); err != nil {
			return nil, err
		}
		c.OpenAlerts[kind] = n
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("count open alerts: %w", err)
	}
	return c, nil
}
