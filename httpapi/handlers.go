package httpapi

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/protocol"
	"github.com/lockergate/lockergate/provisioning"
)

func (s *Server) createSite(w http.ResponseWriter, r *http.Request) error {
	var in fleet.Site
	if err := decode(r, &in); err != nil {
		return err
	}
	if !protocol.ValidID(in.ID) || in.ID == "." || in.ID == ".." {
		return badRequest("id must be 1-64 of [A-Za-z0-9._:-], and not . or .. (it names the site in paths)")
	}
	if !utf8.ValidString(in.Name) || len(in.Name) > 200 {
		return badRequest("name must be valid UTF-8 of at most 200 bytes")
	}
	if in.Name == "" {
		in.Name = in.ID
	}
	if in.Timezone == "" {
		in.Timezone = "UTC"
	}
	// "Local" loads too, as the host's zone: not a zone a site is in.
	if _, err := time.LoadLocation(in.Timezone); err != nil || in.Timezone == "Local" {
		return badRequest("timezone %q is not an IANA time zone", in.Timezone)
	}
	if err := s.store.CreateSite(r.Context(), &in); err != nil {
		return err
	}
	if err := s.store.Audit(r.Context(), fleet.AuditEntry{Actor: principal(r).Actor(), Action: "site.create", Site: in.ID}); err != nil {
		return err
	}
	writeJSON(w, http.StatusCreated, in)
	return nil
}

func (s *Server) listSites(w http.ResponseWriter, r *http.Request) error {
	if t := principal(r); t.Role == fleet.RoleStore {
		// A store sees its own site: one item, no cursor; a bad limit is
		// still the 400 of every list.
		if _, _, err := pageParams(r); err != nil {
			return err
		}
		site, err := s.store.GetSite(r.Context(), t.Site)
		if err != nil {
			return err
		}
		writeJSON(w, http.StatusOK, List[fleet.Site]{Items: []fleet.Site{*site}})
		return nil
	}
	return listPage(w, r, s.store.ListSites, func(s fleet.Site) string { return s.ID })
}

func (s *Server) getSite(w http.ResponseWriter, r *http.Request) error {
	id := r.PathValue("site")
	if err := checkSite(r, id); err != nil {
		return err
	}
	site, err := s.store.GetSite(r.Context(), id)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, site)
	return nil
}

type claimIn struct {
	Site          string `json:"site"`
	Uses          int    `json:"uses"`
	ExpiresInS    int64  `json:"expires_in_s"`
	SerialPattern string `json:"serial_pattern"`
}

type claimOut struct {
	*provisioning.Claim
	Token string `json:"token,omitempty"`
}

func (s *Server) createClaim(w http.ResponseWriter, r *http.Request) error {
	var in claimIn
	if err := decode(r, &in); err != nil {
		return err
	}
	if in.Site == "" {
		return badRequest("site is required")
	}
	if in.ExpiresInS == 0 {
		in.ExpiresInS = 86400
	}
	if in.Uses == 0 {
		in.Uses = 1
	}
	c, token, err := s.prov.CreateClaim(r.Context(), provisioning.NewClaim{Site: in.Site, Uses: in.Uses,
		ExpiresIn: seconds(in.ExpiresInS), SerialPattern: in.SerialPattern, Actor: principal(r).Actor()})
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusCreated, claimOut{Claim: c, Token: token})
	return nil
}

func (s *Server) listClaims(w http.ResponseWriter, r *http.Request) error {
	return listPage(w, r, func(ctx context.Context, after string, limit int) ([]provisioning.Claim, error) {
		return s.prov.ListClaims(ctx, r.URL.Query().Get("site"), after, limit)
	}, func(c provisioning.Claim) string { return c.ID })
}

