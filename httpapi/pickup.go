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
	"github.com/lockergate/lockergate/protocol"
	"github.com/lockergate/lockergate/webhook"
)

var (
	allRoles = []string{fleet.RoleAdmin, fleet.RoleOperator, fleet.RoleStore, fleet.RolePlatform}
	// handoffRoles hand orders over: they create and cancel pickups and
	// hold their codes. Operators run the fleet (api-v1: lockers,
	// commands, firmware, rollouts, claims); they read pickups, without
	// codes.
	handoffRoles = []string{fleet.RoleAdmin, fleet.RoleStore, fleet.RolePlatform}
)

func (s *Server) pickupTable() []route {
	return []route{
		{"POST", "/v1/pickups", handoffRoles, true, s.createPickup},
		{"GET", "/v1/pickups", allRoles, false, s.listPickups},
		{"GET", "/v1/pickups/{id}", allRoles, false, s.getPickup},
		{"POST", "/v1/pickups/{id}/cancel", handoffRoles, false, s.cancelPickup},
		{"POST", "/v1/credentials", handoffRoles, true, s.createCredential},
		{"POST", "/v1/webhooks", allRoles, true, s.createWebhook},
		{"GET", "/v1/webhooks", allRoles, false, s.listWebhooks},
		{"DELETE", "/v1/webhooks/{id}", allRoles, false, s.deleteWebhook},
		{"GET", "/v1/webhooks/{id}/deliveries", allRoles, false, s.webhookDeliveries},
	}
}

// canSeePickup: admins and operators see all; a store its site's; a
// platform its own.
func canSeePickup(t *fleet.Token, p *pickup.Pickup) bool {
	switch t.Role {
	case fleet.RoleAdmin, fleet.RoleOperator:
		return true
	case fleet.RoleStore:
		return p.Site == t.Site
	case fleet.RolePlatform:
		return p.Platform == t.Name
	}
	return false
}

// mayHoldCode: the credential is shown to the store and the pickup's own
// platform (and admins), not to fleet operators.
func mayHoldCode(t *fleet.Token, p *pickup.Pickup) bool {
	return t.Role != fleet.RoleOperator && canSeePickup(t, p)
}

type pickupIn struct {
	Site      string           `json:"site"`
	OrderRef  string           `json:"order_ref"`
	Size      string           `json:"size"`
	Zone      string           `json:"zone"`
	Recipient pickup.Recipient `json:"recipient"`
	ExpiresAt *time.Time       `json:"expires_at"`
}

func (s *Server) createPickup(w http.ResponseWriter, r *http.Request) error {
	var in pickupIn
	if err := decode(r, &in); err != nil {
		return err
	}
	t := principal(r)
	switch t.Role {
	case fleet.RoleStore:
		if in.Site == "" {
			in.Site = t.Site // a store's pickups are at its site
		}
		if in.Site != t.Site {
			return otherSite(t, in.Site)
		}
	case fleet.RolePlatform:
		if in.Recipient.Platform == "" {
			in.Recipient.Platform = t.Name // and so a driver, unless kind says otherwise (Service.Create)
		}
		if in.Recipient.Platform != t.Name {
			return fmt.Errorf("%w: this platform token is %s's: it makes pickups for %s only (recipient.platform %s)",
				errForbidden, t.Name, t.Name, in.Recipient.Platform)
		}
	}
	if !protocol.ValidID(in.Site) {
		return badRequest("site is required: 1-64 of [A-Za-z0-9._:-]")
	}
	if t.Role == fleet.RolePlatform && !t.PlatformAt(in.Site) {
		// Before the site is looked up: a token limited to some sites
		// learns nothing of the others, not even whether they exist.
		return platformElsewhere(t, "pickups", in.Site)
	}
	if _, err := s.store.GetSite(r.Context(), in.Site); err != nil {
		return fmt.Errorf("site %s: %w", in.Site, err)
	}
	p := &pickup.Pickup{ID: idempotentID(r, "p"), Site: in.Site, OrderRef: in.OrderRef, Size: in.Size, Zone: in.Zone, Recipient: in.Recipient, CreatedBy: t.Actor()}
	if in.ExpiresAt != nil {
		p.ExpiresAt = in.ExpiresAt.UTC()
	}
	err := s.pickups.Create(r.Context(), p)
	if errors.Is(err, pickup.ErrNoCompartment) {
		writeProblem(w, http.StatusUnprocessableEntity, "no free compartment fits: size "+p.Size+" or larger, zone "+p.Zone+
			", in service, on an online locker at "+p.Site)
		return nil
	}
	if err != nil {
		return err
	}
	if t.Role != fleet.RolePlatform { // a platform's own pickups name its live token: no lookup
		s.checkPlatform(r.Context(), p)
	}
	w.Header().Set("Location", "/v1/pickups/"+p.ID)
	writeJSON(w, http.StatusCreated, p)
	return nil
}

