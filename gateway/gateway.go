// Package gateway wires the Lockergate gateway together: PostgreSQL (given or
// a private cluster), the embedded broker, the fleet manager, provisioning
// and the HTTP API. cmd/lockergate and the end-to-end tests run it.
package gateway

import (
	"cmp"
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/lockergate/lockergate/broker"
	"github.com/lockergate/lockergate/firmware"
	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/httpapi"
	"github.com/lockergate/lockergate/internal/pgcluster"
	"github.com/lockergate/lockergate/mqttbus"
	"github.com/lockergate/lockergate/pickup"
	"github.com/lockergate/lockergate/postgres"
	"github.com/lockergate/lockergate/protocol"
	"github.com/lockergate/lockergate/provisioning"
	"github.com/lockergate/lockergate/webhook"
)

// ReasonGatewayRestart is the disconnect reason of a locker session that a
// previous run of the gateway (embedded broker) left open: it ended
// without recording its sessions' ends, and the next start ends them.
const ReasonGatewayRestart = "gateway_restart"

// Options configure the gateway. cmd/lockergate fills them from flags.
type Options struct {
	// DataDir holds the private PostgreSQL cluster, keys and the admin token.
	DataDir string
	// DatabaseURL selects an existing PostgreSQL; empty starts a private
	// cluster under DataDir/pg from the machine's PostgreSQL binaries.
	DatabaseURL string
	// FastDB turns off durability of the private cluster (tests only).
	FastDB bool
	// MQTTAddr is the plain MQTT listener ("" disables it).
	MQTTAddr string
	// MQTTSAddr is the MQTT over TLS listener ("" disables it).
	MQTTSAddr string
	// TLSCert and TLSKey name a certificate for MQTTS; empty creates a
	// private CA and certificate under DataDir/tls.
	TLSCert, TLSKey string
	// HTTPAddr is the API listener.
	HTTPAddr string
	// MQTTListener, MQTTSListener and HTTPListener are sockets already
	// listening (systemd socket activation), served in place of MQTTAddr,
	// MQTTSAddr and HTTPAddr. The gateway owns them from New on and closes
	// them, also when New fails.
	MQTTListener, MQTTSListener, HTTPListener net.Listener
	// BrokerURL is the address handed to lockers at provisioning; default
	// derived from the listeners (or ExternalBroker).
	BrokerURL string
	// FirmwareKey is the path of the Ed25519 firmware signing seed; default DataDir/firmware.key.
	FirmwareKey string
	// PublicURL is the gateway's HTTP base URL as lockers reach it, used in
	// firmware download URLs (firmware); default http://<HTTPAddr>.
	PublicURL string
	// Config is what every locker is configured with. With no Version
	// (the flags), its zero fields are fleet.DefaultConfig's and the
	// version is kept in the database: bumped when a start brings a
	// different configuration (postgres.LockerConfig), so that every
	// locker applies it. A Version given is used as it is (tests).
	Config protocol.Config
	// WebhookAllowPrivate lets webhooks target loopback and private
	// addresses (tests, labs); off by default.
	WebhookAllowPrivate bool
	// WebhookBackoff is the first webhook retry delay (default 5s; tests shorten it).
	WebhookBackoff time.Duration
	// ExternalBroker runs the fleet against an existing broker cluster
	// (mqtt://host:port or mqtts://); "" uses the embedded broker. In that
	// mode the embedded listeners serve provisioning only and lockers are
	// told to connect to BrokerURL (default ExternalBroker).
	ExternalBroker string
	// ExternalUser and ExternalPassword are this gateway's identity on the
	// external broker (never a device's); with mosquitto it must hold the
	// dynamic-security admin role so lockers' identities can be managed.
	ExternalUser, ExternalPassword string
	// ExternalCAFile is a PEM file of the CA certificates an mqtts://
	// ExternalBroker's certificate is checked against; "" uses the
	// system's.
	ExternalCAFile string
	// InstanceID names this instance on the external broker (its client id).
	InstanceID string
	// DeviceAuth is how the external broker authenticates lockers:
	// DeviceAuthDynSec (default) or DeviceAuthHTTP (docs/deployment.md).
	DeviceAuth string
	// BrokerAPIURL and BrokerAPIKey ("key:secret"), with DeviceAuthHTTP,
	// let the gateway end a disabled or replaced locker's live session on
	// EMQX through its REST API; without them it is left to the operator.
	BrokerAPIURL, BrokerAPIKey string
	// AuthStaleWindow, with DeviceAuthHTTP, is how long after this instance
	// last heard a kick its auth hook still admits a locker on the secret
	// it last verified when the database cannot confirm it (0: the default,
	// DefaultAuthStaleWindow; negative: never; at most 24 h). Longer keeps
	// lockers online through a longer database outage; it is also how long
	// an instance cut off alone may admit a locker disabled elsewhere.
	AuthStaleWindow time.Duration
	// LatestHealthEvery bounds how often one locker's latest health is
	// rewritten (fleet.Options.LatestHealthEvery). 0: the fleet manager's
	// default (a second, or half the health interval if shorter) with the
	// embedded broker; with an external one every report is written
	// through, since each instance sees only some of a locker's reports.
	LatestHealthEvery time.Duration
	// CommandResend is how long a sent command may go unanswered by an
	// online locker before it is sent again (fleet.Options.CommandResend;
	// 0: 5 s).
	CommandResend time.Duration
	// StagingTTL is how long a pickup's staging unlock stays valid
	// (pickup.Options.StagingTTL; 0: 60 s).
	StagingTTL time.Duration
	// CensusInterval is how often the fleet-wide gauges are counted and
	// lockers behind on their credential set are found (republished to at
	// the next census if still behind) (fleet.Options.CensusInterval; 0: 15 s).
	CensusInterval time.Duration
	// RetentionDays keeps health and events this long (default 30).
	RetentionDays int
	// HistoryRetentionDays keeps presence changes, cleared alerts,
	// finished commands, settled webhook deliveries, claim uses and
	// Idempotency-Key answers this long (default 365; negative: forever).
	// Pickups, the audit log and rollouts are kept.
	HistoryRetentionDays int
	// MaxClockSkew is how far a locker's clock may be off at its birth
	// before a clock_skew alert (fleet.Options.MaxClockSkew; 0: 30 s;
	// negative: never judged).
	MaxClockSkew time.Duration
	Logger       *slog.Logger
}

