package fleet

import (
	"context"
	"time"

	"github.com/lockergate/lockergate/protocol"
)

// FirmwareTracker follows firmware jobs; the rollout engine implements it.
// Calls come from the fleet's control workers, in order per locker, and may
// block briefly on the database.
type FirmwareTracker interface {
	// JobStatus records a locker's fw/status report.
	JobStatus(ctx context.Context, deviceID string, st *protocol.FwStatus, at time.Time)
	// Booted records a birth message: the version a locker runs after it
	// (re)connected. Success of a job is confirmed only by this.
	Booted(ctx context.Context, deviceID, fw string, at time.Time)
}
