package postgres

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/lockergate/lockergate/fleet"
)

const commandCols = `id, device_id, type, coalesce(compartment, 0), reason, in_service, status, error, actor,
	created_at, expires_at, sent_at, done_at`

func scanCommand(row pgx.Row) (*fleet.Command, error) {
	var c fleet.Command
	err := row.Scan(&c.ID, &c.DeviceID, &c.Type, &c.Compartment, &c.Reason, &c.InService, &c.Status, &c.Error, &c.Actor,
		&c.CreatedAt, &c.ExpiresAt, &c.SentAt, &c.DoneAt)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, fleet.ErrNotFound
	}
	if err != nil {
		return nil, err
	}
	return &c, nil
}

func collectCommands(rows pgx.Rows, err error) ([]fleet.Command, error) {
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []fleet.Command
	for rows.Next() {
		c, err := scanCommand(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, *c)
	}
	return out, rows.Err()
}

// CreateCommand implements fleet.Store: the locker check, the command and
// its audit entry are one statement, so one round trip and one commit. To
// an online, enabled locker the command is stored as sent, at its
// creation time.
func (db *DB) CreateCommand(ctx context.Context, c *fleet.Command, audit *fleet.AuditEntry, site string) (fleet.CommandTarget, bool, error) {
	var actor, action *string
	var detail []byte
	token := ""
	if audit != nil {
		d, err := auditDetail(*audit)
		if err != nil {
			return fleet.CommandTarget{}, false, err
		}
		actor, action, detail = &audit.Actor, &audit.Action, d
		if token = audit.Token; token == "" {
			token = fleet.AuditToken(ctx, audit.Actor)
		}
	}
	var t fleet.CommandTarget
	var status *string
	var sentAt *time.Time
	// A pickup's staging unlock ($15): made only while the pickup is live,
	// its row locked (a cancel holds it too: one waits for the other), and
	// recorded on it. A cancel that came first leaves nothing to send; one
	// that comes after finds the command and withdraws it, and Allocate
	// leaves its compartment alone while it may still fire. Other commands
	// (an unlock through the API: the round trip the unlock waits for) run
	// the statement without those parts.
	live, ifLive, recorded, ended := "", "", "", "false"
	args := []any{c.ID, c.DeviceID, c.Type, c.Compartment, c.Reason, c.InService, c.Actor, c.CreatedAt, c.ExpiresAt,
		site, actor, action, detail, token}
	if c.Pickup != "" {
		live = `live AS (SELECT id FROM pickups WHERE id = $15 AND state IN ('staging', 'ready') FOR UPDATE),`
		ifLive = ` AND EXISTS (SELECT 1 FROM live)`
		recorded = `, pk AS (UPDATE pickups SET command_id = ins.id FROM ins WHERE pickups.id = $15)`
		ended = `NOT EXISTS (SELECT 1 FROM live)`
		args = append(args, c.Pickup)
	}
	err := db.pool.QueryRow(ctx, `WITH d AS (
			SELECT id, site, disabled, online AND NOT disabled AS sendable,
				$4::int = 0 OR EXISTS (SELECT 1 FROM compartments c WHERE c.device_id = devices.id AND c.n = $4 AND NOT c.missing) AS has_comp
			FROM devices WHERE id = $2),
		`+live+`
		ins AS (
			INSERT INTO commands (id, device_id, type, compartment, reason, in_service, status, actor, created_at, expires_at, sent_at)
			SELECT $1, d.id, $3, nullif($4, 0), $5, $6, CASE WHEN d.sendable THEN 'sent' ELSE 'pending' END, $7, $8, $9,
				CASE WHEN d.sendable THEN $8::timestamptz END
			FROM d WHERE d.has_comp AND NOT d.disabled AND ($10 = '' OR d.site = $10)`+ifLive+`
			RETURNING id, device_id, status, sent_at),
		aud AS (
			INSERT INTO audit (actor, action, locker, site, detail, token)
			SELECT $11, $12, ins.device_id, d.site, $13, $14 FROM ins, d WHERE $13::jsonb IS NOT NULL)`+recorded+`
		SELECT d.site, d.has_comp, d.disabled, ins.status, ins.sent_at, `+ended+`
		FROM d LEFT JOIN ins ON true`, args...).Scan(&t.Site, &t.HasCompartment, &t.Disabled, &status, &sentAt, &t.PickupEnded)
	if errors.Is(err, pgx.ErrNoRows) || isFKViolation(err) {
		// No such locker (or it was deleted between the check and the insert).
		return t, false, fleet.ErrNotFound
	}
	if pgErr := (*pgconn.PgError)(nil); errors.As(err, &pgErr) && pgErr.Code == "23505" && pgErr.ConstraintName == "commands_pkey" {
		return t, false, fmt.Errorf("command %s: %w", c.ID, fleet.ErrExists)
	}
	if err != nil || status == nil {
		return t, false, err
	}
	c.Status, c.SentAt = *status, sentAt
	return t, true, nil
}

