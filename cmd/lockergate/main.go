// Command lockergate runs the Lockergate gateway: the embedded MQTT broker,
// the fleet manager and the HTTP API. `lockergate demo` adds a simulated fleet.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"
	// Site time zones (API timezone, firmware install windows) load on
	// hosts without a zoneinfo database too (minimal containers).
	_ "time/tzdata"

	"github.com/lockergate/lockergate/gateway"
	"github.com/lockergate/lockergate/protocol"
)

func main() {
	// Ctrl-C or SIGTERM: drain and stop (the gateway and, in demo, the
	// simulated lockers).
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// commands is the head of every usage message.
const commands = `usage: lockergate [serve|demo] [flags]

  serve   run the gateway (the default)
  demo    run the gateway with a simulated fleet on the embedded defaults
`

const usage = commands + `
Run "lockergate serve -h" or "lockergate demo -h" for flags.
`

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	cmd := "serve"
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		cmd, args = args[0], args[1:]
	}
	switch cmd {
	case "serve", "demo":
	case "help":
		fmt.Fprint(stdout, usage)
		return 0
	default:
		fmt.Fprintf(stderr, "lockergate: unknown command %q\n%s", cmd, usage)
		return 2
	}
	st, code := parseSettings(cmd, args, stderr)
	if st == nil {
		return code
	}
	o, demo := st.o, st.demo
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: st.level}))
	o.Logger = log
	if err := gateway.TakeSockets(&o); err != nil {
		log.Error("gateway did not start", "err", err)
		return 1
	}

	g, err := gateway.New(ctx, o)
	if err != nil {
		log.Error("gateway did not start", "err", err)
		return 1
	}
	defer func() {
		if err := g.Close(); err != nil {
			log.Error("close", "err", err)
		}
	}()
	if cmd == "demo" {
		return runDemo(ctx, g, demo, stdout, log)
	}
	printWhere(stdout, g)
	if _, err := os.Stat(g.AdminTokenPath()); err == nil {
		// lockerctl reads the admin token from the data directory it is told.
		fmt.Fprintf(stdout, "  lockerctl: LOCKERGATE_URL=http://%s LOCKERGATE_DATA_DIR=%s go run ./cmd/lockerctl lockers list\n",
			loopback(g.HTTPAddr()), shellQuote(dataDirOf(g)))
	}
	if err := g.Run(ctx); err != nil {
		log.Error("gateway stopped with an error", "err", err)
		return 1
	}
	return 0
}

// settings are what the flags of serve or demo say.
type settings struct {
	o     gateway.Options
	demo  demoOptions
	level slog.Level
}

