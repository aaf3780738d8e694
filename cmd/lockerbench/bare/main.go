// Command bare is lockerbench's baseline broker (bench.ServeBare): the
// gateway's embedded mochi broker without authentication, fleet logic or
// database. A benchmark baseline only: it admits every client.
package main

import (
	"context"
	"flag"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/lockergate/lockergate/bench"
)

func main() { os.Exit(run()) }

func run() int {
	mqttAddr := flag.String("mqtt-addr", "127.0.0.1:1883", "MQTT listen address")
	httpAddr := flag.String("http-addr", "127.0.0.1:8080", "HTTP address for /readyz, /stats and /rt")
	flag.Parse()
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := bench.ServeBare(ctx, *mqttAddr, *httpAddr, log); err != nil {
		log.Error("bare broker", "err", err)
		return 1
	}
	return 0
}
