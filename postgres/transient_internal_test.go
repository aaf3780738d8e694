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
		{&pgconn.PgError{Code: "X"}, true},     // not a code we know: provisioning retries
	} {
		if got := transient(tc.err); got != tc.want {
			t.Errorf("transient(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
}

// TestUnavailable: what the API answers 503 for (retry) rather than 500 (a
// fault to look at).
func TestUnavailable(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want bool
	}{
		{&pgconn.ConnectError{}, true},
		{fmt.Errorf("list: %w", io.ErrUnexpectedEOF), true},
		{&net.OpError{Op: "dial", Err: errors.New("connection refused")}, true},
		{fmt.Errorf("query: %w", context.DeadlineExceeded), true},
		{&pgconn.PgError{Code: "57P01"}, true}, // admin shutdown
		{&pgconn.PgError{Code: "57P03"}, true}, // cannot connect now: starting
		{&pgconn.PgError{Code: "08006"}, true},
		{&pgconn.PgError{Code: "40P01"}, true},
		{&pgconn.PgError{Code: "40001"}, true},
		{&pgconn.PgError{Code: "53300"}, true},
		{&pgconn.PgError{Code: "25006"}, true},
		{&pgconn.PgError{Code: "55P03"}, true},
		{context.Canceled, false},               // the client went away: not the database
		{&pgconn.PgError{Code: "XX000"}, false}, // internal error
		{&pgconn.PgError{Code: "25P02"}, false}, // a failed transaction: our bug
		{&pgconn.PgError{Code: "0A000"}, false}, // feature not supported
		{&pgconn.PgError{Code: "54000"}, false}, // program limit
		{&pgconn.PgError{Code: "23505"}, false},
		{&pgconn.PgError{Code: "X"}, false},
		{errors.New("can't scan into dest[0]"), false},
	} {
		if got := Unavailable(tc.err); got != tc.want {
			t.Errorf("Unavailable(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
}
