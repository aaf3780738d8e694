package main

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/lockergate/lockergate/client"
	"github.com/lockergate/lockergate/internal/testtool"
)

// TestDemo runs the README's first command, `lockergate demo`, as main
// does (its own private PostgreSQL in the data directory, the embedded
// broker, simulated lockers and the people around them), checks that the
// lockers provision and come online in the API, that the simulated
// drivers collect orders, and that cancelling (Ctrl-C) stops it cleanly.
func TestDemo(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a private PostgreSQL and a simulated fleet")
	}
	dataDir := filepath.Join(testtool.PostgresDir(t), "data")
	// The data directory from the environment, as lockerctl reads it too.
	t.Setenv("LOCKERGATE_DATA_DIR", dataDir)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	stdout, stderr := &testtool.LockedBuffer{}, &testtool.LockedBuffer{}
	exit := make(chan int, 1)
	go func() {
		exit <- run(ctx, []string{"demo", "--lockers", "5", "--orders-per-min", "20", "--log-level", "warn",
			"--mqtt-addr", "127.0.0.1:0", "--mqtts-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"}, stdout, stderr)
	}()
	api := regexp.MustCompile(`API:\s+http://(\S+)/v1/`)
	var addr string
	testtool.Eventually(t, 2*time.Minute, "the demo says where it runs", func() error {
		select {
		case code := <-exit:
			t.Fatalf("demo exited %d before it was up:\n%s", code, stderr.String())
		default:
		}
		m := api.FindStringSubmatch(stdout.String())
		if m == nil || !strings.Contains(stdout.String(), "Press Ctrl-C to stop.") {
			return fmt.Errorf("stdout so far: %q", stdout.String())
		}
		addr = m[1]
		return nil
	})
	// Its lockerctl hint names the data directory, whose admin.token
	// lockerctl reads: a hint without it fails outside the default one.
	if want := "LOCKERGATE_DATA_DIR=" + shellQuote(dataDir) + " go run ./cmd/lockerctl"; !strings.Contains(stdout.String(), want) {
		t.Errorf("stdout %q without %q", stdout.String(), want)
	}
	token, err := os.ReadFile(filepath.Join(dataDir, "admin.token"))
	if err != nil {
		t.Fatal(err)
	}
	c := client.New("http://"+addr, strings.TrimSpace(string(token)))
	testtool.Eventually(t, time.Minute, "5 simulated lockers online", func() error {
		var page struct {
			Items []struct {
				ID     string `json:"id"`
				Online bool   `json:"online"`
			} `json:"items"`
		}
		if err := c.Get(ctx, "/v1/lockers", url.Values{"site": {"demo-site"}, "online": {"true"}}, &page); err != nil {
			return err
		}
		if len(page.Items) != 5 {
			return fmt.Errorf("%d online", len(page.Items))
		}
		return nil
	})

	// The demo's webhooks reach a receiver on this machine (serve refuses
	// loopback targets unless --webhook-allow-private).
	got := make(chan struct{}, 1)
	rcv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case got <- struct{}{}:
		default:
		}
	}))
	defer rcv.Close()
	if err := c.Post(ctx, "/v1/webhooks", map[string]any{"url": rcv.URL, "events": []string{"pickup.ready"}}, nil); err != nil {
		t.Fatal(err)
	}
	if err := c.Post(ctx, "/v1/pickups", map[string]any{"site": "demo-site", "order_ref": "D-1", "size": "S", "zone": "ambient",
		"recipient": map[string]string{"kind": "driver", "platform": "speedy"}, "expires_at": time.Now().Add(time.Hour)}, nil); err != nil {
		t.Fatal(err)
	}
	select {
	case <-got:
	case <-time.After(time.Minute):
		t.Fatal("no webhook delivery to a loopback receiver within a minute of a pickup")
	}

	// The simulated staff stage orders and their drivers collect them (the
	// first come 20 s after an order is ready).
	testtool.Eventually(t, 2*time.Minute, "an order picked up by a simulated driver", func() error {
		var page struct {
			Items []struct {
				Platform string `json:"platform"`
			} `json:"items"`
		}
		if err := c.Get(ctx, "/v1/pickups", url.Values{"site": {"demo-site"}, "state": {"picked_up"}}, &page); err != nil {
			return err
		}
		if len(page.Items) == 0 || page.Items[0].Platform != "demo-platform" {
			return fmt.Errorf("picked up: %+v", page.Items)
		}
		return nil
	})

	cancel() // Ctrl-C
	select {
	case code := <-exit:
		if code != 0 {
			t.Fatalf("demo exited %d after Ctrl-C:\n%s", code, stderr.String())
		}
	case <-time.After(time.Minute):
		t.Fatal("demo did not stop within a minute of Ctrl-C")
	}
}

func TestShellQuote(t *testing.T) {
	for in, want := range map[string]string{
		"/tmp/lockergate-data": "/tmp/lockergate-data",
		"/tmp/my data":         "'/tmp/my data'",
		"/tmp/it's":            `'/tmp/it'\''s'`,
		"$HOME/x":              `'$HOME/x'`,
		"":                     "''",
	} {
		if got := shellQuote(in); got != want {
			t.Errorf("shellQuote(%q) = %s, want %s", in, got, want)
		}
	}
}