// platformElsewhere is the 403 for platform token t making what (pickups,
// codes) at a site its sites do not list.
func platformElsewhere(t *fleet.Token, what, site string) error {
	at := strings.Join(t.Sites, ", ")
	if len(t.Sites) > 5 {
		at = fmt.Sprintf("its %d sites", len(t.Sites))
	}
	return fmt.Errorf("%w: this platform token makes %s at %s only, not at %s (an admin may add the site: PATCH /v1/tokens/%s)",
		errForbidden, what, at, site, t.ID)
}

// platformExists reports whether a platform token that is not revoked has
// name: the platform of that name exists.
func (s *Server) platformExists(ctx context.Context, name string) (bool, error) {
	live := false
	ts, err := s.store.ListTokens(ctx, fleet.TokenFilter{Role: fleet.RolePlatform, Name: name, Revoked: &live, Limit: 1})
	return len(ts) > 0, err
}

// checkPlatform marks new pickup p RecipientPlatformUnknown, and logs it,
// when no platform token that is not revoked has its recipient's platform
// name: the pickup is made all the same (a platform's token may come
// later, or be rotated meanwhile), but nobody may see its code until then.
// A failed lookup is logged and leaves the answer as it is.
func (s *Server) checkPlatform(ctx context.Context, p *pickup.Pickup) {
	if p.Recipient.Platform == "" {
		return
	}
	exists, err := s.platformExists(ctx, p.Recipient.Platform)
	if err != nil {
		s.log.Warn("platform of a new pickup not looked up", "pickup", p.ID, "platform", p.Recipient.Platform, "err", err)
		return
	}
	if !exists {
		p.RecipientPlatformUnknown = true
		s.log.Warn("pickup made for a platform no token has the name of: no platform can see it or its code until a platform token has that name",
			"pickup", p.ID, "platform", p.Recipient.Platform, "site", p.Site,
			"hint", "check recipient.platform against GET /v1/tokens?role=platform, or cancel the pickup")
	}
}

func (s *Server) pickupOf(r *http.Request) (*pickup.Pickup, error) {
	p, err := s.pickups.Get(r.Context(), r.PathValue("id"))
	if err != nil {
		return nil, err
	}
	if !canSeePickup(principal(r), p) {
		return nil, fmt.Errorf("%w: pickup %s is another site's or platform's", errForbidden, p.ID)
	}
	return p, nil
}

func (s *Server) getPickup(w http.ResponseWriter, r *http.Request) error {
	p, err := s.pickupOf(r)
	if err != nil {
		return err
	}
	if mayHoldCode(principal(r), p) {
		p.Credential = s.pickups.CredentialOf(r.Context(), p)
	}
	writeJSON(w, http.StatusOK, p)
	return nil
}

func (s *Server) listPickups(w http.ResponseWriter, r *http.Request) error {
	limit, after, err := pageParams(r)
	if err != nil {
		return err
	}
	q := r.URL.Query()
	f := pickup.Filter{Site: q.Get("site"), State: q.Get("state"), After: after, Limit: limit}
	if f.State != "" && !validState(f.State) {
		return badRequest("state must be one of staging, ready, picked_up, expired, cancelled")
	}
	switch t := principal(r); t.Role {
	case fleet.RoleStore:
		if f.Site != "" && f.Site != t.Site {
			return otherSite(t, f.Site)
		}
		f.Site = t.Site
	case fleet.RolePlatform:
		f.Platform = t.Name
	}
	ps, err := s.pickups.List(r.Context(), f)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, listOf(ps, limit, func(p pickup.Pickup) string { return p.ID }))
	return nil
}

func validState(s string) bool {
	for _, v := range pickup.States {
		if v == s {
			return true
		}
	}
	return false
}

func (s *Server) cancelPickup(w http.ResponseWriter, r *http.Request) error {
	p, err := s.pickupOf(r)
	if err != nil {
		return err
	}
	p, err = s.pickups.Cancel(r.Context(), p.ID, principal(r).Actor())
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, p)
	return nil
}

type credentialIn struct {
	Pickups []string `json:"pickups"`
	Kind    string   `json:"kind"`
}

