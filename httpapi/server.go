// Package httpapi serves the Lockergate HTTP API (api-v1.md) for stores,
// delivery platforms, operators and lockerctl.
package httpapi

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"path"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/lockergate/lockergate/firmware"
	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/pickup"
	"github.com/lockergate/lockergate/provisioning"
	"github.com/lockergate/lockergate/webhook"
)

// Store is what the API reads and writes beyond the fleet manager.
type Store interface {
	CreateSite(ctx context.Context, s *fleet.Site) error
	GetSite(ctx context.Context, id string) (*fleet.Site, error)
	ListSites(ctx context.Context, after string, limit int) ([]fleet.Site, error)
	CreateToken(ctx context.Context, t *fleet.Token, hash []byte) error
	TokenByHash(ctx context.Context, hash []byte) (*fleet.Token, error)
	TokenUsed(ctx context.Context, id string) error
	GetToken(ctx context.Context, id string) (*fleet.Token, error)
	ListTokens(ctx context.Context, f fleet.TokenFilter) ([]fleet.Token, error)
	RevokeToken(ctx context.Context, id string) error
	SetTokenSites(ctx context.Context, id string, sites []string) (was, now *fleet.Token, err error)
	UpdateLocker(ctx context.Context, id string, disabled, replaceable *bool) (*fleet.Locker, error)
	ListHealth(ctx context.Context, id string, r fleet.Range) ([]fleet.HealthRecord, error)
	ListEvents(ctx context.Context, id string, r fleet.Range) ([]fleet.EventRecord, error)
	PresenceHistory(ctx context.Context, id string, from, to time.Time) (*fleet.PresenceChange, []fleet.PresenceChange, error)
	Audit(ctx context.Context, e fleet.AuditEntry) error
	ListAudit(ctx context.Context, f fleet.AuditFilter) ([]fleet.AuditEntry, error)
	QueryAlerts(ctx context.Context, f fleet.AlertFilter) ([]fleet.Alert, error)
	GetAlert(ctx context.Context, id int64) (*fleet.Alert, error)
	ClearAlert(ctx context.Context, id int64, actor string, at time.Time) (*fleet.Alert, error)
	GetIdempotent(ctx context.Context, actor, key string) (*fleet.Idempotent, error)
	ClaimIdempotent(ctx context.Context, actor, key, route string, bodyHash []byte) (bool, error)
	FinishIdempotent(ctx context.Context, actor, key string, status int, response, sealed []byte) error
	ReleaseIdempotent(ctx context.Context, actor, key string) error
}

// Kicker ends a locker's live session (the broker).
type Kicker interface {
	Kick(id string)
}

// Options configure a Server.
type Options struct {
	Store        Store
	Fleet        *fleet.Manager
	Provisioning *provisioning.Service
	Kicker       Kicker
	Pickups      *pickup.Service
	Webhooks     *webhook.Dispatcher
	// Firmware serves firmware and rollouts (httpapi/firmware.go); nil answers 404.
	Firmware *firmware.Engine
	// BrokerAuth answers an external broker's auth hooks
	// (httpapi/brokerauth.go); nil answers 404.
	BrokerAuth BrokerAuth
	Gatherer   prometheus.Gatherer
	// Ready reports whether the database and broker are ready.
	Ready func(ctx context.Context) error
	// Unavailable reports store errors that say the database could not
	// serve the request just now (unreachable or restarting, a timeout, a
	// deadlock victim): they are answered 503 with Retry-After instead of
	// 500. nil: none is.
	Unavailable func(error) bool
	// BodyReadTimeout bounds how long a request's body may take to arrive
	// (0: DefaultBodyReadTimeout); see limitBodyTime.
	BodyReadTimeout time.Duration
	// ResponseTimeout bounds a request from its start to its answer
	// written (0: DefaultResponseTimeout); see limitResponseTime.
	ResponseTimeout time.Duration
	// DownloadStallTimeout bounds how long each 64 KiB of a firmware
	// image may take to be written (0: DefaultDownloadStallTimeout); see
	// progressWriter.
	DownloadStallTimeout time.Duration
	// MasterKey, the gateway's, derives the key that seals the secrets of
	// Idempotency-Key answers for their replays (replaySealer). nil:
	// replays leave the secrets out.
	MasterKey []byte
	Logger    *slog.Logger
}

