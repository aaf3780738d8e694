package postgres

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/lockergate/lockergate/fleet"
)

// Audit implements fleet.Store.
func (db *DB) Audit(ctx context.Context, e fleet.AuditEntry) error {
	return audit(ctx, db.pool, e)
}

func audit(ctx context.Context, q interface {
	Exec(context.Context, string, ...any) (pgconn.CommandTag, error)
}, e fleet.AuditEntry) error {
	args, err := auditArgs(ctx, e)
	if err != nil {
		return err
	}
	_, err = q.Exec(ctx, auditInsert, args...)
	return err
}

// auditArgs are auditInsert's arguments for e, its token the one ctx
// carries for its actor unless it names one.
func auditArgs(ctx context.Context, e fleet.AuditEntry) ([]any, error) {
	detail, err := auditDetail(e)
	if err != nil {
		return nil, err
	}
	if e.Token == "" {
		e.Token = fleet.AuditToken(ctx, e.Actor)
	}
	return []any{e.Actor, e.Action, e.Locker, e.Site, detail, e.Token}, nil
}

// auditInsert records an entry; one about a locker that names no site
// (a locker's own doing: a code it accepted, an alert it raised) is filed
// under the locker's site.
const auditInsert = `INSERT INTO audit (actor, action, locker, site, detail, token)
	SELECT $1, $2, $3::text, CASE WHEN $4::text = '' AND $3::text <> '' THEN coalesce((SELECT site FROM devices WHERE id = $3::text), '') ELSE $4::text END, $5, $6`

func auditDetail(e fleet.AuditEntry) ([]byte, error) {
	if e.Detail == nil {
		return []byte("{}"), nil
	}
	detail, err := json.Marshal(e.Detail)
	if err != nil {
		return nil, fmt.Errorf("audit detail: %w", err)
	}
	return detail, nil
}

// ListAudit returns audit entries in order.
func (db *DB) ListAudit(ctx context.Context, f fleet.AuditFilter) ([]fleet.AuditEntry, error) {
	rows, err := db.pool.Query(ctx, `SELECT id, ts, actor, token, action, locker, site, detail FROM audit
		WHERE id > $1 AND ts >= $2 AND ($3 = '' OR locker = $3) AND ($4 = '' OR actor = $4) AND ($6 = '' OR token = $6)
		ORDER BY id LIMIT $5`, f.After, f.Since, f.Locker, f.Actor, limit(f.Limit), f.Token)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(row pgx.CollectableRow) (fleet.AuditEntry, error) {
		var e fleet.AuditEntry
		var detail []byte
		if err := row.Scan(&e.ID, &e.TS, &e.Actor, &e.Token, &e.Action, &e.Locker, &e.Site, &detail); err != nil {
			return e, err
		}
		return e, json.Unmarshal(detail, &e.Detail)
	})
}

// CreateSite stores a site; fleet.ErrConflict when the id exists.
func (db *DB) CreateSite(ctx context.Context, s *fleet.Site) error {
	err := db.pool.QueryRow(ctx, `INSERT INTO sites (id, name, timezone) VALUES ($1, $2, $3) RETURNING created_at`,
		s.ID, s.Name, s.Timezone).Scan(&s.CreatedAt)
	if isUniqueViolation(err) {
		return fmt.Errorf("site %s exists (GET /v1/sites/%s; pick another id for a new one): %w", s.ID, s.ID, fleet.ErrConflict)
	}
	return err
}

// GetSite returns a site.
func (db *DB) GetSite(ctx context.Context, id string) (*fleet.Site, error) {
	var s fleet.Site
	err := db.pool.QueryRow(ctx, `SELECT id, name, timezone, created_at FROM sites WHERE id = $1`, id).
		Scan(&s.ID, &s.Name, &s.Timezone, &s.CreatedAt)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, fleet.ErrNotFound
	}
	return &s, err
}

// ListSites lists sites by id.
func (db *DB) ListSites(ctx context.Context, after string, n int) ([]fleet.Site, error) {
	rows, err := db.pool.Query(ctx, `SELECT id, name, timezone, created_at FROM sites WHERE id > $1 ORDER BY id LIMIT $2`, after, limit(n))
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(row pgx.CollectableRow) (fleet.Site, error) {
		var s fleet.Site
		err := row.Scan(&s.ID, &s.Name, &s.Timezone, &s.CreatedAt)
		return s, err
	})
}

// CreateToken stores a token by its hash.
func (db *DB) CreateToken(ctx context.Context, t *fleet.Token, hash []byte) error {
	var site *string
	if t.Site != "" {
		site = &t.Site
	}
	if err := db.sitesExist(ctx, t.Sites); err != nil {
		return err
	}
	err := db.pool.QueryRow(ctx, `INSERT INTO tokens (id, hash, role, site, name, created_by, sites) VALUES ($1, $2, $3, $4, $5, $6, $7)
		RETURNING created_at`, t.ID, hash, t.Role, site, t.Name, t.CreatedBy, fleet.SitesOrEvery(t.Sites)).Scan(&t.CreatedAt)
	if isFKViolation(err) {
		return noSite(t.Site)
	}
	return err
}

