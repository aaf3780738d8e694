package bench

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"testing"

	"github.com/lockergate/lockergate/gateway"
	"github.com/lockergate/lockergate/internal/pgtest"
)

// childEnv marks a test binary started as a server by TestSmoke: it saves
// building cmd/lockergate and cmd/lockerbench/bare (tens of seconds on a
// busy two-core machine) and runs the same packages.
const childEnv = "LOCKERBENCH_TEST_CHILD"

func TestMain(m *testing.M) {
	if os.Getenv(childEnv) != "" {
		os.Exit(child(os.Args[1:]))
	}
	os.Exit(pgtest.Main(m))
}

// child serves as the gateway (args start with "serve", as for
// cmd/lockergate) or as the bare broker.
func child(args []string) int {
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	fs := flag.NewFlagSet("child", flag.ContinueOnError)
	mqttAddr := fs.String("mqtt-addr", "", "")
	httpAddr := fs.String("http-addr", "", "")
	var err error
	if len(args) > 0 && args[0] == "serve" {
		o := gateway.Options{Logger: log}
		fs.StringVar(&o.MQTTSAddr, "mqtts-addr", "", "")
		fs.StringVar(&o.DataDir, "data-dir", "", "")
		fs.StringVar(&o.DatabaseURL, "database-url", "", "")
		fs.String("log-level", "", "")
		if err := fs.Parse(args[1:]); err != nil {
			return 2
		}
		o.MQTTAddr, o.HTTPAddr = *mqttAddr, *httpAddr
		err = ServeGateway(ctx, o, "")
	} else {
		if err := fs.Parse(args); err != nil {
			return 2
		}
		err = ServeBare(ctx, *mqttAddr, *httpAddr, log)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

// useSelf makes r start this test binary as its servers.
func useSelf(tb testing.TB, r *Runner) {
	tb.Helper()
	self, err := os.Executable()
	if err != nil {
		tb.Fatal(err)
	}
	r.UseBinary("lockergate", self, childEnv+"=1")
	r.UseBinary("bare", self)
}
