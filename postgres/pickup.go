package postgres

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/pickup"
	"github.com/lockergate/lockergate/protocol"
)

var _ pickup.Store = (*DB)(nil)

const pickupCols = `id, site, order_ref, platform, recipient, size, zone, device_id, compartment, state, expires_at,
	coalesce(credential_id, ''), coalesce(command_id, ''), created_by, created_at, ready_at, done_at`

func scanPickup(row pgx.Row) (*pickup.Pickup, error) {
	var p pickup.Pickup
	var recipient []byte
	err := row.Scan(&p.ID, &p.Site, &p.OrderRef, &p.Platform, &recipient, &p.Size, &p.Zone, &p.Locker, &p.Compartment,
		&p.State, &p.ExpiresAt, &p.CredentialID, &p.CommandID, &p.CreatedBy, &p.CreatedAt, &p.ReadyAt, &p.DoneAt)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, fleet.ErrNotFound
	}
	if err != nil {
		return nil, err
	}
	return &p, json.Unmarshal(recipient, &p.Recipient)
}

// collectPickups reads rows of pickupCols.
func collectPickups(rows pgx.Rows) ([]pickup.Pickup, error) {
	return pgx.CollectRows(rows, func(row pgx.CollectableRow) (pickup.Pickup, error) {
		p, err := scanPickup(row)
		if err != nil {
			return pickup.Pickup{}, err
		}
		return *p, nil
	})
}

// insertCredential stores an active credential (credentialArgs).
const insertCredential = `INSERT INTO credentials (id, device_id, pin_mac, qr_mac, compartments, not_after, state, created_at)
	VALUES ($1, $2, nullif($3, ''), nullif($4, ''), $5, $6, 'active', $7)`

func credentialArgs(c *pickup.Credential) []any {
	return []any{c.ID, c.DeviceID, c.PINMAC, c.QRMAC, c.Compartments, c.NotAfter, c.CreatedAt}
}

// sizeRank orders sizes in SQL the way protocol.SizeRank does in Go.
const sizeRank = `array_position(ARRAY['S','M','L','XL'], %s)`

// Allocate implements pickup.Store. A candidate locker is found first,
// then its advisory lock is taken (the order of every path that changes a
// locker's pickups) and the compartment chosen under it: allocations at one
// locker take turns, so none passes pickup.MaxLivePerLocker, and those at
// different lockers do not wait for each other. Compartments are locked
// with SKIP LOCKED; the partial unique index on live pickups catches the
// rare race that slips through, and the allocation retries.
func (db *DB) Allocate(ctx context.Context, p *pickup.Pickup, heardSince time.Time) error {
	recipient, err := json.Marshal(p.Recipient)
	if err != nil {
		return err
	}
	var heard *time.Time // nil: not checked
	if !heardSince.IsZero() {
		heard = &heardSince
	}
	free := fmt.Sprintf(`
		FROM compartments c JOIN devices d ON d.id = c.device_id
		WHERE d.site = $1 AND d.online AND NOT d.disabled AND c.in_service AND NOT c.missing AND NOT c.occupied AND c.door = 'closed'
			AND c.zone = $2 AND %s >= %s
			AND NOT EXISTS (SELECT 1 FROM pickups p WHERE p.device_id = c.device_id AND p.compartment = c.n AND p.state IN ('staging', 'ready'))
			AND NOT EXISTS (SELECT 1 FROM alerts a WHERE a.device_id = c.device_id AND a.kind = '`+fleet.AlertDoorFault+`'
				AND a.compartment = c.n AND a.cleared_at IS NULL)
			AND NOT EXISTS (SELECT 1 FROM alerts a WHERE a.device_id = c.device_id AND a.kind = '`+fleet.AlertCredsNotApplied+`'
				AND a.cleared_at IS NULL)
			AND NOT EXISTS (SELECT 1 FROM compartment_clears x WHERE x.device_id = c.device_id AND x.n = c.n AND x.version > d.creds_acked)
			AND (SELECT count(*) FROM pickups p WHERE p.device_id = c.device_id AND p.state IN ('staging', 'ready')) < $4`,
		fmt.Sprintf(sizeRank, "c.size"), fmt.Sprintf(sizeRank, "$3"))
	// A compartment whose door the locker reports failing (an open
	// door_fault alert: its health's door_faults) is not one: its staging
	// unlock would fail (door_jammed). Nor is any of a locker that does not
	// apply its credential sets (an open creds_not_applied alert): it knows
	// no new order's code, and still takes the codes of orders that ended
	// since the set it holds, one of which would then open the compartment
	// on the next order. Nor is one whose last order ended since the set
	// the locker acknowledged (compartment_clears, recordClears): until it
	// applies the set without that order's code, the code still opens the
	// compartment, and would open it on the next order (a set whose publish
	// failed waits for the census's republish; a locker may be slow to
	// apply one). The smallest that fits first; ties
	// to the lower locker id, then compartment number.
	smallest := fmt.Sprintf(`%s, c.device_id, c.n LIMIT 1`, fmt.Sprintf(sizeRank, "c.size"))
	// Lockers tried in this call are not candidates again: one whose free
	// compartment another transaction holds would be found again and again.
	// Lockers heard from since $6 come first: one online but silent (its
	// firmware may be hung) is chosen only when no other has room; so is
	// one with an open clock_skew alert (it judges the staging unlock's
	// expires_at, and the code's not_after, by a clock that is off: one
	// ahead refuses the unlock, one behind takes the code after it ends).
	silent := `NOT coalesce($6::timestamptz IS NULL OR d.last_seen >= $6, false)`
	skewed := `EXISTS (SELECT 1 FROM alerts a WHERE a.device_id = d.id AND a.kind = '` + fleet.AlertClockSkew + `' AND a.cleared_at IS NULL)`
	candidate := `SELECT c.device_id, ` + silent + `, ` + skewed + free + ` AND c.device_id <> ALL($5::text[])
		ORDER BY ` + silent + ` OR ` + skewed + `, ` + smallest
	// The same, at one locker, under its lock: what the lock's last holder
	// committed is counted. Compartments in $6 are left out: an unlock of
	// each may still fire (firing, below).
	atLocker := `SELECT c.n` + free + ` AND c.device_id = $5 AND NOT c.n = ANY($6::int[]) ORDER BY ` + smallest + ` FOR UPDATE OF c SKIP LOCKED`
	// An unlock of compartment $2 of locker $1 that may still fire on the
	// locker, unanswered (or withdrawn unanswered: a cancelled pickup's
	// staging unlock) and not expired at $3: a locker that got a copy late
	// would open the next order's compartment with no code. Asked of the
	// compartment chosen, not of every candidate (free compartments seldom
	// have one).
	const firing = `SELECT EXISTS (SELECT 1 FROM commands k WHERE k.device_id = $1 AND k.compartment = $2 AND k.type = 'unlock'
		AND k.status IN ('pending', 'sent', 'timed_out') AND k.expires_at > $3)`
	errRetry := errors.New("locker taken meanwhile")
	tried := []string{} // not nil: <> ALL(NULL) is never true
	for attempt := 0; ; attempt++ {
		err := pgx.BeginFunc(ctx, db.pool, func(tx pgx.Tx) error {
			if err := tx.QueryRow(ctx, candidate, p.Site, p.Zone, p.Size, pickup.MaxLivePerLocker, tried, heard).Scan(&p.Locker, &p.LockerSilent, &p.LockerClockSkewed); errors.Is(err, pgx.ErrNoRows) {
				return pickup.ErrNoCompartment
			} else if err != nil {
				return err
			}
			if _, err := lockLocker(ctx, tx, p.Locker); err != nil {
				return err
			}
			skip := []int{}
			for {
				if err := tx.QueryRow(ctx, atLocker, p.Site, p.Zone, p.Size, pickup.MaxLivePerLocker, p.Locker, skip).Scan(&p.Compartment); errors.Is(err, pgx.ErrNoRows) {
					return errRetry // filled (or at its bound) while we waited, or every free one may be opened: look again
				} else if err != nil {
					return err
				}
				var busy bool
				if err := tx.QueryRow(ctx, firing, p.Locker, p.Compartment, p.CreatedAt).Scan(&busy); err != nil {
					return err
				}
				if !busy {
					break
				}
				skip = append(skip, p.Compartment)
			}
			if _, err := tx.Exec(ctx, `INSERT INTO pickups (id, site, order_ref, platform, recipient, size, zone, device_id, compartment,
				state, expires_at, created_by, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'staging', $10, $11, $12)`,
				p.ID, p.Site, p.OrderRef, p.Platform, recipient, p.Size, p.Zone, p.Locker, p.Compartment, p.ExpiresAt, p.CreatedBy, p.CreatedAt); err != nil {
				return err
			}
			if _, err := tx.Exec(ctx, `INSERT INTO pickup_transitions (pickup_id, ts, from_state, to_state, actor, detail)
				VALUES ($1, $2, '', 'staging', $3, 'compartment allocated')`, p.ID, p.CreatedAt, p.CreatedBy); err != nil {
				return err
			}
			return audit(ctx, tx, fleet.AuditEntry{Actor: p.CreatedBy, Action: "pickup.create", Locker: p.Locker, Site: p.Site,
				Detail: map[string]any{"pickup": p.ID, "order_ref": p.OrderRef, "compartment": p.Compartment}})
		})
		if errors.Is(err, errRetry) && attempt < 20 {
			tried = append(tried, p.Locker)
			continue
		}
		var pgErr *pgconn.PgError
		switch {
		case err == nil:
			return nil
		case errors.As(err, &pgErr) && pgErr.Code == "23505" && pgErr.ConstraintName == "pickups_live_compartment" && attempt < 20:
			continue // another allocation took it between our read and insert
		case errors.As(err, &pgErr) && pgErr.Code == "23505" && pgErr.ConstraintName == "pickups_pkey":
			return fmt.Errorf("pickup %s: %w", p.ID, fleet.ErrExists)
		case errors.As(err, &pgErr) && pgErr.Code == "23505":
			return fmt.Errorf("order %s of platform %q at site %s exists: %w", p.OrderRef, p.Platform, p.Site, fleet.ErrConflict)
		case isFKViolation(err):
			return fmt.Errorf("site %s: %w", p.Site, fleet.ErrNotFound)
		case errors.Is(err, errRetry):
			return fmt.Errorf("site %s: every locker found filled up while this allocation waited for it: %w", p.Site, pickup.ErrNoCompartment)
		default:
			return err
		}
	}
}

