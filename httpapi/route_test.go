package httpapi

import (
	"net/http"
	"testing"
)

// A path the API has, asked with another method, is a 405 naming the
// methods it takes; a path it does not have is a 404. Both are problem
// details, and neither needs a token (nothing is revealed that
// /v1/openapi.json does not publish).
func TestNoRoute(t *testing.T) {
	s := New(Options{Store: &fakeStore{}})
	for _, tc := range []struct {
		method, target string
		status         int
		detail, allow  string
	}{
		{"DELETE", "/v1/sites", http.StatusMethodNotAllowed, "DELETE is not allowed on /v1/sites; allowed: GET, HEAD, POST", "GET, HEAD, POST"},
		{"PUT", "/v1/lockers/lk-1/commands", http.StatusMethodNotAllowed, "PUT is not allowed on /v1/lockers/lk-1/commands; allowed: POST", "POST"},
		{"GET", "/v1/nothing/here", http.StatusNotFound, "no such endpoint: GET /v1/nothing/here (see GET /v1/openapi.json)", ""},
		{"POST", "/elsewhere", http.StatusNotFound, "no such endpoint: POST /elsewhere (see GET /v1/openapi.json)", ""},
	} {
		a := call(t, s, tc.method, tc.target, "")
		a.wantProblem(t, tc.status, tc.detail)
		if got := a.header.Get("Allow"); got != tc.allow {
			t.Errorf("%s %s: Allow %q, want %q", tc.method, tc.target, got, tc.allow)
		}
	}
	// A known route still answers (here: 401 without a token).
	if a := call(t, s, "GET", "/v1/sites", ""); a.status != http.StatusUnauthorized {
		t.Errorf("GET /v1/sites without a token: %d, want 401", a.status)
	}
}
