package postgres

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/lockergate/lockergate/firmware"
	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/protocol"
	"github.com/lockergate/lockergate/webhook"
)

const lockerCols = `d.id, d.serial, d.site, d.model, d.fw, d.online, d.disabled, d.replaceable, d.boot_id,
	d.last_seen, d.connected_at, d.disconnected_at, d.disconnect_reason, d.connect_count, d.health, d.health_at,
	d.health_gaps, d.config_version, d.creds_version, d.creds_acked, d.created_at, d.clock_offset_ms, d.birth_ts,
	(SELECT count(*) FROM presence_log p WHERE p.device_id = d.id AND p.online AND p.ts > now() - interval '10 minutes')`

func scanLocker(row pgx.Row) (*fleet.Locker, error) {
	var l fleet.Locker
	var health []byte
	err := row.Scan(&l.ID, &l.Serial, &l.Site, &l.Model, &l.FW, &l.Online, &l.Disabled, &l.Replaceable, &l.BootID,
		&l.LastSeen, &l.ConnectedAt, &l.DisconnectedAt, &l.DisconnectReason, &l.ConnectCount, &health, &l.HealthAt,
		&l.HealthGaps, &l.ConfigVersion, &l.CredsVersion, &l.CredsAcked, &l.CreatedAt, &l.ClockOffsetMS, &l.BirthTS, &l.RecentConnects)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, fleet.ErrNotFound
	}
	if health != nil {
		l.Health = json.RawMessage(health)
	}
	return &l, err
}

// GetLocker implements fleet.Store.
func (db *DB) GetLocker(ctx context.Context, id string) (*fleet.Locker, error) {
	// Both queries in one round trip (every API call on a locker starts here).
	b := &pgx.Batch{}
	b.Queue("SELECT "+lockerCols+" FROM devices d WHERE d.id = $1", id)
	b.Queue(`SELECT c.n, c.size, c.zone, c.in_service, c.occupied, c.door, p.id, c.missing, coalesce(x.version, 0)
		FROM compartments c LEFT JOIN pickups p ON p.device_id = c.device_id AND p.compartment = c.n AND p.state IN ('staging', 'ready')
		LEFT JOIN compartment_clears x ON x.device_id = c.device_id AND x.n = c.n
			AND x.version > (SELECT creds_acked FROM devices WHERE id = $1)
		WHERE c.device_id = $1 ORDER BY c.n`, id)
	br := db.pool.SendBatch(ctx, b)
	defer br.Close()
	l, err := scanLocker(br.QueryRow())
	if err != nil {
		return nil, err
	}
	rows, err := br.Query()
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	for rows.Next() {
		var c fleet.Compartment
		if err := rows.Scan(&c.N, &c.Size, &c.Zone, &c.InService, &c.Occupied, &c.Door, &c.Pickup, &c.Missing, &c.AwaitsCreds); err != nil {
			return nil, err
		}
		l.Compartments = append(l.Compartments, c)
	}
	return l, rows.Err()
}

// ListLockers implements fleet.Store.
func (db *DB) ListLockers(ctx context.Context, f fleet.LockerFilter) ([]fleet.Locker, error) {
	var w conds
	w.add("d.id > $%d", f.After)
	if f.Site != "" {
		w.add("d.site = $%d", f.Site)
	}
	if f.Model != "" {
		w.add("d.model = $%d", f.Model)
	}
	if f.FW != "" {
		w.add("d.fw = $%d", f.FW)
	}
	if f.Online != nil {
		w.add("d.online = $%d", *f.Online)
	}
	w.args = append(w.args, limit(f.Limit))
	q := fmt.Sprintf("SELECT %s FROM devices d WHERE %s ORDER BY d.id LIMIT $%d", lockerCols, w.and(), len(w.args))
	rows, err := db.pool.Query(ctx, q, w.args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []fleet.Locker
	for rows.Next() {
		l, err := scanLocker(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, *l)
	}
	return out, rows.Err()
}

// EnabledLockerIDs implements fleet.Store.
func (db *DB) EnabledLockerIDs(ctx context.Context, after string, limit int) ([]string, error) {
	rows, err := db.pool.Query(ctx, `SELECT id FROM devices WHERE id > $1 AND NOT disabled ORDER BY id LIMIT $2`, after, limit)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, pgx.RowTo[string])
}

// LockerIDsOlderThan returns the id of every locker registered more than
// age ago (by the database's clock), disabled ones included, in order.
func (db *DB) LockerIDsOlderThan(ctx context.Context, age time.Duration) ([]string, error) {
	rows, err := db.pool.Query(ctx, `SELECT id FROM devices WHERE created_at < now() - make_interval(secs => $1) ORDER BY id`, age.Seconds())
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, pgx.RowTo[string])
}

// UpdateLocker sets a locker's disabled and replaceable flags (nil leaves one as is).
// A locker disabled, it tells every gateway instance (WatchKicks), and
// its open commands are withdrawn, as a pickup's staging unlock is when
// the pickup ends (withdrawCTE): a pending one ends expired, a sent one
// timed_out, error "withdrawn: locker disabled", so that none runs when
// the locker is enabled again (a stolen unit found, say, should not open
// for an unlock queued before it was taken). Their waiters hear of it.
//
// Under the locker's advisory lock (lockerLock), which a pickup's
// transition takes before it withdraws a command and then touches the
// devices row: without it the two took those rows in opposite orders. The
// withdrawal is a statement of its own after the disable, so that it sees
// a command stored while the disable waited for the row. A command whose
// statement read the locker enabled and commits after the withdrawal has
// read the commands (the two a fraction of a millisecond apart) escapes
// both; CreateCommand takes no lock, being the unlock's path.
func (db *DB) UpdateLocker(ctx context.Context, id string, disabled, replaceable *bool) (*fleet.Locker, error) {
	err := pgx.BeginFunc(ctx, db.pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `SELECT `+lockerLock("$1"), id); err != nil {
			return err
		}
		err := tx.QueryRow(ctx, `WITH u AS (UPDATE devices SET disabled = coalesce($2, disabled),
				replaceable = coalesce($3, replaceable) WHERE id = $1 RETURNING id, disabled)
			SELECT 1 FROM u LEFT JOIN LATERAL (SELECT pg_notify($4, u.id) WHERE u.disabled) n ON true`,
			id, disabled, replaceable, kickChannel).Scan(nil) // a row: the locker exists
		if errors.Is(err, pgx.ErrNoRows) {
			return fleet.ErrNotFound
		}
		if err != nil || disabled == nil || !*disabled {
			return err
		}
		now := time.Now()
		if _, err = tx.Exec(ctx, `WITH wd AS (UPDATE commands SET status = CASE WHEN status = 'pending' THEN 'expired' ELSE 'timed_out' END,
				error = 'withdrawn: locker disabled', done_at = $3
			WHERE device_id = $1 AND status IN ('pending', 'sent') RETURNING id)
			SELECT count(pg_notify($2, wd.id)) FROM wd`, id, commandChannel, now); err != nil {
			return err
		}
		// Its open firmware jobs end skipped, as a replaced board's do
		// (migration 012's trigger): it can no longer connect to report,
		// and a job that times out would count against its rollout's
		// gate as the image's failure.
		_, err = tx.Exec(ctx, `UPDATE fw_jobs SET state = 'skipped', error = $2, updated_at = $3, done_at = $3
			WHERE device_id = $1 AND state IN ('queued', 'sent', 'downloading', 'verifying', 'installing', 'rebooting')`,
			id, firmware.SkipDisabled, now)
		return err
	})
	if err != nil {
		return nil, err
	}
	return db.GetLocker(ctx, id)
}

