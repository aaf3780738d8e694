package main

import (
	"bytes"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
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