// GetCommand implements fleet.Store.
func (db *DB) GetCommand(ctx context.Context, deviceID, id string) (*fleet.Command, error) {
	return scanCommand(db.pool.QueryRow(ctx, "SELECT "+commandCols+" FROM commands WHERE id = $1 AND device_id = $2", id, deviceID))
}

// MarkCommandSent implements fleet.Store. Its commit does not wait for the
// disk (synchronous_commit off for this transaction only): if PostgreSQL
// itself crashes within a fraction of a second, the command is pending
// again and is sent again by id, which lockers ignore (protocol: commands
// are idempotent by id), and should it expire pending, the locker's answer
// is still taken (CompleteCommand). The durable records (the command, its
// audit entry, its result) are not relaxed.
func (db *DB) MarkCommandSent(ctx context.Context, id string, at time.Time) (bool, error) {
	b := &pgx.Batch{}
	b.Queue("SELECT set_config('synchronous_commit', 'off', true)")
	b.Queue("UPDATE commands SET status = 'sent', sent_at = $2 WHERE id = $1 AND status = 'pending' AND expires_at > $2", id, at)
	br := db.pool.SendBatch(ctx, b)
	defer br.Close()
	if _, err := br.Exec(); err != nil {
		return false, err
	}
	tag, err := br.Exec()
	if err != nil {
		return false, err
	}
	return tag.RowsAffected() == 1, br.Close()
}

// CompleteCommand implements fleet.Store. A device's answer is taken while
// the command is open; a late "ok" after the gateway gave up (timed_out, or
// expired when a sent mark was lost to a database crash) is kept too (the
// door did open), but never overwrites another answer.
func (db *DB) CompleteCommand(ctx context.Context, deviceID, id, status, errText string, at time.Time) (*fleet.Command, error) {
	// One statement, one round trip: the update and its notification commit
	// together.
	// A set_service the locker carried out takes its compartment out of
	// allocation (or back), in the same statement.
	// The status it replaces is read under the row's lock (old), so that an
	// answer racing the sweep or a pickup's withdrawal is late exactly when
	// it came after the other's commit.
	var was string
	c, err := scanCommand(scanAlso{db.pool.QueryRow(ctx, `WITH old AS (
			SELECT status FROM commands WHERE id = $1 AND device_id = $2 FOR UPDATE),
		u AS (
			UPDATE commands SET status = $3, error = $4, done_at = $5 FROM old
			WHERE id = $1 AND device_id = $2 AND (old.status IN ('pending', 'sent') OR (old.status IN ('timed_out', 'expired') AND $3 <> 'expired'))
			RETURNING commands.*, old.status AS was),
		s AS (
			UPDATE compartments c SET in_service = u.in_service, updated_at = $5 FROM u
			WHERE u.type = 'set_service' AND u.status = 'ok' AND u.in_service IS NOT NULL
				AND c.device_id = u.device_id AND c.n = u.compartment)
		SELECT `+commandCols+`, u.was FROM u CROSS JOIN LATERAL (SELECT pg_notify($6, u.id)) n`,
		id, deviceID, status, errText, at, commandChannel), []any{&was}})
	if c != nil {
		c.LateAnswer = was != "pending" && was != "sent"
	}
	return c, dataError(err)
}

// commandChannel carries the ids of commands that changed, on commit, to
// every gateway instance (one instance may wait on a result another took).
const commandChannel = "lockergate_command"

// kickChannel carries the ids of lockers disabled or re-provisioned, on
// commit, to every gateway instance: each forgets the secret it may have
// cached for them.
const kickChannel = "lockergate_kick"

// WatchCommands implements fleet.Store: it LISTENs on a dedicated
// connection and calls fn with each changed command id until ctx ends,
// reconnecting after errors. Each time LISTEN is in place again it calls
// fn with "": what was sent meanwhile was missed (PostgreSQL notifies only
// the sessions listening at the commit).
func (db *DB) WatchCommands(ctx context.Context, fn func(id string)) error {
	again := false
	db.watch(ctx, commandChannel, "command", fn, func() {
		if again {
			fn("")
		}
		again = true
	})
	return nil
}

// WatchKicks calls fn with the id of every locker disabled or re-provisioned
// (by any instance), and with "" for every HeartbeatKicks, until ctx ends.
// Notifications sent before LISTEN is in place are lost, so listening is
// called each time it is: the first time, and after every reconnect.
func (db *DB) WatchKicks(ctx context.Context, fn func(id string), listening func()) {
	db.watch(ctx, kickChannel, "kick", fn, listening)
}

