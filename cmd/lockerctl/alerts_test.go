package main

import (
	"bytes"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestAlerts: alerts list passes its filters and prints every page; alerts
// clear posts to the alert's clear path and prints the answer; an error
// answer exits 1 with the API's detail.
func TestAlerts(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		switch {
		case r.Method == http.MethodGet && r.URL.Path == "/v1/alerts":
			q := r.URL.Query()
			if q.Get("site") != "store-042" || q.Get("open") != "true" || q.Get("kind") != "" {
				http.Error(w, "bad query "+r.URL.RawQuery, http.StatusBadRequest)
				return
			}
			if q.Get("after") == "" {
				json.NewEncoder(w).Encode(map[string]any{"items": []map[string]any{{"id": 9, "kind": "door_ajar", "locker": "lk-1", "site": "store-042"}}, "next": "9"})
				return
			}
			json.NewEncoder(w).Encode(map[string]any{"items": []map[string]any{{"id": 4, "kind": "tamper", "locker": "lk-1", "site": "store-042"}}, "next": ""})
		case r.Method == http.MethodPost && r.URL.Path == "/v1/alerts/9/clear":
			json.NewEncoder(w).Encode(map[string]any{"id": 9, "kind": "door_ajar", "cleared_by": "admin:ops"})
		case r.Method == http.MethodPost && r.URL.Path == "/v1/alerts/4/clear":
			w.Header().Set("Content-Type", "application/problem+json")
			w.WriteHeader(http.StatusConflict)
			w.Write([]byte(`{"title":"Conflict","status":409,"detail":"conflict: alert 4 was cleared at 2026-12-05T05:00:00Z"}`))
		default:
			http.NotFound(w, r)
		}
	}))
	defer srv.Close()
	var out, errOut bytes.Buffer
	if code := run([]string{"--url", srv.URL, "--token", "tok", "alerts", "list", "--site", "store-042", "--open", "true"}, &out, &errOut); code != 0 ||
		!strings.Contains(out.String(), "door_ajar") || !strings.Contains(out.String(), "tamper") {
		t.Fatalf("alerts list: exit %d, out %q, err %q; want both pages", code, out.String(), errOut.String())
	}
	out.Reset()
	if code := run([]string{"--url", srv.URL, "--token", "tok", "alerts", "clear", "9"}, &out, &errOut); code != 0 || !strings.Contains(out.String(), "admin:ops") {
		t.Fatalf("alerts clear: exit %d, out %q, err %q", code, out.String(), errOut.String())
	}
	errOut.Reset()
	if code := run([]string{"--url", srv.URL, "--token", "tok", "alerts", "clear", "4"}, &out, &errOut); code != 1 || !strings.Contains(errOut.String(), "was cleared at") {
		t.Fatalf("alerts clear of a cleared alert: exit %d, err %q; want 1 and the detail", code, errOut.String())
	}
	if code := run([]string{"--url", srv.URL, "--token", "tok", "alerts", "clear"}, &out, &errOut); code != 2 {
		t.Fatalf("alerts clear without an id: exit %d, want 2", code)
	}
}

// TestClaimsCreateLifetime: claims create sends --expires-in in seconds; one
// under a second is a usage error (exit 2), not a request: 0 would be the
// API's default, a day.
func TestClaimsCreateLifetime(t *testing.T) {
	var got map[string]any
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost || r.URL.Path != "/v1/claims" {
			http.NotFound(w, r)
			return
		}
		if err := json.NewDecoder(r.Body).Decode(&got); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusCreated)
		json.NewEncoder(w).Encode(map[string]any{"id": "cl-1", "token": "secret"})
	}))
	defer srv.Close()
	var out, errOut bytes.Buffer
	if code := run([]string{"--url", srv.URL, "--token", "tok", "claims", "create", "--site", "s1", "--expires-in", "2s"}, &out, &errOut); code != 0 ||
		got["expires_in_s"] != float64(2) {
		t.Fatalf("claims create --expires-in 2s: exit %d, sent %v, err %q", code, got, errOut.String())
	}
	got = nil
	if code := run([]string{"--url", srv.URL, "--token", "tok", "claims", "create", "--site", "s1", "--expires-in", "500ms"}, &out, &errOut); code != 2 || got != nil {
		t.Fatalf("claims create --expires-in 500ms: exit %d, sent %v; want exit 2 and nothing sent", code, got)
	}
}