// sitesExist returns fleet.ErrNotFound naming the first of sites that is
// not a site. Sites are never deleted, so a site found stays one.
func (db *DB) sitesExist(ctx context.Context, sites []string) error {
	if len(sites) == 0 {
		return nil
	}
	var missing string
	err := db.pool.QueryRow(ctx, `SELECT s FROM unnest($1::text[]) WITH ORDINALITY AS u (s, n)
		WHERE NOT EXISTS (SELECT 1 FROM sites WHERE id = u.s) ORDER BY n LIMIT 1`, sites).Scan(&missing)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil
	}
	if err != nil {
		return err
	}
	return noSite(missing)
}

// noSite is fleet.ErrNotFound for a site an admin named that does not
// exist, saying how to make it.
func noSite(site string) error {
	return fmt.Errorf("site %s (make it first: POST /v1/sites, lockerctl sites create %s): %w", site, site, fleet.ErrNotFound)
}

// SetTokenSites sets platform token id's sites (empty: every site) and
// returns the token as it was before and as it is now. An unknown token is
// fleet.ErrNotFound, a revoked one fleet.ErrConflict, another role's
// fleet.ErrInvalid.
func (db *DB) SetTokenSites(ctx context.Context, id string, sites []string) (was, now *fleet.Token, err error) {
	if err := db.sitesExist(ctx, sites); err != nil {
		return nil, nil, err
	}
	err = pgx.BeginFunc(ctx, db.pool, func(tx pgx.Tx) error {
		if was, err = scanToken(tx.QueryRow(ctx, `SELECT `+tokenCols+` FROM tokens WHERE id = $1 FOR UPDATE`, id)); err != nil {
			if errors.Is(err, fleet.ErrNotFound) {
				return fmt.Errorf("token %s (GET /v1/tokens lists them): %w", id, err)
			}
			return err
		}
		switch {
		case was.RevokedAt != nil:
			return fmt.Errorf("token %s is revoked (make a new one): %w", id, fleet.ErrConflict)
		case was.Role != fleet.RolePlatform:
			return fmt.Errorf("token %s is a %s token: only platform tokens have sites: %w", id, was.Role, fleet.ErrInvalid)
		}
		now, err = scanToken(tx.QueryRow(ctx, `UPDATE tokens SET sites = $2 WHERE id = $1 RETURNING `+tokenCols, id, fleet.SitesOrEvery(sites)))
		return err
	})
	if err != nil {
		return nil, nil, err
	}
	return was, now, nil
}

// tokenCols are the columns scanToken reads.
const tokenCols = `id, role, site, name, created_at, created_by, revoked_at, last_used_at, sites`

func scanToken(row pgx.Row) (*fleet.Token, error) {
	var t fleet.Token
	var site *string
	err := row.Scan(&t.ID, &t.Role, &site, &t.Name, &t.CreatedAt, &t.CreatedBy, &t.RevokedAt, &t.LastUsedAt, &t.Sites)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, fleet.ErrNotFound
	}
	if err != nil {
		return nil, err
	}
	if site != nil {
		t.Site = *site
	}
	if len(t.Sites) == 0 {
		t.Sites = nil
	}
	return &t, nil
}

// TokenByHash returns the unrevoked token with that hash.
func (db *DB) TokenByHash(ctx context.Context, hash []byte) (*fleet.Token, error) {
	return scanToken(db.pool.QueryRow(ctx, `SELECT `+tokenCols+` FROM tokens WHERE hash = $1 AND revoked_at IS NULL`, hash))
}

// GetToken returns token id, revoked or not.
func (db *DB) GetToken(ctx context.Context, id string) (*fleet.Token, error) {
	return scanToken(db.pool.QueryRow(ctx, `SELECT `+tokenCols+` FROM tokens WHERE id = $1`, id))
}

// ListTokens lists tokens by id after f.After.
func (db *DB) ListTokens(ctx context.Context, f fleet.TokenFilter) ([]fleet.Token, error) {
	rows, err := db.pool.Query(ctx, `SELECT `+tokenCols+` FROM tokens
		WHERE id > $1 AND ($2 = '' OR role = $2) AND ($3 = '' OR site = $3 OR $3 = ANY (sites))
			AND ($4::boolean IS NULL OR (revoked_at IS NOT NULL) = $4) AND ($6 = '' OR name = $6)
		ORDER BY id LIMIT $5`, f.After, f.Role, f.Site, f.Revoked, limit(f.Limit), f.Name)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(row pgx.CollectableRow) (fleet.Token, error) {
		t, err := scanToken(row)
		if err != nil {
			return fleet.Token{}, err
		}
		return *t, nil
	})
}