// DefaultBodyReadTimeout is Options.BodyReadTimeout's default.
const DefaultBodyReadTimeout = 30 * time.Second

// DefaultResponseTimeout is Options.ResponseTimeout's default: past the
// longest wait_s (maxWait).
const DefaultResponseTimeout = 2 * time.Minute

// DefaultDownloadStallTimeout is Options.DownloadStallTimeout's default:
// a link slower than about 1 KiB/s for a minute is taken for gone.
const DefaultDownloadStallTimeout = time.Minute

// Server is the HTTP API.
type Server struct {
	store Store
	fleet *fleet.Manager
	prov  *provisioning.Service
	kick  Kicker
	log   *slog.Logger

	pickups  *pickup.Service
	webhooks *webhook.Dispatcher
	opts     Options
	mux      *http.ServeMux
	tokens   *tokenCache
	replay   *replaySealer // nil: replays leave secrets out
	// staleLogged is when a stale token was last logged (unix ns),
	// unavailableLogged a request refused for a transient store error, and
	// useLogged a token's use that could not be recorded.
	staleLogged, unavailableLogged, useLogged, notReadyLogged atomic.Int64
	// lookups holds a slot for each token lookup in the database.
	lookups chan struct{}
	// usedAt holds when this instance last wrote each token's use
	// (recordUse): token id → time.Time.
	usedAt sync.Map
	// inFlight counts each token's requests in flight here (enter):
	// token id → *atomic.Int32.
	inFlight sync.Map
}

// MaxInFlightPerToken bounds the requests one store, platform or operator
// token may have in flight at once on one gateway instance; more are
// answered 429. Every request may hold a database connection, and the pool
// (32) is the fleet's too: one token, leaked or looping, must not take it.
// Admin tokens (the operator's own) and broker tokens (an external broker
// asks once per locker connect) are not bounded.
const MaxInFlightPerToken = 16

// enter counts a request of tok in flight, unless tok has
// MaxInFlightPerToken already; leave ends it.
func (s *Server) enter(tok *fleet.Token) (leave func(), ok bool) {
	if tok.Role == fleet.RoleAdmin || tok.Role == fleet.RoleBroker {
		return func() {}, true
	}
	v, _ := s.inFlight.LoadOrStore(tok.ID, new(atomic.Int32))
	n := v.(*atomic.Int32)
	if n.Add(1) > MaxInFlightPerToken {
		n.Add(-1)
		return nil, false
	}
	return func() { n.Add(-1) }, true
}

// New returns the API handler.
func New(o Options) *Server {
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.Ready == nil {
		o.Ready = func(context.Context) error { return nil }
	}
	if o.BodyReadTimeout <= 0 {
		o.BodyReadTimeout = DefaultBodyReadTimeout
	}
	if o.ResponseTimeout <= 0 {
		o.ResponseTimeout = DefaultResponseTimeout
	}
	if o.DownloadStallTimeout <= 0 {
		o.DownloadStallTimeout = DefaultDownloadStallTimeout
	}
	s := &Server{store: o.Store, fleet: o.Fleet, prov: o.Provisioning, kick: o.Kicker, log: o.Logger, opts: o, mux: http.NewServeMux(),
		pickups: o.Pickups, webhooks: o.Webhooks, tokens: newTokenCache(TokenCacheTTL, time.Now),
		lookups: make(chan struct{}, maxTokenLookups), replay: newReplaySealer(o.MasterKey)}
	s.routes()
	return s
}

