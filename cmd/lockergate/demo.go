package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/lockergate/lockergate/client"
	"github.com/lockergate/lockergate/devicesim"
	"github.com/lockergate/lockergate/devicesim/orders"
	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/gateway"
	"github.com/lockergate/lockergate/httpapi"
	"github.com/lockergate/lockergate/provisioning"
)

type demoOptions struct {
	lockers      int
	seed         int64
	ordersPerMin float64
}

// demoSite is the site the demo's simulated lockers belong to, and
// demoPlatform the delivery platform of its orders.
const (
	demoSite     = "demo-site"
	demoPlatform = "demo-platform"
)

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
	// The gateway stops when the demo says, after the orders and the
	// lockers (Ctrl-C cancels ctx); the orders' token is revoked in its
	// database (httpapi.RevokeToken) before it stops.
	gctx, stopGateway := context.WithCancel(context.WithoutCancel(ctx))
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
	stopOrders := func() {}
	if o.ordersPerMin > 0 {
		var err error
		if stopOrders, err = demoOrders(ctx, g, sim, o, log); err != nil {
			log.Error("demo orders not started; the lockers run without them", "err", err)
			stopOrders = func() {}
		}
	}
	printWhere(stdout, g)
	fmt.Fprintf(stdout, "  Simulated lockers: %d at site %s.\n", o.lockers, demoSite)
	if o.ordersPerMin > 0 {
		fmt.Fprintf(stdout, "  Orders: %g a minute, placed through the API by the platform %s (its token), loaded by simulated staff and collected by its drivers\n"+
			"    (some type a wrong code first, some never come: their pickups expire after 10 minutes).\n", o.ordersPerMin, demoPlatform)
	}
	fmt.Fprintf(stdout, "  Try:\n")
	// lockerctl reads the admin token from the data directory it is told.
	fmt.Fprintf(stdout, "    LOCKERGATE_URL=http://%s LOCKERGATE_DATA_DIR=%s go run ./cmd/lockerctl lockers list\n",
		loopback(g.HTTPAddr()), shellQuote(dataDirOf(g)))
	fmt.Fprintf(stdout, "    curl -H \"Authorization: Bearer $(cat %s)\" http://%s/v1/pickups\n", shellQuote(g.AdminTokenPath()), loopback(g.HTTPAddr()))
	fmt.Fprintf(stdout, "  Press Ctrl-C to stop.\n")

	select {
	case <-ctx.Done():
	case err := <-runErr:
		stopOrders() // the database stays open until main closes the gateway
		sim.Close()
		if err != nil {
			log.Error("gateway stopped with an error", "err", err)
			return 1
		}
		return 0
	}
	stopOrders()
	sim.Close()
	stopGateway()
	if err := <-runErr; err != nil {
		log.Error("gateway stopped with an error", "err", err)
		return 1
	}
	return 0
}

// demoOrders plays the people around the demo's lockers (devicesim/orders):
// store staff stage orders through the API, drivers of demoPlatform come
// after 20 s to 3 min and type the code (one in ten a wrong one first),
// and one in twenty never comes. They act with a platform token of their
// own, revoked when the demo stops. The returned func stops them, logs
// what they did and revokes the token (audited). Their order references
// start with the run's start time: a restart finds the last run's live
// pickups under other references.
func demoOrders(ctx context.Context, g *gateway.Gateway, sim *devicesim.Fleet, o demoOptions, log *slog.Logger) (func(), error) {
	tok, secret, err := httpapi.CreateToken(ctx, g.DB(), fleet.Token{Role: fleet.RolePlatform, Name: demoPlatform}, "system:demo")
	if err != nil {
		return nil, fmt.Errorf("platform token: %w", err)
	}
	octx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		st, err := orders.Run(octx, orders.Options{
			API: client.New("http://"+loopback(g.HTTPAddr()), secret), Fleet: sim, Sites: []string{demoSite},
			Platform: demoPlatform, RefPrefix: "DEMO-" + strconv.FormatInt(time.Now().Unix(), 36),
			Rate: o.ordersPerMin / 60, DriverDelay: orders.DefaultDriverDelay,
			WrongCode: 0.1, NoShow: 0.05, ExpiresIn: 10 * time.Minute, Seed: o.seed, Logger: log.With("component", "orders"),
		})
		if err != nil {
			log.Error("demo orders", "err", err)
			return
		}
		log.Info("demo orders stopped", "created", st.Created, "picked_up", st.PickedUp, "no_shows", st.NoShows,
			"wrong_codes", st.WrongCodes, "no_compartment", st.NoCompartment, "failed", st.Failed)
	}()
	log.Info("demo orders started", "per_minute", o.ordersPerMin, "platform", demoPlatform)
	return func() {
		cancel()
		<-done
		// The demo's context has ended by now: revoke on a short one.
		rctx, rcancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer rcancel()
		if err := httpapi.RevokeToken(rctx, g.DB(), tok.ID, "system:demo"); err != nil {
			log.Warn("revoke the demo orders' platform token", "token", tok.ID, "err", err)
		}
	}, nil
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

// shellQuote is path as a POSIX shell word: as it is when that is safe,
// else in single quotes.
// dataDirOf is the directory of g's admin token, absolute when it can be
// made so: the line it goes into may be run from another directory.
func dataDirOf(g *gateway.Gateway) string {
	dir := filepath.Dir(g.AdminTokenPath())
	if abs, err := filepath.Abs(dir); err == nil {
		return abs
	}
	return dir
}

func shellQuote(path string) string {
	if path != "" && strings.Trim(path, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_./-:") == "" {
		return path
	}
	return "'" + strings.ReplaceAll(path, "'", `'\''`) + "'"
}
