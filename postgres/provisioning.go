package postgres

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/provisioning"
)

const claimCols = `id, site, max_uses, uses, serial_pattern, expires_at, revoked_at, created_at, created_by`

func scanClaim(row pgx.Row) (*provisioning.Claim, error) {
	var c provisioning.Claim
	err := row.Scan(&c.ID, &c.Site, &c.MaxUses, &c.Used, &c.SerialPattern, &c.ExpiresAt, &c.RevokedAt, &c.CreatedAt, &c.CreatedBy)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, provisioning.ErrNotFound
	}
	return &c, err
}

// CreateClaim implements provisioning.Store.
func (db *DB) CreateClaim(ctx context.Context, c *provisioning.Claim, hash []byte) error {
	return pgx.BeginFunc(ctx, db.pool, func(tx pgx.Tx) error {
		_, err := tx.Exec(ctx, `INSERT INTO claims (id, hash, site, max_uses, serial_pattern, expires_at, created_at, created_by)
			VALUES ($1, $2, $3, $4, $5, $6, $7, $8)`, c.ID, hash, c.Site, c.MaxUses, c.SerialPattern, c.ExpiresAt, c.CreatedAt, c.CreatedBy)
		if isFKViolation(err) {
			return noSite(c.Site)
		}
		if err != nil {
			return err
		}
		return audit(ctx, tx, fleet.AuditEntry{Actor: c.CreatedBy, Action: "claim.create", Site: c.Site,
			Detail: map[string]any{"claim": c.ID, "uses": c.MaxUses, "expires_at": c.ExpiresAt}})
	})
}

// ListClaims implements provisioning.Store.
func (db *DB) ListClaims(ctx context.Context, site, after string, n int) ([]provisioning.Claim, error) {
	rows, err := db.pool.Query(ctx, `SELECT `+claimCols+` FROM claims WHERE id > $1 AND ($2 = '' OR site = $2)
		ORDER BY id LIMIT $3`, after, site, limit(n))
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []provisioning.Claim
	for rows.Next() {
		c, err := scanClaim(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, *c)
	}
	return out, rows.Err()
}

// GetClaim implements provisioning.Store.
func (db *DB) GetClaim(ctx context.Context, id string) (*provisioning.Claim, error) {
	return scanClaim(db.pool.QueryRow(ctx, `SELECT `+claimCols+` FROM claims WHERE id = $1`, id))
}

// RevokeClaim implements provisioning.Store.
func (db *DB) RevokeClaim(ctx context.Context, id, actor string, at time.Time) error {
	return pgx.BeginFunc(ctx, db.pool, func(tx pgx.Tx) error {
		var site string
		err := tx.QueryRow(ctx, `UPDATE claims SET revoked_at = coalesce(revoked_at, $2) WHERE id = $1 RETURNING site`, id, at).Scan(&site)
		if errors.Is(err, pgx.ErrNoRows) {
			return fmt.Errorf("claim %s: %w", id, provisioning.ErrNotFound)
		}
		if err != nil {
			return err
		}
		return audit(ctx, tx, fleet.AuditEntry{Actor: actor, Action: "claim.revoke", Site: site, Detail: map[string]any{"claim": id}})
	})
}

// ClaimByHash implements provisioning.Store.
func (db *DB) ClaimByHash(ctx context.Context, hash []byte) (*provisioning.Claim, error) {
	c, err := scanClaim(db.pool.QueryRow(ctx, `SELECT `+claimCols+` FROM claims WHERE hash = $1 AND revoked_at IS NULL`, hash))
	if errors.Is(err, provisioning.ErrNotFound) {
		return nil, provisioning.ErrUnknownClaim
	}
	return c, err
}

// Register implements provisioning.Store.
//
// Two claims registering the same new serial at once both find no device
// with it; the second INSERT then waits for the first and fails on the
// serial's unique index. That registration is run again, and sees the
// device: serial_taken (and recorded as a claim use), like any later one.
func (db *DB) Register(ctx context.Context, claimHash []byte, r provisioning.Registration) (*provisioning.Registered, error) {
	for attempt := 0; ; attempt++ {
		out, err := db.register(ctx, claimHash, r)
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && pgErr.Code == "23505" && pgErr.ConstraintName == "devices_serial_key" {
			if attempt == 0 {
				continue
			}
			// Free again on the second look and taken once more
			// meanwhile: answered as taken, without a third look.
			return nil, fmt.Errorf("register %s: %w", r.Request.Serial, provisioning.ErrSerialTaken)
		}
		return out, err
	}
}