// TestLockerHistory: lockers health and events page through the locker's
// history from --since (a negative duration is from now; the default an
// hour); lockers uptime prints its days and their total; commands show
// reads one command; an id is required first.
func TestLockerHistory(t *testing.T) {
	var sinces, untils []string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		q := r.URL.Query()
		switch r.URL.Path {
		case "/v1/lockers/lk-1/events":
			sinces = append(sinces, q.Get("since"))
			untils = append(untils, q.Get("until"))
			if q.Get("after") == "" {
				json.NewEncoder(w).Encode(map[string]any{"items": []map[string]any{{"id": "e-1", "type": "door_opened"}}, "next": "t~e-1"})
				return
			}
			json.NewEncoder(w).Encode(map[string]any{"items": []map[string]any{{"id": "e-2", "type": "door_closed"}}, "next": ""})
		case "/v1/lockers/lk-1/health":
			sinces = append(sinces, q.Get("since"))
			json.NewEncoder(w).Encode(map[string]any{"items": []map[string]any{{"seq": 7}}, "next": ""})
		case "/v1/lockers/lk-1/uptime":
			sinces = append(sinces, q.Get("since"))
			json.NewEncoder(w).Encode(map[string]any{"observed_s": 7200, "online_s": 3600, "uptime": 0.5,
				"days": []map[string]any{{"date": "2026-12-06", "uptime": 0.25, "connects": 3}, {"date": "2026-12-07", "uptime": 0.75}}})
		case "/v1/lockers/lk-1/commands/c-1":
			json.NewEncoder(w).Encode(map[string]any{"id": "c-1", "status": "ok"})
		default:
			http.NotFound(w, r)
		}
	}))
	defer srv.Close()
	lockerctl := func(args ...string) (int, string) {
		var out, errOut bytes.Buffer
		code := run(append([]string{"--url", srv.URL, "--token", "tok"}, args...), &out, &errOut)
		return code, out.String() + errOut.String()
	}
	before := time.Now().Add(-2 * time.Hour)
	if code, out := lockerctl("lockers", "events", "lk-1", "--since", "-2h"); code != 0 || !strings.Contains(out, "door_opened") || !strings.Contains(out, "door_closed") {
		t.Fatalf("lockers events: exit %d:\n%s", code, out)
	}
	if code, out := lockerctl("lockers", "health", "lk-1"); code != 0 || !strings.Contains(out, "7") {
		t.Fatalf("lockers health: exit %d:\n%s", code, out)
	}
	if code, out := lockerctl("lockers", "uptime", "lk-1"); code != 0 || !strings.Contains(out, "2026-12-06") || !strings.Contains(out, "total") ||
		!strings.Contains(out, "0.5") {
		t.Fatalf("lockers uptime: exit %d:\n%s", code, out)
	}
	// Both pages of events from 2 h ago, health from 1 h ago, uptime from the API's default.
	if len(sinces) != 4 || sinces[0] != sinces[1] || sinces[3] != "" {
		t.Fatalf("since sent %q", sinces)
	}
	for i, want := range []time.Time{before, before.Add(time.Hour)} {
		got, err := time.Parse(time.RFC3339Nano, sinces[i*2])
		if err != nil || got.Before(want.Add(-time.Minute)) || got.After(want.Add(time.Minute)) {
			t.Fatalf("since %q, want about %v", sinces[i*2], want)
		}
	}
	if len(untils) != 2 || untils[0] == "" || untils[0] != untils[1] {
		t.Fatalf("until sent %q, want one time for both pages", untils)
	}
	if code, out := lockerctl("commands", "show", "lk-1", "c-1"); code != 0 || !strings.Contains(out, "ok") {
		t.Fatalf("commands show: exit %d:\n%s", code, out)
	}
	for _, args := range [][]string{{"lockers", "events", "--since", "-1h"}, {"lockers", "health", "lk-1", "--since", "1h"}, {"commands", "show", "lk-1"}} {
		if code, out := lockerctl(args...); code != 2 {
			t.Errorf("%q: exit %d, want 2 (usage):\n%s", args, code, out)
		}
	}
}

