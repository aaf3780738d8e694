// Package provisioning holds claim tokens and device identities: how a new
// locker becomes a registered device with its own secret (protocol-v1.md,
// provisioning), and how the broker checks those secrets.
package provisioning

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"fmt"
	"log/slog"
	"path"
	"strconv"
	"strings"
	"time"

	"github.com/lockergate/lockergate/protocol"
)

// Provisioning outcomes; the first four map to the protocol's error codes.
var (
	ErrClaimExpired   = errors.New("claim expired")
	ErrClaimExhausted = errors.New("claim exhausted")
	ErrSerialTaken    = errors.New("serial already registered")
	ErrSerialRefused  = errors.New("serial not allowed by claim")
	ErrUnknownClaim   = errors.New("unknown or revoked claim")
	// ErrUnavailable (wrapped) is a store failure that may pass if the
	// locker asks again later: the database did not answer.
	ErrUnavailable = errors.New("provisioning store unavailable")
	ErrNotFound    = errors.New("not found")
)

// Device authentication outcomes.
var (
	ErrUnknownDevice = errors.New("unknown device")
	ErrBadSecret     = errors.New("bad secret")
	ErrDisabled      = errors.New("device disabled")
)

// Claim is a provisioning claim: a token that lets lockers register at a site.
type Claim struct {
	ID            string     `json:"id"`
	Site          string     `json:"site"`
	MaxUses       int        `json:"uses"`
	Used          int        `json:"used"`
	SerialPattern string     `json:"serial_pattern,omitempty"`
	ExpiresAt     time.Time  `json:"expires_at"`
	RevokedAt     *time.Time `json:"revoked_at,omitempty"`
	CreatedAt     time.Time  `json:"created_at"`
	CreatedBy     string     `json:"created_by,omitempty"`
}

// Registration is a device to register (or re-register) under a claim.
type Registration struct {
	DeviceID   string // proposed id for a new device
	SecretHash []byte
	Request    *protocol.ProvisionRequest
	At         time.Time
}

// Registered is the outcome of a registration.
type Registered struct {
	DeviceID string
	KeyGen   int
	Site     string
	// Replaced is true when an existing device (marked replaceable) was
	// re-provisioned: its old secret no longer works.
	Replaced bool
	// Retried is true when a locker asked again with the same claim, within
	// 10 minutes, before ever connecting and before its first answer was
	// delivered (AnswerDelivered): that answer was lost, and it gets a new
	// secret.
	Retried bool
	// Missing lists the compartments a replaced board did not report that
	// hold a live pickup: they are kept, marked missing (no new pickup goes
	// there), until the pickup ends. Staff must see to those orders.
	Missing []int
}

// DeviceAuth is what the broker needs to check a device's CONNECT.
type DeviceAuth struct {
	SecretHash []byte
	Disabled   bool
}

// Store persists claims and identities.
type Store interface {
	CreateClaim(ctx context.Context, c *Claim, hash []byte) error
	ListClaims(ctx context.Context, site, after string, limit int) ([]Claim, error)
	GetClaim(ctx context.Context, id string) (*Claim, error)
	RevokeClaim(ctx context.Context, id, actor string, at time.Time) error
	// ClaimByHash returns an unrevoked claim, or ErrUnknownClaim.
	ClaimByHash(ctx context.Context, hash []byte) (*Claim, error)
	// Register checks the claim (locked), the serial, and registers the
	// device, all in one transaction; every attempt is recorded as a claim use.
	// A failure that may pass on a later try wraps ErrUnavailable.
	Register(ctx context.Context, claimHash []byte, r Registration) (*Registered, error)
	// AnswerDelivered records that the locker acknowledged (QoS 1) or was
	// sent (QoS 0) the answer of its latest registration at at: from then
	// on that registration is not handed out again (Retried), and asking
	// again is serial_taken.
	AnswerDelivered(ctx context.Context, deviceID string, at time.Time) error
	// DeviceAuth returns a device's secret hash, or ErrUnknownDevice.
	DeviceAuth(ctx context.Context, id string) (*DeviceAuth, error)
}

// Options configure a Service.
type Options struct {
	Store Store
	// MasterKey derives every device's cred_key (at least 32 bytes).
	MasterKey []byte
	// FwPubkey is the firmware signing public key handed to lockers.
	FwPubkey []byte
	// BrokerURL is where provisioned lockers connect, e.g. mqtts://gw:8883.
	BrokerURL string
	// OnReplace is called after a device was re-provisioned, to end its old session.
	OnReplace func(deviceID string)
	// OnRekey is called after a device was re-provisioned, before it is
	// answered: what was made for its old cred_key must be made again for
	// the new one (pickup credentials). An error means no answer, as for
	// a store that does not answer; the locker's retry is re-issued.
	OnRekey func(ctx context.Context, deviceID string) error
	// OnIssued is called with every identity issued, before the locker is
	// answered (an external broker learns the credentials here); an error
	// sends the locker no answer (Provision's error), so it retries.
	OnIssued func(ctx context.Context, deviceID, secret string) error
	Logger   *slog.Logger
	Now      func() time.Time
}

