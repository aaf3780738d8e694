package postgres

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"testing"

	"github.com/jackc/pgx/v5/pgconn"
)

func TestTransient(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want bool
	}{
		{fmt.Errorf("register: %w", context.DeadlineExceeded), true},
		{&pgconn.ConnectError{}, true},
		{fmt.Errorf("query: %w", io.ErrUnexpectedEOF), true}, // the connection broke mid-answer
		{&net.OpError{Op: "read", Err: errors.New("connection reset by peer")}, true},
		{errors.New("can't scan into dest[0]: cannot scan text into *int"), false}, // a bug of ours
		{&pgconn.PgError{Code: "57P01"}, true},                                     // admin shutdown
		{&pgconn.PgError{Code: "08006"}, true},                                     // connection failure
		{&pgconn.PgError{Code: "40P01"}, true},                                     // deadlock victim
		{&pgconn.PgError{Code: "53300"}, true},                                     // too many connections
		{fmt.Errorf("register: %w", &pgconn.PgError{Code: "23505"}), false},        // unique violation
		{&pgconn.PgError{Code: "22P02"}, false},
		{&pgconn.PgError{Code: "25006"}, true}, // read-only transaction: a replica during failover
		{&pgconn.PgError{Code: "55P03"}, true}, // lock not available
		{&pgconn.PgError{Code: "X"}, true},     // bad value
	} {
		if got := Transient(tc.err); got != tc.want {
			t.Errorf("Transient(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
}
