package pickup

import (
	"cmp"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/protocol"
	"github.com/lockergate/lockergate/provisioning"
)

// DefaultSilentAfter is Options.SilentAfter's default: three health
// intervals at the default 60 s, when a locker shows as stale.
const DefaultSilentAfter = 3 * time.Minute

// Fleet is what pickups need from the fleet manager.
type Fleet interface {
	SendCommand(ctx context.Context, req fleet.CommandRequest) (*fleet.Command, error)
	// PublishCreds republishes a locker's retained credential set.
	PublishCreds(ctx context.Context, deviceID string) error
	GetLocker(ctx context.Context, id string) (*fleet.Locker, error)
	// CommandEnded accounts for a command the store ended outside the
	// fleet manager: a staging unlock withdrawn with its pickup.
	CommandEnded(typ, status string)
}

// Options configure a Service.
type Options struct {
	Store Store
	Fleet Fleet
	// MasterKey derives pickup codes and lockers' cred_keys.
	MasterKey  []byte
	Logger     *slog.Logger
	Registerer prometheus.Registerer
	// Wake is called after webhook events were queued (the dispatcher).
	Wake func()
	// SweepInterval is how often expired pickups are ended. Default 1s.
	SweepInterval time.Duration
	// StagingTTL bounds the staging unlock. Default 60s.
	StagingTTL time.Duration
	// SilentAfter: a locker not heard from for this long (online, but
	// stale: its firmware may be hung, its staging unlock unanswered) gets
	// a new pickup only when no locker heard from since has room for it.
	// Default DefaultSilentAfter.
	SilentAfter time.Duration
	Now         func() time.Time
}

// Service runs the pickup workflow.
type Service struct {
	o   Options
	log *slog.Logger
	m   *metrics
}

