package postgres

import (
	"context"
	"errors"
	"fmt"
	"testing"

	"github.com/jackc/pgx/v5/pgconn"
)

func TestTransient(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want bool
	}{
		{fmt.Errorf("register: %w", context.DeadlineExceeded), true},
		{errors.New("dial unix /tmp/.s.PGSQL.5432: connect: connection refused"), true},
		{&pgconn.PgError{Code: "57P01"}, true},                              // admin shutdown
		{&pgconn.PgError{Code: "08006"}, true},                              // connection failure
		{&pgconn.PgError{Code: "40P01"}, true},                              // deadlock victim
		{&pgconn.PgError{Code: "53300"}, true},                              // too many connections
		{fmt.Errorf("register: %w", &pgconn.PgError{Code: "23505"}), false}, // unique violation
		{&pgconn.PgError{Code: "22P02"}, false},                             // bad value
	} {
		if got := transient(tc.err); got != tc.want {
			t.Errorf("transient(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
}
