package httpapi

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/provisioning"
)

// The list endpoints' paging and the checks they make before reaching the
// fleet manager or the database, against fakes. The gateway tests cover the
// same endpoints against PostgreSQL.

// fakeStore is the part of Store these tests reach; any other method panics
// (the embedded interface is nil), which fails the test that reaches it.
type fakeStore struct {
	Store
	sites []fleet.Site
	audit []fleet.AuditEntry

	gotAudit fleet.AuditFilter
	// used lists the tokens whose use was recorded; usedErr fails that.
	used    []string
	usedErr error
}

func (f *fakeStore) TokenUsed(_ context.Context, id string) error {
	if f.usedErr != nil {
		return f.usedErr
	}
	f.used = append(f.used, id)
	return nil
}

// testTokens are the bearer tokens the tests send, by secret.
var testTokens = map[string]*fleet.Token{
	"admin":   {ID: "t-admin", Role: fleet.RoleAdmin, Name: "root"},
	"store-a": {ID: "t-store", Role: fleet.RoleStore, Site: "a", Name: "front-desk"},
	"broker":  {ID: "t-broker", Role: fleet.RoleBroker, Name: "emqx"},
}

func (f *fakeStore) TokenByHash(_ context.Context, hash []byte) (*fleet.Token, error) {
	for secret, t := range testTokens {
		if bytes.Equal(provisioning.HashSecret(secret), hash) {
			return t, nil
		}
	}
	return nil, fleet.ErrNotFound
}

func siteID(s fleet.Site) string { return s.ID }

func (f *fakeStore) GetSite(_ context.Context, id string) (*fleet.Site, error) {
	return find(f.sites, siteID, id)
}

func (f *fakeStore) ListSites(_ context.Context, after string, limit int) ([]fleet.Site, error) {
	return page(f.sites, siteID, after, limit), nil
}

func (f *fakeStore) ListAudit(_ context.Context, af fleet.AuditFilter) ([]fleet.AuditEntry, error) {
	f.gotAudit = af
	var out []fleet.AuditEntry
	for _, e := range f.audit {
		if e.ID > af.After && len(out) < af.Limit {
			out = append(out, e)
		}
	}
	return out, nil
}

// find returns the item whose key is id, or fleet.ErrNotFound.
func find[T any](items []T, key func(T) string, id string) (*T, error) {
	for _, it := range items {
		if key(it) == id {
			return &it, nil
		}
	}
	return nil, fleet.ErrNotFound
}

// page returns up to limit items whose key sorts after after, as a store
// pages by id; items are sorted by key.
func page[T any](items []T, key func(T) string, after string, limit int) []T {
	var out []T
	for _, it := range items {
		if key(it) > after && len(out) < limit {
			out = append(out, it)
		}
	}
	return out
}

// answer is a decoded response: a list envelope or a problem detail.
type answer struct {
	status  int
	header  http.Header
	raw     string
	items   []json.RawMessage
	next    string
	problem Problem
}

