package main

import (
	"context"
	"encoding/json"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/lockergate/lockergate/client"
	"github.com/lockergate/lockergate/devicesim/devicesimtest"
	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/gateway"
	"github.com/lockergate/lockergate/internal/pgtest"
	"github.com/lockergate/lockergate/internal/testtool"
	"github.com/lockergate/lockergate/pickup"
	"github.com/lockergate/lockergate/protocol"
)

// TestRunPlacesTheScenarioOrders: a scenario with behavior.orders_per_hour
// run with --api and --token places its orders through a real gateway, and
// its simulated staff and drivers act them out: pickups are created, made
// ready and picked up with their codes, and the report says so.
func TestRunPlacesTheScenarioOrders(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a gateway on PostgreSQL and a simulated fleet")
	}
	g, err := gateway.New(context.Background(), gateway.Options{
		DataDir: t.TempDir(), DatabaseURL: pgtest.NewDB(t), MQTTAddr: "127.0.0.1:0", HTTPAddr: "127.0.0.1:0",
		Logger: slog.New(slog.DiscardHandler),
		Config: protocol.Config{Version: 1, HealthIntervalS: 5, DoorAjarS: 120, Lockout: protocol.DefaultLockout},
	})
	if err != nil {
		t.Fatal(err)
	}
	gctx, stop := context.WithCancel(context.Background())
	stopped := make(chan error, 1)
	go func() { stopped <- g.Run(gctx) }()
	t.Cleanup(func() {
		stop()
		if err := <-stopped; err != nil {
			t.Errorf("gateway: %v", err)
		}
		if err := g.Close(); err != nil {
			t.Errorf("close gateway: %v", err)
		}
	})
	token := g.AdminToken()
	if token == "" {
		b, err := os.ReadFile(g.AdminTokenPath())
		if err != nil {
			t.Fatal(err)
		}
		token = strings.TrimSpace(string(b))
	}
	api := "http://" + g.HTTPAddr()
	testtool.Eventually(t, 10*time.Second, "gateway ready", func() error {
		_, err := client.New(api, token).Do(context.Background(), client.Request{Method: "GET", Path: "/readyz"}, nil)
		return err
	})

	// An hour of a busy store in 40 s: 360 orders an hour at 2 sites at 60×
	// is about 12 in 1 s of real time; drivers come within 1-3 s.
	scenario := filepath.Join(t.TempDir(), "orders.json")
	if err := os.WriteFile(scenario, []byte(`{"name": "orders", "seed": 7, "time_scale": 60,
		"fleet": {"sites": [{"id": "ord-1", "lockers": 2}, {"id": "ord-2", "lockers": 2}]},
		"behavior": {"orders_per_hour": 360, "driver_delay": {"min": "1m", "max": "3m"}, "wrong_code_share": 0.2}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	var stdout, stderr testtool.LockedBuffer
	code := runArgs(t.Context(), []string{"run", "--scenario", scenario, "--bootstrap", "--api", api, "--token", token,
		"--broker", "tcp://" + g.MQTTAddr(), "--duration", "25s", "--summary-interval", "1s", "--log-level", "warn", "-o", "json"},
		func(string) string { return "" }, &stdout, &stderr)
	if code != 0 {
		t.Fatalf("lockersim exited %d:\n%s", code, stderr.String())
	}
	var rep report
	if err := json.Unmarshal([]byte(stdout.String()), &rep); err != nil {
		t.Fatalf("report: %v\n%s", err, stdout.String())
	}
	if rep.Orders == nil || rep.Orders.Created == 0 || rep.Orders.PickedUp == 0 || rep.Orders.Failed != 0 {
		t.Fatalf("orders %+v, want some created and picked up, none failed\n%s", rep.Orders, stderr.String())
	}
	if rep.Stats.CodesAccepted == 0 || !strings.Contains(stderr.String(), "orders: created") {
		t.Errorf("codes accepted %d; report:\n%s", rep.Stats.CodesAccepted, stderr.String())
	}
	// The orders came from a platform token of the run's own, limited to
	// the scenario's sites and revoked at its end.
	admin := client.New(api, token)
	var ps struct{ Items []pickup.Pickup }
	if err := admin.Get(t.Context(), "/v1/pickups", url.Values{"limit": {"1000"}}, &ps); err != nil {
		t.Fatal(err)
	}
	for _, p := range ps.Items {
		if p.CreatedBy != "platform:lockersim" {
			t.Fatalf("pickup %s created by %q, want platform:lockersim", p.ID, p.CreatedBy)
		}
	}
	var toks struct{ Items []fleet.Token }
	if err := admin.Get(t.Context(), "/v1/tokens", url.Values{"name": {"lockersim"}}, &toks); err != nil {
		t.Fatal(err)
	}
	if len(toks.Items) != 1 || toks.Items[0].RevokedAt == nil || !slices.Equal(toks.Items[0].Sites, []string{"ord-1", "ord-2"}) {
		t.Errorf("lockersim's platform tokens: %+v, want one, for the scenario's sites, revoked", toks.Items)
	}
}

// TestRunOrdersNeedTheAPI: a scenario that places orders, run without
// --api and --token (or without site ids), says that it places none, and
// runs its fleet all the same.
func TestRunOrdersNeedTheAPI(t *testing.T) {
	env := devicesimtest.Start(t, devicesimtest.Options{})
	dir := t.TempDir()
	for _, tc := range []struct{ name, fleet, want string }{
		{"NoAPI", `{"sites": [{"id": "ord-1", "lockers": 2}]}`, "none are placed: give --api and --token"},
		{"NoSiteIDs", `{"lockers": 2}`, "none are placed: its fleet names no site ids"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			scenario := filepath.Join(dir, tc.name+".json")
			if err := os.WriteFile(scenario, []byte(`{"name": "orders", "fleet": `+tc.fleet+`, "behavior": {"orders_per_hour": 60}}`), 0o600); err != nil {
				t.Fatal(err)
			}
			args := []string{"run", "--scenario", scenario, "--broker", env.URL, "--claim", env.Claim,
				"--serial-prefix", tc.name, "--duration", "3s", "--log-level", "warn", "-o", "json"}
			if tc.name == "NoSiteIDs" {
				args = append(args, "--api", "http://127.0.0.1:9", "--token", "t")
			} else {
				args = append(args, "--site-claim", "ord-1="+env.Claim)
			}
			var stdout, stderr testtool.LockedBuffer
			if code := runArgs(t.Context(), args, func(string) string { return "" }, &stdout, &stderr); code != 0 {
				t.Fatalf("lockersim exited %d:\n%s", code, stderr.String())
			}
			if !strings.Contains(stderr.String(), tc.want) {
				t.Errorf("stderr does not say %q:\n%s", tc.want, stderr.String())
			}
			var rep report
			if err := json.Unmarshal([]byte(stdout.String()), &rep); err != nil || rep.Orders != nil || !rep.AllConnected {
				t.Errorf("report %+v (%v), want all connected and no orders", rep, err)
			}
		})
	}
}