// lockDevicesCTE locks, in id order, the rows of devices whose ids are the
// statement's $1 (a text array): the first part of every statement of the
// running fleet that updates many lockers' rows at once (MarkOnlineMany,
// MarkOfflineMany, RecordBirths, AckCredsMany, TouchLockers, the health
// writer's latest health), which then updates only rows it joined with "locked". Not of
// EndOpenSessions, which runs before the fleet does, nor of the demo's
// MarkSiteReplaceable.
//
// Without it each statement locked rows in its plan's order (the order of
// a hash table or of the heap), and two on overlapping lockers (a control
// shard's batch and a health batch of the same lockers, in a reconnect
// storm; two instances' health batches behind an external broker)
// deadlocked: PostgreSQL failed one after deadlock_timeout (1 s), a stall
// of that shard or health writer before its retry. A version of
// TestBatchUpdatesDoNotDeadlock that did not stop at the first counted 71
// in 300 such statements. Taken in one order, locks cannot form a cycle: a
// statement waits only for a row ordered after every row it holds.
// Sorting the arrays in Go would not do: the plan, not the array, decides
// the order rows are met in. The ORDER BY is under the locking clause, so
// rows are locked as they come out of the sort (a custom plan) or of an
// index scan of devices_pkey (a generic plan), in the column's collation,
// the same for every statement.
//
// Rows the update then leaves as they are (an older health report, a
// session end older than the session) are locked too, until the commit.
// The lock costs the health writer's update up to 3 µs per locker (EXPLAIN
// ANALYZE of a batch of 300 and of 2,000 lockers: 2.0 against 2.9 ms, 10-14
// against 14-16 ms).
//
// Single-row updates need no order: they hold one devices row.
const lockDevicesCTE = `locked AS MATERIALIZED (
			SELECT id FROM devices WHERE id = ANY($1::text[]) ORDER BY id FOR NO KEY UPDATE)`

// markOnlineManySQL starts sessions ($1 ids, $2 times). "d.id = ANY($1)"
// makes the lockers an index condition (see updateLatestSQL).
const markOnlineManySQL = `
		WITH ` + lockDevicesCTE + `,
		d AS (
			UPDATE devices d SET online = true, connected_at = s.at, last_seen = greatest(d.last_seen, s.at),
				connect_count = connect_count + 1, disconnect_reason = ''
			FROM unnest($1::text[], $2::timestamptz[]) AS s(id, at) JOIN locked l ON l.id = s.id
			WHERE d.id = s.id AND d.id = ANY($1::text[]) RETURNING d.id, s.at)
		INSERT INTO presence_log (device_id, ts, online) SELECT id, at, true FROM d`

// MarkOnlineMany implements fleet.Store: one statement for all of starts,
// locking its lockers' rows in order (lockDevicesCTE).
func (db *DB) MarkOnlineMany(ctx context.Context, starts []fleet.SessionStart) error {
	ids := make([]string, len(starts))
	ats := make([]time.Time, len(starts))
	for i, s := range starts {
		ids[i], ats[i] = s.ID, s.At
	}
	_, err := db.pool.Exec(ctx, markOnlineManySQL, ids, ats)
	return err
}

// markOfflineManySQL ends sessions ($1 ids, $2 reasons, $3 times).
const markOfflineManySQL = `
		WITH ` + lockDevicesCTE + `,
		d AS (
			UPDATE devices d SET online = false, disconnected_at = e.at, disconnect_reason = e.reason
			FROM unnest($1::text[], $2::text[], $3::timestamptz[]) AS e(id, reason, at) JOIN locked l ON l.id = e.id
			WHERE d.id = e.id AND d.id = ANY($1::text[]) AND d.online AND (d.connected_at IS NULL OR d.connected_at <= e.at)
			RETURNING d.id, e.at, e.reason)
		INSERT INTO presence_log (device_id, ts, online, reason) SELECT id, at, false, reason FROM d`

// MarkOfflineMany implements fleet.Store: one statement for all of ends,
// locking its lockers' rows in order (lockDevicesCTE). A session that
// ended before the locker's current one started (a takeover's old session,
// a late Last Will) changes nothing.
func (db *DB) MarkOfflineMany(ctx context.Context, ends []fleet.SessionEnd) error {
	ids := make([]string, len(ends))
	reasons := make([]string, len(ends))
	ats := make([]time.Time, len(ends))
	for i, e := range ends {
		ids[i], reasons[i], ats[i] = e.ID, e.Reason, e.At
	}
	_, err := db.pool.Exec(ctx, markOfflineManySQL, ids, reasons, ats)
	return err
}

// recordBirthsSQL records births ($1 ids, $2 firmware, $3 models, $4 boot
// ids, $5 times, $6 clock offsets, $7 whether to clear a clock-skew alert,
// $8 the births' ts).
const recordBirthsSQL = `WITH ` + lockDevicesCTE + `,
		b AS (
			SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::bigint[], $7::bool[], $8::timestamptz[])
				AS b(id, fw, model, boot_id, at, off, clear_skew, ts)),
		cleared AS (UPDATE alerts a SET cleared_at = b.at, cleared_by = 'gateway' FROM b
			WHERE b.clear_skew AND a.device_id = b.id AND a.kind = '` + fleet.AlertClockSkew + `' AND a.cleared_at IS NULL)
		UPDATE devices d SET ` + birthSet + `
		FROM b JOIN locked l ON l.id = b.id WHERE d.id = b.id AND d.id = ANY($1::text[])`

// birthSet is what a birth b (fw, model, boot_id, at, off, ts) sets on its
// locker's row d.
const birthSet = `fw = coalesce(nullif(b.fw, ''), d.fw), model = coalesce(nullif(b.model, ''), d.model),
			boot_id = b.boot_id, last_seen = greatest(d.last_seen, b.at), health_seq = 0, clock_offset_ms = b.off,
			born_at = b.at, birth_ts = b.ts`

