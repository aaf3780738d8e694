package gateway_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/lockergate/lockergate/gateway"
	"github.com/lockergate/lockergate/internal/pgtest"
)

// TestInstancesMustShareKeys: a gateway started on a database another
// instance set up, with a data directory of its own (its own master.key,
// its own firmware.key), refuses to start and names the file to copy: it
// would have handed out pickup codes no locker accepts, and firmware its
// lockers refuse. With the first instance's keys copied it starts.
func TestInstancesMustShareKeys(t *testing.T) {
	dsn := pgtest.NewDB(t)
	first := t.TempDir()
	opts := func(dir string) gateway.Options {
		return gateway.Options{DataDir: dir, DatabaseURL: dsn, MQTTAddr: "127.0.0.1:0", HTTPAddr: "127.0.0.1:0",
			Logger: testLogger(t)}
	}
	MustRun(t, opts(first)).Stop(t)

	copyKey := func(dir, name string) {
		t.Helper()
		b, err := os.ReadFile(filepath.Join(first, name))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	refused := func(dir, want string) {
		t.Helper()
		g, err := gateway.New(context.Background(), opts(dir))
		if err == nil {
			g.Close()
			t.Fatalf("a gateway with its own keys started on the shared database; want it refused naming %s", want)
		}
		if !strings.Contains(err.Error(), filepath.Join(dir, want)) || !strings.Contains(err.Error(), "copy it from the instance") {
			t.Fatalf("refused with %q, want it to name %s and say to copy it", err, filepath.Join(dir, want))
		}
	}
	own := t.TempDir()
	refused(own, "master.key")
	copyKey(own, "master.key")
	refused(own, "firmware.key")
	copyKey(own, "firmware.key")
	copyKey(own, "admin.token") // for MustRun's client: the first instance wrote it
	MustRun(t, opts(own)).Stop(t)
}