// ServeHTTP implements http.Handler.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	limitBodyTime(w, r, s.opts.BodyReadTimeout)
	limitResponseTime(w, s.opts.ResponseTimeout)
	// The mux redirects a path with //, /./ or /../ to its cleaned form
	// (an HTML 301 or 307, which a client follows with its method and
	// body: POST /v1/pickups/../sites would create a site). No endpoint
	// has such a path.
	if clean := cleanPath(r.URL.Path); clean != r.URL.Path && r.Method != http.MethodConnect {
		writeProblem(w, http.StatusNotFound, "no such endpoint: "+r.Method+" "+r.URL.Path+" is not a clean path (did you mean "+clean+"?)")
		return
	}
	if h, pattern := s.mux.Handler(r); pattern == "" {
		noRoute(h, w, r)
		return
	}
	s.mux.ServeHTTP(w, r)
}

// limitBodyTime gives r's body d to arrive, if it has one: a client that
// sends it slowly, or less of it than its Content-Length says (before any
// token is checked: the server reads what is left of a refused request's
// body), loses the connection then instead of holding it, and a goroutine,
// for ever. net/http's server clears the deadline when the body has been
// read to its end (it then reads ahead for the next request), so a handler
// that then waits (wait_s) is not cut short; one that streams a large body
// (a firmware upload) lifts it itself (liftBodyTime). The body is left as
// it is: the server judges an unread one (Expect: 100-continue, too large
// to drain) by its own type. Not for a request without a body: the read
// ahead runs during its handler, and a deadline passing there would end its
// context.
func limitBodyTime(w http.ResponseWriter, r *http.Request, d time.Duration) {
	if r.Body == nil || r.Body == http.NoBody || r.ContentLength == 0 {
		return
	}
	http.NewResponseController(w).SetReadDeadline(time.Now().Add(d))
}

// liftBodyTime lifts limitBodyTime's deadline, for a handler that streams a
// large body from a client it has authenticated.
func liftBodyTime(w http.ResponseWriter) {
	http.NewResponseController(w).SetReadDeadline(time.Time{})
}

// limitResponseTime gives the answer d to be written (net/http clears the
// deadline after each request): a client that does not read what it asked
// for (a 200 KB /v1/openapi.json, pipelined) loses the connection then. d
// is longer than any handler waits (wait_s); the firmware image download
// lifts it (liftResponseTime): an image to a slow locker takes what it
// takes.
func limitResponseTime(w http.ResponseWriter, d time.Duration) {
	http.NewResponseController(w).SetWriteDeadline(time.Now().Add(d))
}

// liftResponseTime lifts limitResponseTime's deadline.
func liftResponseTime(w http.ResponseWriter) {
	http.NewResponseController(w).SetWriteDeadline(time.Time{})
}

// cleanPath is p as the mux cleans it: no empty, . or .. segments, a
// trailing slash kept.
func cleanPath(p string) string {
	if p == "" {
		return "/"
	}
	c := path.Clean(p)
	if strings.HasSuffix(p, "/") && c != "/" {
		c += "/"
	}
	return c
}

// noRoute answers a request no pattern takes as a problem: 405 with an Allow
// header when the path exists for other methods, 404 otherwise. h is the
// mux's own answer for it, which knows which; its plain text is caught and
// rewritten.
func noRoute(h http.Handler, w http.ResponseWriter, r *http.Request) {
	rec := &statusRecorder{header: http.Header{}}
	h.ServeHTTP(rec, r)
	if rec.status == http.StatusMethodNotAllowed {
		w.Header().Set("Allow", rec.header.Get("Allow"))
		writeProblem(w, http.StatusMethodNotAllowed, r.Method+" is not allowed on "+r.URL.Path+"; allowed: "+rec.header.Get("Allow"))
		return
	}
	writeProblem(w, http.StatusNotFound, "no such endpoint: "+r.Method+" "+r.URL.Path+" (see GET /v1/openapi.json)")
}

// statusRecorder keeps a response's status and header and drops its body.
type statusRecorder struct {
	header http.Header
	status int
}

func (s *statusRecorder) Header() http.Header { return s.header }
func (s *statusRecorder) WriteHeader(code int) {
	if s.status == 0 {
		s.status = code
	}
}
func (s *statusRecorder) Write(b []byte) (int, error) {
	s.WriteHeader(http.StatusOK)
	return len(b), nil
}