// startWithBirthSQL starts a session from a birth ($1 id, $2 firmware, $3
// model, $4 boot id, $5 arrival, $6 clock offset, $7 whether to clear a
// clock-skew alert, $8 the birth's ts, $9 whether it is a retained copy)
// and records the birth, unless the locker is online from that very birth
// (the same boot id and ts; without a ts, only a retained copy of a birth
// without one is taken for it: a live one may be a reconnect). A
// comparison with a NULL on one side only is no match. One
// UPDATE: a second copy applied at once by another instance waits for the
// row and, read again after the first commits, finds it recorded. Its one
// row counts the sessions started (0 or 1).
const startWithBirthSQL = `WITH b AS (
			SELECT $1::text AS id, $2::text AS fw, $3::text AS model, $4::text AS boot_id, $5::timestamptz AS at,
				$6::bigint AS off, $7::bool AS clear_skew, $8::timestamptz AS ts),
		u AS (UPDATE devices d SET online = true, connected_at = b.at, connect_count = d.connect_count + 1,
				disconnect_reason = '', ` + birthSet + `
			FROM b WHERE d.id = b.id AND NOT coalesce(d.online AND d.boot_id = b.boot_id AND (d.birth_ts IS NULL AND b.ts IS NULL AND $9
				OR abs(extract(epoch FROM d.birth_ts - b.ts)) < ` + sameBirthWithin + `), false)
			RETURNING d.id, b.at, b.clear_skew),
		cleared AS (UPDATE alerts a SET cleared_at = u.at, cleared_by = 'gateway' FROM u
			WHERE u.clear_skew AND a.device_id = u.id AND a.kind = '` + fleet.AlertClockSkew + `' AND a.cleared_at IS NULL),
		logged AS (INSERT INTO presence_log (device_id, ts, online) SELECT id, at, true FROM u)
		SELECT count(*) FROM u`

// sameBirthWithin is how close, in seconds, a birth's ts must be to the
// one recorded to be that birth: the same to the millisecond, within the
// rounding of a ts derived from an offset (migration 025); a reconnect is
// a new birth, sent well after.
const sameBirthWithin = `0.002`

// StartSessionWithBirth implements fleet.Store.
func (db *DB) StartSessionWithBirth(ctx context.Context, b fleet.BirthRecord) (bool, error) {
	ts, off := birthTimes(&b)
	var n int
	err := db.pool.QueryRow(ctx, startWithBirthSQL, b.ID, b.Presence.FW, b.Presence.Model, b.Presence.BootID, b.At,
		off, b.ClearSkew, ts, b.Retained).Scan(&n)
	return n == 1, dataError(err)
}

// birthTimes is what birth b records of the locker's clock: its ts, and
// the offset from its arrival unless b.NoOffset (nil: none).
func birthTimes(b *fleet.BirthRecord) (ts *time.Time, off *int64) {
	if b.Presence.TS.IsZero() {
		return nil, nil
	}
	t := b.Presence.TS.Time
	if !b.NoOffset {
		ms := t.Sub(b.At).Milliseconds()
		off = &ms
	}
	return &t, off
}

// RecordBirths implements fleet.Store: one statement, locking its lockers'
// rows in order (lockDevicesCTE), each alert's clearing in it (an index
// probe of the open-alert index) rather than a round trip more for every
// birth of a reconnect storm.
func (db *DB) RecordBirths(ctx context.Context, births []fleet.BirthRecord) error {
	n := len(births)
	ids, fws, models, boots := make([]string, n), make([]string, n), make([]string, n), make([]string, n)
	ats, offs, clears, tss := make([]time.Time, n), make([]*int64, n), make([]bool, n), make([]*time.Time, n)
	for i, b := range births {
		ids[i], fws[i], models[i], boots[i] = b.ID, b.Presence.FW, b.Presence.Model, b.Presence.BootID
		ats[i], clears[i] = b.At, b.ClearSkew
		tss[i], offs[i] = birthTimes(&births[i])
	}
	_, err := db.pool.Exec(ctx, recordBirthsSQL, ids, fws, models, boots, ats, offs, clears, tss)
	return dataError(err)
}

// RecordBirth records one birth (RecordBirths).
func (db *DB) RecordBirth(ctx context.Context, id string, p *protocol.Presence, at time.Time, clearSkew bool) error {
	return db.RecordBirths(ctx, []fleet.BirthRecord{{ID: id, Presence: p, At: at, ClearSkew: clearSkew}})
}

// ackCredsManySQL records acknowledged credential sets ($1 ids, $2 versions),
// clears the creds_not_applied alert of each locker that acknowledged its
// current set (an index probe of the open-alert index each), and returns
// the lockers whose acknowledgement went back to an older set than the one
// they had acknowledged and left them behind (ahead 0), and those whose
// acknowledgement is ahead of their current set (ahead: its version), which
// is not recorded: no such set was published, and recording it would read
// every set since as applied. Its rows are locked in id order, as
// lockDevicesCTE does, reading the acknowledgement and the set they had.
const ackCredsManySQL = `WITH locked AS MATERIALIZED (
			SELECT id, creds_acked AS was, creds_version AS cv FROM devices WHERE id = ANY($1::text[]) ORDER BY id FOR NO KEY UPDATE),
		acks AS (SELECT a.id, a.version, l.was, l.cv FROM unnest($1::text[], $2::bigint[]) AS a(id, version) JOIN locked l ON l.id = a.id),
		acked AS (UPDATE devices d SET creds_acked = a.version
			FROM acks a
			WHERE d.id = a.id AND d.id = ANY($1::text[]) AND a.version <= a.cv
			RETURNING d.id, d.creds_version, d.creds_acked = d.creds_version AS current,
				d.creds_acked < a.was AND d.creds_acked < d.creds_version AS regressed),
		cleared AS (UPDATE alerts SET cleared_at = now(), cleared_by = 'gateway'
			FROM acked WHERE acked.current AND alerts.device_id = acked.id
				AND alerts.kind = '` + fleet.AlertCredsNotApplied + `' AND alerts.cleared_at IS NULL)
		SELECT id, creds_version, 0::bigint FROM acked WHERE regressed
		UNION ALL SELECT id, cv, version FROM acks WHERE version > cv`

// AckCredsMany implements fleet.Store, locking its lockers' rows in order:
// the version each locker acknowledged last, not the highest it ever did.
// A locker applies each set it gets, so one that applied an older set after
// a newer (two instances publishing one after the other out of order) holds
// the older one, and must show as behind (CredsBehind) to be sent the
// current set again. It returns the lockers whose acknowledgement went back
// or is ahead of their current set (fleet.Store).
func (db *DB) AckCredsMany(ctx context.Context, acks []fleet.CredsAck) ([]fleet.CredsLag, error) {
	ids := make([]string, len(acks))
	versions := make([]int64, len(acks))
	for i, a := range acks {
		ids[i], versions[i] = a.ID, a.Version
	}
	rows, _ := db.pool.Query(ctx, ackCredsManySQL, ids, versions)
	back, err := pgx.CollectRows(rows, pgx.RowToStructByPos[fleet.CredsLag])
	return back, dataError(err)
}

