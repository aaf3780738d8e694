// Package pickup is the handoff: staff stage an order in a compartment, the
// gateway mints an offline-valid credential for the driver, and the pickup
// ends picked up, expired or cancelled. It drives lockers through the fleet
// manager and tells delivery platforms through the webhook outbox.
package pickup

import (
	"context"
	"errors"
	"time"

	"github.com/lockergate/lockergate/fleet"
)

// Pickup states: staging → ready → picked_up | expired | cancelled.
const (
	Staging   = "staging"
	Ready     = "ready"
	PickedUp  = "picked_up"
	Expired   = "expired"
	Cancelled = "cancelled"
)

// States lists every state (for metrics).
var States = []string{Staging, Ready, PickedUp, Expired, Cancelled}

// Live reports whether a pickup in state s still holds its compartment.
func Live(s string) bool { return s == Staging || s == Ready }

// Errors of the pickup domain.
var (
	// ErrNoCompartment: no free compartment fits (size, zone, in service, locker online).
	ErrNoCompartment = errors.New("no free compartment fits")
	// ErrPINTaken: the derived PIN collides with an active one at the locker.
	ErrPINTaken = errors.New("pin collides with an active credential")
	// ErrKeyChanged: the locker was re-provisioned (a new cred_key) while
	// a credential was made for the old one.
	ErrKeyChanged = errors.New("the locker's credential key changed")
)

// Recipient says who collects a pickup.
type Recipient struct {
	Kind     string `json:"kind"` // "driver" or "customer"
	Platform string `json:"platform,omitempty"`
	Name     string `json:"name,omitempty"`
}

// Pickup is one order handed over through a locker compartment.
type Pickup struct {
	ID           string          `json:"id"`
	Site         string          `json:"site"`
	OrderRef     string          `json:"order_ref"`
	Platform     string          `json:"platform,omitempty"`
	Recipient    Recipient       `json:"recipient"`
	Size         string          `json:"size"`
	Zone         string          `json:"zone"`
	Locker       string          `json:"locker"`
	Compartment  int             `json:"compartment"`
	State        string          `json:"state"`
	ExpiresAt    time.Time       `json:"expires_at"`
	CredentialID string          `json:"-"`
	CommandID    string          `json:"staging_command,omitempty"`
	CreatedBy    string          `json:"created_by"`
	CreatedAt    time.Time       `json:"created_at"`
	ReadyAt      *time.Time      `json:"ready_at,omitempty"`
	DoneAt       *time.Time      `json:"done_at,omitempty"`
	Credential   *CredentialView `json:"credential,omitempty"`
	Transitions  []Transition    `json:"transitions,omitempty"`
	// LockerSilent, in the answer to its creation only: the locker is
	// online but was not heard from lately (every locker with room at the
	// site was so); its staging unlock may go unanswered.
	LockerSilent bool `json:"locker_silent,omitempty"`
	// LockerClockSkewed, in the answer to its creation only: the locker's
	// clock is off (an open clock_skew alert; every locker with room at the
	// site was so), and it judges the staging unlock's expires_at and the
	// code's not_after by it.
	LockerClockSkewed bool `json:"locker_clock_skewed,omitempty"`
	// RecipientPlatformUnknown, in the answer to its creation only: no
	// platform token (not revoked) has the name recipient.platform gives,
	// so no platform can see the pickup or its code until one is made
	// with that name (a typo strands the order).
	RecipientPlatformUnknown bool `json:"recipient_platform_unknown,omitempty"`
	// Withdrawn is the status its staging unlock ended in (expired or
	// timed_out) when the transition that returned it withdrew that unlock
	// (Store.Transition); "" otherwise.
	Withdrawn string `json:"-"`
	// Alerted is the kind of the alert Store.Transition raised with the
	// transition it returned the pickup from ("": none).
	Alerted string `json:"-"`
}

// Transition is one recorded state change.
type Transition struct {
	TS     time.Time `json:"ts"`
	From   string    `json:"from"`
	To     string    `json:"to"`
	Actor  string    `json:"actor"`
	Detail string    `json:"detail,omitempty"`
}

// CredentialView is a credential as the store and the platform see it.
type CredentialView struct {
	ID           string    `json:"id"`
	Code         string    `json:"code,omitempty"`
	QR           string    `json:"qr,omitempty"`
	NotAfter     time.Time `json:"not_after"`
	Locker       string    `json:"locker,omitempty"`
	Compartments []int     `json:"compartments,omitempty"`
	Pickups      []string  `json:"pickups,omitempty"`
}