// withdrawCTE, in Transition's statement (u: the pickup as updated, $2 its
// new state, $3 the time, $4 the command channel), withdraws the staging
// unlock of a pickup that ended, if it is still unanswered: a pending one
// ends expired (never sent), a sent one timed_out (the gateway stops
// sending it again: not by the resend, not at the locker's next connect),
// with the reason in error; every instance hears of it. A late answer is
// still taken (CompleteCommand): the door may have opened. Until it
// expires, a sent one may still fire on a locker that held a copy, so
// Allocate gives its compartment to no other pickup till then.
const withdrawCTE = `wd AS (UPDATE commands k SET status = CASE WHEN k.status = 'pending' THEN 'expired' ELSE 'timed_out' END,
		error = 'withdrawn: pickup ' || $2::text, done_at = $3
	FROM u WHERE k.id = u.command_id AND u.state NOT IN ('staging', 'ready') AND k.status IN ('pending', 'sent')
	RETURNING k.id, k.status),
	wn AS (SELECT pg_notify($4, wd.id) FROM wd)`

// GetPickup implements pickup.Store.
func (db *DB) GetPickup(ctx context.Context, id string) (*pickup.Pickup, error) {
	return scanPickup(db.pool.QueryRow(ctx, `SELECT `+pickupCols+` FROM pickups WHERE id = $1`, id))
}

// ListPickups implements pickup.Store.
func (db *DB) ListPickups(ctx context.Context, f pickup.Filter) ([]pickup.Pickup, error) {
	sql, args := pickupListSQL(f)
	rows, err := db.pool.Query(ctx, sql, args...)
	if err != nil {
		return nil, err
	}
	return collectPickups(rows)
}

// pickupListSQL is ListPickups' statement for f, and its arguments: a
// condition for each filter given and none for the others, so that a
// cached statement's generic plan (the same for any values) still uses the
// index of the columns it filters, which a condition that holds for an
// empty parameter ("$n is empty or col = $n") does not.
func pickupListSQL(f pickup.Filter) (string, []any) {
	where, args := []string{"id > $1"}, []any{f.After}
	for _, c := range []struct{ col, v string }{{"site", f.Site}, {"state", f.State}, {"platform", f.Platform}} {
		if c.v != "" {
			args = append(args, c.v)
			where = append(where, fmt.Sprintf("%s = $%d", c.col, len(args)))
		}
	}
	args = append(args, limit(f.Limit))
	return `SELECT ` + pickupCols + ` FROM pickups WHERE ` + strings.Join(where, " AND ") +
		fmt.Sprintf(" ORDER BY id LIMIT $%d", len(args)), args
}