func (s *Server) getClaim(w http.ResponseWriter, r *http.Request) error {
	c, err := s.prov.GetClaim(r.Context(), r.PathValue("id"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, c)
	return nil
}

func (s *Server) revokeClaim(w http.ResponseWriter, r *http.Request) error {
	if err := s.prov.RevokeClaim(r.Context(), r.PathValue("id"), principal(r).Actor()); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

func (s *Server) listLockers(w http.ResponseWriter, r *http.Request) error {
	return listPage(w, r, func(ctx context.Context, after string, limit int) ([]fleet.Locker, error) {
		q := r.URL.Query()
		f := fleet.LockerFilter{Site: q.Get("site"), Model: q.Get("model"), FW: q.Get("fw"), After: after, Limit: limit}
		if t := principal(r); t.Role == fleet.RoleStore {
			if f.Site != "" && f.Site != t.Site {
				return nil, otherSite(t, f.Site)
			}
			f.Site = t.Site
		}
		if v := q.Get("online"); v != "" {
			b, err := strconv.ParseBool(v)
			if err != nil {
				return nil, badRequest("online must be true or false")
			}
			f.Online = &b
		}
		return s.fleet.ListLockers(ctx, f)
	}, func(l fleet.Locker) string { return l.ID })
}

// seconds is n seconds as a Duration, past any bound a caller checks (a
// billion seconds, 31 years) clamped rather than wrapped around: 2^64/10^9
// + 30 seconds would otherwise pass as 30.
func seconds(n int64) time.Duration {
	return time.Duration(max(min(n, 1e9), -1e9)) * time.Second
}

// locker loads the path's locker and checks the caller's site.
func (s *Server) locker(r *http.Request) (*fleet.Locker, error) {
	l, err := s.fleet.GetLocker(r.Context(), r.PathValue("id"))
	if err != nil {
		return nil, err
	}
	if err := checkSite(r, l.Site); err != nil {
		return nil, fmt.Errorf("%w: locker %s is at another site", errForbidden, l.ID)
	}
	return l, nil
}

func (s *Server) getLocker(w http.ResponseWriter, r *http.Request) error {
	l, err := s.locker(r)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, l)
	return nil
}

type lockerPatch struct {
	Disabled    *bool `json:"disabled"`
	Replaceable *bool `json:"replaceable"`
}

func (s *Server) patchLocker(w http.ResponseWriter, r *http.Request) error {
	var in lockerPatch
	if err := decode(r, &in); err != nil {
		return err
	}
	if in.Disabled == nil && in.Replaceable == nil {
		return badRequest("nothing to change: send disabled and/or replaceable")
	}
	l, err := s.store.UpdateLocker(r.Context(), r.PathValue("id"), in.Disabled, in.Replaceable)
	if err != nil {
		return err
	}
	if in.Disabled != nil && *in.Disabled {
		s.kick.Kick(l.ID)
		s.fleet.SessionKicked(r.Context(), l.ID) // where the broker reports no end
		// The disable ended its firmware jobs (skipped): its retained fw/job
		// goes empty now, not at its next connect, whose subscription the
		// broker would answer with the ended job first.
		if err := s.fleet.PublishRetained(context.WithoutCancel(r.Context()), l.ID); err != nil {
			s.log.Warn("retained state of a disabled locker not republished: its fw/job may still name an ended job until it connects",
				"locker", l.ID, "err", err)
		}
	} else if en, ok := s.kick.(interface{ Enable(string) }); ok && in.Disabled != nil {
		en.Enable(l.ID) // an external broker keeps its own disabled flag
	}
	detail := map[string]any{}
	if in.Disabled != nil {
		detail["disabled"] = *in.Disabled
	}
	if in.Replaceable != nil {
		detail["replaceable"] = *in.Replaceable
	}
	if err := s.store.Audit(r.Context(), fleet.AuditEntry{Actor: principal(r).Actor(), Action: "locker.update",
		Locker: l.ID, Site: l.Site, Detail: detail}); err != nil {
		return err
	}
	if in.Disabled != nil && *in.Disabled && l.Online {
		// The broker ended the session; the answer waits (briefly) for
		// the fleet to record that, so it says offline, as a GET after it.
		l, err = s.fleet.WaitOffline(r.Context(), l.ID, kickRecorded)
	} else {
		l, err = s.fleet.GetLocker(r.Context(), l.ID)
	}
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, l)
	return nil
}

// kickRecorded bounds how long a disable's answer waits for the end of the
// locker's session to be recorded: behind an external broker that reports
// no session ends (mosquitto) it is recorded from the Last Will, or not at
// all, and the answer then says what is recorded.
const kickRecorded = 2 * time.Second

// rotateCodes gives every order in a locker new codes
// (pickup.Service.RotateCodes).
func (s *Server) rotateCodes(w http.ResponseWriter, r *http.Request) error {
	l, err := s.locker(r)
	if err != nil {
		return err
	}
	n, err := s.pickups.RotateCodes(r.Context(), l.ID, principal(r).Actor(), l.Site)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, map[string]any{"locker": l.ID, "rotated": n})
	return nil
}

