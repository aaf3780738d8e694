// Package postgres implements the stores of fleet, provisioning and the HTTP
// API on PostgreSQL through pgx, with embedded, advisory-locked migrations.
package postgres

import (
	"context"
	"embed"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"sort"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgtype"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/provisioning"
)

//go:embed migrations/*.sql
var migrations embed.FS

// migrationLock is the advisory lock key that serialises migrations across
// gateway instances ("lockergt" in ASCII).
const migrationLock = 0x6c6f636b65726774

// DB is the PostgreSQL store.
type DB struct {
	pool        *pgxpool.Pool
	log         *slog.Logger
	doorByClock bool // Options.DoorEventsByClock
	healthAsync bool // Options.HealthAsyncCommit
	// listenQuiet is how long a listener hears nothing before it asks its
	// connection for an answer (listenQuietDefault; tests shorten it).
	listenQuiet time.Duration
}

var (
	_ fleet.Store        = (*DB)(nil)
	_ provisioning.Store = (*DB)(nil)
)

// SessionDefaults are the settings of every connection the gateway opens,
// unless the database URL sets them itself (e.g. "jit=on" as a keyword or a
// URL query parameter). The gateway's statements are short: JIT compiling
// one costs more than it saves (the fleet census, estimated above
// jit_above_cost, took 35 ms with JIT and 3 ms without), and a parallel plan
// for a periodic count takes every core of a small machine from the unlocks
// and the writes for as long as it runs.
var SessionDefaults = map[string]string{
	"jit":                             "off",
	"max_parallel_workers_per_gather": "0",
}

// Options configure Open.
type Options struct {
	DSN      string
	MaxConns int32 // default 32
	Logger   *slog.Logger
	// DoorEventsByClock orders each compartment's door events by the
	// locker's clock (their ts) rather than by their arrival, within
	// DoorClockWindow: for gateways behind an external broker, where a
	// locker's events reach several instances and can be applied out of
	// their order. The embedded broker's single instance applies them in
	// order, so there arrival order is the locker's.
	DoorEventsByClock bool
	// HealthAsyncCommit lets health batches commit without waiting for the
	// disk: for a broker that acknowledges health when it is queued (the
	// embedded one), where the wait guards nothing a crash of the gateway
	// would not lose anyway, and a slow flush would stall ingest. Leave it
	// off behind an external broker, which is acknowledged after the
	// commit. A crash of PostgreSQL or its machine then loses the health
	// committed but not yet flushed (postgres/healthwire.go).
	HealthAsyncCommit bool
}

// Open connects, waits for the database to answer, and applies migrations.
func Open(ctx context.Context, o Options) (*DB, error) {
	cfg, err := pgxpool.ParseConfig(o.DSN)
	if err != nil {
		return nil, fmt.Errorf("parse database url: %w", err)
	}
	cfg.MaxConns = 32 // 16 control shards, 2 health writers, events, API, credential checks
	if o.MaxConns > 0 {
		cfg.MaxConns = o.MaxConns
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	for k, v := range SessionDefaults {
		if _, set := cfg.ConnConfig.RuntimeParams[k]; !set {
			cfg.ConnConfig.RuntimeParams[k] = v
		}
	}
	// Times leave the API in UTC whatever the host's zone (pgx scans
	// timestamptz into the local zone by default).
	cfg.AfterConnect = func(ctx context.Context, c *pgx.Conn) error {
		c.TypeMap().RegisterType(&pgtype.Type{Name: "timestamptz", OID: pgtype.TimestamptzOID,
			Codec: &pgtype.TimestamptzCodec{ScanLocation: time.UTC}})
		return nil
	}
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("connect to database: %w", err)
	}
	db := &DB{pool: pool, log: o.Logger, doorByClock: o.DoorEventsByClock, healthAsync: o.HealthAsyncCommit,
		listenQuiet: listenQuietDefault}
	if err := db.Migrate(ctx); err != nil {
		pool.Close()
		return nil, err
	}
	return db, nil
}