// Device authentication on an external broker.
const (
	// DeviceAuthDynSec: the gateway manages a mosquitto dynamic security
	// client and role per locker.
	DeviceAuthDynSec = "dynsec"
	// DeviceAuthHTTP: the broker asks the gateway's auth hook
	// (/v1/broker-auth/...) at every CONNECT; nothing is kept on the broker.
	DeviceAuthHTTP = "http"
)

// externalAuthCacheTTL bounds how long an instance's auth hook admits a
// locker disabled through another instance whose kick it did not hear
// (DeviceAuthHTTP), should the kick watch (kicks.go) fail to notice.
const externalAuthCacheTTL = 10 * time.Second

// rekeyPublishWait bounds the wait for a re-provisioned locker's retained
// state to go out before its answer: a fifth of the provisioning call's
// 10 s, so that a broker that is down delays the answer, not withholds it.
const rekeyPublishWait = 2 * time.Second

// Gateway is one running gateway process.
type Gateway struct {
	opts    Options
	log     *slog.Logger
	cluster *pgcluster.Cluster
	db      *postgres.DB
	reg     *prometheus.Registry
	broker  *broker.Broker
	fleet   *fleet.Manager
	prov    *provisioning.Service

	pickups  *pickup.Service
	webhooks *webhook.Dispatcher

	external *mqttbus.Bus
	dynsec   *mqttbus.DynSec
	// identityCheck runs the broker identity checks, one at a time (one
	// asked for meanwhile runs after it); identitiesMissing is the last
	// count. running is set as Run starts and cleared by Close: the bus's
	// reconnects (one may come while New sets up dynsec) check identities
	// only meanwhile, on checkCtx, which Close cancels.
	identityCheck     rerun
	identitiesMissing atomic.Int64
	running           atomic.Bool
	checkCtx          context.Context
	stopChecks        context.CancelFunc
	kicks             *kickWatch
	emqx              *emqxKicker // nil unless BrokerAPIURL
	firmware          *firmware.Engine
	api               *httpapi.Server
	httpLn            net.Listener
	http              *http.Server

	adminToken     string
	adminTokenPath string

	closeOnce sync.Once
}

