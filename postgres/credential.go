package postgres

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/pickup"
	"github.com/lockergate/lockergate/protocol"
)

// Retained implements fleet.Store. It is read on every (re)connect of every
// locker, so it reads everything the locker's retained topics carry in one
// round trip and one snapshot (retained).
func (db *DB) Retained(ctx context.Context, id string) (*fleet.Retained, error) {
	rs, err := db.retained(ctx, []string{id})
	if err == nil && rs[id] == nil {
		err = fleet.ErrNotFound
	}
	if err != nil {
		return nil, fmt.Errorf("retained state of %s: %w", id, err)
	}
	return rs[id], nil
}

// RetainedMany implements fleet.Store: Retained for many lockers, in one
// round trip (a reconnect storm brings hundreds to a control shard at once).
func (db *DB) RetainedMany(ctx context.Context, ids []string) (map[string]*fleet.Retained, error) {
	rs, err := db.retained(ctx, ids)
	if err != nil {
		return nil, fmt.Errorf("retained state of %d lockers: %w", len(ids), err)
	}
	return rs, nil
}

// CredsVersions implements fleet.Store.
func (db *DB) CredsVersions(ctx context.Context, ids []string) (map[string]int64, error) {
	rows, err := db.pool.Query(ctx, `SELECT id, creds_version FROM devices WHERE id = ANY($1)`, ids)
	if err != nil {
		return nil, err
	}
	out := make(map[string]int64, len(ids))
	var id string
	var v int64
	_, err = pgx.ForEachRow(rows, []any{&id, &v}, func() error {
		out[id] = v
		return nil
	})
	return out, err
}

// retained reads the retained state of the lockers of ids that exist: the
// config version, the credential set version with the credentials it
// names, and the firmware job. Explicit BEGIN and COMMIT in the batch make
// its statements one repeatable-read transaction; a failure leaves the
// connection in a transaction, which pgxpool closes rather than reuse.
// PostgreSQL sends no result before the batch's end, so a statement that
// fails or stalls surfaces at the first read: errors name a statement only
// once its rows are read.
func (db *DB) retained(ctx context.Context, ids []string) (map[string]*fleet.Retained, error) {
	b := &pgx.Batch{}
	b.Queue("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
	b.Queue("SELECT id, config_version, creds_version FROM devices WHERE id = ANY($1)", ids)
	b.Queue(`SELECT device_id, id, coalesce(pin_mac, ''), coalesce(qr_mac, ''), compartments, not_after FROM credentials
		WHERE device_id = ANY($1) AND state = 'active' AND not_after > $2 ORDER BY device_id, id`, ids, time.Now())
	b.Queue(`SELECT device_id, payload FROM fw_jobs WHERE device_id = ANY($1) AND state IN `+fwActive+` AND payload IS NOT NULL`, ids)
	b.Queue("COMMIT")
	br := db.pool.SendBatch(ctx, b)
	defer br.Close()
	if _, err := br.Exec(); err != nil {
		return nil, err
	}
	out := make(map[string]*fleet.Retained, len(ids))
	ts := protocol.Now()
	rows, err := br.Query()
	if err != nil {
		return nil, err
	}
	var id string
	var cfgV, credsV int64
	_, err = pgx.ForEachRow(rows, []any{&id, &cfgV, &credsV}, func() error {
		r := &fleet.Retained{Creds: protocol.CredSet{TS: ts, Version: credsV}}
		r.Config.Version = cfgV
		out[id] = r
		return nil
	})
	if err != nil {
		return nil, err
	}
	if rows, err = br.Query(); err != nil {
		return nil, fmt.Errorf("credential set: %w", err)
	}
	creds := make(map[string][]pickup.Credential, len(out))
	var c pickup.Credential
	_, err = pgx.ForEachRow(rows, []any{&id, &c.ID, &c.PINMAC, &c.QRMAC, &c.Compartments, &c.NotAfter}, func() error {
		creds[id] = append(creds[id], c)
		c = pickup.Credential{} // Compartments is scanned into a fresh slice each row
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("credential set: %w", err)
	}
	for id, r := range out {
		r.Creds.Creds = pickup.WireCredentials(creds[id])
		pickup.FitSet(&r.Creds)
	}
	if rows, err = br.Query(); err != nil {
		return nil, fmt.Errorf("firmware job: %w", err)
	}
	var job []byte
	_, err = pgx.ForEachRow(rows, []any{&id, &job}, func() error {
		r := out[id]
		if r == nil || r.FwJob != nil {
			return nil // one active job per locker
		}
		r.FwJob = new(protocol.FwJob)
		if err := json.Unmarshal(job, r.FwJob); err != nil {
			return fmt.Errorf("stored fw/job of %s: %w", id, err)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("firmware job: %w", err)
	}
	if _, err := br.Exec(); err != nil {
		return nil, err
	}
	return out, br.Close()
}