// Pool returns the connection pool (for tests and readiness checks).
func (db *DB) Pool() *pgxpool.Pool { return db.pool }

// Ping checks the database answers.
func (db *DB) Ping(ctx context.Context) error { return db.pool.Ping(ctx) }

// Close closes the pool.
func (db *DB) Close() { db.pool.Close() }

// Migrate applies the embedded migrations not applied yet, each in its own
// transaction, holding an advisory lock so concurrent instances take turns.
func (db *DB) Migrate(ctx context.Context) error {
	conn, err := db.pool.Acquire(ctx)
	if err != nil {
		return fmt.Errorf("migrate: acquire connection: %w", err)
	}
	defer conn.Release()
	if _, err := conn.Exec(ctx, "SELECT pg_advisory_lock($1)", int64(migrationLock)); err != nil {
		return fmt.Errorf("migrate: advisory lock: %w", err)
	}
	defer conn.Exec(context.WithoutCancel(ctx), "SELECT pg_advisory_unlock($1)", int64(migrationLock))
	if _, err := conn.Exec(ctx, `CREATE TABLE IF NOT EXISTS schema_migrations (
		version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())`); err != nil {
		return fmt.Errorf("migrate: create schema_migrations: %w", err)
	}
	names, err := fs.Glob(migrations, "migrations/*.sql")
	if err != nil {
		return err
	}
	sort.Strings(names)
	if err := refuseNewerSchema(ctx, conn, names); err != nil {
		return err
	}
	for _, name := range names {
		version := migrationVersion(name)
		var done bool
		if err := conn.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM schema_migrations WHERE version = $1)", version).Scan(&done); err != nil {
			return fmt.Errorf("migrate: check %s: %w", version, err)
		}
		if done {
			continue
		}
		sql, err := migrations.ReadFile(name)
		if err != nil {
			return err
		}
		err = pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
			if _, err := tx.Exec(ctx, string(sql)); err != nil {
				return err
			}
			_, err := tx.Exec(ctx, "INSERT INTO schema_migrations (version) VALUES ($1)", version)
			return err
		})
		if err != nil {
			return fmt.Errorf("migrate: apply %s: %w", version, err)
		}
		db.log.Info("applied migration", "version", version)
	}
	return nil
}

// migrationVersion is the version schema_migrations records for the
// embedded migration file name.
func migrationVersion(name string) string {
	return strings.TrimSuffix(strings.TrimPrefix(name, "migrations/"), ".sql")
}

// ErrNewerSchema is Migrate's refusal of a database that a newer release
// migrated.
var ErrNewerSchema = errors.New("database migrated by a newer release")

// refuseNewerSchema refuses a database with migrations this build does not
// have (names: its own): a newer release migrated it, and this one would
// run on a schema it does not know (states, constraints and columns it
// would misread), silently. It names them and what to do.
func refuseNewerSchema(ctx context.Context, conn *pgxpool.Conn, names []string) error {
	known := make(map[string]bool, len(names))
	for _, name := range names {
		known[migrationVersion(name)] = true
	}
	rows, _ := conn.Query(ctx, "SELECT version FROM schema_migrations ORDER BY version")
	applied, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return fmt.Errorf("migrate: read schema_migrations: %w", err)
	}
	var unknown []string
	for _, v := range applied {
		if !known[v] {
			unknown = append(unknown, v)
		}
	}
	if len(unknown) == 0 {
		return nil
	}
	return fmt.Errorf("migrate: %w: it has %d migration(s) this build lacks (%s), so this is an older lockergate than the one "+
		"that last ran on it; run that release or a newer one, or restore the backup taken before the upgrade to go back "+
		"(docs/operations.md, Upgrades)", ErrNewerSchema, len(unknown), strings.Join(unknown, ", "))
}

