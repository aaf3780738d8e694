package postgres

// UpdateLatestSQL is exported for the plan test in package postgres_test.
const UpdateLatestSQL = updateLatestSQL
