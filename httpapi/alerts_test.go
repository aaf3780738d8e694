package httpapi

import (
	"context"
	"errors"
	"log/slog"
	"net/http"
	"testing"

	"github.com/lockergate/lockergate/fleet"
)

// lockerStore answers every locker read with locker, or fails it with err,
// as a database that is down does.
type lockerStore struct {
	fleet.Store
	locker *fleet.Locker
	err    error
}

func (s lockerStore) GetLocker(context.Context, string) (*fleet.Locker, error) {
	return s.locker, s.err
}

type nopBus struct{}

func (nopBus) Publish(context.Context, string, []byte, byte, bool) error { return nil }
func (nopBus) Subscribe(string, fleet.Handler) error                     { return nil }

// TestListAlertsRefusals: a store's filter by locker needs the locker's
// site, and a failed read of it is an error, not an empty page nor another
// site's alerts; a cursor that no answer gives is a bad request.
func TestListAlertsRefusals(t *testing.T) {
	fm, err := fleet.New(fleet.Options{Store: lockerStore{err: errors.New("database down")}, Bus: nopBus{}, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	s := New(Options{Store: &fakeStore{}, Fleet: fm, Logger: slog.New(slog.DiscardHandler)})
	call(t, s, "GET", "/v1/alerts?locker=lk-1", "store-a").wantProblem(t, http.StatusInternalServerError, "internal error; the gateway log has the details")
	for _, after := range []string{"0", "-3", "x"} {
		call(t, s, "GET", "/v1/alerts?after="+after, "admin").wantProblem(t, http.StatusBadRequest, "bad request: after must be a cursor from a previous answer")
	}
}
