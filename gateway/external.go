package gateway

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"time"

	"github.com/lockergate/lockergate/mqttbus"
)

// brokerTLS is the TLS configuration for an mqtts:// external broker: nil
// (the system's CAs) unless ExternalCAFile names the CAs to trust.
func brokerTLS(o Options) (*tls.Config, error) {
	if o.ExternalCAFile == "" {
		return nil, nil
	}
	u, err := url.Parse(o.ExternalBroker)
	if err != nil || (u.Scheme != "mqtts" && u.Scheme != "ssl" && u.Scheme != "tls") {
		return nil, fmt.Errorf("--broker-ca-file is for an mqtts:// --broker-url, not %q", o.ExternalBroker)
	}
	b, err := os.ReadFile(o.ExternalCAFile)
	if err != nil {
		return nil, fmt.Errorf("--broker-ca-file: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(b) {
		return nil, fmt.Errorf("--broker-ca-file %s: no PEM certificate in it", o.ExternalCAFile)
	}
	// ServerName as the URL says: a dial through a proxy (all_proxy)
	// does not fill it in.
	return &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12, ServerName: u.Hostname()}, nil
}

// checkDeviceAuth defaults and checks o.DeviceAuth and the options that
// go with it.
func checkDeviceAuth(o *Options) error {
	switch {
	case o.AuthStaleWindow > maxAuthStaleWindow:
		return fmt.Errorf("--auth-stale-window %s: at most %s (it is also how long an instance cut off from the database may admit a disabled locker)",
			o.AuthStaleWindow, maxAuthStaleWindow)
	case o.AuthStaleWindow != 0 && o.DeviceAuth != DeviceAuthHTTP:
		return fmt.Errorf("--auth-stale-window is for --device-auth http: the embedded broker and mosquitto answer \"server unavailable\" instead")
	}
	if o.ExternalBroker == "" {
		if o.DeviceAuth != "" || o.BrokerAPIURL != "" {
			return fmt.Errorf("--device-auth and --broker-api-url need --broker-url: the embedded broker checks lockers itself")
		}
		return nil
	}
	if o.DeviceAuth == "" {
		o.DeviceAuth = DeviceAuthDynSec
	}
	switch {
	case o.DeviceAuth != DeviceAuthDynSec && o.DeviceAuth != DeviceAuthHTTP:
		return fmt.Errorf("--device-auth %q: want %s (mosquitto dynamic security) or %s (the broker calls /v1/broker-auth)",
			o.DeviceAuth, DeviceAuthDynSec, DeviceAuthHTTP)
	case o.BrokerAPIURL != "" && o.DeviceAuth != DeviceAuthHTTP:
		return fmt.Errorf("--broker-api-url is for --device-auth http (EMQX); with %s the gateway ends sessions itself", o.DeviceAuth)
	case o.DeviceAuth == DeviceAuthHTTP && o.InstanceID != "" && o.InstanceID == o.ExternalUser:
		// The hook takes client id == username for a locker identity.
		return fmt.Errorf("--instance-id %q equals --broker-user: with --device-auth http they must differ, "+
			"or the auth hook takes the gateway for a locker", o.InstanceID)
	case o.BrokerAPIURL != "":
		_, _, _, err := parseBrokerAPI(*o) // before anything starts
		return err
	}
	return nil
}

// dialExternal connects the fleet to an external broker cluster and
// prepares device identity management (mosquitto dynamic security).
func dialExternal(ctx context.Context, o Options, resubscribed func()) (*mqttbus.Bus, *mqttbus.DynSec, error) {
	id := o.InstanceID
	if id == "" {
		host, _ := os.Hostname()
		var b [4]byte
		rand.Read(b[:])
		id = "lockergate-" + host + "-" + hex.EncodeToString(b[:])
	}
	// A named instance keeps its session (and what it had not acknowledged)
	// on the broker across crashes; a random id would never come back for it.
	tlsConf, err := brokerTLS(o)
	if err != nil {
		return nil, nil, err
	}
	bus, err := mqttbus.Dial(ctx, mqttbus.Options{URL: o.ExternalBroker, ClientID: id, Username: o.ExternalUser,
		Password: o.ExternalPassword, TLS: tlsConf, Persistent: o.InstanceID != "", Resubscribed: resubscribed,
		Logger: o.Logger.With("component", "external-broker")})
	if err != nil {
		if unknown := (x509.UnknownAuthorityError{}); errors.As(err, &unknown) && o.ExternalCAFile == "" {
			err = fmt.Errorf("%w (a broker certificate from a private CA: give the CA with --broker-ca-file)", err)
		}
		return nil, nil, err
	}
	if o.DeviceAuth == DeviceAuthHTTP {
		return bus, nil, nil // the broker asks /v1/broker-auth
	}
	ds, err := mqttbus.NewDynSec(bus)
	if err == nil {
		err = ds.SetupGateway(ctx, o.ExternalUser)
	}
	if err != nil {
		bus.Close()
		return nil, nil, fmt.Errorf("set up device identities on the external broker (mosquitto dynamic security): %w", err)
	}
	return bus, ds, nil
}