func rangeParams(r *http.Request) (fleet.Range, error) {
	limit, _, err := pageParams(r)
	if err != nil {
		return fleet.Range{}, err
	}
	since, err := timeParam(r, "since")
	if err != nil {
		return fleet.Range{}, err
	}
	until, err := timeParam(r, "until")
	if err != nil {
		return fleet.Range{}, err
	}
	if !since.IsZero() && !until.IsZero() && !since.Before(until) {
		return fleet.Range{}, badRequest("since must be before until")
	}
	rg := fleet.Range{Since: since, Until: until, Limit: limit}
	if after := r.URL.Query().Get("after"); after != "" {
		ts, key, ok := strings.Cut(after, "~")
		t, err := time.Parse(time.RFC3339Nano, ts)
		if err != nil || !ok || key == "" {
			return fleet.Range{}, badRequest("after must be a cursor from a previous answer")
		}
		rg.AfterTS, rg.AfterKey = t, key
	}
	return rg, nil
}

func (s *Server) lockerHealth(w http.ResponseWriter, r *http.Request) error {
	l, err := s.locker(r)
	if err != nil {
		return err
	}
	rg, err := rangeParams(r)
	if err != nil {
		return err
	}
	if rg.AfterKey != "" {
		if _, err := strconv.ParseInt(rg.AfterKey, 10, 64); err != nil { // a health row's key is its seq
			return badRequest("after must be a cursor from a previous answer")
		}
	}
	hs, err := s.store.ListHealth(r.Context(), l.ID, rg)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, listOf(hs, rg.Limit, func(h fleet.HealthRecord) string {
		return h.ReceivedAt.Format(time.RFC3339Nano) + "~" + strconv.FormatInt(h.Seq, 10)
	}))
	return nil
}

func (s *Server) lockerEvents(w http.ResponseWriter, r *http.Request) error {
	l, err := s.locker(r)
	if err != nil {
		return err
	}
	rg, err := rangeParams(r)
	if err != nil {
		return err
	}
	es, err := s.store.ListEvents(r.Context(), l.ID, rg)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, listOf(es, rg.Limit, func(e fleet.EventRecord) string {
		return e.ReceivedAt.Format(time.RFC3339Nano) + "~" + e.EventID
	}))
	return nil
}

type commandIn struct {
	Type        string `json:"type"`
	Compartment int    `json:"compartment"`
	Reason      string `json:"reason"`
	InService   *bool  `json:"in_service"`
	TTLS        int    `json:"ttl_s"`
	WaitS       int    `json:"wait_s"`
}

// maxWait bounds how long a create-command call may wait for the answer.
const maxWait = 60

func (s *Server) createCommand(w http.ResponseWriter, r *http.Request) error {
	var in commandIn
	if err := decode(r, &in); err != nil {
		return err
	}
	if in.WaitS < 0 || in.WaitS > maxWait {
		return badRequest("wait_s must be 0..%d", maxWait)
	}
	if in.TTLS < 0 {
		return badRequest("ttl_s must not be negative")
	}
	tok := principal(r)
	req := fleet.CommandRequest{
		ID: idempotentID(r, "c"), DeviceID: r.PathValue("id"), Type: in.Type, Compartment: in.Compartment, Reason: in.Reason, InService: in.InService,
		TTL: seconds(int64(in.TTLS)), Actor: tok.Actor(), AllowLongTTL: tok.Role == fleet.RoleAdmin,
	}
	if tok.Role == fleet.RoleStore {
		switch in.Type {
		case protocol.CmdUnlock:
		case protocol.CmdSetService, protocol.CmdReboot:
			return fmt.Errorf("%w: a store token may send unlock commands only (%s is for operator or admin tokens)", errForbidden, in.Type)
		default: // as for any token: the request is wrong, not the role
			return badRequest("type %q: want unlock, set_service or reboot", in.Type)
		}
		req.Site = tok.Site // another site's locker is forbidden
	}
	// The locker is looked up where the command is stored (one round trip).
	c, err := s.fleet.SendCommandWait(r.Context(), req, time.Duration(in.WaitS)*time.Second)
	if c == nil {
		return err
	}
	if err != nil && !errors.Is(err, r.Context().Err()) {
		// The command is stored and may be on its way: an error would
		// invite a retry, which would be a second command (a second
		// unlock). Answer what is known; its Location has the rest.
		s.log.Warn("command created, but waiting for its result failed; answering its last known state",
			"command", c.ID, "locker", c.DeviceID, "err", err)
	}
	w.Header().Set("Location", "/v1/lockers/"+c.DeviceID+"/commands/"+c.ID)
	writeJSON(w, http.StatusCreated, c)
	return nil
}

