package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"time"

	"github.com/lockergate/lockergate/devicesim"
	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/gateway"
	"github.com/lockergate/lockergate/provisioning"
)

type demoOptions struct {
	lockers int
	seed    int64
}

// demoSite is the site the demo's simulated lockers belong to.
const demoSite = "demo-site"

// runDemo runs the gateway with a simulated fleet in one process.
func runDemo(ctx context.Context, g *gateway.Gateway, o demoOptions, stdout io.Writer, log *slog.Logger) int {
	if g.MQTTAddr() == "" {
		log.Error("demo needs the plain MQTT listener: do not set --mqtt-addr empty")
		return 2
	}
	err := g.DB().CreateSite(ctx, &fleet.Site{ID: demoSite, Name: "Demo store", Timezone: "UTC"})
	if err != nil && !errors.Is(err, fleet.ErrConflict) {
		log.Error("create demo site", "err", err)
		return 1
	}
	// The simulator keeps no identities between runs: let the demo's lockers
	// provision again under their serials.
	if err := g.DB().MarkSiteReplaceable(ctx, demoSite); err != nil {
		log.Error("prepare demo lockers", "err", err)
		return 1
	}
	_, token, err := g.Provisioning().CreateClaim(ctx, provisioning.NewClaim{Site: demoSite, Uses: o.lockers,
		ExpiresIn: time.Hour, Actor: "system:demo"})
	if err != nil {
		log.Error("create demo claim", "err", err)
		return 1
	}

	runErr := make(chan error, 1)
	gctx, stopGateway := context.WithCancel(ctx)
	defer stopGateway()
	go func() { runErr <- g.Run(gctx) }()

	sim, err := devicesim.NewFleet(devicesim.Options{
		Broker: "tcp://" + loopback(g.MQTTAddr()), ClaimToken: token, Lockers: o.lockers, Seed: o.seed,
		SerialPrefix: "DEMO", HealthInterval: 15 * time.Second, Logger: log.With("component", "sim"),
	})
	if err != nil {
		log.Error("simulator", "err", err)
		stopGateway()
		<-runErr
		return 1
	}
	log.Info("starting simulated lockers", "lockers", o.lockers)
	if err := sim.Start(ctx); err != nil {
		log.Error("simulated fleet did not come up", "err", err)
	}
	printWhere(stdout, g)
	fmt.Fprintf(stdout, "  Simulated lockers: %d at site %s. Try:\n", o.lockers, demoSite)
	fmt.Fprintf(stdout, "    LOCKERGATE_URL=http://%s go run ./cmd/lockerctl lockers list\n", loopback(g.HTTPAddr()))
	fmt.Fprintf(stdout, "  Press Ctrl-C to stop.\n")

	select {
	case <-ctx.Done():
	case err := <-runErr:
		sim.Close()
		if err != nil {
			log.Error("gateway stopped with an error", "err", err)
			return 1
		}
		return 0
	}
	sim.Close()
	stopGateway()
	if err := <-runErr; err != nil {
		log.Error("gateway stopped with an error", "err", err)
		return 1
	}
	return 0
}

// loopback turns ":1883" or "[::]:1883" into an address a local client can dial.
func loopback(addr string) string {
	for _, p := range []string{"[::]:", "0.0.0.0:"} {
		if len(addr) > len(p) && addr[:len(p)] == p {
			return "127.0.0.1:" + addr[len(p):]
		}
	}
	if len(addr) > 0 && addr[0] == ':' {
		return "127.0.0.1" + addr
	}
	return addr
}