// New starts the database (and migrates it), loads or creates keys, and binds
// every listener, so that all start-up errors surface here. Call Run to serve
// and Close to release everything.
func New(ctx context.Context, o Options) (_ *Gateway, err error) {
	// The passed sockets are closed if New fails (a second Close, of one
	// the broker closed already, is harmless).
	defer func() {
		if err != nil {
			for _, ln := range []net.Listener{o.MQTTListener, o.MQTTSListener, o.HTTPListener} {
				if ln != nil {
					_ = ln.Close()
				}
			}
		}
	}()
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.DataDir == "" {
		o.DataDir = "lockergate-data"
	}
	if o.RetentionDays <= 0 {
		o.RetentionDays = 30
	}
	if o.HistoryRetentionDays == 0 {
		o.HistoryRetentionDays = 365
	}
	if err := checkDeviceAuth(&o); err != nil {
		return nil, err
	}
	if o.DataDir, err = filepath.Abs(o.DataDir); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(o.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("create data dir: %w", err)
	}
	g := &Gateway{opts: o, log: o.Logger, reg: prometheus.NewRegistry()}
	defer func() {
		if err != nil {
			g.Close()
		}
	}()
	g.reg.MustRegister(collectors.NewGoCollector(
		// The size new goroutines start with: each resting MQTT reader
		// is a new goroutine, so it sets an idle locker's stack.
		collectors.WithGoCollectorRuntimeMetrics(collectors.GoRuntimeMetricsRule{Matcher: startingStack}),
	), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))

	dsn := o.DatabaseURL
	if dsn == "" && os.Geteuid() == 0 {
		// The private cluster runs as the postgres user, which must be able
		// to pass through the data dir; the secrets in it stay 0600.
		if err := os.Chmod(o.DataDir, 0o711); err != nil {
			return nil, fmt.Errorf("make data dir traversable for the postgres user: %w", err)
		}
	}
	if dsn == "" {
		g.log.Info("no database URL: starting a private PostgreSQL cluster", "dir", filepath.Join(o.DataDir, "pg"))
		g.cluster, err = pgcluster.Start(ctx, pgcluster.Options{DataDir: filepath.Join(o.DataDir, "pg"), Logger: o.Logger, Fast: o.FastDB, Database: "lockergate"})
		if err != nil {
			return nil, fmt.Errorf("start private PostgreSQL: %w", err)
		}
		dsn = g.cluster.DSN("lockergate")
	}
	if g.db, err = postgres.Open(ctx, postgres.Options{DSN: dsn, Logger: o.Logger,
		DoorEventsByClock: o.ExternalBroker != "", HealthAsyncCommit: o.ExternalBroker == ""}); err != nil {
		return nil, fmt.Errorf("open database: %w", err)
	}
	if err := g.maintainPartitions(ctx); err != nil {
		return nil, err
	}

	master, err := masterKey(o.DataDir)
	if err != nil {
		return nil, fmt.Errorf("master key: %w", err)
	}
	fwPath := o.FirmwareKey
	if fwPath == "" {
		fwPath = filepath.Join(o.DataDir, "firmware.key")
	}
	fwKey, err := firmwareKey(fwPath)
	if err != nil {
		return nil, fmt.Errorf("firmware key: %w", err)
	}
	if err := checkKeys(ctx, g.db, master, filepath.Join(o.DataDir, "master.key"), fwKey, fwPath); err != nil {
		return nil, err
	}
	if err := g.ensureAdminToken(ctx); err != nil {
		return nil, err
	}
	if o.ExternalBroker == "" {
		// The embedded broker has not started: no locker is connected to
		// it, and one the database shows online was left so by a previous
		// process that ended without recording its sessions' ends.
		n, err := g.db.EndOpenSessions(ctx, ReasonGatewayRestart, time.Now())
		if err != nil {
			return nil, fmt.Errorf("end the sessions a previous run left open: %w", err)
		}
		if n > 0 {
			g.log.Warn("lockers shown online by a previous run that did not record their sessions' ends: marked offline",
				"lockers", n, "reason", ReasonGatewayRestart)
		}
		// Nor can a request be running yet: an Idempotency-Key claimed and
		// not finished was claimed by a previous process that died
		// mid-request. Its retry runs now (a command's or pickup's id
		// derives from the key, so a run again finds what the first made).
		if n, err := g.db.ReleaseAbandonedIdempotent(ctx); err != nil {
			return nil, fmt.Errorf("release the Idempotency-Key claims a previous run left: %w", err)
		} else if n > 0 {
			g.log.Warn("Idempotency-Key claims left unfinished by a previous run released: their retries run at once",
				"claims", n)
		}
	}

	obs := &observer{}
	bo := broker.Options{
		TCPAddr: o.MQTTAddr, TLSAddr: o.MQTTSAddr, TCPListener: o.MQTTListener, TLSListener: o.MQTTSListener,
		Observer: obs, Logger: o.Logger, Registerer: g.reg,
		// A locker's event, command result, creds ack and firmware status
		// are acknowledged once stored: the fleet calls Message.Ack.
		AckWhenStored: true,
	}
	if o.MQTTSAddr != "" || o.MQTTSListener != nil {
		if o.TLSCert != "" {
			bo.TLSConfig, err = loadTLS(o.TLSCert, o.TLSKey)
		} else {
			bo.TLSConfig, err = selfSignedTLS(filepath.Join(o.DataDir, "tls"), certHosts(o), o.Logger)
		}
		if err != nil {
			return nil, fmt.Errorf("TLS: %w", err)
		}
	}
	auth := &authenticator{}
	bo.Auth = auth
	g.kicks = &kickWatch{now: time.Now, trust: cmp.Or(o.AuthStaleWindow, DefaultAuthStaleWindow)}
	bo.KicksHeard = g.kicks.trusted
	g.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "lockergate_kicks_last_heard_timestamp_seconds",
		Help: "When this instance last heard a kick or heartbeat from PostgreSQL (unix seconds; 0: never). Older than 10 s: kicks from other instances may be missed, and past --auth-stale-window (2 min by default) the auth hook stops admitting secrets it cannot confirm.",
	}, g.kicks.lastHeard))
	bo.Provisioner = auth
	bo.ProvisionOnly = o.ExternalBroker != ""
	if o.DeviceAuth == DeviceAuthHTTP {
		// Several instances answer the hook. Kicks reach them all
		// (kicks.go), and an instance that stops hearing them forgets
		// its cache (every ~12 s while its listener is restarted); this
		// short TTL is defence in depth on top of that.
		bo.AuthCacheTTL = externalAuthCacheTTL
	}
	if g.broker, err = broker.New(bo); err != nil {
		return nil, fmt.Errorf("start broker: %w", err)
	}
	g.kicks.cache = g.broker
	brokerURL := o.BrokerURL
	if brokerURL == "" {
		brokerURL = g.defaultBrokerURL()
	}
	var bus fleet.Bus = g.broker
	var onIssued func(ctx context.Context, id, secret string) error
	// kicker ends a disabled locker's live session wherever it is, and
	// makes the embedded broker forget its cached secret; onReplace does
	// the same for a re-provisioned one, whose identity stays enabled.
	var kicker httpapi.Kicker = g.broker
	onReplace := g.broker.Kick
	if o.ExternalBroker != "" {
		g.checkCtx, g.stopChecks = context.WithCancel(context.Background())
		resubscribed := func() {
			if g.running.Load() {
				g.checkBrokerIdentities(g.checkCtx)
			}
		}
		if g.external, g.dynsec, err = dialExternal(ctx, o, resubscribed); err != nil {
			return nil, err
		}
		bus = g.external
		if g.dynsec != nil {
			onIssued = g.putDynSecDevice
			// PutDevice (onIssued) sets the new secret, which ends the
			// old session on mosquitto; disabling would lock out the new.
			kicker = &dynsecKicker{d: g.dynsec, log: g.log, local: g.broker}
		}
		if o.BrokerAPIURL != "" {
			ek, err := newEMQXKicker(o, g.broker)
			if err != nil {
				return nil, err
			}
			ek.disabled = g.lockerDisabled
			kicker, g.emqx = ek, ek
			onReplace = func(id string) {
				if ek.Replace(id) {
					g.sessionReplaced(id)
				}
			}
		}
		if brokerURL = o.BrokerURL; brokerURL == "" {
			brokerURL = o.ExternalBroker
		}
		g.log.Info("fleet runs on an external broker; the embedded listeners serve provisioning only",
			"broker", o.ExternalBroker, "instance", o.InstanceID, "devices_told", brokerURL, "device_auth", o.DeviceAuth)
	}
	g.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "lockergate_broker_identities_missing",
		Help: "With mosquitto's dynamic security (else 0): lockers on record whose identity the plugin does not hold (checked at start, after each reconnect to the broker, hourly). They are refused until provisioned again. Above 0: see the gateway's ERROR line and docs/deployment.md.",
	}, func() float64 { return float64(g.identitiesMissing.Load()) }))
	if g.dynsec != nil && g.emqx == nil {
		// PutDevice (onIssued) set the new secret, which ended the old
		// board's session on mosquitto, before the replacement got here.
		onReplace = func(id string) {
			g.broker.Kick(id)
			g.sessionReplaced(id)
		}
	}
	g.prov, err = provisioning.New(provisioning.Options{
		Store: g.db, MasterKey: master, FwPubkey: fwKey.Public().(ed25519.PublicKey), BrokerURL: brokerURL,
		OnReplace: onReplace, OnIssued: onIssued, Logger: o.Logger.With("component", "provisioning"),
		OnRekey: func(ctx context.Context, id string) error {
			// The orders in a re-provisioned locker keep their codes.
			if err := g.pickups.Rekey(ctx, id); err != nil {
				return err
			}
			// The re-keyed set goes out, and the old board's firmware jobs
			// ended in the registration (the firmware store's trigger): its
			// fw/job goes empty on the broker now, before the new board,
			// which connects with this answer, can subscribe and run a job
			// meant for the board it replaced. Not a reason to withhold the
			// answer: a broker that does not take it now gets it at the new
			// board's first connect (an external broker may be slow or down
			// while provisioning, on the embedded listener, is not), so the
			// wait for it is short.
			pctx, cancel := context.WithTimeout(ctx, rekeyPublishWait)
			defer cancel()
			if err := g.fleet.PublishRetained(pctx, id); err != nil {
				g.log.Warn("replaced locker's retained state not republished before its answer; the new board may see the old set and fw/job until it connects",
					"locker", id, "err", err)
			}
			return nil
		},
	})
	if err != nil {
		return nil, err
	}
	auth.prov = g.prov
	// firmware: the rollout engine follows fw/status and births through the
	// fleet manager and republishes fw/job through it (bound once it exists).
	g.firmware, err = firmware.New(firmware.Options{Store: g.db, Key: fwKey, URLKey: firmware.DeriveURLKey(master),
		Fleet:   firmware.FleetFunc(func(ctx context.Context, id string) error { return g.fleet.PublishRetained(ctx, id) }),
		BaseURL: g.publicURL, Dir: filepath.Join(o.DataDir, "firmware"),
		Registerer: g.reg, Logger: o.Logger.With("component", "firmware")})
	if err != nil {
		return nil, err
	}
	// webhooks, the fleet and pickups
	g.webhooks, err = webhook.New(webhook.Options{Store: g.db, MasterKey: master, Logger: o.Logger.With("component", "webhook"),
		Registerer: g.reg, BackoffBase: o.WebhookBackoff, AllowPrivate: o.WebhookAllowPrivate})
	if err != nil {
		return nil, err
	}
	configChanged := false
	if o.Config.Version == 0 {
		if o.Config, configChanged, err = lockerConfig(ctx, g.db, o.Config); err != nil {
			return nil, err
		}
		o.Logger.Info("locker configuration", "version", o.Config.Version, "changed", configChanged, "health_interval_s", o.Config.HealthIntervalS,
			"door_ajar_s", o.Config.DoorAjarS, "lockout_max_failures", o.Config.Lockout.MaxFailures,
			"lockout_window_s", o.Config.Lockout.WindowS, "lockout_lock_s", o.Config.Lockout.LockS)
	}
	pickups := &pickupSink{}
	g.fleet, err = fleet.New(fleet.Options{Store: g.db, Bus: bus, Logger: o.Logger.With("component", "fleet"),
		Registerer: g.reg, Config: o.Config, RepublishAtStart: g.external != nil, Events: pickups, Firmware: g.firmware, PresenceFromWill: g.external != nil,
		LatestHealthEvery: latestHealthEvery(o.LatestHealthEvery, g.external != nil), SharedReports: g.external != nil, SharedPublish: g.external != nil,
		CommandResend: o.CommandResend, CensusInterval: o.CensusInterval, MaxClockSkew: o.MaxClockSkew,
		AlertRaised: g.webhooks.Wake, CommandFinished: pickups.CommandFinished})
	if err != nil {
		return nil, err
	}
	g.pickups, err = pickup.New(pickup.Options{Store: g.db, Fleet: g.fleet, MasterKey: master,
		Logger: o.Logger.With("component", "pickup"), Registerer: g.reg, Wake: g.webhooks.Wake,
		SilentAfter: pickupSilence(g.fleet.SilentAfter()), StagingTTL: o.StagingTTL})
	if err != nil {
		return nil, err
	}
	pickups.s = g.pickups
	g.webhooks.SetExpand(g.pickups.ExpandEvent)
	obs.m = g.fleet
	if err := g.fleet.Subscribe(); err != nil {
		return nil, err
	}
	g.api = httpapi.New(httpapi.Options{Store: g.db, Fleet: g.fleet, Provisioning: g.prov, Kicker: kicker,
		Pickups: g.pickups, Webhooks: g.webhooks, Firmware: g.firmware, BrokerAuth: g.broker,
		Gatherer: g.reg, Ready: g.ready, Unavailable: postgres.Unavailable, MasterKey: master, Logger: o.Logger.With("component", "api")})
	if g.httpLn = o.HTTPListener; g.httpLn == nil {
		if g.httpLn, err = net.Listen("tcp", o.HTTPAddr); err != nil {
			return nil, fmt.Errorf("listen on HTTP address %s: %w (use --http-addr to pick another)", o.HTTPAddr, err)
		}
	}
	// A connection idle between requests is closed after IdleTimeout (with
	// none, Go keeps it for ever); a request's body has the API's
	// BodyReadTimeout to arrive and its answer the API's ResponseTimeout to
	// be written. No server-wide ReadTimeout or WriteTimeout: a passing
	// read deadline ends a waiting handler's context (wait_s), and
	// firmware uploads and downloads take as long as the image needs.
	g.http = &http.Server{Handler: g.api, ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 2 * time.Minute,
		ErrorLog: slog.NewLogLogger(o.Logger.Handler(), slog.LevelWarn)}
	return g, nil
}

