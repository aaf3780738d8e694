package devicesim

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"net/url"
	"time"

	"github.com/lockergate/lockergate/protocol"
)

// Options configures a Fleet. Zero values take the defaults given per field.
type Options struct {
	// Broker is the MQTT broker URL: tcp:// or mqtt:// (plain), or mqtts://,
	// ssl://, tls:// (TLS with TLSConfig). Required.
	Broker string
	// ClaimToken provisions lockers that have no identity yet.
	ClaimToken string
	// Lockers is how many lockers the fleet runs.
	Lockers int
	// Seed makes serials, models and device decisions reproducible.
	Seed int64
	// SerialPrefix prefixes serials: fmt.Sprintf("%s-%06d", prefix, index). Default "SIM".
	SerialPrefix string
	// FirstIndex is the index of the first locker, so several simulator
	// processes can run disjoint ranges of one seeded fleet. Default 0.
	FirstIndex int
	// Models are the models lockers pick from (deterministically). Default DefaultModels.
	Models []Model
	// FW is the firmware version lockers report. Default "1.4.2".
	FW string
	// HealthInterval is the default health period until config says otherwise.
	// Default 60s; negative disables health messages.
	HealthInterval time.Duration
	// HealthQoS is the QoS of health messages (0 or 1). Default 0.
	HealthQoS byte
	// KeepAlive is the MQTT keep-alive. Default 60s.
	KeepAlive time.Duration
	// ConnectRate bounds new connections per second across the fleet
	// (provisioning and device connections alike). Default 200; negative means
	// no limit.
	ConnectRate float64
	// DoorCloseDelay is how long a door stays open after it was unlocked before
	// the simulated person closes it. Default 500ms; negative leaves doors open
	// until Locker.CloseDoor.
	DoorCloseDelay time.Duration
	// OmitCodeCompartments makes the lockers leave code_accepted's optional
	// compartments out, as a vendor's firmware may.
	OmitCodeCompartments bool
	// CodeReport is how the lockers report a code's use. Default
	// CodeAcceptedFirst, the protocol's order.
	CodeReport CodeReport
	// Behavior tunes simulated people.
	Behavior Behavior
	// Identities holds identities of already provisioned lockers, by serial;
	// those lockers skip provisioning.
	Identities map[string]Identity
	// TLSConfig is used for TLS broker URLs.
	TLSConfig *tls.Config
	// API is the gateway's HTTP API base URL. The core simulator does not call
	// it; it is carried for scenarios and reports.
	API string
	// ConnectTimeout bounds one connection attempt (dial and MQTT handshake). Default 10s.
	ConnectTimeout time.Duration
	// ProvisionTimeout bounds the wait for a provisioning answer. Default 30s.
	ProvisionTimeout time.Duration
	// RetryBase and RetryMax shape the reconnect back-off: full jitter over
	// min(RetryMax, RetryBase·2^attempt). Defaults 500ms and 30s.
	RetryBase, RetryMax time.Duration
	// OfflineQueue is how many events and command results a locker keeps
	// while it is offline; the oldest are dropped beyond it. Default 1000.
	OfflineQueue int
	// Logger receives the simulator's logs. Default: discard.
	Logger *slog.Logger

	// Sites places the lockers: locker indexes fill the sites in order, each
	// site with its own claim token and models. Empty means one site with
	// Lockers lockers, every model and ClaimToken. When set, Lockers is
	// their sum (0 is filled in).
	Sites []Site
	// SourceAddrs are local IP addresses the lockers connect from, by index
	// round robin. One address pair holds only ~28,000 connections (the
	// ephemeral port range), so bigger fleets spread over 127.0.0.2,
	// 127.0.0.3, ... (all of 127/8 is loopback on Linux). Default: the
	// system's choice.
	SourceAddrs []string
	// Faults injects failures, deterministically from Seed. Zero: none.
	Faults Faults
	// TimeScale runs fault and behaviour schedules this many times faster
	// than the scenario says (60: a scenario hour in a minute); protocol
	// timers (health, keep-alive, back-off) keep real time. Default 1.
	TimeScale float64
	// OnDecision, when set, receives every device decision (Decision) as it
	// is made, from many goroutines: it must be safe for concurrent use and
	// fast (it runs under the locker's lock, or the fleet's for a gateway
	// restart).
	OnDecision func(Decision)
	// GatewayRestart, when set, is called at the gateway restarts that
	// Faults.GatewayRestarts plans: the harness (a test, or the operator's
	// command) restarts the gateway, keeping it down for down (wall-clock:
	// TimeScale applied), and returns when it is back. ctx ends when the
	// fleet closes. Without it planned restarts are skipped and counted.
	GatewayRestart func(ctx context.Context, down time.Duration) error
}

