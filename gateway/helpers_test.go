package gateway_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/lockergate/lockergate/client"
	"github.com/lockergate/lockergate/gateway"
	"github.com/lockergate/lockergate/internal/pgtest"
	"github.com/lockergate/lockergate/internal/testtool"
	"github.com/lockergate/lockergate/protocol"
)

func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }

// testLogger logs warnings and errors to the test log only.
func testLogger(tb testing.TB) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// TestGateway is a gateway running in process on random loopback ports.
type TestGateway struct {
	*gateway.Gateway
	Admin  *client.Client
	cancel context.CancelFunc
	done   chan error
}

// MustStart starts a gateway on a fresh database; it stops in tb.Cleanup.
func MustStart(tb testing.TB, mod ...func(*gateway.Options)) *TestGateway {
	tb.Helper()
	o := gateway.Options{
		DataDir: tb.TempDir(), DatabaseURL: pgtest.NewDB(tb),
		MQTTAddr: "127.0.0.1:0", HTTPAddr: "127.0.0.1:0", Logger: testLogger(tb), WebhookAllowPrivate: true,
		Config: protocol.Config{Version: 1, HealthIntervalS: 1, DoorAjarS: 120, Lockout: protocol.DefaultLockout},
	}
	for _, f := range mod {
		f(&o)
	}
	return MustRun(tb, o)
}

// MustRun starts a gateway with o.
func MustRun(tb testing.TB, o gateway.Options) *TestGateway {
	tb.Helper()
	g, err := gateway.New(context.Background(), o)
	if err != nil {
		tb.Fatalf("start gateway: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	tg := &TestGateway{Gateway: g, cancel: cancel, done: make(chan error, 1)}
	go func() { tg.done <- g.Run(ctx) }()
	token := g.AdminToken()
	if token == "" {
		b, err := os.ReadFile(g.AdminTokenPath())
		if err != nil {
			tb.Fatalf("read admin token: %v", err)
		}
		token = strings.TrimSpace(string(b))
	}
	tg.Admin = client.New("http://"+g.HTTPAddr(), token)
	tb.Cleanup(func() { tg.Stop(tb) })
	Eventually(tb, 10*time.Second, "gateway ready", func() error {
		_, err := tg.Admin.Do(context.Background(), client.Request{Method: "GET", Path: "/readyz"}, nil)
		return err
	})
	return tg
}

// Stop shuts the gateway down and waits; safe to call twice.
func (tg *TestGateway) Stop(tb testing.TB) {
	tb.Helper()
	if tg.cancel == nil {
		return
	}
	tg.cancel()
	tg.cancel = nil
	select {
	case err := <-tg.done:
		if err != nil {
			tb.Errorf("gateway run: %v", err)
		}
	case <-time.After(30 * time.Second):
		tb.Errorf("gateway did not stop within 30 s")
	}
	if err := tg.Close(); err != nil {
		tb.Errorf("close gateway: %v", err)
	}
}

// Eventually retries f until it returns nil or the deadline passes. It is
// how tests wait for conditions (never fixed sleeps).
func Eventually(tb testing.TB, d time.Duration, what string, f func() error) {
	tb.Helper()
	testtool.Eventually(tb, d, what, f)
}

// Count runs a query that returns one count and fails the test if it
// cannot: a failed query must not read as "none stored".
func (tg *TestGateway) Count(tb testing.TB, query string, args ...any) int {
	tb.Helper()
	var n int
	if err := tg.DB().Pool().QueryRow(context.Background(), query, args...).Scan(&n); err != nil {
		tb.Fatalf("%s: %v", query, err)
	}
	return n
}

// Metric returns the value of the sample line that starts with name+labels
// in the gateway's /metrics, or an error.
func (tg *TestGateway) Metric(series string) (float64, error) {
	v, found, err := scrapeSeries(tg.HTTPAddr(), series)
	if err == nil && !found {
		err = fmt.Errorf("no series %s in /metrics", series)
	}
	return v, err
}

// WaitMetric waits up to d until the sample line series in the gateway's
// /metrics reads want.
func (tg *TestGateway) WaitMetric(tb testing.TB, d time.Duration, series string, want float64) {
	tb.Helper()
	Eventually(tb, d, series, func() error {
		got, err := tg.Metric(series)
		if err == nil && got != want {
			err = fmt.Errorf("%s = %v, want %v", series, got, want)
		}
		return err
	})
}

// scrapeSeries reads one sample line (name+labels) from the /metrics of the
// gateway at httpAddr; found is false when the series is not there.
func scrapeSeries(httpAddr, series string) (v float64, found bool, err error) {
	resp, err := http.Get("http://" + httpAddr + "/metrics")
	if err != nil {
		return 0, false, err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, series+" "); ok {
			_, err := fmt.Sscan(rest, &v)
			return v, true, err
		}
	}
	return 0, false, nil
}

// MustSiteAndClaim creates a site and a claim for n lockers through the API.
// WaitOnline waits until n lockers read online through the API.
func (tg *TestGateway) WaitOnline(tb testing.TB, n int) {
	tb.Helper()
	Eventually(tb, 20*time.Second, fmt.Sprintf("%d lockers online", n), func() error {
		var l lockerList
		if err := tg.Admin.Get(context.Background(), "/v1/lockers", url.Values{"online": {"true"}}, &l); err != nil {
			return err
		}
		if len(l.Items) != n {
			return fmt.Errorf("%d online", len(l.Items))
		}
		return nil
	})
}

func (tg *TestGateway) MustSiteAndClaim(tb testing.TB, site string, n int) string {
	tb.Helper()
	ctx := context.Background()
	if err := tg.Admin.Post(ctx, "/v1/sites", map[string]string{"id": site, "name": "Store " + site, "timezone": "America/Chicago"}, nil); err != nil {
		tb.Fatalf("create site: %v", err)
	}
	var claim struct {
		ID    string `json:"id"`
		Token string `json:"token"`
	}
	if err := tg.Admin.Post(ctx, "/v1/claims", map[string]any{"site": site, "uses": n, "expires_in_s": 3600}, &claim); err != nil {
		tb.Fatalf("create claim: %v", err)
	}
	if claim.Token == "" || claim.ID == "" {
		tb.Fatalf("claim answer without id or token: %+v", claim)
	}
	return claim.Token
}
