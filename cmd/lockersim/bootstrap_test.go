package main

import (
	"encoding/json"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/lockergate/lockergate/devicesim"
	"github.com/lockergate/lockergate/internal/testtool"
)

func TestBootstrap(t *testing.T) {
	var sites, claims []string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "Bearer admin-token" {
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
		var body map[string]any
		_ = json.NewDecoder(r.Body).Decode(&body)
		w.Header().Set("Content-Type", "application/json")
		switch r.URL.Path {
		case "/v1/sites":
			id := body["id"].(string)
			sites = append(sites, id)
			if id == "old" { // exists already: kept
				w.Header().Set("Content-Type", "application/problem+json")
				w.WriteHeader(http.StatusConflict)
				_, _ = w.Write([]byte(`{"title":"site exists","status":409}`))
				return
			}
			w.WriteHeader(http.StatusCreated)
			_, _ = w.Write([]byte(`{}`))
		case "/v1/claims":
			site := body["site"].(string)
			claims = append(claims, site)
			w.WriteHeader(http.StatusCreated)
			_ = json.NewEncoder(w).Encode(map[string]string{"id": "cl-" + site, "token": "tok-" + site})
		default:
			w.WriteHeader(http.StatusNotFound)
		}
	}))
	defer srv.Close()
	cfg := config{apiToken: "admin-token"}
	cfg.opts.API = srv.URL
	cfg.opts.Sites = []devicesim.Site{{ID: "new", Lockers: 3}, {ID: "old", Lockers: 2}, {ID: "given", Lockers: 1, ClaimToken: "mine"}}
	if err := bootstrap(t.Context(), &cfg, slog.New(slog.DiscardHandler)); err != nil {
		t.Fatal(err)
	}
	got := []string{cfg.opts.Sites[0].ClaimToken, cfg.opts.Sites[1].ClaimToken, cfg.opts.Sites[2].ClaimToken}
	if got[0] != "tok-new" || got[1] != "tok-old" || got[2] != "mine" || len(sites) != 2 || len(claims) != 2 {
		t.Errorf("tokens %v, sites created %v, claims %v", got, sites, claims)
	}
}

func TestRestartCommand(t *testing.T) {
	var out testtool.LockedBuffer
	ok := restartCommand(`test "$LOCKERSIM_DOWN_S" = 3 && echo restarted`, &out)
	if err := ok(t.Context(), 3*time.Second); err != nil || !strings.Contains(out.String(), "restarted") {
		t.Fatalf("%v, output %q", err, out.String())
	}
	if err := restartCommand("exit 3", &out)(t.Context(), time.Second); err == nil {
		t.Fatal("a failing restart command reported success")
	}
}
