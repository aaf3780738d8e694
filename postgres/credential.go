package postgres

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/pickup"
	"github.com/lockergate/lockergate/protocol"
)

// Retained implements fleet.Store. It is read on every (re)connect of every
// locker, so it reads everything the locker's retained topics carry in one
// round trip and one snapshot: the config version, the credential set
// version with the credentials it names, and the firmware job. Explicit
// BEGIN and COMMIT in the batch make its statements one repeatable-read
// transaction; a failure leaves the connection in a transaction, which
// pgxpool closes rather than reuse. PostgreSQL sends no result before the
// batch's end, so a statement that fails or stalls surfaces at the first
// read: errors name the locker, and a statement only once its rows are read.
func (db *DB) Retained(ctx context.Context, id string) (*fleet.Retained, error) {
	r, err := db.retained(ctx, id)
	if err != nil {
		return nil, fmt.Errorf("retained state of %s: %w", id, err)
	}
	return r, nil
}

func (db *DB) retained(ctx context.Context, id string) (*fleet.Retained, error) {
	b := &pgx.Batch{}
	b.Queue("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
	b.Queue("SELECT config_version, creds_version FROM devices WHERE id = $1", id)
	b.Queue(`SELECT id, coalesce(pin_mac, ''), coalesce(qr_mac, ''), compartments, not_after FROM credentials
		WHERE device_id = $1 AND state = 'active' AND not_after > $2 ORDER BY id`, id, time.Now())
	b.Queue(`SELECT payload FROM fw_jobs WHERE device_id = $1 AND state IN `+fwActive+` AND payload IS NOT NULL`, id)
	b.Queue("COMMIT")
	br := db.pool.SendBatch(ctx, b)
	defer br.Close()
	r := &fleet.Retained{Creds: protocol.CredSet{TS: protocol.Now()}}
	if _, err := br.Exec(); err != nil {
		return nil, err
	}
	err := br.QueryRow().Scan(&r.Config.Version, &r.Creds.Version)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, fleet.ErrNotFound
	}
	if err != nil {
		return nil, err
	}
	rows, err := br.Query()
	if err != nil {
		return nil, fmt.Errorf("credential set: %w", err)
	}
	cs, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (pickup.Credential, error) {
		var c pickup.Credential
		err := row.Scan(&c.ID, &c.PINMAC, &c.QRMAC, &c.Compartments, &c.NotAfter)
		return c, err
	})
	if err != nil {
		return nil, fmt.Errorf("credential set: %w", err)
	}
	r.Creds.Creds = pickup.WireCredentials(cs)
	pickup.FitSet(&r.Creds)
	var job []byte
	err = br.QueryRow().Scan(&job)
	switch {
	case errors.Is(err, pgx.ErrNoRows):
	case err != nil:
		return nil, fmt.Errorf("firmware job: %w", err)
	default:
		r.FwJob = new(protocol.FwJob)
		if err := json.Unmarshal(job, r.FwJob); err != nil {
			return nil, fmt.Errorf("stored fw/job: %w", err)
		}
	}
	if _, err := br.Exec(); err != nil {
		return nil, err
	}
	return r, br.Close()
}