type ctxKey struct{}

// principal returns the token of the request (set by auth).
func principal(r *http.Request) *fleet.Token { return r.Context().Value(ctxKey{}).(*fleet.Token) }

// handler is an API handler; a returned error becomes a problem detail.
type handler func(w http.ResponseWriter, r *http.Request) error

// auth wraps h: the request needs a valid token of one of roles.
func (s *Server) auth(roles []string, h handler) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		// One credential per request (RFC 9110, section 11.6.2: the field
		// is a singleton): of two, which to take would be a guess.
		if len(r.Header.Values("Authorization")) > 1 {
			writeProblem(w, http.StatusBadRequest, "more than one Authorization header: send one, Authorization: Bearer <token>")
			return
		}
		// The scheme is case-insensitive (RFC 9110, section 11.1).
		// The scheme and the token may be apart by more than one space
		// (RFC 9110, section 11.4: 1*SP).
		scheme, raw, _ := strings.Cut(r.Header.Get("Authorization"), " ")
		raw = strings.TrimLeft(raw, " ")
		if !strings.EqualFold(scheme, "Bearer") || raw == "" {
			w.Header().Set("WWW-Authenticate", `Bearer realm="lockergate"`)
			writeProblem(w, http.StatusUnauthorized, "missing bearer token: send Authorization: Bearer <token>")
			return
		}
		tok, err := s.token(r, provisioning.HashSecret(raw))
		if errors.Is(err, fleet.ErrNotFound) {
			w.Header().Set("WWW-Authenticate", `Bearer realm="lockergate", error="invalid_token"`)
			writeProblem(w, http.StatusUnauthorized, "unknown or revoked token")
			return
		}
		if errors.Is(err, errTokenLookupsBusy) {
			w.Header().Set("Retry-After", "1")
			writeProblem(w, http.StatusServiceUnavailable, "too many token checks in flight; retry in a second")
			return
		}
		if err != nil {
			s.writeError(w, r, err)
			return
		}
		allowed := false
		for _, role := range roles {
			allowed = allowed || tok.Role == role
		}
		if !allowed {
			writeProblem(w, http.StatusForbidden, "role "+tok.Role+" may not "+r.Method+" "+r.URL.Path)
			return
		}
		if err := checkText(r); err != nil {
			writeProblem(w, http.StatusBadRequest, err.Error())
			return
		}
		leave, ok := s.enter(tok)
		if !ok {
			w.Header().Set("Retry-After", "1")
			writeProblem(w, http.StatusTooManyRequests, fmt.Sprintf("this token has %d requests in flight on this gateway instance, the most one %s token may: "+
				"retry once one is answered (Retry-After), or send fewer at once", MaxInFlightPerToken, tok.Role))
			return
		}
		defer leave()
		r = r.WithContext(fleet.WithToken(context.WithValue(r.Context(), ctxKey{}, tok), tok))
		if err := h(w, r); err != nil {
			s.writeError(w, r, err)
		}
	}
}

// token returns the live token whose secret hashes to hash.
func (s *Server) token(r *http.Request, hash []byte) (*fleet.Token, error) {
	if tok, ok := s.tokens.get(hash, s.tokens.ttl); ok {
		return tok, nil
	}
	gen := s.tokens.generation()
	ctx, cancel := context.WithTimeout(r.Context(), tokenLookupTimeout)
	defer cancel()
	var tok *fleet.Token
	var err error
	select {
	case s.lookups <- struct{}{}:
		tok, err = s.store.TokenByHash(ctx, hash)
		<-s.lookups
	case <-ctx.Done():
		err = errTokenLookupsBusy
	}
	switch {
	case err == nil:
		s.tokens.put(hash, tok, gen)
		s.recordUse(ctx, tok)
		return tok, nil
	case errors.Is(err, fleet.ErrNotFound):
		s.tokens.forget(hash) // revoked, maybe through another instance
		return nil, err
	}
	// Only the broker's token: an outage must not refuse lockers for good
	// (brokerauth.go), and it can do nothing else. For every other role a
	// slow database must not stretch how long a revoked token works.
	if stale, ok := s.tokens.get(hash, tokenStaleMax); ok && stale.Role == fleet.RoleBroker && r.Context().Err() == nil {
		// One line per 10 s: an external broker asks many times a second.
		if logDue(&s.staleLogged, 10*time.Second) {
			s.log.Warn("token lookup failed; trusting broker tokens verified in the last 10 minutes until the database answers",
				"token", stale.ID, "err", err)
		}
		return stale, nil
	}
	return nil, err
}

