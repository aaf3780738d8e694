package httpapi

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/pickup"
)

// alertKinds are the kinds the gateway raises; a list filter on another
// kind is a typo, answered 400 rather than an empty list.
var alertKinds = slices.Concat(fleet.AlertKinds, pickup.AlertKinds)

// listAlerts: GET /v1/alerts, newest first. A store sees its site's.
func (s *Server) listAlerts(w http.ResponseWriter, r *http.Request) error {
	return listPage(w, r, func(ctx context.Context, after string, limit int) ([]fleet.Alert, error) {
		q := r.URL.Query()
		f := fleet.AlertFilter{Site: q.Get("site"), Locker: q.Get("locker"), Kind: q.Get("kind"), Limit: limit}
		if t := principal(r); t.Role == fleet.RoleStore {
			if f.Site != "" && f.Site != t.Site {
				return nil, otherSite(t, f.Site)
			}
			f.Site = t.Site
			if f.Locker != "" {
				// Another site's locker is a 403, as everywhere else; an
				// unknown one lists nothing.
				l, err := s.fleet.GetLocker(ctx, f.Locker)
				if err == nil && l.Site != t.Site {
					return nil, fmt.Errorf("%w: locker %s is at another site", errForbidden, l.ID)
				}
				if err != nil && !errors.Is(err, fleet.ErrNotFound) {
					return nil, err
				}
			}
		}
		if f.Kind != "" && !slices.Contains(alertKinds, f.Kind) {
			return nil, badRequest("kind %q: want one of %s", f.Kind, strings.Join(alertKinds, ", "))
		}
		if v := q.Get("open"); v != "" {
			b, err := strconv.ParseBool(v)
			if err != nil {
				return nil, badRequest("open must be true or false")
			}
			f.Open = &b
		}
		var err error
		if f.Since, err = timeParam(r, "since"); err != nil {
			return nil, err
		}
		if after != "" {
			if f.Before, err = strconv.ParseInt(after, 10, 64); err != nil || f.Before <= 0 {
				return nil, badRequest("after must be a cursor from a previous answer")
			}
		}
		return s.store.QueryAlerts(ctx, f)
	}, func(a fleet.Alert) string { return strconv.FormatInt(a.ID, 10) })
}

// clearAlert: POST /v1/alerts/{id}/clear. Staff acknowledge an alert that
// needs a person (a stateful one clears itself when its condition ends,
// and opens again if the condition is reported anew).
func (s *Server) clearAlert(w http.ResponseWriter, r *http.Request) error {
	id, err := strconv.ParseInt(r.PathValue("id"), 10, 64)
	if err != nil || id <= 0 {
		return fmt.Errorf("alert %q: %w", r.PathValue("id"), fleet.ErrNotFound)
	}
	a, err := s.store.GetAlert(r.Context(), id)
	if err != nil {
		return err
	}
	if err := checkSite(r, a.Site); err != nil {
		return fmt.Errorf("%w: alert %d is at another site", errForbidden, id)
	}
	if t := principal(r); a.Kind == fleet.AlertCredsNotApplied && t.Role != fleet.RoleAdmin && t.Role != fleet.RoleOperator {
		// Clearing it vouches that the locker holds its set, and releases
		// compartments whose last order's code it may still accept: for
		// those who can see the locker's state, not for a store at rush hour.
		return fmt.Errorf("%w: a %s alert is cleared by an operator or admin token (clearing it releases compartments whose "+
			"last order's code the locker may still accept); until then the locker acknowledging its set clears it", errForbidden, a.Kind)
	}
	a, err = s.store.ClearAlert(r.Context(), id, principal(r).Actor(), time.Now())
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, a)
	return nil
}