func (s *Server) createCredential(w http.ResponseWriter, r *http.Request) error {
	var in credentialIn
	if err := decode(r, &in); err != nil {
		return err
	}
	t := principal(r)
	v, err := s.pickups.Combine(r.Context(), in.Pickups, in.Kind, t.Actor(), func(p *pickup.Pickup) error {
		switch {
		case !mayHoldCode(t, p):
			return fmt.Errorf("%w: it is another site's or platform's", errForbidden)
		case t.Role == fleet.RolePlatform && !t.PlatformAt(p.Site):
			// Its own pickup (a store there made it for the platform, or
			// the token's sites changed since): it sees the code, but
			// makes codes at its sites only.
			return platformElsewhere(t, "codes", p.Site)
		}
		return nil
	})
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusCreated, v)
	return nil
}

// webhookEvents are the event types a webhook may ask for.
var webhookEvents = append(slices.Clone(pickup.EventTypes), webhook.EventAlertRaised)

type webhookIn struct {
	URL    string   `json:"url"`
	Events []string `json:"events"`
}

type webhookOut struct {
	*webhook.Webhook
	Secret string `json:"secret"`
}

func (s *Server) createWebhook(w http.ResponseWriter, r *http.Request) error {
	var in webhookIn
	if err := decode(r, &in); err != nil {
		return err
	}
	if len(in.Events) == 0 {
		in.Events = pickup.EventTypes // alert.raised only when asked for
	}
	t := principal(r)
	in.Events = withoutRepeats(in.Events)
	for _, e := range in.Events {
		if !slices.Contains(webhookEvents, e) {
			return badRequest("event %q: want one of %s", e, strings.Join(webhookEvents, ", "))
		}
		if e == webhook.EventAlertRaised && t.Role == fleet.RolePlatform {
			return fmt.Errorf("%w: %s is for admin, operator and store tokens (alerts are about lockers)", errForbidden, e)
		}
	}
	wh := &webhook.Webhook{TokenID: t.ID, Role: t.Role, Site: t.Site, URL: in.URL, Events: in.Events}
	if t.Role == fleet.RolePlatform {
		wh.Platform = t.Name
	}
	secret, err := s.webhooks.Create(r.Context(), wh)
	if err != nil {
		return err
	}
	if err := s.store.Audit(r.Context(), fleet.AuditEntry{Actor: t.Actor(), Action: "webhook.create", Site: t.Site,
		Detail: map[string]any{"webhook": wh.ID, "url": wh.URL}}); err != nil {
		return err
	}
	writeJSON(w, http.StatusCreated, webhookOut{Webhook: wh, Secret: secret})
	return nil
}

// webhookOf loads the path's webhook: admins see all, others their token's own.
func (s *Server) webhookOf(r *http.Request) (*webhook.Webhook, error) {
	wh, err := s.webhooks.Get(r.Context(), r.PathValue("id"))
	if err != nil {
		return nil, err
	}
	if t := principal(r); t.Role != fleet.RoleAdmin && wh.TokenID != t.ID {
		return nil, fmt.Errorf("%w: webhook %s belongs to another token", errForbidden, wh.ID)
	}
	return wh, nil
}

func (s *Server) listWebhooks(w http.ResponseWriter, r *http.Request) error {
	t := principal(r)
	owner := t.ID
	if t.Role == fleet.RoleAdmin {
		owner = ""
	}
	return listPage(w, r, func(ctx context.Context, after string, limit int) ([]webhook.Webhook, error) {
		return s.webhooks.List(ctx, owner, after, limit)
	}, func(w webhook.Webhook) string { return w.ID })
}

func (s *Server) deleteWebhook(w http.ResponseWriter, r *http.Request) error {
	wh, err := s.webhookOf(r)
	if err != nil {
		return err
	}
	if err := s.webhooks.Delete(r.Context(), wh.ID); err != nil {
		return err
	}
	if err := s.store.Audit(r.Context(), fleet.AuditEntry{Actor: principal(r).Actor(), Action: "webhook.delete",
		Detail: map[string]any{"webhook": wh.ID}}); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

func (s *Server) webhookDeliveries(w http.ResponseWriter, r *http.Request) error {
	wh, err := s.webhookOf(r)
	if err != nil {
		return err
	}
	limit, after, err := pageParams(r)
	if err != nil {
		return err
	}
	var afterSeq int64
	if after != "" {
		if afterSeq, err = strconv.ParseInt(after, 10, 64); err != nil {
			return badRequest("after must be a cursor from a previous answer")
		}
	}
	ds, err := s.webhooks.Deliveries(r.Context(), wh.ID, afterSeq, limit)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, listOf(ds, limit, func(d webhook.Delivery) string { return strconv.FormatInt(d.Seq, 10) }))
	return nil
}

// withoutRepeats is list in its order with each value's repeats left out.
func withoutRepeats(list []string) []string {
	var out []string
	for _, v := range list {
		if !slices.Contains(out, v) {
			out = append(out, v)
		}
	}
	return out
}