// Transitions implements pickup.Store.
func (db *DB) Transitions(ctx context.Context, id string) ([]pickup.Transition, error) {
	rows, err := db.pool.Query(ctx, `SELECT ts, from_state, to_state, actor, detail FROM pickup_transitions
		WHERE pickup_id = $1 ORDER BY ts, to_state = 'staging' DESC`, id)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(row pgx.CollectableRow) (pickup.Transition, error) {
		var t pickup.Transition
		err := row.Scan(&t.TS, &t.From, &t.To, &t.Actor, &t.Detail)
		return t, err
	})
}

// LivePickupAt implements pickup.Store.
func (db *DB) LivePickupAt(ctx context.Context, deviceID string, n int) (*pickup.Pickup, error) {
	return scanPickup(db.pool.QueryRow(ctx, `SELECT `+pickupCols+` FROM pickups
		WHERE device_id = $1 AND compartment = $2 AND state IN ('staging', 'ready')`, deviceID, n))
}

// Every transaction that changes a locker's credentials, or ends one of its
// pickups, takes the locker's advisory lock first (lockLocker): they run one
// at a time per locker, so none deadlocks with another and each sees the
// others' outcome. An advisory lock, not the devices row: health and
// presence writes update that row all the time, in batches across the
// fleet, and would queue behind (and hold up) these transactions. The row
// is updated last (bumpCreds), and its key generation tells a credential
// made for a key that a replacement (Register) changed meanwhile.

// lockerLock is the SQL that takes the advisory lock of the locker whose id
// is the expression id, for the transaction. Register takes it too, before
// the devices row: the lock order is this lock, then pickups and
// credentials, then compartments, then the devices row, then
// compartment_clears (written only under this lock).
func lockerLock(id string) string {
	return `pg_advisory_xact_lock(hashtextextended('lockergate/locker/' || ` + id + `, 0))`
}

// lockLocker takes a locker's advisory lock for the transaction and
// returns its key generation (fleet.ErrNotFound for no locker). The
// statements after it see what the lock's last holder committed; the key
// generation is not under the lock (bumpCreds checks it at the end).
func lockLocker(ctx context.Context, tx pgx.Tx, deviceID string) (int, error) {
	var gen int
	err := tx.QueryRow(ctx, `SELECT key_gen FROM devices, `+lockerLock("$1")+` WHERE id = $1`, deviceID).Scan(&gen)
	if errors.Is(err, pgx.ErrNoRows) {
		return 0, fmt.Errorf("locker %s: %w", deviceID, fleet.ErrNotFound)
	}
	return gen, err
}

// bumpCreds bumps a locker's credential-set version, so that it gets the
// set again: ErrKeyChanged when its key generation is no longer gen (a
// replacement committed meanwhile; the transaction must roll back). gen 0
// skips that check.
func bumpCreds(ctx context.Context, tx pgx.Tx, deviceID string, gen int) error {
	return bumped(tx.Exec(ctx, bumpCredsSQL, deviceID, gen))
}

const bumpCredsSQL = `UPDATE devices SET creds_version = creds_version + 1 WHERE id = $1 AND ($2 = 0 OR key_gen = $2)`

// bumped is the outcome of bumpCredsSQL.
func bumped(tag pgconn.CommandTag, err error) error {
	if err == nil && tag.RowsAffected() == 0 {
		err = pickup.ErrKeyChanged
	}
	return err
}

// Transition implements pickup.Store.
func (db *DB) Transition(ctx context.Context, id string, from []string, to, actor, detail string, at time.Time, ev *pickup.Event) (*pickup.Pickup, error) {
	var out *pickup.Pickup
	err := pgx.BeginFunc(ctx, db.pool, func(tx pgx.Tx) error {
		// The pickup's locker, locked (lockLocker) in the same round trip.
		err := tx.QueryRow(ctx, `SELECT `+lockerLock("device_id")+` FROM pickups WHERE id = $1`, id).Scan(nil)
		if errors.Is(err, pgx.ErrNoRows) {
			return fleet.ErrNotFound
		}
		if err != nil {
			return err
		}
		var state string
		if err := tx.QueryRow(ctx, `SELECT state FROM pickups WHERE id = $1 FOR UPDATE`, id).Scan(&state); err != nil {
			return err
		}
		allowed := false
		for _, f := range from {
			allowed = allowed || f == state
		}
		if !allowed {
			return fmt.Errorf("pickup %s is %s: %w", id, state, fleet.ErrConflict)
		}
		if to == pickup.Expired || to == pickup.Cancelled {
			// Under the locker's lock, so a code accepted since the caller
			// found the pickup due is seen (UseCredential takes it too). A
			// cancel then would record an order its driver took as
			// cancelled; the door's closing decides instead.
			var collecting bool
			if err := tx.QueryRow(ctx, `SELECT `+beingCollected("p", "$2", "$3")+` FROM pickups p WHERE p.id = $1`,
				id, at, pickup.CollectGrace).Scan(&collecting); err != nil {
				return err
			}
			if collecting {
				return fmt.Errorf("pickup %s is being collected (its code was used): %w", id, fleet.ErrConflict)
			}
		}
		// A pickup that ends takes with it the compartment a replaced
		// board no longer reports, kept for this order only, and withdraws
		// its staging unlock if unanswered (withdrawCTE), in the same
		// statement.
		var withdrawn string
		out, err = scanPickup(scanAlso{tx.QueryRow(ctx, `WITH u AS (UPDATE pickups SET state = $2,
				ready_at = CASE WHEN $2 = 'ready' THEN $3 ELSE ready_at END,
				done_at = CASE WHEN $2 IN ('picked_up', 'expired', 'cancelled') THEN $3 ELSE done_at END
			WHERE id = $1 RETURNING *),
			gone AS (DELETE FROM compartments c USING u WHERE u.state NOT IN ('staging', 'ready')
				AND c.device_id = u.device_id AND c.n = u.compartment AND c.missing),
			`+withdrawCTE+`
			SELECT `+pickupCols+`, coalesce((SELECT status FROM wd), '') FROM u CROSS JOIN (SELECT count(*) FROM wn) n`,
			id, to, at, commandChannel), []any{&withdrawn}})
		if err != nil {
			return err
		}
		out.Withdrawn = withdrawn
		if !pickup.Live(to) {
			if err := releaseCredential(ctx, tx, out); err != nil {
				return err
			}
		}
		// With the transition, in one round trip: the compartment of a
		// pickup that ends waits for the set without its code (a pickup
		// never given a code leaves none behind; a late collection of an
		// expired one changes no code).
		b := &pgx.Batch{}
		if pickup.Live(state) && !pickup.Live(to) && out.CredentialID != "" {
			b.Queue(recordClearsSQL, out.Locker, []int{out.Compartment})
		}
		b.Queue(`INSERT INTO pickup_transitions (pickup_id, ts, from_state, to_state, actor, detail)
			VALUES ($1, $2, $3, $4, $5, $6)`, id, at, state, to, actor, detail)
		if err := tx.SendBatch(ctx, b).Close(); err != nil {
			return err
		}
		if err := audit(ctx, tx, fleet.AuditEntry{Actor: actor, Action: "pickup." + to, Locker: out.Locker, Site: out.Site,
			Detail: map[string]any{"pickup": id, "from": state}}); err != nil {
			return err
		}
		if ev != nil {
			if _, ok := ev.Data["credential_id"]; ok && out.CredentialID != "" {
				// The credential as of now: a rotation may have replaced
				// the one the caller minted.
				ev.Data["credential_id"] = out.CredentialID
			}
			if err := queueEvent(ctx, tx, ev, out, at); err != nil {
				return err
			}
		}
		var a *fleet.Alert
		switch to {
		case pickup.Expired:
			// With the expiry (after its webhook event, as before), so
			// that a collection the locker reports late (pickup.Service's
			// lateCollection) finds it to withdraw.
			a = new(pickup.ExpiredAlert(out))
		case pickup.Cancelled:
			opened, err := mayHaveOpened(ctx, tx, state, out)
			if err != nil {
				return err
			}
			if opened {
				a = new(pickup.CancelledAlert(out, actor))
			}
		}
		if a != nil {
			if _, err := raiseAlert(ctx, tx, a); err != nil {
				return fmt.Errorf("raise %s alert: %w", a.Kind, err)
			}
			out.Alerted = a.Kind
		}
		return nil
	})
	return out, err
}