// partitionLockWait bounds how long creating or dropping a partition waits
// for its lock on the parent table (ACCESS EXCLUSIVE): while it waits,
// every health and event write queues behind it, so one that a long read
// or a pg_dump holds off gives up and is tried at the next hourly pass
// (partitions are made 3 days ahead).
const partitionLockWait = time.Second

// partitionDDL runs sql, a partition's CREATE or DROP, waiting at most
// partitionLockWait for its locks: false (and no error) when it gave up.
func (db *DB) partitionDDL(ctx context.Context, sql string) (bool, error) {
	err := pgx.BeginFunc(ctx, db.pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, fmt.Sprintf("SET LOCAL lock_timeout = '%dms'", partitionLockWait.Milliseconds())); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, sql)
		return err
	})
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "55P03" { // lock_not_available
		return false, nil
	}
	return err == nil, err
}

// EnsurePartitions creates the daily partitions of health and events for the
// days from `from` through `days` days later; rows outside land in the
// default partition. One whose lock it cannot get in partitionLockWait is
// left for the next pass (logged).
func (db *DB) EnsurePartitions(ctx context.Context, from time.Time, days int) error {
	soon := time.Now().UTC().Truncate(24*time.Hour).AddDate(0, 0, 2) // rows for days before it may come any moment
	for _, table := range []string{"health", "events"} {
		for d := 0; d <= days; d++ {
			day := from.UTC().Truncate(24*time.Hour).AddDate(0, 0, d)
			name := fmt.Sprintf("%s_%s", table, day.Format("20060102"))
			sql := fmt.Sprintf(`CREATE TABLE IF NOT EXISTS %s PARTITION OF %s FOR VALUES FROM ('%s') TO ('%s')`,
				name, table, day.Format(time.RFC3339), day.AddDate(0, 0, 1).Format(time.RFC3339))
			done, err := db.partitionDDL(ctx, sql)
			var pgErr *pgconn.PgError
			switch {
			case err == nil && !done && day.Before(soon):
				// Its rows would go to the default partition, which then
				// keeps it from being made: an operator should free the lock.
				db.log.Error("partition for a day begun or beginning tomorrow not created: its table is locked (a long read or a dump); "+
					"its rows go to the default partition until it is made, and none can be made once they do: end what holds the lock "+
					"(pg_stat_activity), the next hourly pass tries again", "table", name, "waited", partitionLockWait)
			case err == nil && !done:
				db.log.Warn("partition not created: its table is locked (a long read or a dump); trying again at the next hourly pass",
					"table", name, "waited", partitionLockWait)
			case errors.As(err, &pgErr) && pgErr.Code == "23514":
				// A row already in the default partition for that day blocks
				// the new partition; it stays in the default partition.
				db.log.Warn("partition not created: rows for that day are in the default partition", "table", name)
			case errors.As(err, &pgErr) && (pgErr.Code == "42P07" || pgErr.Code == "23505"):
				// Another instance created it at the same time (IF NOT
				// EXISTS checks before it waits for the lock).
			case err != nil:
				return fmt.Errorf("create partition %s: %w", name, err)
			}
			if err == nil && !done {
				break // the table's other days would wait for the same lock: each wait holds up its writes
			}
		}
	}
	return nil
}

