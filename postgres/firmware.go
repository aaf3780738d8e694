package postgres

import (
	"context"

	"github.com/lockergate/lockergate/protocol"
)

// currentFwJob returns the firmware job a locker should run, or nil.
func (db *DB) currentFwJob(ctx context.Context, deviceID string) (*protocol.FwJob, error) {
	return nil, nil
}