// touchLockersSQL moves last_seen forward ($1 ids, $2 times), the rows
// locked in order (lockDevicesCTE).
const touchLockersSQL = `WITH ` + lockDevicesCTE + `
		UPDATE devices d SET last_seen = t.at
		FROM unnest($1::text[], $2::timestamptz[]) AS t(id, at) JOIN locked l ON l.id = t.id
		WHERE d.id = t.id AND d.id = ANY($1::text[]) AND (d.last_seen IS NULL OR d.last_seen < t.at)`

// TouchLockers implements fleet.Store.
func (db *DB) TouchLockers(ctx context.Context, ids []string, at []time.Time) error {
	_, err := db.pool.Exec(ctx, touchLockersSQL, ids, at)
	return dataError(err)
}

// InsertHealth implements fleet.Store: rows by COPY and latest health by
// one UPDATE, in one transaction and one round trip (writeHealth).
func (db *DB) InsertHealth(ctx context.Context, batch []fleet.HealthRecord, latest []fleet.LatestHealth) error {
	if len(batch) == 0 && len(latest) == 0 {
		return nil
	}
	conn, err := db.pool.Acquire(ctx)
	if err != nil {
		return err
	}
	defer conn.Release() // one left broken or in a transaction is closed, not reused
	// A value PostgreSQL refuses fails the batch every time: ErrInvalid,
	// which the fleet's health writer splits the batch on.
	return dataError(writeHealth(ctx, conn.Conn().PgConn(), batch, latest, db.healthAsync))
}

// InsertEvents implements fleet.Store.
func (db *DB) InsertEvents(ctx context.Context, batch []fleet.EventRecord) ([]fleet.EventRecord, error) {
	var fresh, stored []fleet.EventRecord
	err := pgx.BeginFunc(ctx, db.pool, func(tx pgx.Tx) error {
		fresh, stored = fresh[:0], stored[:0]
		ids := make([]string, len(batch))
		eids := make([]string, len(batch))
		ats := make([]time.Time, len(batch))
		for i, e := range batch {
			ids[i], eids[i], ats[i] = e.DeviceID, e.EventID, e.ReceivedAt
		}
		rows, err := tx.Query(ctx, `
			INSERT INTO event_ids (device_id, event_id, received_at)
			SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[])
			ON CONFLICT DO NOTHING RETURNING device_id, event_id`, ids, eids, ats)
		if err != nil {
			return fmt.Errorf("dedupe events: %w", err)
		}
		isNew := make(map[[2]string]bool, len(batch)) // false: stored before with this very received_at
		for rows.Next() {
			var k [2]string
			if err := rows.Scan(&k[0], &k[1]); err != nil {
				return err
			}
			isNew[k] = true
		}
		if err := rows.Err(); err != nil {
			return err
		}
		if len(isNew) < len(batch) {
			// Those not inserted that were stored with this very
			// received_at: an earlier try of this call committed them and
			// its answer was lost. A statement of its own, after the
			// insert: its snapshot sees a try whose commit the insert
			// waited for (the insert's own does not).
			rows, err := tx.Query(ctx, `SELECT e.device_id, e.event_id FROM event_ids e
				JOIN unnest($1::text[], $2::text[], $3::timestamptz[]) u (d, id, at)
				ON e.device_id = u.d AND e.event_id = u.id AND e.received_at = u.at`, ids, eids, ats)
			if err != nil {
				return fmt.Errorf("dedupe events: %w", err)
			}
			for rows.Next() {
				var k [2]string
				if err := rows.Scan(&k[0], &k[1]); err != nil {
					return err
				}
				if _, ok := isNew[k]; !ok {
					isNew[k] = false
				}
			}
			if err := rows.Err(); err != nil {
				return err
			}
		}
		for _, e := range batch {
			k := [2]string{e.DeviceID, e.EventID}
			inserted, ok := isNew[k]
			switch {
			case ok && inserted:
				fresh = append(fresh, e)
			case ok:
				stored = append(stored, e)
			}
			delete(isNew, k) // the same event twice in one batch counts once
		}
		if len(fresh) == 0 {
			return nil
		}
		if _, err := tx.CopyFrom(ctx, pgx.Identifier{"events"}, eventCopyCols,
			pgx.CopyFromSlice(len(fresh), func(i int) ([]any, error) { return eventCopyRow(&fresh[i]), nil })); err != nil {
			return fmt.Errorf("copy events: %w", err)
		}
		if err := queueEffects(ctx, tx, fresh); err != nil {
			return err
		}
		stale, err := applyEvents(ctx, tx, fresh, db.doorByClock, db.log)
		if err != nil {
			return err
		}
		return applyAlerts(ctx, tx, fresh, stale)
	})
	if err != nil {
		return nil, dataError(err)
	}
	// A stored one's Alert is as the try that committed it left it.
	return append(fresh, stored...), nil
}

// eventCopyCols are the columns events and event_outbox are copied in by,
// and eventCopyRow an event's values for them.
var eventCopyCols = []string{"device_id", "event_id", "received_at", "ts", "type", "compartment", "body"}

func eventCopyRow(e *fleet.EventRecord) []any {
	var comp *int
	if e.Compartment > 0 {
		comp = &e.Compartment
	}
	return []any{e.DeviceID, e.EventID, e.ReceivedAt, e.TS, e.Type, comp, string(e.Body)}
}

// queueEffects writes the fresh events whose effects are still to apply
// (EventRecord.Pending) to the outbox, with them.
func queueEffects(ctx context.Context, tx pgx.Tx, fresh []fleet.EventRecord) error {
	var pending []*fleet.EventRecord
	for i := range fresh {
		if fresh[i].Pending {
			pending = append(pending, &fresh[i])
		}
	}
	if len(pending) == 0 {
		return nil
	}
	_, err := tx.CopyFrom(ctx, pgx.Identifier{"event_outbox"}, eventCopyCols,
		pgx.CopyFromSlice(len(pending), func(i int) ([]any, error) { return eventCopyRow(pending[i]), nil }))
	if err != nil {
		return fmt.Errorf("queue event effects: %w", err)
	}
	return nil
}

// EffectsApplied implements fleet.Store.
func (db *DB) EffectsApplied(ctx context.Context, deviceID string, eventIDs []string) error {
	_, err := db.pool.Exec(ctx, `DELETE FROM event_outbox WHERE device_id = $1 AND event_id = ANY($2)`, deviceID, eventIDs)
	return err
}

