package postgres

import "time"

// UpdateLatestSQL is exported for the plan test in package postgres_test.
const UpdateLatestSQL = updateLatestSQL

// PruneLock is the advisory lock PruneHistory takes, for the test that holds it.
const PruneLock = pruneLock

// SetEffectsLockIdle sets the idle bound of effects locks taken from now
// on, until the test ends.
func SetEffectsLockIdle(t interface{ Cleanup(func()) }, d time.Duration) {
	old := effectsLockIdle
	effectsLockIdle = d
	t.Cleanup(func() { effectsLockIdle = old })
}