// DropPartitionsBefore drops daily partitions of health and events wholly
// older than cutoff, and prunes the event dedupe table. It returns the
// partitions dropped.
func (db *DB) DropPartitionsBefore(ctx context.Context, cutoff time.Time) ([]string, error) {
	rows, err := db.pool.Query(ctx, `
		SELECT c.relname FROM pg_inherits i
		JOIN pg_class c ON c.oid = i.inhrelid
		JOIN pg_class p ON p.oid = i.inhparent
		WHERE p.relname IN ('health', 'events') AND c.relname ~ '_[0-9]{8}$'`)
	if err != nil {
		return nil, err
	}
	names, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, err
	}
	var dropped []string
	blocked := map[string]bool{} // tables whose lock a drop could not get: their others would wait too
	for _, name := range names {
		day, err := time.Parse("20060102", name[len(name)-8:])
		if err != nil || !day.AddDate(0, 0, 1).Before(cutoff) && !day.AddDate(0, 0, 1).Equal(cutoff) || blocked[name[:strings.LastIndexByte(name, '_')]] {
			continue
		}
		done, err := db.partitionDDL(ctx, "DROP TABLE IF EXISTS "+pgx.Identifier{name}.Sanitize())
		if err != nil {
			return dropped, fmt.Errorf("drop partition %s: %w", name, err)
		}
		if !done {
			db.log.Warn("partition not dropped: its table is locked (a long read or a dump); trying again at the next hourly pass",
				"table", name, "waited", partitionLockWait)
			blocked[name[:strings.LastIndexByte(name, '_')]] = true
			continue
		}
		dropped = append(dropped, name)
	}
	if _, err := db.pool.Exec(ctx, "DELETE FROM event_ids WHERE received_at < $1", cutoff); err != nil {
		return dropped, fmt.Errorf("prune event ids: %w", err)
	}
	return dropped, nil
}

func isUniqueViolation(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && pgErr.Code == "23505"
}

// transient reports whether err may pass if the same statement is tried
// again later: the database could not be reached (wrong password after a
// rotation, a replica during failover, no such database yet), the
// connection broke, a timeout or cancellation, a lock or resource limit,
// a shutdown, a deadlock or serialization victim. A statement PostgreSQL
// refuses for its content (a constraint, a bad value, a bad query) is not,
// nor is an error of our own (a failed scan).
func transient(err error) bool {
	if connectionFailed(err) {
		return true
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		if len(pgErr.Code) < 2 {
			return true // not a code we know
		}
		switch pgErr.Code[:2] {
		case "21", "22", "23", "42": // cardinality, data, integrity, syntax and access rules
			return false
		}
		return true
	}
	return errors.Is(err, context.Canceled) || pgconn.SafeToRetry(err)
}

// Unavailable reports whether err says the database could not serve the
// statement just now, for reasons of its own state, not the statement's:
// it is unreachable, the connection broke or timed out, it is starting,
// shutting down, read-only (a failover) or out of resources, or the
// statement lost a deadlock or serialization race. Narrower than
// transient: an internal error, a failed transaction or a limit the query
// hit is a fault to look at, not a moment to wait out.
func Unavailable(err error) bool {
	if connectionFailed(err) {
		return true
	}
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) {
		return false
	}
	switch {
	case pgErr.Code == "55P03", pgErr.Code == "25006": // lock not available, read-only transaction
		return true
	case len(pgErr.Code) != 5:
		return false
	}
	switch pgErr.Code[:2] {
	case "08", "40", "53", "57", "58": // connection, rollback, resources, operator intervention, system
		return true
	}
	return false
}

// connectionFailed reports an error of reaching the database or of the
// connection, not an answer to the statement: whatever the server said
// while we connected, a network error or timeout (context.DeadlineExceeded
// is a net.Error too), a connection closed under the statement.
func connectionFailed(err error) bool {
	var connErr *pgconn.ConnectError
	var netErr net.Error
	return errors.As(err, &connErr) || errors.As(err, &netErr) ||
		errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || pgconn.Timeout(err)
}

// dataError marks an error of a value PostgreSQL cannot take (class 22,
// data exception: NUL in text, a number out of range, a bad escape in
// jsonb) as fleet.ErrInvalid: the same write fails every time, so the
// fleet drops the message instead of retrying it forever.
func dataError(err error) error {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && strings.HasPrefix(pgErr.Code, "22") {
		return fmt.Errorf("%w: %v", fleet.ErrInvalid, err)
	}
	return err
}

func isFKViolation(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && pgErr.Code == "23503"
}

func limit(n int) int {
	switch {
	case n <= 0:
		return 100
	case n > 1000:
		return 1000
	}
	return n
}