// Credential is a stored credential: MACs only, never the codes.
type Credential struct {
	ID           string
	DeviceID     string
	PINMAC       string // "" when the credential has no PIN
	QRMAC        string // "" when it has no QR token
	Compartments []int
	NotAfter     time.Time
	CreatedAt    time.Time
	// KeyGen is the generation of the locker's cred_key the MACs are
	// made with.
	KeyGen int
	// Audit, when set, is recorded with the credential (MintCredential),
	// its detail given the credential's id and compartments.
	Audit *fleet.AuditEntry
}

// Filter selects pickups for a list.
type Filter struct {
	Site, State, Platform, After string
	Limit                        int
}

// Event is a webhook event about a pickup, queued in the same transaction as
// the transition it reports.
type Event struct {
	ID        string         `json:"id"`
	Type      string         `json:"type"`
	CreatedAt time.Time      `json:"created_at"`
	Data      map[string]any `json:"data"`
}

// Webhook event types.
const (
	EventReady     = "pickup.ready"
	EventPickedUp  = "pickup.picked_up"
	EventExpired   = "pickup.expired"
	EventCancelled = "pickup.cancelled"
	// EventCredentialChanged: a ready pickup's codes were replaced
	// (Service.RotateCodes; a fresh code after the order was left inside;
	// a combined code, Service.Combine); the old ones no longer open the
	// compartment.
	EventCredentialChanged = "pickup.credential_changed"
)

// EventTypes lists the webhook event types.
var EventTypes = []string{EventReady, EventPickedUp, EventExpired, EventCancelled, EventCredentialChanged}

// CollectGrace is how long after a pickup's code opened its compartment
// the pickup is being collected: the driver has the door open, and its
// door_closed decides (picked up, or not taken). Until then it does not
// expire, even past expires_at: a code accepted a moment before expiry must
// not leave an order taken as "expired: retrieve the order". Past it (a door
// left open, an event lost) the pickup expires as any other.
const CollectGrace = 15 * time.Minute

// ExpiredAlert is the alert that tells staff to retrieve expired pickup
// p's order, raised at its expiry (p.DoneAt); or, for one that expired
// staging, that its order never reached the locker.
func ExpiredAlert(p *Pickup) fleet.Alert {
	detail := "pickup " + p.ID + " (" + p.OrderRef + ") expired: retrieve the order"
	if p.ReadyAt == nil {
		detail = "pickup " + p.ID + " (" + p.OrderRef + ") expired before it was loaded (its compartment never closed with the order inside): hand the order over another way"
	}
	a := fleet.Alert{DeviceID: p.Locker, Kind: fleet.AlertPickupExpired, Compartment: p.Compartment, Detail: detail}
	if p.DoneAt != nil {
		a.RaisedAt = *p.DoneAt
	}
	return a
}

// CancelledAlert is the alert that tells staff to take out the order of
// pickup p, cancelled by actor (p.DoneAt), raised when its compartment may
// hold it: a ready pickup's does, and a staging one's may when an unlock
// opened it for loading or may have (Store.Transition). Nothing else would
// tell them: the compartment, occupied, is allocated to no other order, and
// a closing with the order inside finds no pickup to make ready.
func CancelledAlert(p *Pickup, actor string) fleet.Alert {
	detail := "pickup " + p.ID + " (" + p.OrderRef + ") cancelled by " + actor + ": retrieve the order"
	if p.ReadyAt == nil {
		detail = "pickup " + p.ID + " (" + p.OrderRef + ") cancelled by " + actor + " while its compartment was open for loading: take the order out if it is inside"
	}
	a := fleet.Alert{DeviceID: p.Locker, Kind: AlertCancelled, Compartment: p.Compartment, Detail: detail}
	if p.DoneAt != nil {
		a.RaisedAt = *p.DoneAt
	}
	return a
}

// DoorUse is a code's use that a door's opening reported
// (Store.UseCredentialByDoor): At, when the gateway got it (the
// credential's used_at), and Opened, when the door opened by the locker's
// clock.
type DoorUse struct {
	At, Opened time.Time
	// Ready are the ready pickups the used credential is still for.
	Ready []Pickup
}