// HeartbeatKicks sends an empty kick to every instance: one that hears none
// for a while knows its listener is not hearing kicks either (a half-open
// connection, a pooler that drops LISTEN).
func (db *DB) HeartbeatKicks(ctx context.Context) error {
	_, err := db.pool.Exec(ctx, `SELECT pg_notify($1, '')`, kickChannel)
	return err
}

// watch LISTENs to channel on a dedicated connection, reconnecting after
// errors with a back-off, and calls listening (if not nil) each time LISTEN
// is in place.
func (db *DB) watch(ctx context.Context, channel, what string, fn func(string), listening func()) {
	backoff := 100 * time.Millisecond
	listen := func() {
		backoff = 100 * time.Millisecond
		if listening != nil {
			listening()
		}
	}
	for ctx.Err() == nil {
		err := db.listen(ctx, channel, fn, listen)
		if ctx.Err() != nil {
			break
		}
		db.log.Warn(what+" notifications interrupted; reconnecting", "err", err, "retry_in", backoff)
		select {
		case <-ctx.Done():
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, 5*time.Second)
	}
}

// listen LISTENs to channel and calls fn with each payload; listening is
// called once LISTEN is in place.
func (db *DB) listen(ctx context.Context, channel string, fn func(string), listening func()) error {
	conn, err := db.pool.Acquire(ctx)
	if err != nil {
		return err
	}
	// The connection is left in LISTEN state: close it rather than return it.
	defer conn.Release()
	defer conn.Conn().Close(context.Background())
	if _, err := conn.Exec(ctx, "LISTEN "+pgx.Identifier{channel}.Sanitize()); err != nil {
		return err
	}
	listening()
	for {
		wctx, cancel := context.WithTimeout(ctx, db.listenQuiet)
		n, err := conn.Conn().WaitForNotification(wctx)
		cancel()
		if err != nil && ctx.Err() == nil && wctx.Err() != nil {
			// Quiet for a while: a connection that no longer answers
			// (half-open: the server or a middlebox gone without a word)
			// would otherwise be waited on until TCP keep-alive gives up,
			// minutes during which every notification is missed.
			pctx, cancel := context.WithTimeout(ctx, listenProbeTimeout)
			_, err = conn.Exec(pctx, "SELECT 1")
			cancel()
			if err != nil {
				return fmt.Errorf("listening connection quiet for %s did not answer within %s: %w", db.listenQuiet, listenProbeTimeout, err)
			}
			continue
		}
		if err != nil {
			return err
		}
		fn(n.Payload)
	}
}

// A listener that has heard nothing for listenQuietDefault asks its
// connection for an answer, and takes one that gives none within
// listenProbeTimeout for dead.
const (
	listenQuietDefault = 30 * time.Second
	listenProbeTimeout = 5 * time.Second
)

// ExpireCommands implements fleet.Store.
func (db *DB) ExpireCommands(ctx context.Context, now time.Time, grace time.Duration) ([]fleet.Command, error) {
	// Runs every second on every instance: one statement, one round trip.
	return collectCommands(db.pool.Query(ctx, `WITH u AS (
			UPDATE commands SET
				status = CASE WHEN status = 'pending' THEN 'expired' ELSE 'timed_out' END, done_at = $1
			WHERE (status = 'pending' AND expires_at <= $1) OR (status = 'sent' AND expires_at <= $2)
			RETURNING *)
		SELECT `+commandCols+` FROM u CROSS JOIN LATERAL (SELECT pg_notify($3, u.id)) n`,
		now, now.Add(-grace), commandChannel))
}

// UnansweredCommands implements fleet.Store. It runs every second on every
// instance; the partial index on open commands' expires_at keeps it to the
// commands still open.
func (db *DB) UnansweredCommands(ctx context.Context, now, sentBefore time.Time, limit int, skip []string) ([]fleet.Command, error) {
	return collectCommands(db.pool.Query(ctx, `SELECT `+commandCols+` FROM commands
		WHERE status IN ('pending', 'sent') AND expires_at > $1 AND coalesce(sent_at, created_at) <= $2
			AND EXISTS (SELECT 1 FROM devices d WHERE d.id = commands.device_id AND d.online AND NOT d.disabled)
			AND NOT id = ANY(coalesce($4::text[], '{}')) -- nil skips nothing (= ANY(NULL) is NULL)
		ORDER BY coalesce(sent_at, created_at) LIMIT $3`, now, sentBefore, limit, skip))
}

// OpenCommands implements fleet.Store.
func (db *DB) OpenCommands(ctx context.Context, deviceIDs []string, now time.Time) ([]fleet.Command, error) {
	return collectCommands(db.pool.Query(ctx, `SELECT `+commandCols+` FROM commands
		WHERE device_id = ANY($1) AND status IN ('pending', 'sent') AND expires_at > $2 ORDER BY device_id, created_at`, deviceIDs, now))
}