// PendingEffects implements fleet.Store: it claims the rows for lease
// (rows another instance holds are skipped, unless reclaim), and returns
// them oldest first, so a locker's events come in their order.
func (db *DB) PendingEffects(ctx context.Context, before time.Time, limit int, lease time.Duration, reclaim bool) ([]fleet.EventRecord, error) {
	rows, err := db.pool.Query(ctx, `WITH c AS (
			SELECT device_id, event_id FROM event_outbox
			WHERE received_at < $1 AND ($4 OR claimed_until IS NULL OR claimed_until < now())
			ORDER BY received_at, device_id, event_id LIMIT $2 FOR UPDATE SKIP LOCKED)
		UPDATE event_outbox o SET claimed_until = now() + $3::interval FROM c
		WHERE o.device_id = c.device_id AND o.event_id = c.event_id
		RETURNING o.device_id, o.event_id, o.received_at, o.ts, o.type, coalesce(o.compartment, 0), o.body`, before, limit, lease, reclaim)
	if err != nil {
		return nil, err
	}
	evs, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (fleet.EventRecord, error) {
		e := fleet.EventRecord{Pending: true}
		var body []byte
		err := row.Scan(&e.DeviceID, &e.EventID, &e.ReceivedAt, &e.TS, &e.Type, &e.Compartment, &body)
		e.Body = body
		return e, err
	})
	slices.SortFunc(evs, func(a, b fleet.EventRecord) int {
		return cmp.Or(a.ReceivedAt.Compare(b.ReceivedAt), strings.Compare(a.DeviceID, b.DeviceID), strings.Compare(a.EventID, b.EventID))
	})
	return evs, err
}

// applyEvents updates compartment state from door events: by locker and
// compartment, the order in which a replacement (Register) locks them, so
// the two cannot deadlock; each compartment's events in the order they came.
// With byClock, an event older by the locker's clock than the one the state
// came from changes nothing (applyDoorSQL); such stale door events are
// returned, by EventRecord.Key. A body that does not read as an event
// (validated at ingest, so a bug) changes nothing and is logged.
func applyEvents(ctx context.Context, tx pgx.Tx, events []fleet.EventRecord, byClock bool, log *slog.Logger) (stale map[string]bool, err error) {
	events = slices.Clone(events)
	slices.SortStableFunc(events, func(a, b fleet.EventRecord) int {
		return cmp.Or(strings.Compare(a.DeviceID, b.DeviceID), cmp.Compare(a.Compartment, b.Compartment))
	})
	stale = make(map[string]bool)
	b := &pgx.Batch{}
	for _, e := range events {
		if e.Compartment < 1 {
			continue
		}
		// Read as the ingest read it: names exactly (protocol.Decode).
		ev, err := protocol.Decode[protocol.Event](e.Body)
		if err != nil {
			log.Error("stored event no longer reads as an event: its compartment's door state is left as it was (ingest read it just before: a gateway bug, please report it)",
				"locker", e.DeviceID, "event", e.EventID, "type", e.Type, "compartment", e.Compartment, "err", err)
			continue
		}
		var occupied *bool // unchanged
		var door string
		switch ev.Type {
		case protocol.EventDoorOpened:
			door = "open"
		case protocol.EventDoorClosed:
			occ := ev.Occupied != nil && *ev.Occupied
			door, occupied = "closed", &occ
		case protocol.EventDoorAjar:
			door = "ajar"
		default:
			continue
		}
		b.Queue(applyDoorSQL, e.DeviceID, e.Compartment, e.ReceivedAt, e.TS, door, occupied,
			byClock, DoorClockWindow, doorClockAhead).QueryRow(func(row pgx.Row) error {
			var current bool
			if err := row.Scan(&current); err != nil {
				return err
			}
			if !current {
				stale[e.Key()] = true
			}
			return nil
		})
	}
	if b.Len() == 0 {
		return stale, nil
	}
	return stale, tx.SendBatch(ctx, b).Close()
}

// DoorClockWindow bounds how much older by the locker's clock a door event
// can be than the compartment's state and still be taken as stale
// (Options.DoorEventsByClock). One older still is taken for a clock that
// was set back (a locker that rebooted with its clock reset) and applies.
const DoorClockWindow = 30 * time.Minute

// doorClockAhead is how far a door event's ts may read ahead of its arrival
// for the state it sets to hold older events back (by clock). A clock that
// reads ahead will be set back, and the events it sends after that would
// read older than the state: such a state holds nothing back (door_ts NULL).
const doorClockAhead = time.Second

// applyDoorSQL applies a door event ($1 locker, $2 compartment, $3 arrival,
// $4 the locker's ts, $5 door, $6 occupied or NULL to keep it). With $7
// (by clock) it leaves the state alone if the state came from a later
// event by the locker's clock, by less than $8 (DoorClockWindow). The
// state keeps its event's ts (door_ts) unless that read more than $9
// ahead of its arrival (doorClockAhead). Its one row says whether the event
// is current: in arrival order always; by clock when it was applied, or
// the compartment is unknown (no state to be stale against).
const applyDoorSQL = `WITH u AS (
		UPDATE compartments c SET door = $5, occupied = coalesce($6, c.occupied), updated_at = $3, door_at = $3,
			door_ts = CASE WHEN $4::timestamptz <= $3::timestamptz + $9::interval THEN $4 END
		WHERE c.device_id = $1 AND c.n = $2
			AND (NOT $7 OR c.door_ts IS NULL OR $4 >= c.door_ts OR $4 < c.door_ts - $8::interval)
		RETURNING 1)
	SELECT NOT $7 OR EXISTS (SELECT 1 FROM u) OR NOT EXISTS (SELECT 1 FROM compartments WHERE device_id = $1 AND n = $2)`

// applyAlerts applies the fresh events' alert changes (fleet.AlertChange)
// in their order, and marks the raises that opened an alert. A stale door
// event (applyEvents) neither raises nor clears a door-ajar alert: the
// alert follows the door state, so a late closing does not clear the alert
// of a door left ajar after it, nor a late ajar raise one for a door closed
// since.
func applyAlerts(ctx context.Context, tx pgx.Tx, fresh []fleet.EventRecord, stale map[string]bool) error {
	b := &pgx.Batch{}
	for i := range fresh {
		e, a := &fresh[i], fresh[i].Alert
		if a == nil {
			continue
		}
		a.Raised = false // a previous try's mark
		// Only door events are stale; their only alert change is door_ajar's.
		if stale[e.Key()] {
			continue
		}
		if a.ClearKind != "" {
			b.Queue(`UPDATE alerts SET cleared_at = $4, cleared_by = 'gateway' WHERE device_id = $1 AND kind = $2 AND cleared_at IS NULL
				AND ($3 = 0 OR compartment = $3)`, e.DeviceID, a.ClearKind, a.ClearAt, e.ReceivedAt)
		}
		if a.Raise != nil {
			sql, args := raiseAlertSQL, raiseAlertArgs(a.Raise)
			if r := a.IfRejected; r != nil {
				sql, args = raiseIfRejectedSQL, append(args, e.TS, r.Window, r.Min)
			}
			b.Queue(sql, args...).QueryRow(func(row pgx.Row) error {
				var n int
				err := row.Scan(&n)
				a.Raised = n == 1
				return err
			})
		}
	}
	if b.Len() == 0 {
		return nil
	}
	if err := tx.SendBatch(ctx, b).Close(); err != nil {
		return fmt.Errorf("apply alerts: %w", err)
	}
	return nil
}