// call sends one request with the token of secret ("" for none).
func call(t *testing.T, h http.Handler, method, target, secret string) answer {
	t.Helper()
	req := httptest.NewRequest(method, target, nil)
	if secret != "" {
		req.Header.Set("Authorization", "Bearer "+secret)
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	a := answer{status: rec.Code, header: rec.Header(), raw: rec.Body.String()}
	if strings.HasPrefix(rec.Header().Get("Content-Type"), "application/problem+json") {
		if err := json.Unmarshal(rec.Body.Bytes(), &a.problem); err != nil {
			t.Fatalf("%s %s: problem detail does not decode: %v\n%s", method, target, err, a.raw)
		}
		return a
	}
	var l struct {
		Items *[]json.RawMessage `json:"items"`
		Next  *string            `json:"next"`
	}
	if err := json.Unmarshal(rec.Body.Bytes(), &l); err == nil && l.Items != nil && l.Next != nil {
		a.items, a.next = *l.Items, *l.Next
	}
	return a
}

// ids returns the "id" field of every item.
func (a answer) ids(t *testing.T) []string {
	t.Helper()
	var out []string
	for _, it := range a.items {
		var v struct {
			ID json.RawMessage `json:"id"`
		}
		if err := json.Unmarshal(it, &v); err != nil {
			t.Fatalf("item %s: %v", it, err)
		}
		out = append(out, strings.Trim(string(v.ID), `"`))
	}
	return out
}

// wantProblem fails unless a is a problem detail of status with detail.
func (a answer) wantProblem(t *testing.T, status int, detail string) {
	t.Helper()
	if a.status != status || a.problem.Status != status || a.problem.Detail != detail {
		t.Errorf("got %d %q (%s), want %d %q", a.status, a.problem.Detail, a.raw, status, detail)
	}
}

// wantPage fails unless a is a list answer of the ids and next cursor.
func (a answer) wantPage(t *testing.T, ids []string, next string) {
	t.Helper()
	if got := a.ids(t); a.status != http.StatusOK || !slices.Equal(got, ids) || a.next != next {
		t.Errorf("got %d items %v next %q (%s), want items %v next %q", a.status, got, a.next, a.raw, ids, next)
	}
}

func TestListSitesPages(t *testing.T) {
	st := &fakeStore{sites: []fleet.Site{{ID: "a"}, {ID: "b"}, {ID: "c"}}}
	s := New(Options{Store: st})

	call(t, s, "GET", "/v1/sites?limit=2", "admin").wantPage(t, []string{"a", "b"}, "b")
	call(t, s, "GET", "/v1/sites?limit=2&after=b", "admin").wantPage(t, []string{"c"}, "")
	// A full page has a cursor even when nothing follows it.
	call(t, s, "GET", "/v1/sites?limit=3", "admin").wantPage(t, []string{"a", "b", "c"}, "c")
	call(t, s, "GET", "/v1/sites", "admin").wantPage(t, []string{"a", "b", "c"}, "")
	// A store sees its own site only, never with a cursor.
	call(t, s, "GET", "/v1/sites?limit=1", "store-a").wantPage(t, []string{"a"}, "")

	for _, limit := range []string{"0", "1001", "ten"} {
		call(t, s, "GET", "/v1/sites?limit="+limit, "admin").wantProblem(t, 400, "bad request: limit must be 1..1000")
		// The limit is checked for a store token too, before its site is read.
		call(t, s, "GET", "/v1/sites?limit="+limit, "store-a").wantProblem(t, 400, "bad request: limit must be 1..1000")
	}

	empty := New(Options{Store: &fakeStore{}})
	if a := call(t, empty, "GET", "/v1/sites", "admin"); a.status != 200 || !strings.Contains(a.raw, `"items":[]`) {
		t.Errorf("an empty list is %d %s, want items []", a.status, a.raw)
	}
}

func TestListAuditCursor(t *testing.T) {
	st := &fakeStore{audit: []fleet.AuditEntry{{ID: 7}, {ID: 9}, {ID: 12}}}
	s := New(Options{Store: st})

	call(t, s, "GET", "/v1/audit?limit=2", "admin").wantPage(t, []string{"7", "9"}, "9")
	call(t, s, "GET", "/v1/audit?limit=2&after=9&locker=lk-1&actor=admin:root&token=t-1", "admin").wantPage(t, []string{"12"}, "")
	if want := (fleet.AuditFilter{After: 9, Limit: 2, Locker: "lk-1", Actor: "admin:root", Token: "t-1"}); st.gotAudit != want {
		t.Errorf("store asked for %+v, want %+v", st.gotAudit, want)
	}

	call(t, s, "GET", "/v1/audit?after=9x", "admin").wantProblem(t, 400, "bad request: after must be a cursor from a previous answer")
	call(t, s, "GET", "/v1/audit?since=yesterday", "admin").wantProblem(t, 400, `bad request: since must be an RFC 3339 time, like 2026-11-24T21:30:00Z, not "yesterday"`)
	call(t, s, "GET", "/v1/audit?since=2026-12-07T09:00:00+01:00", "admin").wantProblem(t, 400,
		`bad request: since must be an RFC 3339 time, not "2026-12-07T09:00:00 01:00": write a + in a URL query as %2B (2026-12-07T09:00:00%2B01:00)`)
	// A space that a + would not mend (between date and time) gets no such advice.
	call(t, s, "GET", "/v1/audit?since=2026-12-07%2009:00:00Z", "admin").wantProblem(t, 400,
		`bad request: since must be an RFC 3339 time, like 2026-11-24T21:30:00Z, not "2026-12-07 09:00:00Z"`)
	call(t, s, "GET", "/v1/audit?limit=-1&after=x", "admin").wantProblem(t, 400, "bad request: limit must be 1..1000")
	call(t, s, "GET", "/v1/audit", "store-a").wantProblem(t, 403, "role store may not GET /v1/audit")
}

// TestListLockersChecks: the checks of GET /v1/lockers answer before the
// fleet manager is asked (this server has none).
func TestListLockersChecks(t *testing.T) {
	s := New(Options{Store: &fakeStore{}})
	call(t, s, "GET", "/v1/lockers?online=maybe", "admin").wantProblem(t, 400, "bad request: online must be true or false")
	call(t, s, "GET", "/v1/lockers?online=maybe&limit=0", "admin").wantProblem(t, 400, "bad request: limit must be 1..1000")
	call(t, s, "GET", "/v1/lockers?site=b", "store-a").wantProblem(t, 403, "forbidden: this store token is for site a, not b")
	call(t, s, "GET", "/v1/lockers", "").wantProblem(t, 401, "missing bearer token: send Authorization: Bearer <token>")
	call(t, s, "GET", "/v1/lockers", "nobody").wantProblem(t, 401, "unknown or revoked token")
}

// TestRangeParams: the paging of a locker's health and events, whose
// cursor is "received-at~key".
func TestRangeParams(t *testing.T) {
	at := func(s string) time.Time {
		ts, err := time.Parse(time.RFC3339Nano, s)
		if err != nil {
			t.Fatal(err)
		}
		return ts
	}
	for _, tc := range []struct {
		query string
		want  fleet.Range
		err   string
	}{
		{"", fleet.Range{Limit: 100}, ""},
		{"limit=5&since=2026-01-01T00:00:00Z&until=2026-01-02T00:00:00Z",
			fleet.Range{Limit: 5, Since: at("2026-01-01T00:00:00Z"), Until: at("2026-01-02T00:00:00Z")}, ""},
		{"after=2026-01-01T10:00:00.123456789Z~42", fleet.Range{Limit: 100, AfterTS: at("2026-01-01T10:00:00.123456789Z"), AfterKey: "42"}, ""},
		{"after=2026-01-01T10:00:00Z~e-1~x", fleet.Range{Limit: 100, AfterTS: at("2026-01-01T10:00:00Z"), AfterKey: "e-1~x"}, ""},
		{"after=2026-01-01T10:00:00Z", fleet.Range{}, "bad request: after must be a cursor from a previous answer"},
		{"after=2026-01-01T10:00:00Z~", fleet.Range{}, "bad request: after must be a cursor from a previous answer"},
		{"after=yesterday~1", fleet.Range{}, "bad request: after must be a cursor from a previous answer"},
		{"since=yesterday", fleet.Range{}, `bad request: since must be an RFC 3339 time, like 2026-11-24T21:30:00Z, not "yesterday"`},
		{"until=tomorrow", fleet.Range{}, `bad request: until must be an RFC 3339 time, like 2026-11-24T21:30:00Z, not "tomorrow"`},
		{"limit=0&since=yesterday", fleet.Range{}, "bad request: limit must be 1..1000"},
		{"since=2026-01-02T00:00:00Z&until=2026-01-01T00:00:00Z", fleet.Range{}, "bad request: since must be before until"},
		{"since=2026-01-02T00:00:00Z&until=2026-01-02T00:00:00Z", fleet.Range{}, "bad request: since must be before until"},
		{"since=2026-01-02T00:00:00Z", fleet.Range{Limit: 100, Since: at("2026-01-02T00:00:00Z")}, ""},
	} {
		rg, err := rangeParams(httptest.NewRequest("GET", "/v1/lockers/x/health?"+tc.query, nil))
		switch {
		case tc.err == "" && err != nil:
			t.Errorf("%q: %v", tc.query, err)
		case tc.err != "" && (err == nil || err.Error() != tc.err):
			t.Errorf("%q: error %v, want %q", tc.query, err, tc.err)
		case !rg.Since.Equal(tc.want.Since) || !rg.Until.Equal(tc.want.Until) || !rg.AfterTS.Equal(tc.want.AfterTS) ||
			rg.Limit != tc.want.Limit || rg.AfterKey != tc.want.AfterKey:
			t.Errorf("%q: %+v, want %+v", tc.query, rg, tc.want)
		}
	}
}

// TestHealthCursorIsASeq: a health page's cursor ends in the last row's
// seq; another key is no cursor an answer gave.
func TestHealthCursorIsASeq(t *testing.T) {
	fm, err := fleet.New(fleet.Options{Store: lockerStore{locker: &fleet.Locker{ID: "lk-1", Site: "a"}}, Bus: nopBus{},
		Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	s := New(Options{Store: &fakeStore{}, Fleet: fm, Logger: slog.New(slog.DiscardHandler)})
	for _, after := range []string{"2026-01-01T10:00:00Z~abc", "2026-01-01T10:00:00Z~e-1"} {
		call(t, s, "GET", "/v1/lockers/lk-1/health?after="+after, "admin").
			wantProblem(t, http.StatusBadRequest, "bad request: after must be a cursor from a previous answer")
	}
}

// TestAuthScheme: the scheme of Authorization is case-insensitive; a
// header that is not a bearer token is refused as missing.
func TestAuthScheme(t *testing.T) {
	s := New(Options{Store: &fakeStore{}})
	for _, h := range []string{"bearer admin", "BEARER admin", "Bearer admin"} {
		req := httptest.NewRequest("GET", "/v1/lockers?online=maybe", nil)
		req.Header.Set("Authorization", h)
		rec := httptest.NewRecorder()
		s.ServeHTTP(rec, req)
		if rec.Code != 400 { // past authentication, to the parameter check
			t.Errorf("Authorization %q: %d %s, want it accepted", h, rec.Code, rec.Body)
		}
	}
	for _, h := range []string{"Basic YWRtaW46eA==", "Bearer", "Bearer ", "Beareradmin"} {
		req := httptest.NewRequest("GET", "/v1/lockers", nil)
		req.Header.Set("Authorization", h)
		rec := httptest.NewRecorder()
		s.ServeHTTP(rec, req)
		if rec.Code != 401 || !strings.Contains(rec.Body.String(), "missing bearer token") {
			t.Errorf("Authorization %q: %d %s, want 401 missing bearer token", h, rec.Code, rec.Body)
		}
	}
}