// TestSinceAsADuration: audit and alerts list take --since as a negative
// duration, as the locker histories do, and send the time it names; a
// positive one exits 2 without a request; a time goes as given.
func TestSinceAsADuration(t *testing.T) {
	var sinces []string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		sinces = append(sinces, r.URL.Path+" "+r.URL.Query().Get("since"))
		w.Header().Set("Content-Type", "application/json")
		w.Write([]byte(`{"items":[],"next":""}`))
	}))
	defer srv.Close()
	ctl := func(args ...string) int {
		var out, errOut bytes.Buffer
		return run(append([]string{"--url", srv.URL, "--token", "tok"}, args...), &out, &errOut)
	}
	before := time.Now().Add(-time.Hour)
	for _, cmd := range [][]string{{"audit", "--since", "-1h"}, {"alerts", "list", "--since", "-1h"}} {
		sinces = nil
		if code := ctl(cmd...); code != 0 || len(sinces) != 1 {
			t.Fatalf("lockerctl %s: exit %d, requests %q", strings.Join(cmd, " "), code, sinces)
		}
		_, at, _ := strings.Cut(sinces[0], " ")
		ts, err := time.Parse(time.RFC3339Nano, at)
		if err != nil || ts.Before(before.Add(-time.Second)) || ts.After(time.Now().Add(-time.Hour).Add(time.Second)) {
			t.Errorf("lockerctl %s sent since=%q (%v), want about an hour ago", strings.Join(cmd, " "), at, err)
		}
	}
	sinces = nil
	if code := ctl("audit", "--since", "1h"); code != 2 || len(sinces) != 0 {
		t.Errorf("audit --since 1h: exit %d, requests %q; want 2 and none", code, sinces)
	}
	if code := ctl("audit", "--since", "2026-12-07T10:00:00Z"); code != 0 || !slices.Equal(sinces, []string{"/v1/audit 2026-12-07T10:00:00Z"}) {
		t.Errorf("audit --since a time: exit %d, requests %q", code, sinces)
	}
}

// TestListLimit: a list reads the API's largest pages; --limit N prints at
// most N items, asks for no more than it prints, and says on stderr which
// cursor the rest start after; --after starts there. JSON is written page
// by page, the same bytes as the whole list's. A negative --limit exits 2
// without a request.
func TestListLimit(t *testing.T) {
	const total = 2500
	var asked []string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		asked = append(asked, q.Get("limit")+" after "+q.Get("after"))
		limit, _ := strconv.Atoi(q.Get("limit"))
		after, _ := strconv.Atoi(q.Get("after"))
		if limit < 1 || limit > 1000 {
			http.Error(w, "limit must be 1..1000", http.StatusBadRequest)
			return
		}
		items := []map[string]any{}
		for id := after + 1; id <= total && len(items) < limit; id++ {
			items = append(items, map[string]any{"id": id, "action": "unlock"})
		}
		next := ""
		if len(items) == limit { // as the API: a full page has a cursor
			next = strconv.Itoa(after + limit)
		}
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(map[string]any{"items": items, "next": next})
	}))
	defer srv.Close()
	for _, c := range []struct {
		args  []string
		code  int
		n     int      // items printed
		asked []string // limit and after of each request
		hint  string   // on stderr; "": none
	}{
		{nil, 0, total, []string{"1000 after ", "1000 after 1000", "1000 after 2000"}, ""},
		{[]string{"--limit", "100"}, 0, 100, []string{"100 after "}, "stopped at --limit 100; there may be more: go on with --after 100"},
		{[]string{"--limit", "1500"}, 0, 1500, []string{"1000 after ", "500 after 1000"}, "--after 1500"},
		{[]string{"--limit", "100", "--after", "2450"}, 0, 50, []string{"100 after 2450"}, ""},
		{[]string{"--after", "2000"}, 0, 500, []string{"1000 after 2000"}, ""},
		{[]string{"--after", "2500"}, 0, 0, []string{"1000 after 2500"}, ""},
		{[]string{"--limit", "-1"}, 2, 0, nil, ""},
	} {
		asked = nil
		var out, errOut bytes.Buffer
		args := append(append([]string{"--url", srv.URL, "--token", "tok", "-o", "json"}, c.args...), "audit")
		code := run(args, &out, &errOut)
		var items []map[string]any
		if c.code == 0 {
			if err := json.Unmarshal(out.Bytes(), &items); err != nil {
				t.Fatalf("%q: %v in %q", c.args, err, out.String())
			}
		}
		if c.code == 0 { // written page by page, as the whole list would be
			var whole bytes.Buffer
			enc := json.NewEncoder(&whole)
			enc.SetIndent("", "  ")
			if items == nil {
				items = []map[string]any{}
			}
			enc.Encode(items)
			if out.String() != whole.String() {
				t.Errorf("%q: the streamed JSON differs from the whole list's encoding", c.args)
			}
		}
		if code != c.code || len(items) != c.n || !slices.Equal(asked, c.asked) {
			t.Errorf("%q: exit %d, %d items, asked %q; want %d, %d, %q", c.args, code, len(items), asked, c.code, c.n, c.asked)
		}
		if got := errOut.String(); (c.hint == "") != !strings.Contains(got, "stopped at") || !strings.Contains(got, c.hint) {
			t.Errorf("%q: stderr %q, want %q", c.args, got, c.hint)
		}
	}
}