// Run serves until ctx ends, then shuts down in order: HTTP, broker, fleet
// (drains queued writes). It returns the first serving error.
func (g *Gateway) Run(ctx context.Context) error {
	if err := g.broker.Start(); err != nil {
		return fmt.Errorf("serve MQTT: %w", err)
	}
	fctx, stopFleet := context.WithCancel(context.WithoutCancel(ctx))
	fleetDone := make(chan error, 1)
	go func() { fleetDone <- g.fleet.Run(fctx) }()
	httpDone := make(chan error, 1)
	go func() { httpDone <- g.http.Serve(g.httpLn) }()
	bctx, stopBackground := context.WithCancel(ctx)
	var background sync.WaitGroup
	// A locker disabled or replaced through any instance: every instance
	// forgets the secret its broker (and auth hook) cached for it.
	for _, run := range []func(context.Context) error{g.pickups.Run, g.webhooks.Run, g.firmware.Run, g.runKicks} {
		background.Add(1)
		go func() {
			defer background.Done()
			if err := run(bctx); err != nil {
				g.log.Error("background worker stopped", "err", err)
			}
		}()
	}
	g.running.Store(true)
	// The start's identity check (behind mosquitto) pages the broker's
	// clients: beside the workers, not ahead of the loop below.
	background.Go(func() { g.checkBrokerIdentities(bctx) })
	maint := time.NewTicker(time.Hour)
	defer maint.Stop()
	g.log.Info("gateway running", "http", g.HTTPAddr(), "mqtt", addrString(g.broker.TCPAddr()), "mqtts", addrString(g.broker.TLSAddr()))

	var runErr error
loop:
	for {
		select {
		case <-ctx.Done():
			break loop
		case err := <-httpDone:
			runErr = fmt.Errorf("serve HTTP: %w", err)
			break loop
		case <-maint.C:
			if err := g.maintainPartitions(ctx); err != nil {
				g.log.Error("partition maintenance", "err", err)
			}
			if err := g.pruneHistory(ctx); err != nil {
				g.log.Error("history retention; the next hour's pass goes on from where this one stopped", "err", err)
			}
			g.wipeReplaySecrets(ctx)
			g.checkBrokerIdentities(ctx)
		}
	}
	g.log.Info("shutting down: draining HTTP, closing broker, flushing queued writes")
	stopBackground()
	background.Wait()
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	g.fleet.EndWaits() // wait_s requests answer what they know instead of holding the drain
	if err := g.http.Shutdown(sctx); err != nil && runErr == nil {
		runErr = fmt.Errorf("shut down HTTP: %w", err)
	}
	start := time.Now()
	if err := g.broker.Close(); err != nil && runErr == nil {
		runErr = fmt.Errorf("close broker: %w", err)
	}
	if g.external != nil {
		g.external.Close()
	}
	g.log.Info("broker closed; writing the session ends and queued messages", "took", time.Since(start).Round(time.Millisecond))
	start = time.Now()
	stopFleet()
	if err := <-fleetDone; err != nil && runErr == nil {
		runErr = err
	}
	// Writes the database did not take in time are logged (lost) above.
	g.log.Info("queued writes done", "took", time.Since(start).Round(time.Millisecond))
	return runErr
}