func (db *DB) register(ctx context.Context, claimHash []byte, r provisioning.Registration) (*provisioning.Registered, error) {
	var out *provisioning.Registered
	var refusal error
	req := r.Request
	err := pgx.BeginFunc(ctx, db.pool, func(tx pgx.Tx) error {
		out, refusal = nil, nil
		c, err := scanClaim(tx.QueryRow(ctx, `SELECT `+claimCols+` FROM claims WHERE hash = $1 AND revoked_at IS NULL FOR UPDATE`, claimHash))
		if errors.Is(err, provisioning.ErrNotFound) {
			refusal = provisioning.ErrUnknownClaim
			return nil
		}
		if err != nil {
			return err
		}
		record := func(outcome, deviceID string) error {
			_, err := tx.Exec(ctx, `INSERT INTO claim_uses (claim_id, ts, serial, device_id, outcome) VALUES ($1, $2, $3, nullif($4, ''), $5)`,
				c.ID, r.At, req.Serial, deviceID, outcome)
			return err
		}
		var existing, site string
		var replaceable, retry bool
		var gen int
		// A locker whose answer was lost (it dropped off mid-provisioning,
		// or the gateway could not answer) asks again with the same claim.
		// While that claim use is fresh, its answer was not delivered
		// (AnswerDelivered) and the identity has not connected since, it
		// is issued again (a new secret), even if the use was the claim's
		// last or the claim has expired since: the locker was admitted
		// then, and a refusal now would be final. Once the answer was
		// delivered, asking again is serial_taken, as the contract says.
		// The locker's lock first (lockerLock): a pickup that ends holds
		// it while it drops a missing compartment and then updates the
		// devices row, the reverse of this transaction's row order.
		if _, err := tx.Exec(ctx, `SELECT `+lockerLock("id")+` FROM devices WHERE serial = $1`, req.Serial); err != nil {
			return err
		}
		err = tx.QueryRow(ctx, `SELECT d.id, d.site, d.replaceable, d.key_gen,
				coalesce(u.ts > $3::timestamptz - interval '10 minutes' AND (d.connected_at IS NULL OR d.connected_at < u.ts)
					AND NOT EXISTS (SELECT 1 FROM claim_uses x WHERE x.device_id = d.id AND x.outcome = 'provision.delivered'
						AND x.ts >= u.ts), false)
			FROM devices d LEFT JOIN LATERAL (
				SELECT ts FROM claim_uses WHERE device_id = d.id AND claim_id = $2
					AND outcome IN ('provision', 'provision.replace', 'provision.retry')
				ORDER BY ts DESC LIMIT 1) u ON true
			WHERE d.serial = $1 FOR NO KEY UPDATE OF d`, req.Serial, c.ID, r.At).Scan(&existing, &site, &replaceable, &gen, &retry)
		if err != nil && !errors.Is(err, pgx.ErrNoRows) {
			return err
		}
		if !retry {
			if err == nil && (!replaceable || site != c.Site) {
				// First: a registered serial is taken whatever the claim.
				// A replacement stays at the locker's site: another site's
				// claim would move it, with the orders in its compartments,
				// under that site's staff.
				refusal = provisioning.ErrSerialTaken
				return record(refusalOutcome(refusal), existing)
			}
			if refusal = c.Refusal(req.Serial, r.At); refusal != nil {
				return record(refusalOutcome(refusal), "")
			}
		}
		switch {
		case errors.Is(err, pgx.ErrNoRows):
			out = &provisioning.Registered{DeviceID: r.DeviceID, KeyGen: 1, Site: c.Site}
			_, err = tx.Exec(ctx, `INSERT INTO devices (id, serial, site, model, fw, secret_hash, key_gen) VALUES ($1, $2, $3, $4, $5, $6, 1)`,
				r.DeviceID, req.Serial, c.Site, req.Model, req.FW, r.SecretHash)
		default:
			out = &provisioning.Registered{DeviceID: existing, KeyGen: gen + 1, Site: c.Site, Replaced: !retry, Retried: retry}
			_, err = tx.Exec(ctx, `UPDATE devices SET secret_hash = $2, key_gen = $3, replaceable = false, site = $4,
				model = $5, fw = $6, creds_acked = -1 WHERE id = $1`, existing, r.SecretHash, gen+1, c.Site, req.Model, req.FW)
			if err == nil {
				// Every instance forgets the old secret (WatchKicks).
				_, err = tx.Exec(ctx, `SELECT pg_notify($1, $2)`, kickChannel, existing)
			}
		}
		if err != nil {
			return err
		}
		ns := make([]int32, len(req.Compartments))
		sizes := make([]string, len(req.Compartments))
		zones := make([]string, len(req.Compartments))
		for i, cs := range req.Compartments {
			ns[i], sizes[i], zones[i] = int32(cs.N), cs.Size, cs.Zone
		}
		if out.Replaced || out.Retried {
			// Wait for allocations in flight (they lock the compartment
			// they take): the statements below then see their pickups.
			// In the order of n, as applyEvents updates them.
			if _, err := tx.Exec(ctx, `SELECT 1 FROM compartments WHERE device_id = $1 ORDER BY n FOR UPDATE`, out.DeviceID); err != nil {
				return err
			}
		}
		// A replaced board keeps what is known of the compartments it
		// reports (an order inside, a door out of service), with the size
		// and zone it reports. The door is taken as closed: the old board's
		// last report may be from when it was pulled out, and the new one
		// reports each change, by a clock the old board's events are not
		// compared with (door_ts, applyDoorSQL).
		if _, err := tx.Exec(ctx, `INSERT INTO compartments (device_id, n, size, zone)
			SELECT $1, * FROM unnest($2::int[], $3::text[], $4::text[])
			ON CONFLICT (device_id, n) DO UPDATE SET size = excluded.size, zone = excluded.zone, missing = false,
				door = 'closed', door_ts = NULL`,
			out.DeviceID, ns, sizes, zones); err != nil {
			return err
		}
		if out.Replaced || out.Retried {
			// One it no longer reports goes, unless a live pickup is in it:
			// that one stays, marked missing, so that the order keeps its
			// record until it ends (Transition removes it then).
			if _, err := tx.Exec(ctx, `DELETE FROM compartments c WHERE c.device_id = $1 AND NOT c.n = ANY($2)
				AND NOT EXISTS (SELECT 1 FROM pickups p WHERE p.device_id = c.device_id AND p.compartment = c.n
					AND p.state IN ('staging', 'ready'))`, out.DeviceID, ns); err != nil {
				return err
			}
			rows, err := tx.Query(ctx, `UPDATE compartments SET missing = true WHERE device_id = $1 AND NOT n = ANY($2)
				RETURNING n`, out.DeviceID, ns)
			if err != nil {
				return err
			}
			if out.Missing, err = pgx.CollectRows(rows, pgx.RowTo[int]); err != nil {
				return err
			}
			slices.Sort(out.Missing)
			// The doors read closed now (above): an open door_ajar of the
			// old board's (its own report, or the gateway's count of a door
			// it left open) ends with it, by the gateway.
			if _, err := tx.Exec(ctx, `UPDATE alerts SET cleared_at = $2, cleared_by = 'gateway'
				WHERE device_id = $1 AND kind = '`+fleet.AlertDoorAjar+`' AND cleared_at IS NULL`, out.DeviceID, r.At); err != nil {
				return err
			}
		}
		action := "provision"
		switch {
		case out.Replaced:
			action = "provision.replace"
		case out.Retried:
			action = "provision.retry" // the same claim use, asked again
		}
		if !out.Retried {
			if _, err := tx.Exec(ctx, `UPDATE claims SET uses = uses + 1 WHERE id = $1`, c.ID); err != nil {
				return err
			}
		}
		if err := record(action, out.DeviceID); err != nil {
			return err
		}
		detail := map[string]any{"serial": req.Serial, "model": req.Model, "fw": req.FW}
		if len(out.Missing) > 0 {
			detail["missing_compartments"] = out.Missing
		}
		return audit(ctx, tx, fleet.AuditEntry{Actor: "claim:" + c.ID, Action: action, Locker: out.DeviceID, Site: c.Site,
			Detail: detail})
	})
	if err != nil {
		if transient(err) {
			return nil, fmt.Errorf("register %s: %w: %w", req.Serial, provisioning.ErrUnavailable, err)
		}
		return nil, fmt.Errorf("register %s: %w", req.Serial, err)
	}
	if refusal != nil {
		return nil, refusal
	}
	return out, nil
}

