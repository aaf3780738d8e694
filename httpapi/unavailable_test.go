package httpapi

import (
	"context"
	"errors"
	"net"
	"net/http"
	"syscall"
	"testing"

	"github.com/lockergate/lockergate/fleet"
)

// downStore fails every listing of sites with err.
type downStore struct {
	fakeStore
	err error
}

func (s *downStore) ListSites(context.Context, string, int) ([]fleet.Site, error) { return nil, s.err }

// TestTransientStoreErrors: a store error that may pass on retry (the
// database unreachable) is a 503 with Retry-After, which clients retry; any
// other stays a 500, and without a Transient classifier every one does.
func TestTransientStoreErrors(t *testing.T) {
	refused := &net.OpError{Op: "dial", Net: "tcp", Err: syscall.ECONNREFUSED}
	isNet := func(err error) bool {
		var ne net.Error
		return errors.As(err, &ne)
	}
	for _, c := range []struct {
		name      string
		transient func(error) bool
		err       error
		status    int
	}{
		{"unreachable", isNet, refused, http.StatusServiceUnavailable},
		{"wrapped", isNet, errors.Join(errors.New("list sites"), refused), http.StatusServiceUnavailable},
		{"not transient", isNet, errors.New("scan: bad column"), http.StatusInternalServerError},
		{"no classifier", nil, refused, http.StatusInternalServerError},
	} {
		t.Run(c.name, func(t *testing.T) {
			s := New(Options{Store: &downStore{err: c.err}, Transient: c.transient})
			a := call(t, s, "GET", "/v1/sites", "admin")
			if a.status != c.status {
				t.Fatalf("status %d, want %d (%s)", a.status, c.status, a.raw)
			}
			if ra := a.header.Get("Retry-After"); (c.status == http.StatusServiceUnavailable) != (ra == "2") {
				t.Fatalf("Retry-After %q with status %d", ra, a.status)
			}
		})
	}
}
