package postgres

// UpdateLatestSQL is exported for the plan test in package postgres_test.
const UpdateLatestSQL = updateLatestSQL

// PruneLock is the advisory lock PruneHistory takes, for the test that holds it.
const PruneLock = pruneLock