// Service provisions lockers and authenticates them.
type Service struct {
	o Options
}

// New returns a Service.
func New(o Options) (*Service, error) {
	if o.Store == nil {
		return nil, errors.New("provisioning: Store is required")
	}
	if len(o.MasterKey) < 32 {
		return nil, errors.New("provisioning: master key must be at least 32 bytes")
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.OnReplace == nil {
		o.OnReplace = func(string) {}
	}
	return &Service{o: o}, nil
}

// NewSecret returns a random secret of 256 bits, URL-safe base64.
func NewSecret(prefix string) string {
	var b [32]byte
	rand.Read(b[:])
	return prefix + base64.RawURLEncoding.EncodeToString(b[:])
}

// HashSecret hashes a high-entropy secret or token for storage. Secrets are
// 256 random bits, so one SHA-256 is as strong as a slow KDF while costing
// microseconds: a reconnect storm of 10,000 lockers stays cheap.
func HashSecret(secret string) []byte {
	h := sha256.Sum256([]byte(secret))
	return h[:]
}

// CredKey derives a device's offline credential key from the master key.
// Nothing is stored: a re-provisioned device gets a new generation.
func (s *Service) CredKey(deviceID string, gen int) []byte {
	return DeriveCredKey(s.o.MasterKey, deviceID, gen)
}

// DeriveCredKey is HMAC-SHA256(master, "lockergate/cred_key/v1|id|gen").
func DeriveCredKey(master []byte, deviceID string, gen int) []byte {
	m := hmac.New(sha256.New, master)
	m.Write([]byte("lockergate/cred_key/v1|" + deviceID + "|" + strconv.Itoa(gen)))
	return m.Sum(nil)
}

// NewClaim asks for a claim.
type NewClaim struct {
	Site          string
	Uses          int
	ExpiresIn     time.Duration
	SerialPattern string
	Actor         string
}

// MaxClaimLifetime bounds how long a claim can stay valid.
const MaxClaimLifetime = 365 * 24 * time.Hour

// CreateClaim creates a claim and returns it with its token (shown once).
func (s *Service) CreateClaim(ctx context.Context, n NewClaim) (*Claim, string, error) {
	if n.Uses < 1 || n.Uses > 1_000_000 {
		return nil, "", fmt.Errorf("%w: uses must be 1..1000000", ErrInvalidRequest)
	}
	// From a second: api-v1 sets no floor, and a claim that expires at once
	// is how an installer (or a test) checks that lockers are told
	// claim_expired.
	if n.ExpiresIn < time.Second || n.ExpiresIn > MaxClaimLifetime {
		return nil, "", fmt.Errorf("%w: expires_in_s must be 1..%d", ErrInvalidRequest, int(MaxClaimLifetime/time.Second))
	}
	for _, p := range strings.Split(n.SerialPattern, ",") {
		if _, err := path.Match(strings.TrimSpace(p), ""); err != nil {
			return nil, "", fmt.Errorf("%w: serial_pattern %q: %v", ErrInvalidRequest, p, err)
		}
	}
	now := s.o.Now().UTC().Truncate(time.Millisecond)
	c := &Claim{ID: newID("cl"), Site: n.Site, MaxUses: n.Uses, SerialPattern: n.SerialPattern,
		ExpiresAt: now.Add(n.ExpiresIn), CreatedAt: now, CreatedBy: n.Actor}
	token := NewSecret("lgc_")
	if err := s.o.Store.CreateClaim(ctx, c, HashSecret(token)); err != nil {
		return nil, "", err
	}
	return c, token, nil
}

// ErrInvalidRequest is a bad API request.
var ErrInvalidRequest = errors.New("invalid request")

// ListClaims, GetClaim and RevokeClaim pass through to the store.
func (s *Service) ListClaims(ctx context.Context, site, after string, limit int) ([]Claim, error) {
	return s.o.Store.ListClaims(ctx, site, after, limit)
}

// GetClaim returns a claim.
func (s *Service) GetClaim(ctx context.Context, id string) (*Claim, error) {
	return s.o.Store.GetClaim(ctx, id)
}

// RevokeClaim revokes a claim: its token stops working for new sessions.
func (s *Service) RevokeClaim(ctx context.Context, id, actor string) error {
	return s.o.Store.RevokeClaim(ctx, id, actor, s.o.Now())
}

// AuthClaim reports whether token names an unrevoked claim. Expired and
// exhausted claims pass: the provisioning answer tells the device why.
// usable reports whether the claim could provision serial now: not
// expired, uses left, and its serial pattern allows it.
func (s *Service) AuthClaim(ctx context.Context, token, serial string) (usable bool, err error) {
	c, err := s.o.Store.ClaimByHash(ctx, HashSecret(token))
	if err != nil {
		return false, err
	}
	return c.Refusal(serial, s.o.Now()) == nil, nil
}

// AuthDevice checks a device's secret in constant time.
func (s *Service) AuthDevice(ctx context.Context, id string, password []byte) error {
	a, err := s.o.Store.DeviceAuth(ctx, id)
	if err != nil {
		return err
	}
	h := sha256.Sum256(password)
	if subtle.ConstantTimeCompare(h[:], a.SecretHash) != 1 {
		return ErrBadSecret
	}
	if a.Disabled {
		return ErrDisabled
	}
	return nil
}

// Provision answers a provisioning request made with a claim token. It
// returns an error, and no answer, when it cannot decide: the store is
// unavailable (ErrUnavailable: a database that does not answer in time,
// say) or OnIssued or OnRekey failed. The locker is then told nothing final and
// retries; a registration that did commit is handed out again to the same
// serial then (Retried).
func (s *Service) Provision(ctx context.Context, token, serial string, payload []byte) (protocol.ProvisionResponse, error) {
	fail := func(code string, err error) (protocol.ProvisionResponse, error) {
		s.o.Logger.Warn("provisioning refused", "serial", serial, "error", code, "err", err)
		return protocol.ProvisionResponse{Status: "error", Error: code}, nil
	}
	req, err := protocol.Decode[protocol.ProvisionRequest](payload)
	if err != nil {
		return fail(protocol.ProvInvalid, err)
	}
	if req.Serial != serial {
		return fail(protocol.ProvInvalid, fmt.Errorf("payload serial %q on topic of %q", req.Serial, serial))
	}
	secret := NewSecret("")
	reg, err := s.o.Store.Register(ctx, HashSecret(token), Registration{
		DeviceID: newID("lk"), SecretHash: HashSecret(secret), Request: req, At: s.o.Now(),
	})
	switch {
	case errors.Is(err, ErrClaimExpired):
		return fail(protocol.ProvClaimExpired, err)
	case errors.Is(err, ErrClaimExhausted):
		return fail(protocol.ProvClaimExhausted, err)
	case errors.Is(err, ErrSerialTaken):
		return fail(protocol.ProvSerialTaken, err)
	case errors.Is(err, ErrUnavailable):
		return protocol.ProvisionResponse{}, err
	case err != nil:
		// Refused for good (a serial outside the claim's pattern, a claim
		// revoked since the session began, a request the database rejects).
		return fail(protocol.ProvInvalid, err)
	}
	if s.o.OnIssued != nil {
		if err := s.o.OnIssued(ctx, reg.DeviceID, secret); err != nil {
			return protocol.ProvisionResponse{}, fmt.Errorf("hand the identity of %s to the broker: %w", serial, err)
		}
	}
	if reg.Replaced || reg.Retried {
		// Either way the old secret is void. A retry is only granted while
		// the device has no counted connection, but connections are counted
		// asynchronously: a session (and a cached secret) may already exist.
		s.o.OnReplace(reg.DeviceID)
		if s.o.OnRekey != nil {
			if err := s.o.OnRekey(ctx, reg.DeviceID); err != nil {
				return protocol.ProvisionResponse{}, fmt.Errorf("re-provisioned %s: %w", serial, err)
			}
		}
	}
	s.o.Logger.Info("locker provisioned", "serial", serial, "locker", reg.DeviceID, "site", reg.Site, "replaced", reg.Replaced)
	if len(reg.Missing) > 0 {
		s.o.Logger.Warn("replaced board does not report compartments that hold live pickups; they stay until those pickups expire or are cancelled: retrieve the orders, or fix the board's compartment list and provision it again",
			"locker", reg.DeviceID, "site", reg.Site, "compartments", reg.Missing)
	}
	return protocol.ProvisionResponse{
		Status: "ok", DeviceID: reg.DeviceID, Password: secret,
		CredKey:  base64.StdEncoding.EncodeToString(s.CredKey(reg.DeviceID, reg.KeyGen)),
		FwPubkey: base64.StdEncoding.EncodeToString(s.o.FwPubkey),
		Broker:   s.o.BrokerURL,
	}, nil
}

// AnswerDelivered records that the answer of a locker's registration
// reached it (see Store.AnswerDelivered).
func (s *Service) AnswerDelivered(ctx context.Context, deviceID string) error {
	return s.o.Store.AnswerDelivered(ctx, deviceID, s.o.Now())
}

// Refusal is why claim c cannot provision serial at at (ErrClaimExpired,
// ErrClaimExhausted or ErrSerialRefused, checked in that order), or nil.
func (c *Claim) Refusal(serial string, at time.Time) error {
	switch {
	case !at.Before(c.ExpiresAt):
		return ErrClaimExpired
	case c.Used >= c.MaxUses:
		return ErrClaimExhausted
	case !SerialAllowed(c.SerialPattern, serial):
		return ErrSerialRefused
	}
	return nil
}

// SerialAllowed reports whether a claim's serial pattern admits serial. The
// pattern is a comma-separated list of globs (path.Match syntax), e.g.
// "SN-0001*,SN-0002?"; an empty pattern admits every serial.
func SerialAllowed(pattern, serial string) bool {
	if pattern == "" {
		return true
	}
	for _, p := range strings.Split(pattern, ",") {
		if ok, err := path.Match(strings.TrimSpace(p), serial); err == nil && ok {
			return true
		}
	}
	return false
}

func newID(prefix string) string {
	var b [10]byte
	rand.Read(b[:])
	return prefix + "-" + base64.RawURLEncoding.EncodeToString(b[:])
}