// ListHealth implements fleet.Store.
func (db *DB) ListHealth(ctx context.Context, id string, r fleet.Range) ([]fleet.HealthRecord, error) {
	afterSeq, _ := strconv.ParseInt(r.AfterKey, 10, 64)
	rows, err := db.pool.Query(ctx, `SELECT device_id, received_at, ts, seq, body FROM health
		WHERE device_id = $1 AND received_at >= $2 AND received_at < $3 AND (received_at, seq) > ($5, $6)
		ORDER BY received_at, seq LIMIT $4`,
		id, r.Since, untilOr(r.Until), limit(r.Limit), r.AfterTS, afterSeq)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(row pgx.CollectableRow) (fleet.HealthRecord, error) {
		var h fleet.HealthRecord
		var body []byte
		err := row.Scan(&h.DeviceID, &h.ReceivedAt, &h.TS, &h.Seq, &body)
		h.Body = body
		return h, err
	})
}

// ListEvents implements fleet.Store.
func (db *DB) ListEvents(ctx context.Context, id string, r fleet.Range) ([]fleet.EventRecord, error) {
	rows, err := db.pool.Query(ctx, `SELECT `+eventCols+` FROM events
		WHERE device_id = $1 AND received_at >= $2 AND received_at < $3 AND (received_at, event_id) > ($5, $6)
		ORDER BY received_at, event_id LIMIT $4`,
		id, r.Since, untilOr(r.Until), limit(r.Limit), r.AfterTS, r.AfterKey)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, scanEvent)
}

// eventCols are the columns scanEvent reads.
const eventCols = `device_id, event_id, received_at, ts, type, coalesce(compartment, 0), body`

func scanEvent(row pgx.CollectableRow) (fleet.EventRecord, error) {
	var e fleet.EventRecord
	var body []byte
	err := row.Scan(&e.DeviceID, &e.EventID, &e.ReceivedAt, &e.TS, &e.Type, &e.Compartment, &body)
	e.Body = body
	return e, err
}

// DoorClosingsAfter implements pickup.Store.
func (db *DB) DoorClosingsAfter(ctx context.Context, deviceID string, n int, since, after time.Time) ([]fleet.EventRecord, error) {
	rows, err := db.pool.Query(ctx, `SELECT `+eventCols+` FROM events
		WHERE device_id = $1 AND received_at > $2 AND type = '`+protocol.EventDoorClosed+`' AND compartment = $3 AND ts >= $4
		ORDER BY ts, received_at LIMIT $5`, deviceID, since, n, after, maxClosingsAfter)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, scanEvent)
}

// LockEffects implements fleet.Store with a transaction advisory lock,
// taken in a transaction left open on a pooled connection of its own until
// release (which rolls it back). A transaction rather than a session lock,
// so that it holds through a transaction-pooling PgBouncer, and so that
// PostgreSQL ends it when its holder stops answering: the transaction is
// idle while the holder's steps run on other connections, and a holder
// idle longer than effectsLockIdle (a hung instance whose socket is still
// open) has its session ended, and the lock with it. So the lock is sure
// only for a part of that bound, counted from a moment before the
// server's last answer (the request, or a query made after a long wait):
// until. Its key is not lockerLock's,
// which the effects' own transactions take. Releasing twice is harmless.
func (db *DB) LockEffects(ctx context.Context, deviceID string) (time.Time, func(), error) {
	conn, err := db.pool.Acquire(ctx)
	if err != nil {
		return time.Time{}, nil, err
	}
	drop := func() { // the session's end ends the transaction and its lock
		conn.Conn().Close(context.Background())
		conn.Release()
	}
	// One batch: the transaction, its idle bound and the lock (one round
	// trip once the connection has the statement prepared).
	b := &pgx.Batch{}
	b.Queue(`BEGIN`)
	b.Queue(`SELECT set_config('idle_in_transaction_session_timeout', $2, true), pg_advisory_xact_lock(`+effectsLock+`)`,
		deviceID, strconv.FormatInt(effectsLockIdle.Milliseconds(), 10))
	asked := time.Now()
	if err := conn.SendBatch(ctx, b).Close(); err != nil {
		drop() // it may have been granted as ctx ended
		return time.Time{}, nil, err
	}
	until := asked.Add(effectsLockIdle * 3 / 4)
	if time.Since(asked) > effectsLockIdle/8 {
		// A long wait (behind a hung holder, say) would leave little of
		// that: the bound runs from the last answer the server sent, so
		// one more query, asked after t0, restarts it no earlier than t0.
		// Counting from the grant as read here instead would add any
		// stall of this instance after the server's answer.
		t0 := time.Now()
		if _, err := conn.Exec(ctx, `SELECT 1`); err != nil {
			drop()
			return time.Time{}, nil, err
		}
		until = t0.Add(effectsLockIdle * 3 / 4)
	}
	var once sync.Once
	return until, func() {
		once.Do(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			if _, err := conn.Exec(ctx, `ROLLBACK`); err != nil {
				// Its session ended first (idle past the bound while the
				// holder's steps ran, or the database went away): another
				// holder may have had the lock meanwhile.
				db.log.Warn("effects lock lost before its release", "locker", deviceID, "err", err)
				drop()
				return
			}
			conn.Release()
		})
	}, nil
}

// effectsLock is the key of LockEffects' lock for the locker $1.
const effectsLock = `hashtextextended('lockergate/effects/' || $1, 0)`

// effectsLockIdle bounds how long a holder of an effects lock may leave
// its transaction idle: far past a batch of pickup steps, short enough
// that a hung instance does not hold a locker's effects for long. A
// variable for the test of the bound.
var effectsLockIdle = 2 * time.Minute

// maxClosingsAfter bounds DoorClosingsAfter: a compartment closed this
// often between a code's use and its report is not a pickup's story.
const maxClosingsAfter = 100