// recordUse writes tok's last_used_at when the one it was read with is
// fleet.TokenUseResolution old or more (or there is none): a round trip a
// minute per token, on the request whose cached check ran out (once a
// second for a token in use). A failure is logged, and the request goes on:
// the record is for access reviews, not for access.
//
// The time read is the database's and the one compared with is this
// instance's: a gateway clock ahead of the database's would pass the check
// at every lookup, so the instance also skips tokens it wrote itself within
// the resolution. The write has its own short deadline: the lookup's may
// be spent, and a database that takes reads but not writes (a failover)
// must not hold requests for long.
func (s *Server) recordUse(ctx context.Context, tok *fleet.Token) {
	now := time.Now()
	if tok.LastUsedAt != nil && now.Sub(*tok.LastUsedAt) < fleet.TokenUseResolution {
		return
	}
	if at, ok := s.usedAt.Load(tok.ID); ok && now.Sub(at.(time.Time)) < fleet.TokenUseResolution {
		return
	}
	s.usedAt.Store(tok.ID, now)
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), tokenUseTimeout)
	defer cancel()
	if err := s.store.TokenUsed(ctx, tok.ID); err != nil && logDue(&s.useLogged, 10*time.Second) {
		s.log.Warn("could not record a token's use (its last_used_at lags; requests go on)", "token", tok.ID, "err", err)
	}
}

// tokenUseTimeout bounds recordUse's write.
const tokenUseTimeout = 500 * time.Millisecond

var (
	fleetRoles = []string{fleet.RoleAdmin, fleet.RoleOperator}
	siteRoles  = []string{fleet.RoleAdmin, fleet.RoleOperator, fleet.RoleStore}
	adminOnly  = []string{fleet.RoleAdmin}
)

// errForbidden is a request outside the token's site or role.
var errForbidden = fleet.ErrForbidden

// checkSite returns errForbidden when a store token asks about another site.
func checkSite(r *http.Request, site string) error {
	if t := principal(r); t.Role == fleet.RoleStore && t.Site != site {
		return otherSite(t, site)
	}
	return nil
}

// otherSite is the 403 of store token t asking about another site.
func otherSite(t *fleet.Token, site string) error {
	return fmt.Errorf("%w: this store token is for site %s, not %s", errForbidden, t.Site, site)
}

// route is one authenticated API endpoint.
type route struct {
	method, pattern string
	roles           []string
	idempotent      bool // honours Idempotency-Key
	h               handler
}

