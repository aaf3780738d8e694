package postgres

import (
	"context"
	"encoding/json"
	"errors"

	"github.com/jackc/pgx/v5"

	"github.com/lockergate/lockergate/protocol"
)

// LockerConfig records cfg (its Version ignored) as the lockers'
// configuration and returns the version it goes out under: the stored
// one while cfg is what was stored, the next one when it differs (bumped:
// lockers hold an older configuration than cfg). Before
// any was stored, def (a version and its content) stands for it: the
// configuration lockers got before it was kept. Instances that start
// together take turns (an advisory lock); instances started with
// different configurations bump it in turn, so run them with the same.
func (db *DB) LockerConfig(ctx context.Context, cfg, def protocol.Config) (version int64, bumped bool, err error) {
	cfg.Version = 0
	value, err := json.Marshal(cfg)
	if err != nil {
		return 0, false, err
	}
	err = pgx.BeginFunc(ctx, db.pool, func(tx pgx.Tx) error {
		bumped = false // a try before
		if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock(hashtextextended('lockergate/settings/locker_config', 0))`); err != nil {
			return err
		}
		var was protocol.Config
		err := tx.QueryRow(ctx, `SELECT value, version FROM settings WHERE name = 'locker_config'`).Scan(&was, &version)
		kept := err == nil
		switch {
		case errors.Is(err, pgx.ErrNoRows):
			was, version = def, def.Version
			was.Version = 0
		case err != nil:
			return err
		}
		if was == cfg && kept {
			return nil
		}
		if was != cfg {
			version++
			bumped = true
		}
		_, err = tx.Exec(ctx, `INSERT INTO settings (name, value, version) VALUES ('locker_config', $1, $2)
			ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value, version = EXCLUDED.version, updated_at = now()`, value, version)
		return err
	})
	return version, bumped && err == nil, err
}

// ErrKeyMismatch is CheckKey's answer for a key other than the one
// recorded (by the first instance that started on the database since
// keys are checked).
var ErrKeyMismatch = errors.New("key differs from the one recorded in this database")

// CheckKey records fingerprint as key name's the first time and, after,
// reports ErrKeyMismatch for another: instances that share a database
// must share its keys (lockers' credential keys and pickup codes derive
// from the master key, firmware is signed with the firmware key), and an
// instance started on a data directory of its own would hand out codes no
// locker accepts. A fingerprint, not the key: the settings table is read
// by anyone who reads the database.
func (db *DB) CheckKey(ctx context.Context, name, fingerprint string) error {
	value, err := json.Marshal(map[string]string{"fingerprint": fingerprint})
	if err != nil {
		return err
	}
	var stored string
	err = db.pool.QueryRow(ctx, `WITH ins AS (
			INSERT INTO settings (name, value, version) VALUES ($1, $2, 1) ON CONFLICT (name) DO NOTHING RETURNING value)
		SELECT value->>'fingerprint' FROM ins UNION ALL SELECT value->>'fingerprint' FROM settings WHERE name = $1 LIMIT 1`,
		"key/"+name, value).Scan(&stored)
	if errors.Is(err, pgx.ErrNoRows) {
		// Another instance inserted it after this statement's snapshot.
		err = db.pool.QueryRow(ctx, `SELECT value->>'fingerprint' FROM settings WHERE name = $1`, "key/"+name).Scan(&stored)
	}
	if err != nil {
		return err
	}
	if stored != fingerprint {
		return ErrKeyMismatch
	}
	return nil
}