// New returns a Service.
func New(o Options) (*Service, error) {
	if o.Store == nil || o.Fleet == nil || len(o.MasterKey) < 32 {
		return nil, errors.New("pickup: Store, Fleet and a 32-byte MasterKey are required")
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.SweepInterval <= 0 {
		o.SweepInterval = time.Second
	}
	if o.StagingTTL <= 0 {
		o.StagingTTL = 60 * time.Second
	}
	if o.SilentAfter <= 0 {
		o.SilentAfter = DefaultSilentAfter
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Wake == nil {
		o.Wake = func() {}
	}
	return &Service{o: o, log: o.Logger, m: newMetrics(o.Registerer)}, nil
}

// stagingUnlockTimeout bounds the making of a new pickup's staging unlock,
// which does not end with the request that asked for the pickup.
const stagingUnlockTimeout = 10 * time.Second

// MaxRecipientName bounds a pickup's recipient.name, in bytes.
const MaxRecipientName = 200

// Create allocates a compartment for a new pickup and opens it for staff to
// load (a staging unlock).
func (s *Service) Create(ctx context.Context, p *Pickup) error {
	if p.ID != "" {
		// Derived from the request's Idempotency-Key: a run again of a
		// request whose answer was lost finds the pickup the first run
		// made before anything else, which may have taken the last free
		// compartment, or its expires_at may have passed since.
		switch prev, err := s.o.Store.GetPickup(ctx, p.ID); {
		case err == nil:
			return s.rerun(ctx, p, prev)
		case !errors.Is(err, fleet.ErrNotFound):
			return err
		}
	}
	if !protocol.ValidID(p.Site) {
		return fmt.Errorf("%w: site is required", fleet.ErrInvalid)
	}
	if p.OrderRef == "" || len(p.OrderRef) > 128 {
		return fmt.Errorf("%w: order_ref must be 1-128 bytes", fleet.ErrInvalid)
	}
	if p.Size == "" {
		p.Size = "S"
	}
	if protocol.SizeRank(p.Size) < 0 {
		return fmt.Errorf("%w: size %q: want S, M, L or XL", fleet.ErrInvalid, p.Size)
	}
	if p.Zone == "" {
		p.Zone = "ambient"
	}
	if !protocol.ValidZone(p.Zone) {
		return fmt.Errorf("%w: zone %q: want ambient, chilled or heated", fleet.ErrInvalid, p.Zone)
	}
	if p.Recipient.Kind == "" {
		// Left out: a platform named is its driver; none, the store's own
		// customer.
		p.Recipient.Kind = "customer"
		if p.Recipient.Platform != "" {
			p.Recipient.Kind = "driver"
		}
	}
	switch p.Recipient.Kind {
	case "driver":
		if p.Recipient.Platform == "" {
			return fmt.Errorf("%w: a driver pickup needs recipient.platform", fleet.ErrInvalid)
		}
	case "customer":
	default:
		return fmt.Errorf("%w: recipient.kind must be driver or customer", fleet.ErrInvalid)
	}
	if p.Recipient.Platform != "" && !fleet.ValidName(p.Recipient.Platform) {
		// The name of the platform's token: any other would be a pickup no
		// platform can see or collect.
		return fmt.Errorf("%w: recipient.platform %q: want a platform token's name, 1-64 bytes of text", fleet.ErrInvalid, p.Recipient.Platform)
	}
	if len(p.Recipient.Name) > MaxRecipientName {
		return fmt.Errorf("%w: recipient.name longer than %d bytes", fleet.ErrInvalid, MaxRecipientName)
	}
	p.Platform = p.Recipient.Platform
	now := s.o.Now().UTC().Truncate(time.Millisecond)
	if p.ExpiresAt.IsZero() {
		p.ExpiresAt = now.Add(2 * time.Hour)
	}
	if !p.ExpiresAt.After(now) || p.ExpiresAt.After(now.Add(7*24*time.Hour)) {
		return fmt.Errorf("%w: expires_at must be in the future, at most 7 days from now", fleet.ErrInvalid)
	}
	derived := p.ID != "" // from the request's Idempotency-Key
	if !derived {
		p.ID = fleet.NewID("p")
	}
	p.State, p.CreatedAt = Staging, now
	err := s.o.Store.Allocate(ctx, p, now.Add(-s.o.SilentAfter))
	switch {
	case errors.Is(err, fleet.ErrExists) && derived:
		// The earlier run committed it since the lookup above.
		prev, err := s.o.Store.GetPickup(ctx, p.ID)
		if err != nil {
			return err
		}
		return s.rerun(ctx, p, prev)
	case err != nil:
		return err
	}
	if p.LockerSilent {
		s.log.Warn("pickup allocated at a locker not heard from lately (no other had room): its staging unlock may go unanswered",
			"pickup", p.ID, "locker", p.Locker, "compartment", p.Compartment, "silent_after", s.o.SilentAfter)
	}
	if p.LockerClockSkewed {
		s.log.Warn("pickup allocated at a locker whose clock is off (no other had room): it may refuse the staging unlock, or take the code late",
			"pickup", p.ID, "locker", p.Locker, "compartment", p.Compartment)
	}
	s.m.state.WithLabelValues(Staging).Inc()
	s.stage(ctx, p)
	return nil
}

// maxRerunAge bounds how old a pickup may be to be answered to a request
// run again (rerun): such a run follows its first by minutes (a claim
// taken over after 5), while a request that reuses an Idempotency-Key
// whose record was pruned (--history-retention-days) is a new order.
const maxRerunAge = 24 * time.Hour

// rerun answers request p, run again, with prev, the pickup an earlier run
// of it made (its id derived from the same Idempotency-Key, token and
// body), whose answer was lost with the gateway that ran it: that pickup,
// not a second one (which its order_ref would refuse anyway), with its
// staging unlock made now if that run ended before making it.
func (s *Service) rerun(ctx context.Context, p, prev *Pickup) error {
	if s.o.Now().Sub(prev.CreatedAt) > maxRerunAge {
		return fmt.Errorf("pickup %s, made %s by an earlier request with this Idempotency-Key and body: use another key for a new order: %w",
			prev.ID, prev.CreatedAt.UTC().Format(time.RFC3339), fleet.ErrConflict)
	}
	*p = *prev
	s.log.Info("pickup request run again: answering the pickup it made before", "pickup", p.ID, "state", p.State)
	if p.State == Staging && p.CommandID == "" {
		s.stage(ctx, p)
	}
	return nil
}

// stage makes new pickup p's staging unlock, which opens its compartment
// for staff to load the order, and records it on p.
func (s *Service) stage(ctx context.Context, p *Pickup) {
	// The pickup is stored: its staging unlock is made even if the
	// request goes away now (a client that gave up), or staff would wait
	// at a compartment that never opens for an order whose retry the
	// order_ref refuses.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), stagingUnlockTimeout)
	defer cancel()
	// Made only while the pickup is live, and recorded on it, in one
	// statement: a cancel in between leaves nothing to send.
	cmd, err := s.o.Fleet.SendCommand(ctx, fleet.CommandRequest{DeviceID: p.Locker, Type: protocol.CmdUnlock,
		Compartment: p.Compartment, Reason: protocol.ReasonStaging, TTL: s.o.StagingTTL, Actor: p.CreatedBy, Pickup: p.ID})
	if errors.Is(err, fleet.ErrConflict) {
		s.log.Info("pickup ended before its staging unlock was made: none sent", "pickup", p.ID, "locker", p.Locker)
		return
	}
	if err != nil {
		// The pickup holds the compartment; staff can open it remotely.
		s.log.Error("staging unlock", "pickup", p.ID, "locker", p.Locker, "err", err)
		return
	}
	p.CommandID = cmd.ID
}

// Get returns a pickup with its transitions.
func (s *Service) Get(ctx context.Context, id string) (*Pickup, error) {
	p, err := s.o.Store.GetPickup(ctx, id)
	if err != nil {
		return nil, err
	}
	p.Transitions, err = s.o.Store.Transitions(ctx, id)
	return p, err
}

// List lists pickups.
func (s *Service) List(ctx context.Context, f Filter) ([]Pickup, error) {
	return s.o.Store.ListPickups(ctx, f)
}

// CredentialOf returns the codes of a pickup's live credential, or nil.
func (s *Service) CredentialOf(ctx context.Context, p *Pickup) *CredentialView {
	if p.CredentialID == "" || p.State != Ready {
		return nil
	}
	c, state, err := s.o.Store.GetCredential(ctx, p.CredentialID)
	if err != nil || state != "active" {
		return nil // used (a fresh one follows) or revoked
	}
	return s.View(c.ID, c.NotAfter, credKind(c))
}

// View derives the codes of credential id: a PIN and a QR token for kind
// "", else only the one of that kind.
func (s *Service) View(id string, notAfter time.Time, kind string) *CredentialView {
	v := &CredentialView{ID: id, NotAfter: notAfter}
	if kind != protocol.KindQR {
		v.Code = s.pin(id)
	}
	if kind != protocol.KindPIN {
		v.QR = s.qr(id)
	}
	return v
}

// credKind is the kind of codes a credential has: "" for both.
func credKind(c *Credential) string {
	switch {
	case c.QRMAC == "":
		return protocol.KindPIN
	case c.PINMAC == "":
		return protocol.KindQR
	}
	return ""
}

// Cancel ends a live pickup and revokes its credential.
func (s *Service) Cancel(ctx context.Context, id, actor string) (*Pickup, error) {
	p, err := s.end(ctx, id, Cancelled, actor, "cancelled", EventCancelled)
	if err != nil {
		return nil, err
	}
	if p.Alerted != "" { // raised with the transition (Store.Transition)
		s.alerted(CancelledAlert(p, actor))
	}
	if p.CredentialID != "" {
		s.publish(ctx, p.Locker)
	}
	return p, nil
}

// end moves a live pickup to a final state, which takes its compartment out
// of its credential (Store.Transition). The caller republishes the locker's
// set when the pickup had a credential.
func (s *Service) end(ctx context.Context, id, to, actor, detail, evType string) (*Pickup, error) {
	p, err := s.o.Store.GetPickup(ctx, id)
	if err != nil {
		return nil, err
	}
	at := s.o.Now()
	p, err = s.o.Store.Transition(ctx, id, []string{Staging, Ready}, to, actor, detail, at, s.event(evType, p, at))
	if err != nil {
		return nil, err
	}
	s.transitioned(p, to)
	return p, nil
}

// Combine mints one credential for several ready pickups at one locker (a
// driver collecting several orders); it replaces their own credentials,
// audited as actor's credential.create. allowed says whether the caller
// may make a code for a pickup: nil, or why not (wrapping
// fleet.ErrForbidden).
func (s *Service) Combine(ctx context.Context, ids []string, kind, actor string, allowed func(*Pickup) error) (*CredentialView, error) {
	if len(ids) == 0 || len(ids) > 32 {
		return nil, fmt.Errorf("%w: want 1-32 pickups", fleet.ErrInvalid)
	}
	if kind != "" && kind != protocol.KindPIN && kind != protocol.KindQR {
		return nil, fmt.Errorf("%w: kind must be pin or qr", fleet.ErrInvalid)
	}
	var locker, platform string
	var recipients []Recipient
	var comps []int
	notAfter := time.Time{}
	seen := map[string]bool{}
	for _, id := range ids {
		if seen[id] {
			return nil, fmt.Errorf("%w: pickup %s listed twice", fleet.ErrInvalid, id)
		}
		seen[id] = true
		p, err := s.o.Store.GetPickup(ctx, id)
		if err != nil {
			return nil, fmt.Errorf("pickup %s: %w", id, err)
		}
		if err := allowed(p); err != nil {
			return nil, fmt.Errorf("pickup %s: %w", id, err)
		}
		if p.State != Ready {
			return nil, fmt.Errorf("%w: pickup %s is %s, not ready", fleet.ErrConflict, id, p.State)
		}
		if locker != "" && p.Locker != locker {
			return nil, fmt.Errorf("%w: pickups are at different lockers (%s, %s)", fleet.ErrUnprocessable, locker, p.Locker)
		}
		if locker != "" && p.Platform != platform {
			// One code goes to one driver: it would open another
			// platform's order, and be sent to that platform too.
			return nil, fmt.Errorf("%w: pickups are for different platforms (%q, %q)", fleet.ErrUnprocessable, platform, p.Platform)
		}
		locker, platform = p.Locker, p.Platform
		recipients = append(recipients, p.Recipient)
		comps = append(comps, p.Compartment)
		if notAfter.IsZero() || p.ExpiresAt.Before(notAfter) {
			notAfter = p.ExpiresAt
		}
	}
	if err := oneRecipient(recipients); err != nil {
		return nil, err
	}
	audit := &fleet.AuditEntry{Actor: actor, Action: "credential.create", Locker: locker,
		Detail: map[string]any{"pickups": ids, "kind": cmp.Or(kind, "pin+qr"), "not_after": notAfter}}
	c, err := s.mint(ctx, locker, comps, notAfter, ids, kind, false, s.credentialChanged, audit)
	if err != nil {
		return nil, err
	}
	v := s.View(c.ID, notAfter, kind)
	v.Locker, v.Compartments, v.Pickups = locker, comps, ids
	s.publish(ctx, locker)
	return v, nil
}

// oneRecipient refuses one code for pickups of several recipients
// (ErrUnprocessable): one code goes to one person, and opens every
// compartment it covers. Combine has checked the platform. Several
// customers' pickups share one only when each names the same customer
// (recipient.name: the store says they are one person; two unnamed
// customers may be two); drivers' when no two name different drivers.
func oneRecipient(rs []Recipient) error {
	if len(rs) < 2 {
		return nil
	}
	first := rs[0]
	for _, r := range rs[1:] {
		switch {
		case r.Kind != first.Kind:
			return fmt.Errorf("%w: pickups for a %s and a %s: one code goes to one person", fleet.ErrUnprocessable, first.Kind, r.Kind)
		case r.Kind == "customer" && (first.Name == "" || r.Name == ""):
			return fmt.Errorf("%w: pickups for a customer who is not named: one code goes to one person, so several customer pickups "+
				"share one only when each names the same customer (recipient.name)", fleet.ErrUnprocessable)
		case r.Name != first.Name && (r.Kind == "customer" || first.Name != "" && r.Name != ""):
			return fmt.Errorf("%w: pickups for different recipients (%q, %q): one code goes to one person", fleet.ErrUnprocessable, first.Name, r.Name)
		}
		if first.Name == "" {
			first.Name = r.Name // a driver named by a later pickup: the rest must not name another
		}
	}
	return nil
}

// mint creates a credential for compartments of a locker; kind "" gives
// both a PIN and a QR token. announce, when set, makes the event queued for
// each ready pickup whose codes this replaces; replaceUsed lets it replace
// a used code (MintCredential).
func (s *Service) mint(ctx context.Context, deviceID string, comps []int, notAfter time.Time, pickups []string, kind string,
	replaceUsed bool, announce func(*Pickup, *Credential) *Event, audit *fleet.AuditEntry) (*Credential, error) {
	gen, err := s.o.Store.KeyGen(ctx, deviceID)
	if err != nil {
		return nil, err
	}
	// The store serialises mints per locker; a PIN that collides, or a key
	// a replacement changed meanwhile, is tried again.
	for attempt := 0; attempt < 8; attempt++ {
		c := &Credential{ID: fleet.NewID("k"), DeviceID: deviceID, Compartments: comps, NotAfter: notAfter, CreatedAt: s.o.Now(), Audit: audit}
		s.setMACs(c, gen, kind != protocol.KindQR, kind != protocol.KindPIN)
		err := s.o.Store.MintCredential(ctx, c, pickups, replaceUsed, announce)
		switch {
		case errors.Is(err, ErrPINTaken):
			continue // another id gives another PIN
		case errors.Is(err, ErrKeyChanged):
			// Re-provisioned meanwhile: MACs for the new key.
			if gen, err = s.o.Store.KeyGen(ctx, deviceID); err != nil {
				return nil, err
			}
			continue
		}
		return c, err
	}
	return nil, errors.New("could not mint a unique PIN in 8 attempts")
}

// Rekey gives the active credentials of a re-provisioned locker MACs for
// its new cred_key (the codes stay the same), so the orders already in it
// can still be collected with the codes their drivers hold. Provisioning
// calls it before it answers the new board; the caller then publishes the
// locker's retained state, the new set with it (the gateway does, with
// its fw/job).
func (s *Service) Rekey(ctx context.Context, deviceID string) error {
	n, err := s.o.Store.RekeyCredentials(ctx, deviceID, func(gen int, c *Credential) {
		s.setMACs(c, gen, c.PINMAC != "", c.QRMAC != "")
	})
	if err != nil {
		return fmt.Errorf("re-key the credentials of %s: %w", deviceID, err)
	}
	if n > 0 {
		s.log.Info("credentials re-keyed for a re-provisioned locker", "locker", deviceID, "credentials", n)
	}
	return nil
}

// credentialChanged is the event that tells the webhooks of ready pickup p
// its new credential c: its codes, derived at send time (ExpandEvent).
func (s *Service) credentialChanged(p *Pickup, c *Credential) *Event {
	ev := s.event(EventCredentialChanged, p, c.CreatedAt)
	ev.Data["credential_id"] = c.ID
	ev.Data["credential_not_after"] = c.NotAfter // a combined one ends with its first order
	if kind := credKind(c); kind != "" {
		ev.Data["credential_kind"] = kind
	}
	return ev
}

// RotateCodes gives every order in a locker new codes: each active
// credential is replaced by a new one (new PIN and QR token, same
// compartments and expiry), the old codes stop working, and the platforms
// and stores are told the new ones (EventCredentialChanged). For a board
// that was stolen or swapped out, whose cred_key could recover the PINs
// of the set it held, and for codes that leaked. It returns how many
// credentials were replaced.
func (s *Service) RotateCodes(ctx context.Context, deviceID, actor, site string) (int, error) {
	at := s.o.Now()
	mint := func(gen int, old *Credential) *Credential {
		c := &Credential{ID: fleet.NewID("k"), DeviceID: deviceID, Compartments: old.Compartments, NotAfter: old.NotAfter,
			CreatedAt: at}
		s.setMACs(c, gen, old.PINMAC != "", old.QRMAC != "")
		return c
	}
	a := fleet.AuditEntry{Actor: actor, Action: "locker.rotate_codes", Locker: deviceID, Site: site}
	for attempt := 0; attempt < 8; attempt++ {
		n, err := s.o.Store.RotateCredentials(ctx, deviceID, at, mint, s.credentialChanged, a)
		if errors.Is(err, ErrPINTaken) || errors.Is(err, ErrKeyChanged) {
			continue // other ids give other PINs; the next try reads the new key
		}
		if err != nil {
			return 0, fmt.Errorf("rotate the codes of %s: %w", deviceID, err)
		}
		if n > 0 {
			s.log.Info("codes rotated", "locker", deviceID, "credentials", n, "actor", actor)
			s.o.Wake()
			// Committed: the old codes must stop working even if the
			// caller is gone (a reconnect republishes the set too).
			s.publish(ctx, deviceID)
		}
		return n, nil
	}
	return 0, errors.New("could not mint unique PINs in 8 attempts")
}

// setMACs gives c the MACs of its codes (a PIN, a QR token, or both) for
// generation gen of its locker's cred_key, and records gen.
func (s *Service) setMACs(c *Credential, gen int, pin, qr bool) {
	key := provisioning.DeriveCredKey(s.o.MasterKey, c.DeviceID, gen)
	c.KeyGen, c.PINMAC, c.QRMAC = gen, "", ""
	if pin {
		c.PINMAC = protocol.CredMAC(key, s.pin(c.ID))
	}
	if qr {
		c.QRMAC = protocol.CredMAC(key, s.qr(c.ID))
	}
}

// pin derives the 8-digit PIN of credential id.
func (s *Service) pin(id string) string {
	h := s.derive("pin", id)
	return fmt.Sprintf("%08d", binary.BigEndian.Uint64(h[:8])%100_000_000)
}

// qr derives the QR token (256 bits) of credential id.
func (s *Service) qr(id string) string {
	h := s.derive("qr", id)
	return "lgq_" + base64.RawURLEncoding.EncodeToString(h)
}

func (s *Service) derive(what, id string) []byte {
	m := hmac.New(sha256.New, s.o.MasterKey)
	m.Write([]byte("lockergate/pickup-code/v1|" + what + "|" + id))
	return m.Sum(nil)
}

// Wire credential ids: one stored credential appears on the locker as a PIN
// entry and a QR entry.
const (
	pinSuffix = ".p"
	qrSuffix  = ".q"
)

// MaxLivePerLocker bounds the live pickups (staging or ready) at one
// locker. Its whole credential set, a PIN and a QR entry per pickup, goes
// out as one retained creds message, which protocol v1 limits to
// protocol.MaxPayload bytes: a set past that could not be sent, and no new
// code would open the locker. A locker at the bound takes no new pickup
// (Allocate passes over it). A combined code takes less room than the
// single ones it replaces.
var MaxLivePerLocker = maxLiveFor(protocol.MaxPayload)

// maxLiveFor is the most pickups whose largest possible credential set
// encodes within limit bytes.
func maxLiveFor(limit int) int {
	mac := protocol.CredMAC(make([]byte, 32), "")
	at := time.Date(2026, 12, 31, 23, 59, 59, 999e6, time.UTC) // every digit of the milliseconds
	set := protocol.CredSet{Version: math.MaxInt64, TS: protocol.T(at)}
	var cs []Credential
	for n := 0; n < protocol.MaxCompartments; n++ {
		// Compartment numbers are any positive int (a vendor's own
		// numbering), so the longest is assumed.
		cs = append(cs, Credential{ID: fleet.NewID("k"), PINMAC: mac, QRMAC: mac, Compartments: []int{math.MaxInt}, NotAfter: at})
		set.Creds = WireCredentials(cs) // group numbers grow with the set
		if len(protocol.Encode(set)) > limit {
			return n
		}
	}
	return protocol.MaxCompartments
}

// WireCredentials renders stored credentials as the locker's set entries.
func WireCredentials(cs []Credential) []protocol.Credential {
	out := make([]protocol.Credential, 0, 2*len(cs))
	groups := 0
	for _, c := range cs {
		// The two forms of one code are one credential: a locker that
		// honours group stops taking the QR once the PIN was used, offline
		// too.
		group := 0
		if c.PINMAC != "" && c.QRMAC != "" {
			groups++
			group = groups
		}
		if c.PINMAC != "" {
			out = append(out, protocol.Credential{ID: c.ID + pinSuffix, Kind: protocol.KindPIN, MAC: c.PINMAC, Compartments: c.Compartments, NotAfter: protocol.T(c.NotAfter), Group: group})
		}
		if c.QRMAC != "" {
			out = append(out, protocol.Credential{ID: c.ID + qrSuffix, Kind: protocol.KindQR, MAC: c.QRMAC, Compartments: c.Compartments, NotAfter: protocol.T(c.NotAfter), Group: group})
		}
	}
	return out
}

// FitSet keeps a set within protocol.MaxPayload: a set past it (more live
// pickups than MaxLivePerLocker, left from a release whose entries were
// shorter) goes out without the groups, which only the offline single use
// across a code's two forms needs, rather than not at all.
func FitSet(set *protocol.CredSet) {
	if len(set.Creds) <= 2*MaxLivePerLocker || len(protocol.Encode(set)) <= protocol.MaxPayload {
		return
	}
	for i := range set.Creds {
		set.Creds[i].Group = 0
	}
}

func credentialID(wire string) string {
	if id, ok := strings.CutSuffix(wire, pinSuffix); ok {
		return id
	}
	id, _ := strings.CutSuffix(wire, qrSuffix)
	return id
}

// publish pushes a locker's credential set after a change. It does not end
// with the request that made the change: a cancel whose client hung up after
// the commit must still take the code off the locker. (A set whose publish
// fails all the same is republished at the fleet's next censuses.)
func (s *Service) publish(ctx context.Context, deviceID string) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	if err := s.o.Fleet.PublishCreds(ctx, deviceID); err != nil {
		s.log.Error("publish credential set", "locker", deviceID, "err", err)
	}
}

func (s *Service) event(typ string, p *Pickup, at time.Time) *Event {
	data := map[string]any{
		"pickup": p.ID, "site": p.Site, "order_ref": p.OrderRef, "platform": p.Platform,
		"locker": p.Locker, "compartment": p.Compartment, "expires_at": p.ExpiresAt,
	}
	// At the precision the transition is stored with (and the API shows).
	return &Event{ID: fleet.NewID("evt"), Type: typ, CreatedAt: at.UTC().Truncate(time.Microsecond), Data: data}
}

func (s *Service) transitioned(p *Pickup, to string) {
	s.m.state.WithLabelValues(to).Inc()
	s.o.Wake()
	s.log.Info("pickup", "pickup", p.ID, "state", to, "locker", p.Locker, "compartment", p.Compartment)
	if p.Withdrawn != "" {
		s.o.Fleet.CommandEnded(protocol.CmdUnlock, p.Withdrawn)
		s.log.Info("staging unlock withdrawn", "pickup", p.ID, "command", p.CommandID, "status", p.Withdrawn)
	}
}

// ExpandEvent completes a stored webhook body: a pickup.ready event names
// its credential by id, and the codes are derived here, at send time, so
// they are never stored.
func (s *Service) ExpandEvent(_ context.Context, role string, body []byte) ([]byte, error) {
	var ev map[string]any
	if err := json.Unmarshal(body, &ev); err != nil {
		return nil, err
	}
	data, _ := ev["data"].(map[string]any)
	cid, ok := data["credential_id"].(string)
	if !ok {
		return body, nil
	}
	notAfter, _ := time.Parse(time.RFC3339Nano, fmt.Sprint(data["expires_at"]))
	if na, ok := data["credential_not_after"].(string); ok {
		notAfter, _ = time.Parse(time.RFC3339Nano, na)
	}
	kind, _ := data["credential_kind"].(string) // "": a PIN and a QR token
	delete(data, "credential_id")
	delete(data, "credential_kind")
	delete(data, "credential_not_after")
	if role != fleet.RoleOperator { // fleet operators never see codes
		data["credential"] = s.View(cid, notAfter, kind)
	}
	return json.Marshal(ev)
}
