package httpapi

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"syscall"
	"testing"

	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/provisioning"
)

// downStore fails every listing of sites with err.
type downStore struct {
	fakeStore
	err error
}

func (s *downStore) ListSites(context.Context, string, int) ([]fleet.Site, error) { return nil, s.err }

// TestUnavailableStoreErrors: a store error that says the database is down (the
// database unreachable) is a 503 with Retry-After, which clients retry; any
// other stays a 500, and without an Unavailable classifier every one does.
func TestUnavailableStoreErrors(t *testing.T) {
	refused := &net.OpError{Op: "dial", Net: "tcp", Err: syscall.ECONNREFUSED}
	isNet := func(err error) bool {
		var ne net.Error
		return errors.As(err, &ne)
	}
	for _, c := range []struct {
		name        string
		unavailable func(error) bool
		err         error
		status      int
	}{
		{"unreachable", isNet, refused, http.StatusServiceUnavailable},
		{"wrapped", isNet, errors.Join(errors.New("list sites"), refused), http.StatusServiceUnavailable},
		{"not transient", isNet, errors.New("scan: bad column"), http.StatusInternalServerError},
		{"no classifier", nil, refused, http.StatusInternalServerError},
	} {
		t.Run(c.name, func(t *testing.T) {
			s := New(Options{Store: &downStore{err: c.err}, Unavailable: c.unavailable})
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

// TestRequestCancelledByClient: a store call that failed because the
// request's own client went away is not a fault of the gateway nor of the
// database: no Retry-After (nobody reads the answer). The same error with
// the client still there is a fault (500).
func TestRequestCancelledByClient(t *testing.T) {
	s := New(Options{Store: &downStore{err: fmt.Errorf("list sites: %w", context.Canceled)}, Unavailable: func(error) bool { return true }})
	s.tokens.put(provisioning.HashSecret("admin"), testTokens["admin"], s.tokens.generation()) // no lookup with a cancelled context
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	req := httptest.NewRequest("GET", "/v1/sites", nil).WithContext(ctx)
	req.Header.Set("Authorization", "Bearer admin")
	rec := httptest.NewRecorder()
	s.ServeHTTP(rec, req)
	if rec.Code != http.StatusServiceUnavailable || rec.Header().Get("Retry-After") != "" || !strings.Contains(rec.Body.String(), "request cancelled") {
		t.Fatalf("client gone: %d, Retry-After %q, %s", rec.Code, rec.Header().Get("Retry-After"), rec.Body)
	}
	s = New(Options{Store: &downStore{err: fmt.Errorf("list sites: %w", context.Canceled)}})
	if a := call(t, s, "GET", "/v1/sites", "admin"); a.status != http.StatusInternalServerError {
		t.Fatalf("cancelled inside the gateway, client still there: %d, want 500", a.status)
	}
}