// dynsecKicker disables and re-enables lockers on the external broker.
type dynsecKicker struct {
	d   *mqttbus.DynSec
	log *slog.Logger
	// local is the embedded broker: its Kick forgets the secret its auth
	// hook (/v1/broker-auth) may have cached.
	local interface{ Kick(id string) }
}

func (k *dynsecKicker) Kick(id string) {
	k.local.Kick(id)
	if err := k.d.DisableDevice(context.Background(), id); err != nil {
		k.log.Error("disable locker on the external broker", "locker", id, "err", err)
	}
}

func (k *dynsecKicker) Enable(id string) {
	if err := k.d.EnableDevice(context.Background(), id); err != nil {
		k.log.Error("enable locker on the external broker", "locker", id, "err", err)
	}
}

// identitySettle is how long after its registration a locker's identity
// must be on the broker (provisioning puts it there within the call's
// 10 s bound).
const identitySettle = time.Minute

// checkBrokerIdentities compares the lockers on record with the device
// identities mosquitto's dynamic security holds (at start, after each
// reconnect to the broker, hourly): a locker whose identity is missing
// cannot connect, and nothing else would say so. The usual cause is a
// dynsec file mosquitto could not write: it applies changes in memory,
// logs the failed save and answers them done, and loses them at its next
// restart. Lockers provisioned while the gateway ran its embedded broker
// have none either. The count is the gauge
// lockergate_broker_identities_missing.
func (g *Gateway) checkBrokerIdentities(ctx context.Context) {
	if g.dynsec == nil || g.db == nil {
		return
	}
	// A check under way runs once more when it ends: it may have asked a
	// broker that went away meanwhile (a flapping link).
	g.identityCheck.Do(ctx, g.checkIdentitiesOnce)
}

// checkIdentitiesOnce is one checkBrokerIdentities.
func (g *Gateway) checkIdentitiesOnce(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	failed := func(err error) {
		if ctx.Err() == nil || errors.Is(ctx.Err(), context.DeadlineExceeded) { // not a stop
			g.log.Warn("could not compare lockers with the broker's identities; tried again after the next reconnect or in an hour "+
				"(lockergate_broker_identities_missing keeps its last count)", "err", err)
		}
	}
	held, err := g.dynsec.Clients(ctx)
	if err != nil {
		failed(err)
		return
	}
	// Read after the broker's clients, and only lockers registered a
	// minute before: a registration commits before its identity is put
	// on the broker (provisioning's OnIssued), and one under way is not
	// missing.
	ids, err := g.db.LockerIDsOlderThan(ctx, identitySettle)
	if err != nil {
		failed(err)
		return
	}
	has := make(map[string]bool, len(held))
	for _, c := range held {
		has[c] = true
	}
	var missing []string
	for _, id := range ids {
		if !has[id] {
			missing = append(missing, id)
		}
	}
	g.identitiesMissing.Store(int64(len(missing)))
	if len(missing) == 0 {
		g.log.Debug("every locker has its identity on the broker", "lockers", len(ids))
		return
	}
	g.log.Error("lockers without an identity on the external broker: they are refused there until provisioned again "+
		"(did mosquitto lose its dynamic security changes? its dynsec file must be writable by the broker: docs/deployment.md)",
		"missing", len(missing), "lockers", len(ids), "first", missing[:min(len(missing), 5)])
}
