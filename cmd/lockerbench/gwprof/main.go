// Command gwprof is the gateway of cmd/lockergate with net/http/pprof on a
// separate listener, for lockerbench --profile: the same gateway package
// and options, so its profiles are the gateway's. Not for production: the
// profiling listener has no authentication.
package main

import (
	"context"
	"flag"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/lockergate/lockergate/bench"
	"github.com/lockergate/lockergate/gateway"
)

func main() { os.Exit(run()) }

func run() int {
	var o gateway.Options
	var pprofAddr, logLevel string
	flag.StringVar(&o.MQTTAddr, "mqtt-addr", "127.0.0.1:1883", "plain MQTT listen address")
	flag.StringVar(&o.MQTTSAddr, "mqtts-addr", "", "MQTT over TLS listen address (empty disables)")
	flag.StringVar(&o.HTTPAddr, "http-addr", "127.0.0.1:8080", "HTTP API listen address")
	flag.StringVar(&o.DataDir, "data-dir", "./lockergate-data", "data directory")
	flag.StringVar(&o.DatabaseURL, "database-url", "", "PostgreSQL URL")
	flag.StringVar(&pprofAddr, "pprof-addr", "127.0.0.1:6060", "net/http/pprof listen address (empty: none)")
	flag.StringVar(&logLevel, "log-level", "warn", "log level")
	flag.Parse()
	var level slog.Level
	if err := level.UnmarshalText([]byte(logLevel)); err != nil {
		slog.Error("bad --log-level", "err", err)
		return 2
	}
	o.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	if err := gateway.TakeSockets(&o); err != nil {
		o.Logger.Error("gateway", "err", err)
		return 1
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := bench.ServeGateway(ctx, o, pprofAddr); err != nil {
		o.Logger.Error("gateway", "err", err)
		return 1
	}
	return 0
}
