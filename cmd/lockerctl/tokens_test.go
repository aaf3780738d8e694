package main

import (
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
)

// TestTokensListAndShow: tokens list passes its filters (and leaves out the
// ones not given), prints every page with last_used_at; tokens show reads
// one token; a bad filter's 400 exits 1 with the API's detail.
func TestTokensListAndShow(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		q := r.URL.Query()
		switch {
		case r.Method == http.MethodGet && r.URL.Path == "/v1/tokens" && q.Get("revoked") == "maybe":
			w.Header().Set("Content-Type", "application/problem+json")
			w.WriteHeader(http.StatusBadRequest)
			w.Write([]byte(`{"title":"Bad Request","status":400,"detail":"revoked must be true or false"}`))
		case r.Method == http.MethodGet && r.URL.Path == "/v1/tokens":
			if q.Get("role") != "store" || q.Get("revoked") != "false" || q.Get("name") != "front" || q.Has("site") {
				http.Error(w, "bad query "+r.URL.RawQuery, http.StatusBadRequest)
				return
			}
			if q.Get("after") == "" {
				json.NewEncoder(w).Encode(map[string]any{"items": []map[string]any{{"id": "tk-1", "role": "store", "site": "s1", "name": "front",
					"last_used_at": "2026-12-07T06:00:00.123Z"}}, "next": "tk-1"})
				return
			}
			json.NewEncoder(w).Encode(map[string]any{"items": []map[string]any{{"id": "tk-2", "role": "store", "site": "s2", "name": "back"}}, "next": ""})
		case r.Method == http.MethodGet && r.URL.Path == "/v1/tokens/tk-1":
			json.NewEncoder(w).Encode(map[string]any{"id": "tk-1", "role": "store", "site": "s1", "name": "front"})
		default:
			http.NotFound(w, r)
		}
	}))
	defer srv.Close()
	var out, errOut bytes.Buffer
	if code := run([]string{"--url", srv.URL, "--token", "tok", "tokens", "list", "--role", "store", "--name", "front", "--revoked", "false"}, &out, &errOut); code != 0 ||
		!strings.Contains(out.String(), "front") || !strings.Contains(out.String(), "back") || !strings.Contains(out.String(), "2026-12-07T06:00:00.123Z") {
		t.Fatalf("tokens list: exit %d, out %q, err %q; want both pages with last_used_at", code, out.String(), errOut.String())
	}
	out.Reset()
	if code := run([]string{"--url", srv.URL, "--token", "tok", "tokens", "show", "tk-1"}, &out, &errOut); code != 0 || !strings.Contains(out.String(), "front") {
		t.Fatalf("tokens show: exit %d, out %q, err %q", code, out.String(), errOut.String())
	}
	errOut.Reset()
	if code := run([]string{"--url", srv.URL, "--token", "tok", "tokens", "list", "--revoked", "maybe"}, &out, &errOut); code != 1 ||
		!strings.Contains(errOut.String(), "revoked must be true or false") {
		t.Fatalf("tokens list --revoked maybe: exit %d, err %q; want 1 and the detail", code, errOut.String())
	}
	if code := run([]string{"--url", srv.URL, "--token", "tok", "tokens", "show"}, &out, &errOut); code != 2 {
		t.Fatalf("tokens show without an id: exit %d, want 2", code)
	}
}

// TestTokenSitesCommands: tokens create --sites sends the list (none when
// absent) and fails when the answer lacks it (a gateway older than token
// sites made a token for every site); tokens sites sends the new list or []
// for --all; a missing id or list exits 2 without a request.
func TestTokenSitesCommands(t *testing.T) {
	var bodies []string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		bodies = append(bodies, r.Method+" "+r.URL.Path+" "+strings.TrimSpace(string(b)))
		var in struct {
			Name  string   `json:"name"`
			Sites []string `json:"sites"`
		}
		json.Unmarshal(b, &in)
		if in.Name == "old" { // a gateway that does not know sites
			in.Sites = nil
		}
		w.Header().Set("Content-Type", "application/json")
		if r.Method == http.MethodPost {
			w.WriteHeader(http.StatusCreated)
		}
		json.NewEncoder(w).Encode(map[string]any{"id": "tk-1", "role": "platform", "name": "speedy", "sites": in.Sites,
			"shares_platform": in.Name == "twin"})
	}))
	defer srv.Close()
	ctl := func(args ...string) int {
		var out, errOut bytes.Buffer
		return run(append([]string{"--url", srv.URL, "--token", "tok"}, args...), &out, &errOut)
	}
	var out, errOut bytes.Buffer
	if code := run([]string{"--url", srv.URL, "--token", "tok", "tokens", "create", "--role", "platform", "--name", "twin"}, &out, &errOut); code != 0 ||
		!strings.Contains(errOut.String(), "warning: another live platform token is named twin") {
		t.Errorf("a token sharing a platform's name: exit %d, stderr %q; want 0 and a warning", code, errOut.String())
	}
	for _, c := range []struct {
		args []string
		code int
		body string // "": no request
	}{
		{[]string{"tokens", "create", "--role", "platform", "--name", "speedy", "--sites", "s1, s2,,"}, 0,
			`POST /v1/tokens {"name":"speedy","role":"platform","site":"","sites":["s1","s2"]}`},
		{[]string{"tokens", "create", "--role", "platform", "--name", "speedy"}, 0,
			`POST /v1/tokens {"name":"speedy","role":"platform","site":"","sites":null}`},
		{[]string{"tokens", "create", "--role", "platform", "--name", "old", "--sites", "s1"}, 1,
			`POST /v1/tokens {"name":"old","role":"platform","site":"","sites":["s1"]}`},
		{[]string{"tokens", "sites", "tk-1", "s1,s3"}, 0, `PATCH /v1/tokens/tk-1 {"sites":["s1","s3"]}`},
		{[]string{"tokens", "sites", "tk-1", "--all"}, 0, `PATCH /v1/tokens/tk-1 {"sites":[]}`},
		{[]string{"tokens", "sites", "tk-1"}, 2, ""},
		{[]string{"tokens", "sites", "tk-1", ","}, 2, ""},
		{[]string{"tokens", "sites", "tk-1", "s1", "--all"}, 2, ""},
		{[]string{"tokens", "sites", "--all"}, 2, ""},
	} {
		bodies = nil
		if code := ctl(c.args...); code != c.code {
			t.Errorf("lockerctl %s: exit %d, want %d", strings.Join(c.args, " "), code, c.code)
		}
		want := []string{}
		if c.body != "" {
			want = []string{c.body}
		}
		if !slices.Equal(bodies, want) {
			t.Errorf("lockerctl %s sent %q, want %q", strings.Join(c.args, " "), bodies, want)
		}
	}
}
