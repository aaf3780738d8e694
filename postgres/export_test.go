package postgres

import (
	"context"
	"time"

	"github.com/lockergate/lockergate/fleet"
)

// MarkOnline records one session start (MarkOnlineMany), for tests.
func (db *DB) MarkOnline(ctx context.Context, id string, at time.Time) error {
	return db.MarkOnlineMany(ctx, []fleet.SessionStart{{ID: id, At: at}})
}

// AckCreds records one credential acknowledgement (AckCredsMany), for tests.
func (db *DB) AckCreds(ctx context.Context, id string, version int64) error {
	_, err := db.AckCredsMany(ctx, []fleet.CredsAck{{ID: id, Version: version}})
	return err
}

// The statements that update many lockers' rows at once, exported for the
// plan test in package postgres_test.
const (
	MarkOnlineManySQL  = markOnlineManySQL
	MarkOfflineManySQL = markOfflineManySQL
	RecordBirthsSQL    = recordBirthsSQL
	AckCredsManySQL    = ackCredsManySQL
	TouchLockersSQL    = touchLockersSQL
)

// PruneLock is the advisory lock PruneHistory takes, for the test that holds it.
const PruneLock = pruneLock

// SetEffectsLockIdle sets the idle bound of effects locks taken from now
// on, until the test ends.
func SetEffectsLockIdle(t interface{ Cleanup(func()) }, d time.Duration) {
	old := effectsLockIdle
	effectsLockIdle = d
	t.Cleanup(func() { effectsLockIdle = old })
}

// UpdateLatestSQL is updateLatestSQL (a variable: it spells fleet.MaxSeqGap).
var UpdateLatestSQL = updateLatestSQL

// PickupListSQL is ListPickups' statement for a filter, for plan tests.
var PickupListSQL = pickupListSQL

// SetListenQuiet shortens how long a listener hears nothing before it asks
// its connection for an answer, for tests.
func (db *DB) SetListenQuiet(d time.Duration) { db.listenQuiet = d }