// Close releases the database and stops the private cluster. Call after Run returns.
func (g *Gateway) Close() error {
	var err error
	g.closeOnce.Do(func() {
		if g.httpLn != nil {
			g.httpLn.Close()
		}
		if g.broker != nil {
			g.broker.Close()
		}
		if g.emqx != nil {
			g.emqx.close()
		}
		if g.external != nil {
			g.external.Close() // Run closed it already, unless New failed
		}
		g.running.Store(false)
		if g.stopChecks != nil {
			g.stopChecks()
			g.identityCheck.Wait() // a check under way ends before the pool does
		}
		if g.db != nil {
			g.db.Close()
		}
		if g.cluster != nil {
			err = g.cluster.Stop()
		}
	})
	return err
}

// HTTPAddr is the bound API address.
func (g *Gateway) HTTPAddr() string { return g.httpLn.Addr().String() }

// publicURL is the base of firmware download URLs (firmware).
func (g *Gateway) publicURL() string {
	if g.opts.PublicURL != "" {
		return strings.TrimRight(g.opts.PublicURL, "/")
	}
	return "http://" + hostPort(g.httpLn.Addr())
}

// Firmware is the firmware rollout engine.
func (g *Gateway) Firmware() *firmware.Engine { return g.firmware }

// MQTTAddr is the bound plain MQTT address ("" when disabled).
func (g *Gateway) MQTTAddr() string { return addrString(g.broker.TCPAddr()) }