// mayHaveOpened reports whether pickup p, which was in state before it
// ended, may have its order in its compartment: a ready one does; a
// staging one may if an unlock of its compartment made since the pickup
// (its staging unlock, or staff's remote one) was answered ok, or was sent
// and not answered (timed_out, or withdrawn so with the pickup's end: it
// may still fire). One whose unlocks were never sent (withdrawn pending:
// expired) or were refused (failed, rejected, expired by the locker) did
// not open for it.
func mayHaveOpened(ctx context.Context, tx pgx.Tx, state string, p *pickup.Pickup) (bool, error) {
	if state == pickup.Ready {
		return true, nil
	}
	var opened bool
	err := tx.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM commands WHERE device_id = $1 AND compartment = $2 AND type = 'unlock'
		AND created_at >= $3 AND status IN ('ok', 'timed_out', 'sent'))`, p.Locker, p.Compartment, p.CreatedAt).Scan(&opened)
	return opened, err
}

// beingCollected is the SQL condition that pickup alias's credential was
// used (its code opened the compartment) within grace before now
// (pickup.CollectGrace).
func beingCollected(alias, now, grace string) string {
	return `EXISTS (SELECT 1 FROM credentials c WHERE c.id = ` + alias + `.credential_id AND c.state = 'used'
		AND c.used_at > ` + now + `::timestamptz - ` + grace + `::interval)`
}

// narrowCredentialsSQL takes the pickups $1 at locker $2 out of their
// active credentials: a credential that opens no other live pickup is
// revoked; one that does (a combined code) is narrowed to their
// compartments and lasts until the first of them expires.
const narrowCredentialsSQL = `UPDATE credentials c SET
		state = CASE WHEN o.comps IS NULL THEN 'revoked' ELSE c.state END,
		compartments = coalesce(o.comps, c.compartments),
		not_after = coalesce(o.expires, c.not_after)
	FROM (SELECT DISTINCT credential_id AS id FROM pickups
		WHERE id = ANY ($1) AND credential_id IS NOT NULL) old
	CROSS JOIN LATERAL (SELECT array_agg(p.compartment ORDER BY p.compartment) AS comps, min(p.expires_at) AS expires
		FROM pickups p WHERE p.device_id = $2 AND p.credential_id = old.id
			AND p.state IN ('staging', 'ready') AND NOT p.id = ANY ($1)) o
	WHERE c.id = old.id AND c.state = 'active'`

// releaseCredential takes an ended pickup's compartment out of its active
// credential (narrowCredentialsSQL) and bumps the set's version if that
// changed it. The locker is locked (lockLocker).
func releaseCredential(ctx context.Context, tx pgx.Tx, p *pickup.Pickup) error {
	if p.CredentialID == "" {
		return nil
	}
	tag, err := tx.Exec(ctx, narrowCredentialsSQL, []string{p.ID}, p.Locker)
	if err != nil || tag.RowsAffected() == 0 {
		return err
	}
	return bumpCreds(ctx, tx, p.Locker, 0)
}

// recordClears records that no code of an order that ended in compartments
// comps of a locker opens them from its current credential set on (after
// this transaction's bump, if any): Allocate gives them no new order until
// the locker acknowledges that set, or a later one. A compartment with a
// live pickup is left out (it takes no order anyway). Recorded even when
// the locker holds the current set already: a locker that applies an
// older set again (a stale copy) takes the code again, and the row then
// holds the compartment again. The locker is locked (lockLocker): its set
// version does not move under this transaction, and no other writes these
// rows.
func recordClears(ctx context.Context, tx pgx.Tx, deviceID string, comps []int) error {
	_, err := tx.Exec(ctx, recordClearsSQL, deviceID, comps)
	return err
}

const recordClearsSQL = `INSERT INTO compartment_clears (device_id, n, version)
	SELECT d.id, n.n, d.creds_version FROM devices d CROSS JOIN (SELECT DISTINCT unnest($2::int[])) n (n)
	WHERE d.id = $1 AND NOT EXISTS (SELECT 1 FROM pickups p WHERE p.device_id = d.id AND p.compartment = n.n
		AND p.state IN ('staging', 'ready'))
	ON CONFLICT (device_id, n) DO UPDATE SET version = greatest(compartment_clears.version, excluded.version)`

// queueEvent queues ev about pickup p for every webhook that asked for its
// type and may see it: operators' and admins' all, a store's of its site, a
// platform's of its own orders. (A webhook that asked for pickup.ready but
// not pickup.credential_changed is not told of replaced codes: api-v1 sends
// a webhook the events it lists.)
func queueEvent(ctx context.Context, tx pgx.Tx, ev *pickup.Event, p *pickup.Pickup, at time.Time) error {
	body, err := json.Marshal(ev)
	if err != nil {
		return err
	}
	_, err = tx.Exec(ctx, `INSERT INTO webhook_deliveries (webhook_id, event_id, type, subject, body, next_attempt, created_at)
		SELECT w.id, $1, $2, $3, $4, $5, $5 FROM webhooks w
		WHERE $2 = ANY (w.events) AND `+webhookSees("$6", "$7"),
		ev.ID, ev.Type, p.ID, body, at, p.Site, p.Platform)
	return err
}

// MintCredential implements pickup.Store.
func (db *DB) MintCredential(ctx context.Context, c *pickup.Credential, pickupIDs []string, replaceUsed bool, announce func(*pickup.Pickup, *pickup.Credential) *pickup.Event) error {
	if len(pickupIDs) == 0 {
		return fmt.Errorf("%w: a credential must open at least one pickup", fleet.ErrInvalid)
	}
	err := pgx.BeginFunc(ctx, db.pool, func(tx pgx.Tx) error {
		gen, err := lockLocker(ctx, tx, c.DeviceID)
		if err != nil {
			return err
		}
		if gen != c.KeyGen {
			return pickup.ErrKeyChanged // made for the old key
		}
		// The pickups must still be live, and the code opens their
		// compartments only: one ended since the caller looked has freed
		// its compartment for the next order.
		rows, err := tx.Query(ctx, `SELECT compartment FROM pickups WHERE id = ANY ($1) AND device_id = $2
			AND state IN ('staging', 'ready') ORDER BY compartment FOR UPDATE`, pickupIDs, c.DeviceID)
		if err != nil {
			return err
		}
		comps, err := pgx.CollectRows(rows, pgx.RowTo[int])
		if err != nil {
			return err
		}
		if len(comps) != len(pickupIDs) {
			return fmt.Errorf("a pickup of %v at %s ended or is not there: %w", pickupIDs, c.DeviceID, fleet.ErrConflict)
		}
		if !replaceUsed {
			// A live pickup whose code opened it within CollectGrace is
			// being collected: its door's closing decides, by that code
			// (doorClosed). Past the grace it may be replaced, as it may
			// be cancelled (Transition): a closing that never came.
			var busy []string
			rows, err := tx.Query(ctx, `SELECT p.id FROM pickups p WHERE p.id = ANY ($1)
				AND `+beingCollected("p", "statement_timestamp()", "$2")+` ORDER BY p.id`, pickupIDs, pickup.CollectGrace)
			if err == nil {
				busy, err = pgx.CollectRows(rows, pgx.RowTo[string])
			}
			if err != nil {
				return err
			}
			if len(busy) > 0 {
				return fmt.Errorf("pickup %s is being collected (its code opened the compartment); its door's closing decides: %w",
					strings.Join(busy, ", "), fleet.ErrConflict)
			}
		}
		c.Compartments = comps
		// The writes in one round trip: the pickups' previous credentials
		// retired (a combined code that also opens live pickups not given
		// the new one is narrowed to theirs instead), the new one stored and
		// named, the set version bumped.
		b := &pgx.Batch{}
		b.Queue(narrowCredentialsSQL, pickupIDs, c.DeviceID)
		b.Queue(insertCredential, credentialArgs(c)...)
		b.Queue(`UPDATE pickups SET credential_id = $2 WHERE id = ANY ($1)`, pickupIDs, c.ID)
		if c.Audit != nil {
			e := *c.Audit
			e.Detail = maps.Clone(e.Detail)
			if e.Detail == nil {
				e.Detail = map[string]any{}
			}
			e.Detail["credential"], e.Detail["compartments"] = c.ID, comps
			args, err := auditArgs(ctx, e)
			if err != nil {
				return err
			}
			b.Queue(auditInsert, args...)
		}
		b.Queue(bumpCredsSQL, c.DeviceID, gen)
		br := tx.SendBatch(ctx, b)
		for range b.Len() - 1 {
			if _, err := br.Exec(); err != nil {
				br.Close()
				return err
			}
		}
		if err := bumped(br.Exec()); err != nil {
			br.Close()
			return err
		}
		if err := br.Close(); err != nil {
			return err
		}
		if announce == nil {
			return nil
		}
		rows, err = tx.Query(ctx, `SELECT `+pickupCols+` FROM pickups WHERE id = ANY ($1) AND state = 'ready' ORDER BY id`, pickupIDs)
		if err != nil {
			return err
		}
		ready, err := collectPickups(rows)
		if err != nil {
			return err
		}
		for i := range ready {
			if err := queueEvent(ctx, tx, announce(&ready[i], c), &ready[i], c.CreatedAt); err != nil {
				return err
			}
		}
		return nil
	})
	if isUniqueViolation(err) {
		return pickup.ErrPINTaken
	}
	return err
}

// revokeOrphans revokes a locker's active credentials that no live pickup
// holds. Under the locker's lock none should be left (a pickup that ends
// releases its credential), so a rotation sweeps them as a safety net: a
// code must never outlive its order, the compartment may hold the next one.
// The locker is locked (lockLocker).
func revokeOrphans(ctx context.Context, tx pgx.Tx, deviceID string) error {
	_, err := tx.Exec(ctx, `UPDATE credentials c SET state = 'revoked' WHERE c.device_id = $1 AND c.state = 'active'
		AND NOT EXISTS (SELECT 1 FROM pickups p WHERE p.device_id = c.device_id AND p.credential_id = c.id
			AND p.state IN ('staging', 'ready'))`, deviceID)
	return err
}

// lockCredentials locks a locker (lockLocker), then its active credentials,
// and returns them with its key generation (fleet.ErrNotFound for no
// locker).
func lockCredentials(ctx context.Context, tx pgx.Tx, deviceID string) ([]pickup.Credential, int, error) {
	gen, err := lockLocker(ctx, tx, deviceID)
	if err != nil {
		return nil, 0, err
	}
	rows, err := tx.Query(ctx, `SELECT id, coalesce(pin_mac, ''), coalesce(qr_mac, ''), compartments, not_after FROM credentials
		WHERE device_id = $1 AND state = 'active' ORDER BY id FOR UPDATE`, deviceID)
	if err != nil {
		return nil, 0, err
	}
	creds, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (pickup.Credential, error) {
		c := pickup.Credential{DeviceID: deviceID}
		err := row.Scan(&c.ID, &c.PINMAC, &c.QRMAC, &c.Compartments, &c.NotAfter)
		return c, err
	})
	return creds, gen, err
}

// RekeyCredentials implements pickup.Store.
func (db *DB) RekeyCredentials(ctx context.Context, deviceID string, mac func(gen int, c *pickup.Credential)) (int, error) {
	var n int
	err := pgx.BeginFunc(ctx, db.pool, func(tx pgx.Tx) error {
		creds, gen, err := lockCredentials(ctx, tx, deviceID)
		if err != nil || len(creds) == 0 {
			return err
		}
		ids := make([]string, len(creds))
		pins := make([]string, len(creds))
		qrs := make([]string, len(creds))
		for i := range creds {
			mac(gen, &creds[i])
			ids[i], pins[i], qrs[i] = creds[i].ID, creds[i].PINMAC, creds[i].QRMAC
		}
		if _, err := tx.Exec(ctx, `UPDATE credentials c SET pin_mac = nullif(u.pin, ''), qr_mac = nullif(u.qr, '')
			FROM unnest($1::text[], $2::text[], $3::text[]) AS u(id, pin, qr) WHERE c.id = u.id`, ids, pins, qrs); err != nil {
			return err
		}
		n = len(creds)
		return bumpCreds(ctx, tx, deviceID, gen)
	})
	return n, err
}

// RotateCredentials implements pickup.Store.
func (db *DB) RotateCredentials(ctx context.Context, deviceID string, at time.Time, mint func(gen int, old *pickup.Credential) *pickup.Credential,
	event func(p *pickup.Pickup, c *pickup.Credential) *pickup.Event, a fleet.AuditEntry) (int, error) {
	var n int
	err := pgx.BeginFunc(ctx, db.pool, func(tx pgx.Tx) error {
		olds, gen, err := lockCredentials(ctx, tx, deviceID)
		if err != nil {
			return err
		}
		// The live pickups each credential opens: one whose pickups all
		// ended is only revoked (revokeOrphans), and a new one opens only
		// the compartments of live pickups.
		rows, err := tx.Query(ctx, `SELECT credential_id, array_agg(compartment ORDER BY compartment) FROM pickups
			WHERE device_id = $1 AND state IN ('staging', 'ready') AND credential_id IS NOT NULL GROUP BY credential_id`, deviceID)
		if err != nil {
			return err
		}
		live := map[string][]int{}
		var id string
		var comps []int
		if _, err := pgx.ForEachRow(rows, []any{&id, &comps}, func() error {
			live[id] = slices.Clone(comps)
			return nil
		}); err != nil {
			return err
		}
		var oldIDs, newIDs []string
		var covered []int
		minted := make(map[string]*pickup.Credential, len(olds))
		for i := range olds {
			covered = append(covered, olds[i].Compartments...)
			old := &olds[i]
			if live[old.ID] == nil {
				continue
			}
			old.Compartments = live[old.ID]
			c := mint(gen, old)
			if _, err := tx.Exec(ctx, `UPDATE credentials SET state = 'revoked', replaced_by = $2 WHERE id = $1`, old.ID, c.ID); err != nil {
				return err
			}
			if _, err := tx.Exec(ctx, insertCredential, credentialArgs(c)...); err != nil {
				return err
			}
			oldIDs, newIDs, minted[c.ID] = append(oldIDs, old.ID), append(newIDs, c.ID), c
		}
		n = len(newIDs)
		a.Detail = map[string]any{"credentials": n}
		if err := audit(ctx, tx, a); err != nil {
			return err
		}
		if n > 0 {
			rows, err = tx.Query(ctx, `UPDATE pickups p SET credential_id = u.new FROM unnest($1::text[], $2::text[]) AS u(old, new)
				WHERE p.device_id = $3 AND p.credential_id = u.old AND p.state IN ('staging', 'ready') RETURNING `+pickupCols,
				oldIDs, newIDs, deviceID)
			if err != nil {
				return err
			}
			moved, err := collectPickups(rows)
			if err != nil {
				return err
			}
			for i := range moved {
				p := &moved[i]
				if ev := event(p, minted[p.CredentialID]); ev != nil && p.State == pickup.Ready {
					if err := queueEvent(ctx, tx, ev, p, at); err != nil {
						return err
					}
				}
			}
		}
		if err := revokeOrphans(ctx, tx, deviceID); err != nil {
			return err
		}
		if len(olds) == 0 {
			return nil
		}
		if err := bumpCreds(ctx, tx, deviceID, gen); err != nil {
			return err
		}
		// The compartments the old codes opened that no live pickup holds
		// (an orphan's): the locker takes their codes until it applies
		// this set.
		return recordClears(ctx, tx, deviceID, covered)
	})
	if isUniqueViolation(err) {
		return 0, pickup.ErrPINTaken
	}
	return n, err
}

// credentialChainCTE is the CTE chain: the ids of credential $2 of locker
// $1 and of those that replaced it, one after another (RotateCredentials;
// an old code the locker still held counts as its replacement's).
const credentialChainCTE = `WITH RECURSIVE chain (id, depth) AS (
	SELECT id, 0 FROM credentials WHERE id = $2 AND device_id = $1
	UNION ALL
	SELECT c.replaced_by, chain.depth + 1 FROM credentials c JOIN chain ON c.id = chain.id
	WHERE c.replaced_by IS NOT NULL AND c.state = 'revoked' AND chain.depth < 32)`

// UseCredential implements pickup.Store. A code the locker accepted from a
// set it held before a rotation (RotateCredentials) counts as a use of the
// credential that replaced it: the door did open.
func (db *DB) UseCredential(ctx context.Context, deviceID, credID string, at time.Time, compartments []int) ([]pickup.Pickup, error) {
	return db.useCredential(ctx, deviceID, credID, at, nil, compartments)
}

// UseCredentialByDoor implements pickup.Store.
func (db *DB) UseCredentialByDoor(ctx context.Context, deviceID, credID string, at, opened time.Time, compartment int) ([]pickup.Pickup, error) {
	return db.useCredential(ctx, deviceID, credID, at, &opened, []int{compartment})
}

// useCredential spends credential credID of a locker, as reported by a
// code_accepted or, with opened (its time by the locker's clock), by a
// door's opening; compartments, audited, are those the locker said it
// opened (nil: not said).
func (db *DB) useCredential(ctx context.Context, deviceID, credID string, at time.Time, opened *time.Time, compartments []int) ([]pickup.Pickup, error) {
	var out []pickup.Pickup
	err := pgx.BeginFunc(ctx, db.pool, func(tx pgx.Tx) error {
		if _, err := lockLocker(ctx, tx, deviceID); err != nil {
			return err
		}
		var used string
		var applied bool
		err := tx.QueryRow(ctx, credentialChainCTE+`,
			u AS (UPDATE credentials SET state = 'used', used_at = $3, opened_ts = $4
				WHERE device_id = $1 AND state = 'active' AND id IN (SELECT id FROM chain) RETURNING id)
			SELECT id, false FROM u
			UNION ALL
			SELECT id, true FROM credentials WHERE device_id = $1 AND state = 'used' AND used_at = $3
				AND (opened_ts IS NOT NULL) = ($4::timestamptz IS NOT NULL)
				AND id IN (SELECT id FROM chain) AND NOT EXISTS (SELECT 1 FROM u)
			LIMIT 1`,
			deviceID, credID, at, opened).Scan(&used, &applied)
		if errors.Is(err, pgx.ErrNoRows) {
			return fmt.Errorf("credential %s of %s: %w", credID, deviceID, fleet.ErrNotFound)
		}
		if err != nil {
			return err
		}
		// applied: this very use, recorded already (an event offered
		// again); only its pickups are read.
		if !applied {
			if err := bumpCreds(ctx, tx, deviceID, 0); err != nil {
				return err
			}
			detail := map[string]any{"credential": credID}
			if compartments != nil {
				detail["compartments"] = compartments
			}
			if opened != nil {
				detail["reported_by"] = protocol.EventDoorOpened
			}
			if used != credID {
				detail["replaced_by"] = used // an old code, from before a rotation
			}
			if err := audit(ctx, tx, fleet.AuditEntry{Actor: "locker:" + deviceID, Action: "credential.use", Locker: deviceID,
				Detail: detail}); err != nil {
				return err
			}
		}
		rows, err := tx.Query(ctx, `SELECT `+pickupCols+` FROM pickups WHERE device_id = $1 AND credential_id = $2
			AND state IN ('staging', 'ready')`, deviceID, used)
		if err != nil {
			return err
		}
		out, err = collectPickups(rows)
		return err
	})
	return out, err
}

// ReportDoorUse implements pickup.Store.
func (db *DB) ReportDoorUse(ctx context.Context, deviceID, credID string, at time.Time) (*pickup.DoorUse, error) {
	var u pickup.DoorUse
	var used string
	err := db.pool.QueryRow(ctx, credentialChainCTE+`
		UPDATE credentials SET use_reported_at = $3
		WHERE device_id = $1 AND id IN (SELECT id FROM chain) AND state = 'used' AND opened_ts IS NOT NULL
			AND (use_reported_at IS NULL OR use_reported_at = $3)
		RETURNING id, used_at, opened_ts`, deviceID, credID, at).Scan(&used, &u.At, &u.Opened)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	rows, _ := db.pool.Query(ctx, `SELECT `+pickupCols+` FROM pickups WHERE device_id = $1 AND credential_id = $2
		AND state = 'ready'`, deviceID, used)
	if u.Ready, err = collectPickups(rows); err != nil {
		return nil, err
	}
	return &u, nil
}

// UseExpiredCredential implements pickup.Store.
func (db *DB) UseExpiredCredential(ctx context.Context, deviceID, credID string, used, at time.Time, compartments []int) ([]pickup.Pickup, error) {
	if compartments == nil {
		compartments = []int{}
	}
	var out []pickup.Pickup
	err := pgx.BeginFunc(ctx, db.pool, func(tx pgx.Tx) error {
		if _, err := lockLocker(ctx, tx, deviceID); err != nil {
			return err
		}
		// A credential spent by this very use (a combined code that also
		// opened live pickups: UseCredential) keeps the compartments it
		// had then; those were its live pickups', the use of them
		// UseCredential's, whatever became of them since.
		spent, err := spentFor(ctx, tx, deviceID, credID, at)
		if err != nil {
			return err
		}
		if len(spent) > 0 {
			rest := slices.DeleteFunc(slices.Clone(compartments), func(n int) bool { return slices.Contains(spent, n) })
			if len(compartments) > 0 && len(rest) == 0 {
				return fmt.Errorf("credential %s of %s: its use opened only its live pickups' compartments: %w", credID, deviceID, fleet.ErrNotFound)
			}
			compartments = rest
		}
		// The pickups the code opened, through the credentials that
		// replaced it (as UseCredential follows them). Each must be marked
		// collected by this very use already (it may be picked up since),
		// or have expired after the use: the use's time by the locker's
		// clock, less the offset of that clock at its last birth, between
		// the pickup's ready (its code was made then) and the use's
		// arrival, a second either way for the offset's own error. A
		// locker whose offset is not known is not judged.
		rows, err := tx.Query(ctx, credentialChainCTE+`,
			dev AS (SELECT $4::timestamptz - clock_offset_ms * interval '1 millisecond' AS used FROM devices WHERE id = $1)
			SELECT p.id, p.compartment,
				coalesce(p.collected_at = $5, p.state = 'expired' AND dev.used <= p.expires_at
					AND dev.used >= p.ready_at - interval '1 second' AND dev.used <= $5::timestamptz + interval '1 second', false),
				p.collected_at IS NOT NULL
			FROM pickups p CROSS JOIN dev
			WHERE p.device_id = $1 AND p.credential_id IN (SELECT id FROM chain)
				AND (cardinality($3::int[]) = 0 OR p.compartment = ANY ($3)) AND NOT p.compartment = ANY ($6)
				-- A code spent already (a second form of it, on a locker
				-- that does not honour group) is not a first use; one
				-- spent by this very use (a combined code that also
				-- opened live pickups, UseCredential) is.
				AND NOT EXISTS (SELECT 1 FROM credentials c WHERE c.id IN (SELECT id FROM chain) AND c.state <> 'revoked'
					AND NOT (c.state = 'used' AND c.used_at = $5))
			ORDER BY p.id FOR UPDATE OF p`, deviceID, credID, compartments, used, at, append([]int{}, spent...))
		if err != nil {
			return err
		}
		var ids []string
		var opened []int
		replay := true
		for rows.Next() {
			var id string
			var n int
			var ok, recorded bool
			if err := rows.Scan(&id, &n, &ok, &recorded); err != nil {
				rows.Close()
				return err
			}
			if !ok {
				rows.Close()
				return fmt.Errorf("credential %s of %s: pickup %s it opened did not expire after the use: %w", credID, deviceID, id, fleet.ErrNotFound)
			}
			ids, opened = append(ids, id), append(opened, n)
			replay = replay && recorded
		}
		if err := rows.Err(); err != nil {
			return err
		}
		if len(ids) == 0 {
			return fmt.Errorf("credential %s of %s: no expired pickup: %w", credID, deviceID, fleet.ErrNotFound)
		}
		for _, n := range compartments {
			if !slices.Contains(opened, n) {
				return fmt.Errorf("credential %s of %s: compartment %d it opened holds none of its pickups: %w", credID, deviceID, n, fleet.ErrNotFound)
			}
		}
		// replay: this very use, recorded already (an event offered again).
		// The credential stays revoked, with the use's time (CredentialState
		// calls it used): in state used, the use offered again would look to
		// UseCredential like its own, recorded, and never come back here.
		if !replay {
			if _, err := tx.Exec(ctx, `UPDATE pickups SET collected_at = $2, collected_ts = $3 WHERE id = ANY ($1)`, ids, at, used); err != nil {
				return err
			}
			if _, err := tx.Exec(ctx, `UPDATE credentials c SET used_at = $2 FROM pickups p
				WHERE p.id = ANY ($1) AND c.id = p.credential_id AND c.state = 'revoked' AND c.used_at IS NULL`, ids, at); err != nil {
				return err
			}
			if err := audit(ctx, tx, fleet.AuditEntry{Actor: "locker:" + deviceID, Action: "credential.use", Locker: deviceID,
				Detail: map[string]any{"credential": credID, "before_expiry": true, "ts": used.UTC(), "pickups": ids}}); err != nil {
				return err
			}
		}
		rows, err = tx.Query(ctx, `SELECT `+pickupCols+` FROM pickups WHERE id = ANY ($1) ORDER BY id`, ids)
		if err != nil {
			return err
		}
		out, err = collectPickups(rows)
		return err
	})
	return out, err
}

// LateCollectionAt implements pickup.Store.
func (db *DB) LateCollectionAt(ctx context.Context, deviceID string, n int, at time.Time) (*pickup.Pickup, time.Time, error) {
	var used time.Time
	p, err := scanPickup(scanAlso{db.pool.QueryRow(ctx, `SELECT `+pickupCols+`, collected_ts FROM (SELECT * FROM pickups
			WHERE device_id = $1 AND compartment = $2 AND created_at <= $3 ORDER BY created_at DESC LIMIT 1) p
		WHERE state = 'expired' AND collected_ts IS NOT NULL`, deviceID, n, at), []any{&used}})
	return p, used, err
}

// LateCollectionOf implements pickup.Store.
func (db *DB) LateCollectionOf(ctx context.Context, id string) (*pickup.Pickup, time.Time, error) {
	var used time.Time
	p, err := scanPickup(scanAlso{db.pool.QueryRow(ctx, `SELECT `+pickupCols+`, collected_ts FROM pickups
		WHERE id = $1 AND state = 'expired' AND collected_ts IS NOT NULL`, id), []any{&used}})
	return p, used, err
}

// JudgeLateCollection implements pickup.Store.
func (db *DB) JudgeLateCollection(ctx context.Context, id string) error {
	_, err := db.pool.Exec(ctx, `UPDATE pickups SET collected_ts = NULL WHERE id = $1 AND state = 'expired'`, id)
	return err
}

// scanAlso scans a row (of pickupCols, commandCols…) followed by more
// columns into more.
type scanAlso struct {
	row  pgx.Row
	more []any
}

func (s scanAlso) Scan(dest ...any) error { return s.row.Scan(append(dest, s.more...)...) }

// GetCredential implements pickup.Store.
func (db *DB) GetCredential(ctx context.Context, id string) (*pickup.Credential, string, error) {
	var c pickup.Credential
	var state string
	err := db.pool.QueryRow(ctx, `SELECT id, device_id, coalesce(pin_mac, ''), coalesce(qr_mac, ''), compartments, not_after, created_at, state
		FROM credentials WHERE id = $1`, id).Scan(&c.ID, &c.DeviceID, &c.PINMAC, &c.QRMAC, &c.Compartments, &c.NotAfter, &c.CreatedAt, &state)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, "", fleet.ErrNotFound
	}
	return &c, state, err
}

// SpentFor implements pickup.Store.
func (db *DB) SpentFor(ctx context.Context, deviceID, id string, at time.Time) ([]int, error) {
	return spentFor(ctx, db.pool, deviceID, id, at)
}

// spentFor is SpentFor on q.
func spentFor(ctx context.Context, q interface {
	QueryRow(context.Context, string, ...any) pgx.Row
}, deviceID, id string, at time.Time) ([]int, error) {
	var spent []int
	err := q.QueryRow(ctx, credentialChainCTE+`
		SELECT coalesce(array_agg(n), '{}') FROM credentials c CROSS JOIN LATERAL unnest(c.compartments) n
		WHERE c.id IN (SELECT id FROM chain) AND c.state = 'used' AND c.used_at = $3`, deviceID, id, at).Scan(&spent)
	return spent, err
}

// CredentialState implements pickup.Store.
func (db *DB) CredentialState(ctx context.Context, deviceID, id string) (string, error) {
	var s string
	// A revoked credential with a use was used after its pickups expired
	// (UseExpiredCredential).
	err := db.pool.QueryRow(ctx, `SELECT CASE WHEN state = 'revoked' AND used_at IS NOT NULL THEN 'used' ELSE state END
		FROM credentials WHERE id = $1 AND device_id = $2`, id, deviceID).Scan(&s)
	if errors.Is(err, pgx.ErrNoRows) {
		return "", fleet.ErrNotFound
	}
	return s, err
}

// DuePickups implements pickup.Store.
func (db *DB) DuePickups(ctx context.Context, now time.Time, n int) ([]pickup.Pickup, error) {
	rows, err := db.pool.Query(ctx, `SELECT `+pickupCols+` FROM pickups p WHERE state IN ('staging', 'ready') AND expires_at <= $1
		AND NOT `+beingCollected("p", "$1", "$3")+`
		ORDER BY expires_at LIMIT $2`, now, n, pickup.CollectGrace)
	if err != nil {
		return nil, err
	}
	return collectPickups(rows)
}

// KeyGen implements pickup.Store.
func (db *DB) KeyGen(ctx context.Context, deviceID string) (int, error) {
	var g int
	err := db.pool.QueryRow(ctx, `SELECT key_gen FROM devices WHERE id = $1`, deviceID).Scan(&g)
	if errors.Is(err, pgx.ErrNoRows) {
		return 0, fleet.ErrNotFound
	}
	return g, err
}

// Occupancy implements pickup.Store.
func (db *DB) Occupancy(ctx context.Context) (map[string][2]int, error) {
	rows, err := db.pool.Query(ctx, `SELECT d.site, count(*), count(*) FILTER (WHERE c.occupied)
		FROM compartments c JOIN devices d ON d.id = c.device_id WHERE NOT c.missing GROUP BY d.site`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := map[string][2]int{}
	for rows.Next() {
		var site string
		var total, occ int
		if err := rows.Scan(&site, &total, &occ); err != nil {
			return nil, err
		}
		out[site] = [2]int{total, occ}
	}
	return out, rows.Err()
}