// parseSettings parses the flags of cmd (serve or demo); nil and the exit
// code when run should end here (-h, or a flag that cannot work: said on
// stderr).
func parseSettings(cmd string, args []string, stderr io.Writer) (*settings, int) {
	fs := flag.NewFlagSet("lockergate "+cmd, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		// The commands first: "lockergate -h" is serve's flags, and the
		// demo is easily missed without them.
		fmt.Fprintf(stderr, "%s\nFlags of lockergate %s:\n", commands, cmd)
		fs.PrintDefaults()
	}
	var o gateway.Options
	var logLevel string
	fs.StringVar(&o.MQTTAddr, "mqtt-addr", ":1883", "plain MQTT listen address (empty disables; a socket named mqtt passed by systemd takes its place)")
	fs.StringVar(&o.MQTTSAddr, "mqtts-addr", ":8883", "MQTT over TLS listen address (empty disables; a socket named mqtts passed by systemd takes its place)")
	fs.StringVar(&o.TLSCert, "tls-cert", "", "TLS certificate (PEM) for MQTTS; default: a private CA under the data dir")
	fs.StringVar(&o.TLSKey, "tls-key", "", "TLS private key (PEM) for --tls-cert")
	fs.StringVar(&o.HTTPAddr, "http-addr", ":8080", "HTTP API listen address (a socket named http passed by systemd takes its place)")
	dataDir := os.Getenv("LOCKERGATE_DATA_DIR")
	if dataDir == "" {
		dataDir = "./lockergate-data"
	}
	fs.StringVar(&o.DataDir, "data-dir", dataDir, "data directory: private PostgreSQL, keys, admin token (env LOCKERGATE_DATA_DIR; lockerctl reads the admin token from it too)")
	fs.StringVar(&o.DatabaseURL, "database-url", os.Getenv("DATABASE_URL"), "PostgreSQL URL (env DATABASE_URL); empty starts a private cluster in the data dir")
	fs.StringVar(&o.BrokerURL, "device-broker-url", "", "broker address handed to lockers at provisioning (default: from the listeners, or --broker-url)")
	fs.StringVar(&o.ExternalBroker, "broker-url", "", "run on an external broker cluster (mqtt://host:port or mqtts://); the embedded listeners then only provision")
	fs.StringVar(&o.ExternalUser, "broker-user", "lockergate", "this gateway's user on the external broker")
	fs.StringVar(&o.ExternalCAFile, "broker-ca-file", "", "PEM file of the CA(s) an mqtts:// --broker-url's certificate is checked against (default: the system's)")
	fs.StringVar(&o.ExternalPassword, "broker-password", os.Getenv("LOCKERGATE_BROKER_PASSWORD"), "its password (env LOCKERGATE_BROKER_PASSWORD)")
	fs.StringVar(&o.DeviceAuth, "device-auth", "", "with --broker-url, how the broker checks lockers: dynsec (mosquitto dynamic security, the default) or http (the broker calls /v1/broker-auth; docs/deployment.md)")
	fs.StringVar(&o.BrokerAPIURL, "broker-api-url", "", "with --device-auth http: EMQX's REST API (https://emqx:18083), to end a disabled or replaced locker's live session")
	fs.StringVar(&o.BrokerAPIKey, "broker-api-key", os.Getenv("LOCKERGATE_BROKER_API_KEY"), "its API key as key:secret (env LOCKERGATE_BROKER_API_KEY)")
	fs.Func("auth-stale-window", "with --device-auth http: how long after it last heard a kick the auth hook admits a locker on the secret it last verified while the database does not answer (default 2m; never: refuse with 503; at most 24h)",
		durationOrNever(&o.AuthStaleWindow, "5m"))
	fs.StringVar(&o.InstanceID, "instance-id", "", "this instance's client id on the external broker (default: lockergate-<host>-<random>)")
	fs.StringVar(&o.FirmwareKey, "firmware-key", "", "Ed25519 firmware signing seed file (default: <data-dir>/firmware.key)")
	fs.IntVar(&o.RetentionDays, "retention-days", 30, "days of health and events to keep")
	fs.Func("history-retention-days", "days of presence changes, cleared alerts, finished commands, settled webhook deliveries, claim uses and Idempotency-Key answers to keep (default 365; 0: forever)",
		func(v string) error {
			n, err := strconv.Atoi(v)
			if err != nil || n < 0 {
				return fmt.Errorf("want a number of days, 0 for forever")
			}
			o.HistoryRetentionDays = n
			if n == 0 {
				o.HistoryRetentionDays = -1
			}
			return nil
		})
	fs.Func("max-clock-skew", "how far a locker's clock may be from the gateway's at its connect before a clock_skew alert (default 30s; never: not checked)",
		durationOrNever(&o.MaxClockSkew, "30s"))
	fs.Func("health-interval", "how often lockers send health (config health_interval_s; default 60s; a locker silent for three intervals is stale)",
		wholeSeconds(&o.Config.HealthIntervalS, 5*time.Second, time.Hour))
	fs.Func("door-ajar", "how long a door may stay open before the locker reports door_ajar (config door_ajar_s; default 2m)",
		wholeSeconds(&o.Config.DoorAjarS, 10*time.Second, 24*time.Hour))
	fs.Func("lockout", "keypad lockout as FAILURES/WINDOW/LOCK: after FAILURES rejected codes within WINDOW the keypad locks for LOCK (config lockout; default 5/5m/5m)",
		func(v string) error { return parseLockout(v, &o.Config.Lockout) })
	fs.StringVar(&o.PublicURL, "public-url", "", "the HTTP API's address as lockers reach it, for firmware download URLs (default: http:// and --http-addr, localhost for an unspecified host)")
	// The demo is a lab on this machine: its webhooks may call receivers
	// on it (a serve refuses them, against requests into private networks).
	fs.BoolVar(&o.WebhookAllowPrivate, "webhook-allow-private", cmd == "demo", "let webhooks target loopback and private addresses (labs, tests; on in demo)")
	fs.StringVar(&logLevel, "log-level", "info", "log level: debug, info, warn, error")
	var demo demoOptions
	if cmd == "demo" {
		fs.IntVar(&demo.lockers, "lockers", 200, "simulated lockers")
		fs.Int64Var(&demo.seed, "seed", 1, "simulator seed")
		fs.Float64Var(&demo.ordersPerMin, "orders-per-min", 6, "orders staged per minute and collected by simulated drivers (0: none)")
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil, 0
		}
		return nil, 2
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(logLevel)); err != nil {
		fmt.Fprintf(stderr, "lockergate: --log-level %q: want debug, info, warn or error\n", logLevel)
		return nil, 2
	}
	return &settings{o: o, demo: demo, level: level}, 0
}