// MQTTSAddr is the bound MQTT over TLS address ("" when disabled).
func (g *Gateway) MQTTSAddr() string { return addrString(g.broker.TLSAddr()) }

// AdminToken is the admin token created at first start ("" on later starts).
func (g *Gateway) AdminToken() string { return g.adminToken }

// AdminTokenPath is where the first admin token was written.
func (g *Gateway) AdminTokenPath() string { return g.adminTokenPath }

// DB is the gateway's store (for tests and tools).
func (g *Gateway) DB() *postgres.DB { return g.db }

// Broker is the embedded broker.
func (g *Gateway) Broker() *broker.Broker { return g.broker }

// Fleet is the fleet manager.
func (g *Gateway) Fleet() *fleet.Manager { return g.fleet }

// Provisioning is the provisioning service.
func (g *Gateway) Provisioning() *provisioning.Service { return g.prov }

// Registry is the Prometheus registry behind /metrics.
func (g *Gateway) Registry() *prometheus.Registry { return g.reg }

func (g *Gateway) ready(ctx context.Context) error {
	if err := g.db.Ping(ctx); err != nil {
		return fmt.Errorf("database: %w", err)
	}
	if g.broker.TCPAddr() == nil && g.broker.TLSAddr() == nil {
		return errors.New("broker: no listener")
	}
	if g.external != nil {
		if err := g.external.Ready(); err != nil {
			return fmt.Errorf("external broker: %w", err)
		}
	}
	return nil
}

// ensureAdminToken creates the first admin token on an empty database and
// writes it to DataDir/admin.token (0600).
func (g *Gateway) ensureAdminToken(ctx context.Context) error {
	g.adminTokenPath = filepath.Join(g.opts.DataDir, "admin.token")
	n, err := g.db.CountTokens(ctx)
	if err != nil {
		return fmt.Errorf("count tokens: %w", err)
	}
	if n > 0 {
		return nil
	}
	_, secret, err := httpapi.CreateToken(ctx, g.db, fleet.Token{Role: fleet.RoleAdmin, Name: "admin"}, "system")
	if err != nil {
		return fmt.Errorf("create admin token: %w", err)
	}
	// The token alone, no newline: a client that puts the file's bytes
	// into its Authorization header as they are must not send one.
	if err := writeFileAtomic(g.adminTokenPath, []byte(secret), 0o600); err != nil {
		return fmt.Errorf("write admin token: %w", err)
	}
	g.adminToken = secret
	g.log.Info("created the first admin token", "path", g.adminTokenPath)
	return nil
}

