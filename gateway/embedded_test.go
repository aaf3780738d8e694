package gateway_test

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/lockergate/lockergate/client"
	"github.com/lockergate/lockergate/gateway"
	"github.com/lockergate/lockergate/internal/testtool"
)

// TestEmbeddedDefault runs the gateway with no database URL: it starts its
// own PostgreSQL cluster in the data dir (as the postgres user when root),
// keeps state across a restart, and stops the cluster on shutdown.
func TestEmbeddedDefault(t *testing.T) {
	// The postgres user must be able to reach the data dir when we are root.
	dataDir := filepath.Join(testtool.PostgresDir(t), "data")
	opts := gateway.Options{DataDir: dataDir, FastDB: true, MQTTAddr: "127.0.0.1:0", HTTPAddr: "127.0.0.1:0", Logger: testLogger(t)}

	tg := MustRun(t, opts)
	first := tg.AdminToken()
	if first == "" {
		t.Fatal("no admin token at first start")
	}
	b, err := os.ReadFile(filepath.Join(dataDir, "admin.token"))
	if err != nil || string(b) != first { // exactly the token: no newline to strip
		t.Fatalf("admin.token: %q, %v", b, err)
	}
	if err := tg.Admin.Post(context.Background(), "/v1/sites", map[string]string{"id": "kept"}, nil); err != nil {
		t.Fatal(err)
	}
	pidFile := filepath.Join(dataDir, "pg", "postmaster.pid")
	if _, err := os.Stat(pidFile); err != nil {
		t.Fatalf("private cluster not running in the data dir: %v", err)
	}
	tg.Stop(t)
	if _, err := os.Stat(pidFile); !os.IsNotExist(err) {
		t.Fatalf("postmaster.pid still there after shutdown: %v", err)
	}

	// Second start: same cluster, same data, no new admin token.
	tg2 := MustRun(t, opts)
	if tg2.AdminToken() != "" {
		t.Fatal("a second admin token was created on restart")
	}
	c := client.New("http://"+tg2.HTTPAddr(), first)
	var site struct{ ID string }
	if err := c.Get(context.Background(), "/v1/sites/kept", nil, &site); err != nil || site.ID != "kept" {
		t.Fatalf("site after restart: %+v, %v", site, err)
	}
}