func (s *Server) getCommand(w http.ResponseWriter, r *http.Request) error {
	l, err := s.locker(r)
	if err != nil {
		return err
	}
	c, err := s.fleet.GetCommand(r.Context(), l.ID, r.PathValue("cmd"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, c)
	return nil
}

type tokenIn struct {
	Role  string   `json:"role"`
	Site  string   `json:"site"`
	Name  string   `json:"name"`
	Sites []string `json:"sites"`
}

// tokenSites checks a platform token's sites and returns them sorted,
// without repeats.
func tokenSites(sites []string) ([]string, error) {
	for _, site := range sites {
		if !protocol.ValidID(site) {
			return nil, badRequest("sites: %q is not a site id (1-64 of [A-Za-z0-9._:-])", site)
		}
	}
	sites = fleet.TokenSites(sites)
	if len(sites) > fleet.MaxTokenSites {
		return nil, badRequest("sites: %d of them, over the limit of %d (a platform at more sites may be given every site: leave sites out)", len(sites), fleet.MaxTokenSites)
	}
	return sites, nil
}

type tokenOut struct {
	*fleet.Token
	Secret string `json:"token"`
	// SharesPlatform, in the answer to a platform token's creation only:
	// another live platform token has its name, and both see that
	// platform's pickups and codes (a rotation; else revoke one).
	SharesPlatform bool `json:"shares_platform,omitempty"`
}

func (s *Server) createToken(w http.ResponseWriter, r *http.Request) error {
	var in tokenIn
	if err := decode(r, &in); err != nil {
		return err
	}
	if !fleet.ValidRole(in.Role) {
		return badRequest("role must be admin, operator, store, platform or broker")
	}
	if (in.Role == fleet.RoleStore) != (in.Site != "") {
		return badRequest("a store token needs a site, and only a store token has one")
	}
	if len(in.Sites) > 0 && in.Role != fleet.RolePlatform {
		return badRequest("only a platform token has sites (a store token has one site: site)")
	}
	sites, err := tokenSites(in.Sites)
	if err != nil {
		return err
	}
	if !fleet.ValidName(in.Name) {
		return badRequest("name must be 1-64 bytes of text, no control characters or spaces at either end (platform tokens: the platform's name)")
	}
	shares := false
	if in.Role == fleet.RolePlatform {
		// A platform is its tokens' name: a second live one sees the
		// first's pickups and codes. Right for a rotation, a leak for a
		// typo of another platform's name, so the answer says so.
		if shares, err = s.platformExists(r.Context(), in.Name); err != nil {
			return err
		}
	}
	t, secret, err := CreateToken(r.Context(), s.store, fleet.Token{Role: in.Role, Site: in.Site, Name: in.Name, Sites: sites}, principal(r).Actor())
	if err != nil {
		return err
	}
	if shares {
		s.log.Warn("platform token made with the name of a live one: both see that platform's pickups and codes",
			"token", t.ID, "platform", t.Name, "hint", "revoke the older once the platform uses the new one (a rotation), or this one if the name was a mistake")
	}
	writeJSON(w, http.StatusCreated, tokenOut{Token: t, Secret: secret, SharesPlatform: shares})
	return nil
}

func (s *Server) listTokens(w http.ResponseWriter, r *http.Request) error {
	return listPage(w, r, func(ctx context.Context, after string, limit int) ([]fleet.Token, error) {
		q := r.URL.Query()
		f := fleet.TokenFilter{Role: q.Get("role"), Site: q.Get("site"), Name: q.Get("name"), After: after, Limit: limit}
		if f.Role != "" && !fleet.ValidRole(f.Role) {
			return nil, badRequest("role must be admin, operator, store, platform or broker")
		}
		if v := q.Get("revoked"); v != "" {
			b, err := strconv.ParseBool(v)
			if err != nil {
				return nil, badRequest("revoked must be true or false")
			}
			f.Revoked = &b
		}
		return s.store.ListTokens(ctx, f)
	}, func(t fleet.Token) string { return t.ID })
}

func (s *Server) getToken(w http.ResponseWriter, r *http.Request) error {
	t, err := s.store.GetToken(r.Context(), r.PathValue("id"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, t)
	return nil
}

type tokenPatch struct {
	// Sites replaces a platform token's sites; [] gives it every site.
	Sites *[]string `json:"sites"`
}

// patchToken changes what a platform token may do at once, without a new
// secret to hand over: its sites.
func (s *Server) patchToken(w http.ResponseWriter, r *http.Request) error {
	var in tokenPatch
	if err := decode(r, &in); err != nil {
		return err
	}
	if in.Sites == nil {
		return badRequest(`nothing to change: give "sites" (a platform token's sites; [] for every site)`)
	}
	sites, err := tokenSites(*in.Sites)
	if err != nil {
		return err
	}
	id := r.PathValue("id")
	// Not cut short by a client that gives up: a change whose commit was
	// sent must be followed by the reset and by its audit entry.
	ctx := context.WithoutCancel(r.Context())
	was, now, err := s.store.SetTokenSites(ctx, id, sites)
	s.tokensChanged(err) // in force from now on here; within TokenCacheTTL elsewhere
	if err != nil {
		return err
	}
	if err := s.store.Audit(ctx, fleet.AuditEntry{Actor: principal(r).Actor(), Action: "token.update",
		Detail: map[string]any{"token": id, "name": now.Name, "sites": fleet.SitesOrEvery(now.Sites), "sites_before": fleet.SitesOrEvery(was.Sites)}}); err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, now)
	return nil
}

// tokensChanged forgets every cached token after a token's revocation or
// change, so that it is in force at once on this instance. A write that
// failed may still have committed (its answer lost): the cache is then
// reset again once a lookup that began meanwhile, and read the row as it
// was, is over.
func (s *Server) tokensChanged(err error) {
	s.tokens.reset()
	if err != nil {
		time.AfterFunc(tokenLookupTimeout, s.tokens.reset)
	}
}

func (s *Server) revokeToken(w http.ResponseWriter, r *http.Request) error {
	id := r.PathValue("id")
	if id == principal(r).ID {
		return badRequest("a token cannot revoke itself; use another admin token")
	}
	err := RevokeToken(context.WithoutCancel(r.Context()), s.store, id, principal(r).Actor())
	s.tokensChanged(err) // refused from now on here; within TokenCacheTTL elsewhere (a broker token: up to tokenStaleMax where the database does not answer)
	if err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

func (s *Server) listAudit(w http.ResponseWriter, r *http.Request) error {
	return listPage(w, r, func(ctx context.Context, after string, limit int) ([]fleet.AuditEntry, error) {
		since, err := timeParam(r, "since")
		if err != nil {
			return nil, err
		}
		var afterID int64
		if after != "" {
			if afterID, err = strconv.ParseInt(after, 10, 64); err != nil {
				return nil, badRequest("after must be a cursor from a previous answer")
			}
		}
		q := r.URL.Query()
		return s.store.ListAudit(ctx, fleet.AuditFilter{Since: since, Locker: q.Get("locker"), Actor: q.Get("actor"), Token: q.Get("token"), After: afterID, Limit: limit})
	}, func(e fleet.AuditEntry) string { return strconv.FormatInt(e.ID, 10) })
}

// maxUptimeDays bounds the range of one uptime answer.
const maxUptimeDays = 93

// uptimeAnswer is a locker's presence over the calendar days of its site.
type uptimeAnswer struct {
	Locker   string    `json:"locker"`
	Site     string    `json:"site"`
	Timezone string    `json:"timezone"`
	Since    time.Time `json:"since"`
	Until    time.Time `json:"until"`
	fleet.Presence
	// Connects and Disconnects sum the days'.
	Connects    int               `json:"connects"`
	Disconnects int               `json:"disconnects"`
	Days        []fleet.DayUptime `json:"days"`
}

// lockerUptime answers a locker's online time per calendar day of its
// site, from its presence history: since (default: the start of the day
// six days ago, so seven days with today) until until (default: now).
func (s *Server) lockerUptime(w http.ResponseWriter, r *http.Request) error {
	l, err := s.locker(r)
	if err != nil {
		return err
	}
	since, err := timeParam(r, "since")
	if err != nil {
		return err
	}
	until, err := timeParam(r, "until")
	if err != nil {
		return err
	}
	site, err := s.store.GetSite(r.Context(), l.Site)
	if err != nil {
		return err
	}
	loc := fleet.SiteLocation(site.Timezone)
	now := time.Now().Truncate(time.Millisecond)
	if until.IsZero() {
		until = now
	}
	if since.IsZero() {
		since = fleet.DaysBack(until, 6, loc)
	}
	if !since.Before(until) {
		return badRequest("since must be before until")
	}
	if until.Sub(since) > maxUptimeDays*24*time.Hour {
		return badRequest("at most %d days at once: narrow since and until", maxUptimeDays)
	}
	prev, changes, err := s.store.PresenceHistory(r.Context(), l.ID, since, until)
	if err != nil {
		return err
	}
	days := fleet.Uptime(fleet.StateBefore(prev, changes, l, since), changes, since, until, l.CreatedAt, now, loc)
	ans := uptimeAnswer{Locker: l.ID, Site: l.Site, Timezone: loc.String(), Since: since.UTC(), Until: until.UTC(),
		Presence: fleet.TotalUptime(days), Days: days}
	for _, d := range days {
		ans.Connects, ans.Disconnects = ans.Connects+d.Connects, ans.Disconnects+d.Disconnects
	}
	writeJSON(w, http.StatusOK, ans)
	return nil
}