func printWhere(w io.Writer, g *gateway.Gateway) {
	fmt.Fprintf(w, "Lockergate is running.\n")
	fmt.Fprintf(w, "  API:     http://%s/v1/  (health: /healthz, ready: /readyz)\n", g.HTTPAddr())
	fmt.Fprintf(w, "  Metrics: http://%s/metrics\n", g.HTTPAddr())
	if a := g.MQTTAddr(); a != "" {
		fmt.Fprintf(w, "  MQTT:    %s\n", a)
	}
	if a := g.MQTTSAddr(); a != "" {
		fmt.Fprintf(w, "  MQTTS:   %s\n", a)
	}
	switch _, err := os.Stat(g.AdminTokenPath()); {
	case g.AdminToken() != "":
		fmt.Fprintf(w, "  Admin token (created now): %s\n", g.AdminTokenPath())
	case err == nil:
		fmt.Fprintf(w, "  Admin token: created at first start in %s\n", g.AdminTokenPath())
	default:
		// Another instance set the database up (its data directory has
		// the token), or the file was removed.
		fmt.Fprintf(w, "  Admin token: not in this data directory; use the one the instance that set the database up wrote, or one made with POST /v1/tokens\n")
	}
}

// durationOrNever parses a flag that takes a positive duration, or never
// (stored as -1); example is shown in the error.
func durationOrNever(dst *time.Duration, example string) func(string) error {
	return func(v string) error {
		if v == "never" {
			*dst = -1
			return nil
		}
		d, err := time.ParseDuration(v)
		if err != nil || d <= 0 {
			return fmt.Errorf("want a positive duration such as %s, or never", example)
		}
		*dst = d
		return nil
	}
}

// wholeSeconds parses a flag that takes a duration of whole seconds within
// [lo, hi] into *dst, in seconds.
func wholeSeconds(dst *int, lo, hi time.Duration) func(string) error {
	return func(v string) error {
		d, err := time.ParseDuration(v)
		if err != nil || d < lo || d > hi || d%time.Second != 0 {
			return fmt.Errorf("want whole seconds from %s to %s, such as %s", lo, hi, lo*6)
		}
		*dst = int(d / time.Second)
		return nil
	}
}

// parseLockout parses FAILURES/WINDOW/LOCK (5/5m/5m) into *dst.
func parseLockout(v string, dst *protocol.Lockout) error {
	bad := fmt.Errorf("want FAILURES/WINDOW/LOCK such as 5/5m/5m: 1-100 rejected codes within 1s-24h lock the keypad for 0s-24h")
	parts := strings.Split(v, "/")
	if len(parts) != 3 {
		return bad
	}
	n, err := strconv.Atoi(parts[0])
	if err != nil || n < 1 || n > 100 {
		return bad
	}
	window, err1 := time.ParseDuration(parts[1])
	lock, err2 := time.ParseDuration(parts[2])
	if err1 != nil || err2 != nil || window < time.Second || window > 24*time.Hour || lock < 0 || lock > 24*time.Hour ||
		window%time.Second != 0 || lock%time.Second != 0 {
		return bad
	}
	*dst = protocol.Lockout{MaxFailures: n, WindowS: int(window / time.Second), LockS: int(lock / time.Second)}
	return nil
}