func untilOr(t time.Time) time.Time {
	if t.IsZero() {
		return time.Date(9999, 1, 1, 0, 0, 0, 0, time.UTC)
	}
	return t
}

// RaiseAlert implements fleet.Store.
// The same alert raised again (its locker, kind, compartment and time: a
// replayed event's) is a no-op, as is one of a kind already open where the
// kind holds one open at a time (the alerts_open index).
// An alert with an audit entry writes it in the same transaction when the
// alert is opened.
func (db *DB) RaiseAlert(ctx context.Context, a fleet.Alert) (bool, error) {
	if a.Audit == nil {
		return raiseAlert(ctx, db.pool, &a)
	}
	var raised bool
	err := pgx.BeginFunc(ctx, db.pool, func(tx pgx.Tx) (err error) {
		if raised, err = raiseAlert(ctx, tx, &a); err != nil || !raised {
			return err
		}
		return audit(ctx, tx, *a.Audit)
	})
	return raised && err == nil, err
}

// RaiseDoorsLeftOpen implements fleet.Store. The compartments are locked
// (skipping any a door event is updating), so a closing applied meanwhile
// either comes first, and the door no longer reads open, or waits for this
// transaction, and clears the alert raised in it.
func (db *DB) RaiseDoorsLeftOpen(ctx context.Context, openBefore, at time.Time, limit int) ([]fleet.Alert, error) {
	var raised []fleet.Alert
	err := pgx.BeginFunc(ctx, db.pool, func(tx pgx.Tx) error {
		raised = raised[:0]
		rows, err := tx.Query(ctx, `SELECT c.device_id, c.n, c.door_at FROM compartments c
			WHERE c.door = 'open' AND c.door_at < $1 AND NOT c.missing
				AND NOT EXISTS (SELECT 1 FROM alerts a WHERE a.device_id = c.device_id AND a.kind = '`+fleet.AlertDoorAjar+`'
					AND a.compartment = c.n AND (a.cleared_at IS NULL OR a.raised_at >= c.door_at))
			ORDER BY c.device_id, c.n LIMIT $2 FOR UPDATE OF c SKIP LOCKED`, openBefore, limit)
		if err != nil {
			return err
		}
		type open struct {
			id    string
			n     int
			since time.Time
		}
		doors, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (open, error) {
			var d open
			err := row.Scan(&d.id, &d.n, &d.since)
			return d, err
		})
		if err != nil {
			return err
		}
		// One round trip for them all: the compartments stay locked
		// until the commit, and a closing waits for it.
		b := &pgx.Batch{}
		for _, d := range doors {
			a := fleet.Alert{DeviceID: d.id, Kind: fleet.AlertDoorAjar, Compartment: d.n, RaisedAt: at,
				Detail: fmt.Sprintf("open %d s by the gateway's count: the locker reported the door open and neither closed nor ajar since",
					int(at.Sub(d.since).Seconds()))}
			b.Queue(raiseAlertSQL, raiseAlertArgs(&a)...).QueryRow(func(row pgx.Row) error {
				var n int
				if err := row.Scan(&n); err != nil {
					return err
				}
				if n == 1 {
					raised = append(raised, a)
				}
				return nil
			})
		}
		if b.Len() == 0 {
			return nil
		}
		return tx.SendBatch(ctx, b).Close()
	})
	return raised, err
}

// raiseAlert runs raiseAlertSQL for a on q (the pool, or a transaction the
// alert belongs to) and reports whether it opened the alert.
func raiseAlert(ctx context.Context, q interface {
	QueryRow(context.Context, string, ...any) pgx.Row
}, a *fleet.Alert) (bool, error) {
	var n int
	err := q.QueryRow(ctx, raiseAlertSQL, raiseAlertArgs(a)...).Scan(&n)
	return n == 1, err
}

// openOnceKinds are the alert kinds of which a locker's compartment has at
// most one open (the alerts_open index, migration 023): one raised again
// while open adds to it (repeats, last_raised_at, the latest detail).
const openOnceKinds = `'door_ajar', 'on_battery', 'door_fault', 'clock_skew', 'tamper', 'code_lockout', 'creds_not_applied'`

// raiseAlertSQL opens an alert and, in the same statement, queues an
// alert.raised event to the webhooks that asked for it in its scope (admin
// and operator webhooks: every alert; a store's: its site's), as pickup
// events are queued with their transitions. The delivery is due from the
// alert's raised_at, the gateway's clock that the dispatcher leases by (not
// the database's, which may run ahead). An alert of openOnceKinds raised
// again while open, later than it was last, is added to the open one (no
// event); one raised again at the same time or earlier (a replayed event,
// or one applied out of order) changes nothing, nor does a replay of one
// that was counted as a repeat, once its alert was cleared. Its one row
// counts the alerts opened (0 or 1).
var raiseAlertSQL = raiseAlertWhere("true")

// raiseIfRejectedSQL is raiseAlertSQL that raises only when the locker's
// rejected codes (fleet.RejectedCodes) with a ts in ($6 - $7, $6] number
// at least $8. Only events received within a day of the raising one are
// counted, so that the locker's index bounds the read.
var raiseIfRejectedSQL = raiseAlertWhere(`(SELECT count(*) FROM events
		WHERE device_id = $1 AND received_at > $5::timestamptz - interval '1 day'
			AND type = '` + protocol.EventCodeRejected + `' AND body->>'reason' IS DISTINCT FROM '` + protocol.RejectLockedOut + `'
			AND ts > $6::timestamptz - $7::interval AND ts <= $6::timestamptz) >= $8`)

// raiseAlertWhere is raiseAlertSQL with cond, an SQL condition, as one
// more condition for the alert to be raised.
func raiseAlertWhere(cond string) string {
	return `WITH raised AS (
		INSERT INTO alerts (device_id, kind, compartment, detail, raised_at)
		SELECT $1, $2, $3, $4, $5 WHERE (` + cond + `) AND NOT EXISTS (SELECT 1 FROM alerts
			WHERE device_id = $1 AND (raised_at = $5 OR last_raised_at = $5) AND kind = $2 AND coalesce(compartment, 0) = coalesce($3, 0))
		ON CONFLICT (device_id, kind, coalesce(compartment, 0)) WHERE cleared_at IS NULL AND kind IN (` + openOnceKinds + `)
		DO UPDATE SET repeats = alerts.repeats + 1, last_raised_at = EXCLUDED.raised_at, detail = EXCLUDED.detail
		WHERE EXCLUDED.raised_at > coalesce(alerts.last_raised_at, alerts.raised_at)
		RETURNING id, xmax = 0 AS opened),
	ev AS (
		SELECT r.id, coalesce(d.site, '') AS site, jsonb_build_object(
			'id', 'evt-alert-' || r.id, 'type', '` + webhook.EventAlertRaised + `', 'created_at', ` + sqlTime("now()") + `,
			'data', jsonb_strip_nulls(jsonb_build_object('alert', r.id::text, 'locker', $1::text, 'site', coalesce(d.site, ''),
				'kind', $2::text, 'compartment', $3::int, 'detail', nullif($4::text, ''), 'raised_at', ` + sqlTime("$5::timestamptz") + `))) AS body
		FROM raised r LEFT JOIN devices d ON d.id = $1::text WHERE r.opened),
	queued AS (
		INSERT INTO webhook_deliveries (webhook_id, event_id, type, subject, body, next_attempt, created_at)
		SELECT w.id, ev.body->>'id', '` + webhook.EventAlertRaised + `', $1::text, ev.body, $5::timestamptz, now() FROM ev JOIN webhooks w
			ON '` + webhook.EventAlertRaised + `' = ANY (w.events) AND ` + webhookSees("ev.site", "") + `)
	SELECT count(*) FROM raised WHERE opened`
}