// AnswerDelivered implements provisioning.Store: a claim use of its own
// ("provision.delivered"), of the claim of the device's latest registration.
func (db *DB) AnswerDelivered(ctx context.Context, deviceID string, at time.Time) error {
	_, err := db.pool.Exec(ctx, `INSERT INTO claim_uses (claim_id, ts, serial, device_id, outcome)
		SELECT claim_id, $2, serial, device_id, 'provision.delivered' FROM claim_uses
		WHERE device_id = $1 AND outcome IN ('provision', 'provision.replace', 'provision.retry')
		ORDER BY ts DESC LIMIT 1`, deviceID, at)
	return err
}

func refusalOutcome(err error) string {
	switch {
	case errors.Is(err, provisioning.ErrClaimExpired):
		return "claim_expired"
	case errors.Is(err, provisioning.ErrClaimExhausted):
		return "claim_exhausted"
	case errors.Is(err, provisioning.ErrSerialTaken):
		return "serial_taken"
	default:
		return "invalid"
	}
}

// DeviceAuth implements provisioning.Store.
func (db *DB) DeviceAuth(ctx context.Context, id string) (*provisioning.DeviceAuth, error) {
	var a provisioning.DeviceAuth
	err := db.pool.QueryRow(ctx, `SELECT secret_hash, disabled FROM devices WHERE id = $1`, id).Scan(&a.SecretHash, &a.Disabled)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, provisioning.ErrUnknownDevice
	}
	return &a, err
}