func (g *Gateway) maintainPartitions(ctx context.Context) error {
	now := time.Now()
	if err := g.db.EnsurePartitions(ctx, now.AddDate(0, 0, -1), 4); err != nil {
		return fmt.Errorf("create partitions: %w", err)
	}
	dropped, err := g.db.DropPartitionsBefore(ctx, now.AddDate(0, 0, -g.opts.RetentionDays))
	if err != nil {
		return fmt.Errorf("retention: %w", err)
	}
	if len(dropped) > 0 {
		g.log.Info("retention dropped partitions", "partitions", dropped)
	}
	return nil
}

// pickupSilence is how long a locker may go unheard before new pickups go
// to lockers heard from since, while one has room: as long as it takes to
// show stale (fleet.Manager.SilentAfter), but never under two minutes (a
// short health interval, the tests' 1 s, must not make a busy moment look
// like silence).
func pickupSilence(staleAfter time.Duration) time.Duration {
	return max(staleAfter, 2*time.Minute)
}

// pruneBudget bounds one hourly pass of history retention: a backlog (the
// first pass after an upgrade may have years to delete) is taken on hour by
// hour.
const pruneBudget = 2 * time.Minute

// pruneHistory deletes history past HistoryRetentionDays (hourly, not at
// start), unless another instance is at it.
func (g *Gateway) pruneHistory(ctx context.Context) error {
	if g.opts.HistoryRetentionDays < 0 {
		return nil
	}
	start := time.Now()
	n, busy, err := g.db.PruneHistory(ctx, start.AddDate(0, 0, -g.opts.HistoryRetentionDays), pruneBudget)
	if busy {
		g.log.Debug("history retention: another instance is pruning")
		return nil
	}
	var total int64
	for _, v := range n {
		total += v
	}
	if total > 0 {
		args := []any{"days", g.opts.HistoryRetentionDays, "took", time.Since(start).Round(time.Millisecond)}
		for _, k := range slices.Sorted(maps.Keys(n)) {
			args = append(args, k, n[k])
		}
		g.log.Info("history retention pruned rows", args...)
	}
	return err
}

// sessionReplacedWait bounds sessionReplaced, which a provisioning answer
// waits for.
const sessionReplacedWait = 5 * time.Second

// sessionReplaced records the end of a replaced board's session that the
// external broker ended (dynsec's new secret, EMQX's kick) and reports no
// end or will for: before the answer lets the new board connect and send
// its birth. A database that does not answer within sessionReplacedWait
// leaves the old session on record until the new board's birth.
func (g *Gateway) sessionReplaced(id string) {
	ctx, cancel := context.WithTimeout(context.Background(), sessionReplacedWait)
	defer cancel()
	g.fleet.SessionKicked(ctx, id)
}

// wipeReplaySecrets deletes the sealed secrets of Idempotency-Key answers
// past fleet.ReplaySecretsFor (hourly; replays stop reading them at that
// age anyway).
func (g *Gateway) wipeReplaySecrets(ctx context.Context) {
	n, err := g.db.WipeReplaySecrets(ctx)
	if err != nil {
		g.log.Error("wiping the secrets of old Idempotency-Key answers; tried again in an hour (replays do not show them meanwhile)", "err", err)
		return
	}
	if n > 0 {
		g.log.Info("wiped the secrets of old Idempotency-Key answers", "answers", n)
	}
}

func (g *Gateway) defaultBrokerURL() string {
	if a := g.broker.TLSAddr(); a != nil {
		return "mqtts://" + hostPort(a)
	}
	if a := g.broker.TCPAddr(); a != nil {
		return "mqtt://" + hostPort(a)
	}
	return ""
}

// certHosts are the names a generated server certificate is valid for:
// loopback, this machine's host name, the MQTTS listen address when it names
// one, and the host lockers are told to connect to. (Only used when the
// certificate is first created.)
func certHosts(o Options) []string {
	hosts := []string{"localhost", "127.0.0.1", "::1"}
	add := func(h string) {
		if ip := net.ParseIP(h); h != "" && (ip == nil || !ip.IsUnspecified()) && !slices.Contains(hosts, h) {
			hosts = append(hosts, h)
		}
	}
	if h, err := os.Hostname(); err == nil {
		add(h)
	}
	if h, _, err := net.SplitHostPort(o.MQTTSAddr); err == nil {
		add(h)
	}
	if o.MQTTSListener != nil {
		if h, _, err := net.SplitHostPort(o.MQTTSListener.Addr().String()); err == nil {
			add(h)
		}
	}
	if u, err := url.Parse(o.BrokerURL); err == nil {
		add(u.Hostname())
	}
	return hosts
}

func hostPort(a net.Addr) string {
	host, port, err := net.SplitHostPort(a.String())
	if err != nil {
		return a.String()
	}
	if ip := net.ParseIP(host); ip == nil || ip.IsUnspecified() {
		host = "localhost"
	}
	return net.JoinHostPort(host, port)
}