// CodeReport is how a locker reports that a code opened compartments.
type CodeReport int

const (
	// CodeAcceptedFirst: code_accepted, then a door_opened (by credential)
	// per compartment, as protocol-v1 describes.
	CodeAcceptedFirst CodeReport = iota
	// DoorOpenedFirst: the door_opened events, then code_accepted, as a
	// vendor's firmware that reports its latches first may.
	DoorOpenedFirst
	// DoorOpenedOnly: the door_opened events, no code_accepted.
	DoorOpenedOnly
)

var codeReportNames = [...]string{CodeAcceptedFirst: "code_accepted", DoorOpenedFirst: "door_first", DoorOpenedOnly: "door_only"}

// String returns the report's name: code_accepted, door_first or door_only.
func (r CodeReport) String() string {
	if r < 0 || int(r) >= len(codeReportNames) {
		return fmt.Sprintf("CodeReport(%d)", int(r))
	}
	return codeReportNames[r]
}

// MarshalText implements encoding.TextMarshaler.
func (r CodeReport) MarshalText() ([]byte, error) {
	if r < 0 || int(r) >= len(codeReportNames) {
		return nil, fmt.Errorf("unknown code report %d", int(r))
	}
	return []byte(r.String()), nil
}

// UnmarshalText implements encoding.TextUnmarshaler (a flag's or a JSON
// string's value).
func (r *CodeReport) UnmarshalText(b []byte) error {
	for i, name := range codeReportNames {
		if string(b) == name {
			*r = CodeReport(i)
			return nil
		}
	}
	return fmt.Errorf("code report %q: want code_accepted, door_first or door_only", b)
}

// Behavior tunes the simulated people at the lockers. Rates other than
// LeaveItemProb are used by the pickup flow (OrderPlanner); the core
// simulator only carries them.
type Behavior struct {
	// LeaveItemProb is the probability that a driver who opened compartments
	// with a code leaves the item in a compartment (door_closed occupied=true).
	LeaveItemProb float64 `json:"leave_item,omitempty"`
	// OrdersPerHour is the mean rate of orders per site (Poisson arrivals).
	OrdersPerHour float64 `json:"orders_per_hour,omitempty"`
	// StaffDelay is how long staff take from the staging unlock to closing
	// the loaded compartment.
	StaffDelay Range `json:"staff_delay,omitzero"`
	// DriverDelay is how long after staging the driver arrives at the locker.
	DriverDelay Range `json:"driver_delay,omitzero"`
	// WrongCodeShare is the share of drivers who type a wrong code before
	// the right one (each of them gets 1 to 3 wrong tries).
	WrongCodeShare float64 `json:"wrong_code_share,omitempty"`
	// NoShowShare is the share of orders nobody collects.
	NoShowShare float64 `json:"no_show_share,omitempty"`
}

// Identity is what provisioning hands a locker.
type Identity struct {
	DeviceID string `json:"device_id"`
	Password string `json:"password"`
	CredKey  []byte `json:"cred_key"`
	FwPubkey []byte `json:"fw_pubkey,omitempty"`
	// Broker is the broker the gateway told the locker to use. The simulator
	// records it but keeps connecting to Options.Broker.
	Broker string `json:"broker,omitempty"`
}

// Defaults.
const (
	DefaultSerialPrefix     = "SIM"
	DefaultFW               = "1.4.2"
	DefaultHealthInterval   = 60 * time.Second
	DefaultKeepAlive        = 60 * time.Second
	DefaultConnectRate      = 200
	DefaultDoorCloseDelay   = 500 * time.Millisecond
	DefaultConnectTimeout   = 10 * time.Second
	DefaultProvisionTimeout = 30 * time.Second
	DefaultRetryBase        = 500 * time.Millisecond
	DefaultRetryMax         = 30 * time.Second
	DefaultOfflineQueue     = 1000
)