// TokenUsed records a use of token id now, unless one within
// fleet.TokenUseResolution is recorded (by this instance or another): at
// most one write a minute per token. A revoked or unknown token is left.
func (db *DB) TokenUsed(ctx context.Context, id string) error {
	_, err := db.pool.Exec(ctx, `UPDATE tokens SET last_used_at = now()
		WHERE id = $1 AND revoked_at IS NULL AND (last_used_at IS NULL OR last_used_at <= now() - make_interval(secs => $2))`,
		id, fleet.TokenUseResolution.Seconds())
	return err
}

// RevokeToken revokes a token.
func (db *DB) RevokeToken(ctx context.Context, id string) error {
	tag, err := db.pool.Exec(ctx, `UPDATE tokens SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL`, id)
	if err == nil && tag.RowsAffected() == 0 {
		return fmt.Errorf("token %s (unknown, or revoked already: GET /v1/tokens/%s): %w", id, id, fleet.ErrNotFound)
	}
	return err
}

// CountTokens counts unrevoked tokens (first start creates the admin token when zero).
func (db *DB) CountTokens(ctx context.Context) (int, error) {
	var n int
	err := db.pool.QueryRow(ctx, `SELECT count(*) FROM tokens`).Scan(&n)
	return n, err
}

// GetIdempotent returns the stored answer for (actor, key), or fleet.ErrNotFound.
func (db *DB) GetIdempotent(ctx context.Context, actor, key string) (*fleet.Idempotent, error) {
	var r fleet.Idempotent
	err := db.pool.QueryRow(ctx, `SELECT route, body_hash, status, response,
			CASE WHEN created_at > now() - make_interval(secs => $3) THEN sealed END
		FROM idempotency WHERE actor = $1 AND key = $2`,
		actor, key, fleet.ReplaySecretsFor.Seconds()).Scan(&r.Route, &r.BodyHash, &r.Status, &r.Response, &r.Sealed)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, fleet.ErrNotFound
	}
	return &r, err
}

// IdempotencyAbandoned is how old an unfinished claim on an Idempotency-Key
// must be before another request may take it over (its request died with
// its gateway). Far above the longest request (wait_s is at most 60).
const IdempotencyAbandoned = 5 * time.Minute

// ClaimIdempotent claims (actor, key) for a request about to run: a row
// with status 0 and no answer yet. It reports false when the key is taken:
// answered, or claimed by a request still running.
func (db *DB) ClaimIdempotent(ctx context.Context, actor, key, route string, bodyHash []byte) (bool, error) {
	tag, err := db.pool.Exec(ctx, `INSERT INTO idempotency (actor, key, route, body_hash, status, response)
		VALUES ($1, $2, $3, $4, 0, '')
		ON CONFLICT (actor, key) DO UPDATE SET route = excluded.route, body_hash = excluded.body_hash, created_at = now()
		WHERE idempotency.status = 0 AND idempotency.created_at < now() - make_interval(secs => $5)`,
		actor, key, route, bodyHash, IdempotencyAbandoned.Seconds())
	return tag.RowsAffected() == 1, err
}

// FinishIdempotent stores the answer of a claimed key: response without
// its secrets, and sealed, those secrets encrypted (nil: none).
func (db *DB) FinishIdempotent(ctx context.Context, actor, key string, status int, response, sealed []byte) error {
	_, err := db.pool.Exec(ctx, `UPDATE idempotency SET status = $3, response = $4, sealed = $5 WHERE actor = $1 AND key = $2 AND status = 0`,
		actor, key, status, response, sealed)
	return err
}

// WipeReplaySecrets deletes the sealed secrets of Idempotency-Key answers
// older than fleet.ReplaySecretsFor (GetIdempotent no longer returns
// them) and returns how many answers it wiped.
func (db *DB) WipeReplaySecrets(ctx context.Context) (int64, error) {
	tag, err := db.pool.Exec(ctx, `UPDATE idempotency SET sealed = NULL
		WHERE sealed IS NOT NULL AND created_at <= now() - make_interval(secs => $1)`, fleet.ReplaySecretsFor.Seconds())
	return tag.RowsAffected(), err
}

// ReleaseAbandonedIdempotent gives up every claim whose request has not
// finished and returns how many. A gateway with the embedded broker (one
// instance) calls it at start, before its API serves: such a claim was
// left by a previous process that died mid-request, and would otherwise
// answer its key's retries 409 until IdempotencyAbandoned passed.
func (db *DB) ReleaseAbandonedIdempotent(ctx context.Context) (int64, error) {
	tag, err := db.pool.Exec(ctx, `DELETE FROM idempotency WHERE status = 0`)
	return tag.RowsAffected(), err
}

// ReleaseIdempotent gives up a claim whose request did not succeed, so that
// it may be retried with the same key.
func (db *DB) ReleaseIdempotent(ctx context.Context, actor, key string) error {
	_, err := db.pool.Exec(ctx, `DELETE FROM idempotency WHERE actor = $1 AND key = $2 AND status = 0`, actor, key)
	return err
}
