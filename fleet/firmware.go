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
	// JobStatus records a locker's fw/status report. An error means the
	// report was not recorded (the database failed): the call may be made
	// again with the same report, which is then recorded once.
	JobStatus(ctx context.Context, deviceID string, st *protocol.FwStatus, at time.Time) error
	// BootedMany records birth messages of distinct lockers: the version
	// each runs after it (re)connected. Success of a job is confirmed only
	// by this.
	BootedMany(ctx context.Context, boots []Boot)
}

// Boot is a birth's news for the firmware tracker.
type Boot struct {
	DeviceID, FW string
	At           time.Time
}