// sqlTime renders a timestamptz expression as protocol v1 writes times
// (RFC 3339, UTC, milliseconds).
func sqlTime(expr string) string {
	return `to_char(` + expr + ` AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')`
}

func raiseAlertArgs(a *fleet.Alert) []any {
	var comp *int
	if a.Compartment > 0 {
		comp = &a.Compartment
	}
	return []any{a.DeviceID, a.Kind, comp, a.Detail, a.RaisedAt}
}

// maxPresenceChanges bounds the presence history one uptime answer reads:
// a locker that reconnects every few seconds for months would have more.
const maxPresenceChanges = 100_000

// PresenceHistory returns a locker's presence changes in [from, to),
// oldest first, and the last one before from (nil: none kept). More than
// maxPresenceChanges is fleet.ErrInvalid: the range is to be narrowed.
func (db *DB) PresenceHistory(ctx context.Context, id string, from, to time.Time) (*fleet.PresenceChange, []fleet.PresenceChange, error) {
	b := &pgx.Batch{}
	// At one time, a session's end comes before the next one's start.
	b.Queue(`SELECT ts, online, reason FROM presence_log WHERE device_id = $1 AND ts < $2 ORDER BY ts DESC, online DESC LIMIT 1`, id, from)
	b.Queue(`SELECT ts, online, reason FROM presence_log WHERE device_id = $1 AND ts >= $2 AND ts < $3 ORDER BY ts, online LIMIT $4`,
		id, from, to, maxPresenceChanges+1)
	br := db.pool.SendBatch(ctx, b)
	defer br.Close()
	var before fleet.PresenceChange
	err := br.QueryRow().Scan(&before.At, &before.Online, &before.Reason)
	if err != nil && !errors.Is(err, pgx.ErrNoRows) {
		return nil, nil, err
	}
	prev := &before
	if err != nil {
		prev = nil
	}
	rows, err := br.Query()
	if err != nil {
		return nil, nil, err
	}
	changes, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (fleet.PresenceChange, error) {
		var c fleet.PresenceChange
		err := row.Scan(&c.At, &c.Online, &c.Reason)
		return c, err
	})
	if err != nil {
		return nil, nil, err
	}
	if len(changes) > maxPresenceChanges {
		return nil, nil, fmt.Errorf("%w: more than %d presence changes in the range: ask for fewer days", fleet.ErrInvalid, maxPresenceChanges)
	}
	return prev, changes, br.Close()
}

// OpenAlertCompartments implements fleet.Store.
func (db *DB) OpenAlertCompartments(ctx context.Context, kind string) (map[string][]int, error) {
	rows, err := db.pool.Query(ctx, `SELECT device_id, array_agg(coalesce(compartment, 0) ORDER BY coalesce(compartment, 0))
		FROM alerts WHERE kind = $1 AND cleared_at IS NULL GROUP BY device_id`, kind)
	if err != nil {
		return nil, err
	}
	out := map[string][]int{}
	var id string
	var comps []int
	_, err = pgx.ForEachRow(rows, []any{&id, &comps}, func() error {
		out[id] = slices.Clone(comps)
		return nil
	})
	return out, err
}

// ClearAlerts implements fleet.Store.
func (db *DB) ClearAlerts(ctx context.Context, deviceID, kind string, keep []int, at time.Time) (int, error) {
	if keep == nil {
		keep = []int{} // a NULL array would clear nothing
	}
	tag, err := db.pool.Exec(ctx, `UPDATE alerts SET cleared_at = $4, cleared_by = 'gateway' WHERE device_id = $1 AND kind = $2
		AND cleared_at IS NULL AND coalesce(compartment, 0) <> ALL($3)`, deviceID, kind, keep, at)
	return int(tag.RowsAffected()), err
}

// MarkSiteReplaceable marks every locker of a site replaceable, so that their
// serials can provision again (the demo's simulator keeps no identities).
func (db *DB) MarkSiteReplaceable(ctx context.Context, site string) error {
	_, err := db.pool.Exec(ctx, `UPDATE devices SET replaceable = true WHERE site = $1`, site)
	return err
}

// CredsBehind implements fleet.Store. It runs at each census (every 15 s
// by default) on every instance: one scan of devices.
func (db *DB) CredsBehind(ctx context.Context, limit int, skip []fleet.CredsLag) ([]fleet.CredsLag, error) {
	ids, versions := make([]string, len(skip)), make([]int64, len(skip))
	for i, s := range skip {
		ids[i], versions[i] = s.DeviceID, s.Version
	}
	rows, err := db.pool.Query(ctx, `SELECT id, creds_version FROM devices
		WHERE online AND NOT disabled AND creds_acked < creds_version
			AND (id, creds_version) NOT IN (SELECT * FROM unnest($2::text[], $3::bigint[]))
		ORDER BY id LIMIT $1`, limit, ids, versions)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(row pgx.CollectableRow) (fleet.CredsLag, error) {
		var l fleet.CredsLag
		err := row.Scan(&l.DeviceID, &l.Version)
		return l, err
	})
}

// EndOpenSessions ends every locker session the database still shows open,
// with reason, at at, and returns how many. A gateway with the embedded
// broker calls it at start, before its listeners open: no locker can be
// connected to it yet, so a locker still online was left so by a process
// that ended without recording its sessions' ends (killed, crashed, its
// host lost).
func (db *DB) EndOpenSessions(ctx context.Context, reason string, at time.Time) (int64, error) {
	tag, err := db.pool.Exec(ctx, `
		WITH d AS (
			UPDATE devices SET online = false, disconnected_at = $2, disconnect_reason = $1
			WHERE online RETURNING id)
		INSERT INTO presence_log (device_id, ts, online, reason) SELECT id, $2, false, $1 FROM d`, reason, at)
	return tag.RowsAffected(), err
}