// table lists every authenticated endpoint; docs/api.md and openapi.json
// describe the same set (a test holds them together).
func (s *Server) table() []route {
	return append([]route{
		{"POST", "/v1/sites", fleetRoles, true, s.createSite},
		{"GET", "/v1/sites", siteRoles, false, s.listSites},
		{"GET", "/v1/sites/{site}", siteRoles, false, s.getSite},
		{"POST", "/v1/claims", fleetRoles, true, s.createClaim},
		{"GET", "/v1/claims", fleetRoles, false, s.listClaims},
		{"GET", "/v1/claims/{id}", fleetRoles, false, s.getClaim},
		{"DELETE", "/v1/claims/{id}", fleetRoles, false, s.revokeClaim},
		{"GET", "/v1/lockers", siteRoles, false, s.listLockers},
		{"GET", "/v1/lockers/{id}", siteRoles, false, s.getLocker},
		{"PATCH", "/v1/lockers/{id}", fleetRoles, false, s.patchLocker},
		{"POST", "/v1/lockers/{id}/rotate-codes", siteRoles, true, s.rotateCodes},
		{"GET", "/v1/lockers/{id}/health", siteRoles, false, s.lockerHealth},
		{"GET", "/v1/lockers/{id}/events", siteRoles, false, s.lockerEvents},
		{"GET", "/v1/lockers/{id}/uptime", siteRoles, false, s.lockerUptime},
		{"POST", "/v1/lockers/{id}/commands", siteRoles, true, s.createCommand},
		{"GET", "/v1/lockers/{id}/commands/{cmd}", siteRoles, false, s.getCommand},
		{"POST", "/v1/tokens", adminOnly, true, s.createToken},
		{"GET", "/v1/tokens", adminOnly, false, s.listTokens},
		{"GET", "/v1/tokens/{id}", adminOnly, false, s.getToken},
		{"PATCH", "/v1/tokens/{id}", adminOnly, false, s.patchToken},
		{"DELETE", "/v1/tokens/{id}", adminOnly, false, s.revokeToken},
		{"GET", "/v1/audit", fleetRoles, false, s.listAudit},
		{"GET", "/v1/alerts", siteRoles, false, s.listAlerts},
		{"POST", "/v1/alerts/{id}/clear", siteRoles, false, s.clearAlert},
	}, slices.Concat(s.pickupTable(), s.firmwareTable(), s.brokerAuthTable())...)
}

func (s *Server) routes() {
	m := s.mux
	m.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
	})
	m.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
		defer cancel()
		if err := s.opts.Ready(ctx); err != nil {
			// Which part, not why: the why (a database's user, name and
			// address, a resolver's) is for the log, not for anyone who
			// can reach /readyz without a token.
			part, _, found := strings.Cut(err.Error(), ":")
			if !found {
				part = "see the gateway's log"
			}
			if logDue(&s.notReadyLogged, 10*time.Second) {
				s.log.Warn("not ready", "err", err)
			}
			writeProblem(w, http.StatusServiceUnavailable, "not ready: "+part+" (the gateway's log says why)")
			return
		}
		writeJSON(w, http.StatusOK, map[string]string{"status": "ready"})
	})
	if s.opts.Gatherer != nil {
		m.Handle("GET /metrics", promhttp.HandlerFor(s.opts.Gatherer, promhttp.HandlerOpts{}))
	}
	for _, rt := range s.table() {
		h := rt.h
		switch {
		case rt.idempotent && streamedBodies[rt.method+" "+rt.pattern]:
			h = s.idempotentUpload(h)
		case rt.idempotent:
			h = s.idempotent(h, secretFields[rt.pattern])
		}
		m.HandleFunc(rt.method+" "+rt.pattern, s.auth(rt.roles, h))
	}
	s.firmwareRoutes(m) // the signed image download, outside table()
	m.HandleFunc("GET /v1/openapi.json", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Write(openapiJSON)
	})
}

type recorder struct {
	http.ResponseWriter
	status int
	body   bytes.Buffer
}

func (r *recorder) WriteHeader(status int) {
	r.status = status
	r.ResponseWriter.WriteHeader(status)
}

func (r *recorder) Write(b []byte) (int, error) {
	if r.status == 0 {
		r.status = http.StatusOK
	}
	r.body.Write(b)
	return r.ResponseWriter.Write(b)
}

type nopCloser struct{ *bytes.Reader }

func (nopCloser) Close() error { return nil }

func readAllLimited(r *http.Request) ([]byte, error) {
	var buf bytes.Buffer
	n, err := buf.ReadFrom(http.MaxBytesReader(nil, r.Body, maxBody))
	if _, ok := errors.AsType[*http.MaxBytesError](err); ok {
		return nil, errTooLarge
	}
	if err != nil {
		return nil, badRequest("read body: %v", err)
	}
	_ = n
	return buf.Bytes(), nil
}

// streamedBodies are the create routes whose body is streamed, never held
// (a firmware image of up to gigabytes): Idempotency-Key compares their
// repeats without buffering (idempotentUpload).
var streamedBodies = map[string]bool{"POST /v1/firmware": true}