// Store persists pickups and credentials.
type Store interface {
	// Allocate picks the smallest free compartment that fits p (size at
	// least p.Size, zone, in service, not occupied, no live pickup, locker
	// online and enabled, no unlock of it unanswered that has not expired
	// at p.CreatedAt), at a locker heard from since heardSince if one has
	// room (zero: no preference; p.LockerSilent tells which), and inserts p holding it, with its
	// pickup.create audit entry. Concurrent allocations never share a
	// compartment. ErrNoCompartment when none fits; fleet.ErrConflict when
	// a live pickup of the site and platform has the order_ref;
	// fleet.ErrExists when a pickup has p.ID.
	Allocate(ctx context.Context, p *Pickup, heardSince time.Time) error
	GetPickup(ctx context.Context, id string) (*Pickup, error)
	ListPickups(ctx context.Context, f Filter) ([]Pickup, error)
	Transitions(ctx context.Context, id string) ([]Transition, error)
	// LivePickupAt returns the staging or ready pickup of a compartment, or fleet.ErrNotFound.
	LivePickupAt(ctx context.Context, deviceID string, n int) (*Pickup, error)
	// Transition moves a pickup from one of from to to, records it and
	// queues ev (when not nil) for every matching webhook, atomically. A
	// pickup that ends leaves its active credential: revoked, or narrowed
	// to the compartments of the other live pickups it opens; its staging
	// unlock, when still unanswered, is withdrawn: not sent again (pending
	// ones end expired, sent ones timed_out, with the reason in error;
	// the returned pickup's Withdrawn says which).
	// fleet.ErrConflict when the pickup is in none of from, or, to Expired
	// or Cancelled, while it is being collected (CollectGrace). To Expired
	// it raises the pickup's ExpiredAlert in the same transaction; to
	// Cancelled its CancelledAlert, when it was ready or an unlock of its
	// compartment since it was made was answered ok or sent unanswered.
	// The returned pickup's Alerted names the kind raised.
	Transition(ctx context.Context, id string, from []string, to, actor, detail string, at time.Time, ev *Event) (*Pickup, error)
	// MintCredential stores c for the pickups, retiring their previous
	// credentials and any of the locker's that opens no live pickup, and
	// bumps the locker's credential-set version.
	// ErrPINTaken when the PIN collides; ErrKeyChanged when the locker's
	// key generation is no longer c.KeyGen. With announce, the event it
	// makes for each of the pickups that is ready (their codes changed) is
	// queued in the same transaction. Unless replaceUsed (the fresh code
	// for an order left inside after its code was used), fleet.ErrConflict
	// while a pickup is being collected (its code used within CollectGrace):
	// its door's closing must find that code.
	MintCredential(ctx context.Context, c *Credential, pickupIDs []string, replaceUsed bool, announce func(*Pickup, *Credential) *Event) error
	// RekeyCredentials gives a locker's active credentials new MACs, made
	// by mac for its current key generation, and bumps its credential-set
	// version, in one transaction; ErrKeyChanged when the locker was
	// re-provisioned meanwhile.
	RekeyCredentials(ctx context.Context, deviceID string, mac func(gen int, c *Credential)) (int, error)
	// RotateCredentials replaces each active credential of a locker that
	// opens live pickups by the one mint makes of it (for the current key
	// generation, given the old one narrowed to those pickups'
	// compartments): the old ones are revoked and name their replacement,
	// the pickups point to the new ones, event's event is queued for each
	// ready pickup, credentials of no live pickup are revoked, the set
	// version is bumped and a is audited, in one transaction that holds the
	// locker's lock. It returns how many were replaced; ErrPINTaken when a
	// new PIN collides, ErrKeyChanged when the locker was re-provisioned
	// meanwhile (nothing changed either way).
	RotateCredentials(ctx context.Context, deviceID string, at time.Time, mint func(gen int, old *Credential) *Credential,
		event func(p *Pickup, c *Credential) *Event, a fleet.AuditEntry) (int, error)
	// UseCredential marks a locker's credential used (single use) and bumps
	// the set version; it returns the live pickups it was for. A credential
	// that was rotated counts as its replacement. A use recorded already at
	// the same at (the same event, offered again) changes nothing and
	// returns those pickups all the same; any other use of a credential not
	// active is fleet.ErrNotFound. compartments are those the locker said
	// it opened (nil: not said), for the use's audit entry.
	UseCredential(ctx context.Context, deviceID, credID string, at time.Time, compartments []int) ([]Pickup, error)
	// UseCredentialByDoor is UseCredential for a use the locker reported
	// with a door's opening (door_opened by the credential, at opened by
	// its clock) before, or instead of, its code_accepted; the credential
	// is marked spent so. A credential spent already, by code_accepted or
	// by another opening (a combined code opens several doors), is
	// fleet.ErrNotFound. compartment is the door's, for the audit entry.
	UseCredentialByDoor(ctx context.Context, deviceID, credID string, at, opened time.Time, compartment int) ([]Pickup, error)
	// ReportDoorUse records the code_accepted, arrived at at, of a use that
	// a door's opening spent already (UseCredentialByDoor) and returns that
	// use; nil when there is none: each use is reported by one
	// code_accepted, so a second (at another at) is not one, nor is a code
	// spent by code_accepted. The same at again (the event offered again)
	// returns the use again. A credential that was rotated counts as its
	// replacement. The use comes with the ready pickups the spent
	// credential is for.
	ReportDoorUse(ctx context.Context, deviceID, credID string, at time.Time) (*DoorUse, error)
	// UseExpiredCredential records that a locker's credential that is no
	// longer active (or was spent by this very use, at at: a combined code
	// that opened live pickups too, whose compartments, those it had when
	// spent, are then left out) opened, at used by the locker's clock,
	// the compartments (empty: all of the credential's) of pickups that
	// expired after used: a driver collected in time while the locker was
	// offline, and its report came after the expiry. It marks the pickups
	// collected at at (a revoked credential stays revoked) and audits the
	// use, and returns the pickups. A credential that was rotated counts as
	// its replacement. The same use recorded already (the same at) changes
	// nothing and returns them all the same, in whatever state they are
	// now. fleet.ErrNotFound when the credential opened no pickup, or any
	// pickup that is not expired or expired before used, or it was spent
	// by another use.
	UseExpiredCredential(ctx context.Context, deviceID, credID string, used, at time.Time, compartments []int) ([]Pickup, error)
	// LateCollectionAt returns the last pickup created at a locker's
	// compartment by at when it is expired and marked collected
	// (UseExpiredCredential) and not judged since (JudgeLateCollection),
	// with the use's time by the locker's clock; fleet.ErrNotFound
	// otherwise. The use may have arrived after at: behind an external
	// broker a closing and the use before it are applied by different
	// instances, in either order.
	LateCollectionAt(ctx context.Context, deviceID string, n int, at time.Time) (*Pickup, time.Time, error)
	// LateCollectionOf is LateCollectionAt for pickup id: it when expired,
	// marked collected and not judged since; fleet.ErrNotFound otherwise.
	LateCollectionOf(ctx context.Context, id string) (*Pickup, time.Time, error)
	// JudgeLateCollection records that the first closing after an expired
	// pickup's late-reported use did not end it (the order left inside, or
	// the door closed past CollectGrace): LateCollectionAt no longer
	// returns it.
	JudgeLateCollection(ctx context.Context, id string) error
	// DoorClosingsAfter returns the door_closed events of a locker's
	// compartment received after since whose device time is at or after
	// after (a closing in the code's own millisecond follows it), in the
	// locker's order (its ts), the first at most 100.
	DoorClosingsAfter(ctx context.Context, deviceID string, n int, since, after time.Time) ([]fleet.EventRecord, error)
	// GetCredential returns a credential and its state.
	GetCredential(ctx context.Context, id string) (*Credential, string, error)
	// CredentialState returns the state of a locker's credential: active,
	// used, revoked or expired; fleet.ErrNotFound when it has none by id.
	CredentialState(ctx context.Context, deviceID, id string) (string, error)
	// SpentFor returns the compartments a locker's credential (or the one
	// that replaced it) was live for when the use recorded at at spent it
	// (UseCredential, UseCredentialByDoor); none when no use at at spent it.
	SpentFor(ctx context.Context, deviceID, id string, at time.Time) ([]int, error)
	// WithdrawStagingFailed withdraws, as the gateway and audited with
	// reason, the open staging_failed alert of a locker's compartment n
	// raised for the pickup whose staging unlock is command; false when
	// there is none.
	WithdrawStagingFailed(ctx context.Context, deviceID string, n int, command, reason string, at time.Time) (bool, error)
	// RaiseAlert records an alert (see fleet.Store).
	RaiseAlert(ctx context.Context, a fleet.Alert) (bool, error)
	// WithdrawAlert clears, as actor and audited with reason, the open
	// alert a names (its locker, kind, compartment and raised_at); false
	// when there is none.
	WithdrawAlert(ctx context.Context, a fleet.Alert, actor, reason string, at time.Time) (bool, error)
	// DuePickups returns live pickups past expires_at, except those being
	// collected (CollectGrace).
	DuePickups(ctx context.Context, now time.Time, limit int) ([]Pickup, error)
	// KeyGen returns the generation of a locker's cred_key.
	KeyGen(ctx context.Context, deviceID string) (int, error)
	// Occupancy counts compartments and occupied ones per site.
	Occupancy(ctx context.Context) (map[string][2]int, error)
	Audit(ctx context.Context, e fleet.AuditEntry) error
}