func addrString(a net.Addr) string {
	if a == nil {
		return ""
	}
	return a.String()
}

// pickupSink forwards new events to the pickup workflow (created after the fleet).
type pickupSink struct{ s *pickup.Service }

func (p *pickupSink) Wants(e *protocol.Event) bool { return p.s.Wants(e) }

func (p *pickupSink) DeviceEvents(ctx context.Context, events []fleet.EventRecord) int {
	return p.s.DeviceEvents(ctx, events)
}

func (p *pickupSink) CommandFinished(ctx context.Context, c *fleet.Command) {
	p.s.StagingUnlockEnded(ctx, c)
}

// putDynSecDevice hands an issued identity to mosquitto. PutDevice leaves
// the client enabled; a re-provisioned locker that an operator disabled
// stays disabled there too, as on the embedded broker.
func (g *Gateway) putDynSecDevice(ctx context.Context, id, secret string) error {
	if err := g.dynsec.PutDevice(ctx, id, secret); err != nil {
		return err
	}
	if disabled, err := g.lockerDisabled(ctx, id); err != nil || !disabled {
		return err
	}
	return g.dynsec.DisableDevice(ctx, id)
}

// lockerDisabled reports whether an operator disabled locker id (one row,
// not the whole locker with its compartments).
func (g *Gateway) lockerDisabled(ctx context.Context, id string) (bool, error) {
	a, err := g.db.DeviceAuth(ctx, id)
	if err != nil {
		return false, err
	}
	return a.Disabled, nil
}

// observer forwards broker session events to the fleet manager (created after the broker).
type observer struct{ m *fleet.Manager }

func (o *observer) DeviceConnected(id, remote string) { o.m.DeviceConnected(id, remote) }
func (o *observer) DeviceDisconnected(id, reason string) {
	o.m.DeviceDisconnected(id, reason)
}
func (o *observer) DeviceSubscribedAfterBirth(id string) { o.m.DeviceSubscribedAfterBirth(id) }

var _ broker.LateSubscribeObserver = (*observer)(nil)

// startingStack picks the runtime's starting goroutine stack size
// (go_gc_stack_starting_size_bytes) on top of the Go collector's default set.
var startingStack = regexp.MustCompile(`^/gc/stack/starting-size:bytes$`)

// authenticator adapts provisioning to the broker's interfaces, mapping errors.
type authenticator struct {
	prov *provisioning.Service
}

func (a *authenticator) AuthDevice(ctx context.Context, id string, password []byte) error {
	err := a.prov.AuthDevice(ctx, id, password)
	switch {
	case errors.Is(err, provisioning.ErrUnknownDevice):
		return broker.ErrUnknownDevice
	case errors.Is(err, provisioning.ErrBadSecret):
		return broker.ErrBadSecret
	case errors.Is(err, provisioning.ErrDisabled):
		return broker.ErrDisabled
	}
	return err
}

func (a *authenticator) AuthClaim(ctx context.Context, token, serial string) (bool, error) {
	usable, err := a.prov.AuthClaim(ctx, token, serial)
	if errors.Is(err, provisioning.ErrUnknownClaim) {
		return false, broker.ErrUnknownClaim
	}
	return usable, err
}

func (a *authenticator) Provision(ctx context.Context, token, serial string, payload []byte) (protocol.ProvisionResponse, error) {
	return a.prov.Provision(ctx, token, serial, payload)
}

// AnswerDelivered implements broker.AnswerRecorder.
func (a *authenticator) AnswerDelivered(ctx context.Context, deviceID string) error {
	return a.prov.AnswerDelivered(ctx, deviceID)
}

// latestHealthEvery is fleet.Options.LatestHealthEvery for the option set
// and the broker: instances sharing an external broker each see only some
// of a locker's reports, so unless told otherwise they write every report's
// latest health through (a held run would count the others' reports as
// sequence gaps).
func latestHealthEvery(set time.Duration, external bool) time.Duration {
	if set == 0 && external {
		return -1
	}
	return set
}

// lockerConfig completes cfg (no version: from the flags) with
// fleet.DefaultConfig's values for its zero fields, and versions it in the
// database (postgres.LockerConfig); changed: this start bumped the version.
func lockerConfig(ctx context.Context, db *postgres.DB, cfg protocol.Config) (_ protocol.Config, changed bool, err error) {
	def := fleet.DefaultConfig
	cfg.HealthIntervalS = cmp.Or(cfg.HealthIntervalS, def.HealthIntervalS)
	cfg.DoorAjarS = cmp.Or(cfg.DoorAjarS, def.DoorAjarS)
	if cfg.Lockout == (protocol.Lockout{}) {
		cfg.Lockout = def.Lockout
	}
	if err := cfg.Validate(); err != nil {
		return cfg, false, fmt.Errorf("locker configuration: %w", err)
	}
	v, changed, err := db.LockerConfig(ctx, cfg, def)
	if err != nil {
		return cfg, false, fmt.Errorf("locker configuration: %w", err)
	}
	cfg.Version = v
	return cfg, changed, nil
}
