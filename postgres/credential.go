package postgres

import (
	"context"
	"errors"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/pickup"
	"github.com/lockergate/lockergate/protocol"
)

// CredSet returns the full set of pickup credentials valid at a locker, with
// the locker's current set version.
func (db *DB) CredSet(ctx context.Context, deviceID string) (*protocol.CredSet, error) {
	s := &protocol.CredSet{TS: protocol.Now()}
	var cs []pickup.Credential
	err := pgx.BeginTxFunc(ctx, db.pool, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly}, func(tx pgx.Tx) error {
		// One snapshot: the version and the credentials it names.
		if err := tx.QueryRow(ctx, "SELECT creds_version FROM devices WHERE id = $1", deviceID).Scan(&s.Version); err != nil {
			if errors.Is(err, pgx.ErrNoRows) {
				return fleet.ErrNotFound
			}
			return err
		}
		rows, err := tx.Query(ctx, `SELECT id, coalesce(pin_mac, ''), coalesce(qr_mac, ''), compartments, not_after FROM credentials
			WHERE device_id = $1 AND state = 'active' AND not_after > $2 ORDER BY id`, deviceID, time.Now())
		if err != nil {
			return err
		}
		cs, err = pgx.CollectRows(rows, func(row pgx.CollectableRow) (pickup.Credential, error) {
			var c pickup.Credential
			err := row.Scan(&c.ID, &c.PINMAC, &c.QRMAC, &c.Compartments, &c.NotAfter)
			return c, err
		})
		return err
	})
	if err != nil {
		return nil, err
	}
	s.Creds = pickup.WireCredentials(cs)
	return s, nil
}