// Timings that are not worth an option yet.
const (
	writeTimeout   = 10 * time.Second // paho Publish blocks at most this long
	ackTimeout     = 30 * time.Second // a QoS 1 publish not acknowledged by then counts as failed
	subackTimeout  = 10 * time.Second
	quiesceMillis  = 250 // Disconnect(250)
	maxRemembered  = 1024
	maxSendRetries = 3
)

func (o *Options) setDefaults() {
	if o.SerialPrefix == "" {
		o.SerialPrefix = DefaultSerialPrefix
	}
	if len(o.Models) == 0 {
		o.Models = DefaultModels
	}
	if o.FW == "" {
		o.FW = DefaultFW
	}
	if o.HealthInterval == 0 {
		o.HealthInterval = DefaultHealthInterval
	}
	if o.KeepAlive == 0 {
		o.KeepAlive = DefaultKeepAlive
	}
	if o.ConnectRate == 0 {
		o.ConnectRate = DefaultConnectRate
	}
	if o.DoorCloseDelay == 0 {
		o.DoorCloseDelay = DefaultDoorCloseDelay
	}
	if o.ConnectTimeout <= 0 {
		o.ConnectTimeout = DefaultConnectTimeout
	}
	if o.ProvisionTimeout <= 0 {
		o.ProvisionTimeout = DefaultProvisionTimeout
	}
	if o.RetryBase <= 0 {
		o.RetryBase = DefaultRetryBase
	}
	if o.RetryMax <= 0 {
		o.RetryMax = DefaultRetryMax
	}
	if o.OfflineQueue <= 0 {
		o.OfflineQueue = DefaultOfflineQueue
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.TimeScale == 0 {
		o.TimeScale = 1
	}
	if len(o.Sites) > 0 && o.Lockers == 0 {
		o.Lockers = sitesTotal(o.Sites)
	}
}

func (o *Options) validate() error {
	var errs []error
	if o.Lockers < 0 {
		errs = append(errs, errors.New("lockers must not be negative"))
	}
	if o.FirstIndex < 0 {
		errs = append(errs, errors.New("first index must not be negative"))
	}
	if u, err := url.Parse(o.Broker); err != nil || u.Host == "" {
		errs = append(errs, fmt.Errorf("broker %q: want a URL like tcp://127.0.0.1:1883", o.Broker))
	} else if _, ok := brokerSchemes[u.Scheme]; !ok {
		errs = append(errs, fmt.Errorf("broker %q: scheme %q not supported (tcp, mqtt, mqtts, ssl, tls)", o.Broker, u.Scheme))
	}
	if !protocol.ValidSerial(serialOf(o.SerialPrefix, o.FirstIndex+max(o.Lockers, 1)-1)) {
		errs = append(errs, fmt.Errorf("serial prefix %q does not make valid serials", o.SerialPrefix))
	}
	for _, m := range o.Models {
		if err := m.Validate(); err != nil {
			errs = append(errs, err)
		}
	}
	if len(o.FW) > 64 {
		errs = append(errs, fmt.Errorf("fw %q: longer than 64 bytes", o.FW))
	}
	if o.HealthQoS > 1 {
		errs = append(errs, errors.New("health QoS must be 0 or 1"))
	}
	if o.KeepAlive < time.Second {
		errs = append(errs, errors.New("keep-alive must be at least 1s"))
	}
	if math.IsNaN(o.ConnectRate) {
		errs = append(errs, errors.New("connect rate is NaN"))
	}
	errs = append(errs, o.Behavior.validate()...)
	errs = append(errs, o.validateSites()...)
	errs = append(errs, o.Faults.validate()...)
	for _, a := range o.SourceAddrs {
		if ip := net.ParseIP(a); ip == nil {
			errs = append(errs, fmt.Errorf("source address %q is not an IP address", a))
		}
	}
	if !(o.TimeScale > 0) || math.IsInf(o.TimeScale, 1) {
		errs = append(errs, errors.New("time scale must be a positive number"))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("devicesim: options: %w", err)
	}
	return nil
}

// brokerSchemes maps supported broker URL schemes to whether they use TLS.
var brokerSchemes = map[string]bool{"tcp": false, "mqtt": false, "mqtts": true, "ssl": true, "tls": true}

func serialOf(prefix string, index int) string { return fmt.Sprintf("%s-%06d", prefix, index) }
