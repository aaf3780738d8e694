package fleet

import (
	"context"
	"time"

	"github.com/lockergate/lockergate/protocol"
)

// CredsLag is a locker that has not acknowledged its current credential set.
type CredsLag struct {
	DeviceID string
	Version  int64 // the current version
	// Ahead, from AckCredsMany only: the version the locker acknowledged,
	// above its current set's (no such set was published: not recorded);
	// 0 when its acknowledgement went back instead.
	Ahead int64
}

// Store is the fleet's persistent state. The PostgreSQL implementation lives
// in package postgres; every method is safe for concurrent use.
type Store interface {
	// GetLocker returns a locker with its compartments, or ErrNotFound.
	GetLocker(ctx context.Context, id string) (*Locker, error)
	// ListLockers returns lockers ordered by id, after f.After.
	ListLockers(ctx context.Context, f LockerFilter) ([]Locker, error)
	// EnabledLockerIDs returns the ids of up to limit enabled lockers,
	// ordered by id, after after: a page of the fleet without its rows.
	EnabledLockerIDs(ctx context.Context, after string, limit int) ([]string, error)

	// MarkOnlineMany records new sessions of lockers, one per locker, in one
	// statement (a reconnect storm starts thousands).
	MarkOnlineMany(ctx context.Context, starts []SessionStart) error
	// MarkOfflineMany records the end of sessions in one statement (a
	// shutdown or a network outage ends thousands at once): each locker goes
	// offline unless a newer session of it started after its end.
	MarkOfflineMany(ctx context.Context, ends []SessionEnd) error
	// RecordBirths stores what birth messages of distinct lockers say
	// about them, in one statement; ErrInvalid when the database refuses
	// one (none is stored then).
	RecordBirths(ctx context.Context, births []BirthRecord) error
	// StartSessionWithBirth starts a session of b's locker from birth b and
	// records the birth (RecordBirths), atomically, unless the locker is
	// online from that very birth (a copy of it: its boot id and ts);
	// false then. Behind an external broker, whose births are the session
	// starts and may come twice (retained and live, to two instances).
	StartSessionWithBirth(ctx context.Context, b BirthRecord) (bool, error)

	// InsertHealth stores a batch of health messages and, in the same
	// transaction, the latest health of the lockers in latest (either may
	// be empty). A latest older than the one stored is ignored.
	InsertHealth(ctx context.Context, batch []HealthRecord, latest []LatestHealth) error
	// InsertEvents stores the events of batch not seen before (by locker and
	// event id), applies them to compartment state and their alert changes
	// (EventRecord.Alert), and returns those it stored. An event stored
	// before with the same ReceivedAt (this very message, by an earlier
	// try of the call whose commit's answer was lost) is returned too, as
	// stored, and not applied again.
	InsertEvents(ctx context.Context, batch []EventRecord) ([]EventRecord, error)
	// ListHealth and ListEvents return a locker's history in a time range.
	ListHealth(ctx context.Context, id string, r Range) ([]HealthRecord, error)
	ListEvents(ctx context.Context, id string, r Range) ([]EventRecord, error)
	// RaiseAlert records an alert about a locker; false when the same
	// stateful alert is already open, or the same alert (locker, kind,
	// compartment and time) was raised already.
	RaiseAlert(ctx context.Context, a Alert) (bool, error)
	// RaiseDoorsLeftOpen raises, at time at, a door_ajar alert for each
	// compartment (up to limit) whose door its locker last reported open
	// before openBefore (by arrival) with no door_ajar alert raised since
	// (open, or cleared by hand: not raised again until the door closes),
	// and returns the alerts it opened.
	RaiseDoorsLeftOpen(ctx context.Context, openBefore, at time.Time, limit int) ([]Alert, error)
	// ClearAlerts clears a locker's open alerts of kind, except those of the
	// compartments in keep (0 stands for "no compartment").
	ClearAlerts(ctx context.Context, deviceID, kind string, keep []int, at time.Time) (int, error)
	// OpenAlertCompartments returns, per locker, the compartments of its
	// open alerts of kind (0 for "no compartment"), in order.
	OpenAlertCompartments(ctx context.Context, kind string) (map[string][]int, error)

	// CreateCommand inserts the new command c and, when audit is not nil,
	// its audit entry (with the locker's site), atomically, if c's locker
	// is of site (any site when site is "") and has c's compartment (when
	// c.Compartment > 0). To an online, enabled locker c is stored as sent,
	// at c.CreatedAt, for the caller to publish at once (a publish that
	// fails is repeated, by id, when the locker next connects); to others
	// it is stored as pending. c.Status and c.SentAt are set as stored. It
	// returns what it saw of the locker and whether it inserted c, or
	// ErrNotFound when there is no such locker, ErrExists when a command
	// with c.ID is stored (nothing is inserted then). With c.Pickup, c is
	// inserted only while that pickup is live, and recorded on it, with the
	// pickup's row locked against a concurrent end (PickupEnded otherwise).
	// One round trip: it is on every unlock's path.
	CreateCommand(ctx context.Context, c *Command, audit *AuditEntry, site string) (CommandTarget, bool, error)
	// GetCommand returns a command of a locker, or ErrNotFound.
	GetCommand(ctx context.Context, deviceID, id string) (*Command, error)
	// MarkCommandSent moves a pending command that has not expired at at to
	// sent; false when it is no longer pending or has expired. It is called
	// before the command is published, so that no command the locker may
	// hold is then expired as never sent.
	MarkCommandSent(ctx context.Context, id string, at time.Time) (bool, error)
	// CompleteCommand records a device's answer to a pending or sent command of
	// that device; it returns the updated command, or ErrNotFound when there is
	// no such open command (unknown, another device's, or already final).
	CompleteCommand(ctx context.Context, deviceID, id, status, errText string, at time.Time) (*Command, error)
	// ExpireCommands finalises open commands past their deadline: pending ones
	// past expires_at become expired, sent ones past expires_at+grace timed_out.
	ExpireCommands(ctx context.Context, now time.Time, grace time.Duration) ([]Command, error)
	// OpenCommands returns the pending and sent commands of lockers that
	// have not expired at now, each locker's oldest first.
	OpenCommands(ctx context.Context, deviceIDs []string, now time.Time) ([]Command, error)
	// UnansweredCommands returns up to limit open commands of online,
	// enabled lockers that have not expired at now: sent ones sent at or
	// before sentBefore, and pending ones created at or before it (a
	// command stored pending as its locker came online, after the birth's
	// delivery had read the open commands); oldest first, leaving out the
	// commands in skip (those the caller sent again and that are not due).
	UnansweredCommands(ctx context.Context, now, sentBefore time.Time, limit int, skip []string) ([]Command, error)

	// WatchCommands calls fn with the id of every command whose status
	// changed on any gateway instance, until ctx ends; and with "" when
	// some may have been missed (every waiter then reads its command again).
	WatchCommands(ctx context.Context, fn func(id string)) error

	// Retained returns what a locker must hold on its retained topics.
	Retained(ctx context.Context, deviceID string) (*Retained, error)
	// RetainedMany is Retained for many lockers at once, in one snapshot;
	// lockers that do not exist are missing from the map.
	RetainedMany(ctx context.Context, deviceIDs []string) (map[string]*Retained, error)
	// CredsVersions returns the credential-set version of each locker of
	// deviceIDs that exists (a read of their devices rows alone).
	CredsVersions(ctx context.Context, deviceIDs []string) (map[string]int64, error)
	// AckCredsMany records the credential-set version each locker applied
	// last, one per locker, and returns the lockers whose acknowledgement
	// went back to an older set than the one they had acknowledged, leaving
	// them behind their current set (with its version), and those whose
	// acknowledgement is ahead of their current set (CredsLag.Ahead), which
	// it does not record.
	AckCredsMany(ctx context.Context, acks []CredsAck) (back []CredsLag, err error)
	// TouchLockers moves each locker's last_seen forward to its time in at
	// (a message heard from it), never back; ids are distinct.
	TouchLockers(ctx context.Context, ids []string, at []time.Time) error
	// EffectsApplied drops a locker's events from the outbox of effects to
	// apply (InsertEvents writes there the fresh events marked Pending).
	EffectsApplied(ctx context.Context, deviceID string, eventIDs []string) error
	// PendingEffects claims for lease up to limit events of the outbox
	// received before before and not claimed by another caller (with
	// reclaim, claimed or not: a single instance's start), and returns them
	// oldest first, marked Pending.
	PendingEffects(ctx context.Context, before time.Time, limit int, lease time.Duration, reclaim bool) ([]EventRecord, error)
	// LockEffects waits for, and holds until release, a lock on applying
	// a locker's event effects. Instances sharing a broker's group get
	// one locker's events in turns, and take it so that their effects
	// (one judging a closing that another is applying) do not interleave.
	// The lock is sure to hold until until (unless released): past it the
	// store may have given it to another holder (postgres: a holder idle
	// past a bound loses it), so the holder stops its steps by then.
	LockEffects(ctx context.Context, deviceID string) (until time.Time, release func(), err error)
	// CredsBehind returns up to limit online, enabled lockers whose last
	// acknowledged credential set is older than their current one, with the
	// current version, leaving out those in skip at the version given
	// there (lockers the caller gave up on until their set changes).
	CredsBehind(ctx context.Context, limit int, skip []CredsLag) ([]CredsLag, error)

	// Audit appends to the audit log.
	Audit(ctx context.Context, e AuditEntry) error

	// Census counts the fleet for the fleet-wide gauges: stale lockers are
	// online but last seen before staleBefore, flapping ones had
	// FlappingConnects sessions since flapSince; open alerts only of kinds.
	Census(ctx context.Context, staleBefore, flapSince time.Time, kinds []string) (*Census, error)
}

// Retained is the state a locker must receive after every (re)connect.
type Retained struct {
	Creds  protocol.CredSet
	Config protocol.Config
	// FwJob is nil when the locker has no firmware job.
	FwJob *protocol.FwJob
}

// Alert kinds.
const (
	AlertDoorAjar      = "door_ajar"
	AlertTamper        = "tamper"
	AlertOnBattery     = "on_battery"
	AlertDoorFault     = "door_fault"
	AlertCodeLockout   = "code_lockout"
	AlertStagedEmpty   = "staged_empty"
	AlertPickupExpired = "pickup_expired"
	// AlertClockSkew: a locker's clock is further than
	// Options.MaxClockSkew from the gateway's.
	AlertClockSkew = "clock_skew"
	// AlertCredsNotApplied: a locker did not acknowledge its credential
	// set after credsRepublishTries republishes (reconcileCreds); cleared
	// when it acknowledges its current one.
	AlertCredsNotApplied = "creds_not_applied"
)

// AlertKinds are the kinds the fleet manager raises (the pickup workflow
// raises pickup.AlertKinds, among them AlertStagedEmpty and
// AlertPickupExpired).
var AlertKinds = []string{AlertDoorAjar, AlertTamper, AlertOnBattery, AlertDoorFault, AlertCodeLockout, AlertClockSkew, AlertCredsNotApplied}

// Alert is something an operator or store should look at.
type Alert struct {
	// ID is sent as a string: ids are opaque strings (api-v1).
	ID          int64      `json:"id,string"`
	DeviceID    string     `json:"locker"`
	Site        string     `json:"site,omitempty"` // the locker's site (read only)
	Kind        string     `json:"kind"`
	Compartment int        `json:"compartment,omitempty"`
	Detail      string     `json:"detail,omitempty"`
	RaisedAt    time.Time  `json:"raised_at"`
	ClearedAt   *time.Time `json:"cleared_at,omitempty"`
	// ClearedBy is who cleared it by hand (an API token's actor), or
	// "gateway" when the gateway withdrew it (a pickup_removed that the
	// late report of its code's use disproved); empty when its condition
	// ended or it is open.
	ClearedBy string `json:"cleared_by,omitempty"`
	// Repeats is how often the alert was raised again while open (kinds
	// of which one is open at a time: stateful ones, tamper, code
	// lockout), the last time at LastRaisedAt; Detail is the latest's.
	Repeats      int        `json:"repeats,omitempty"`
	LastRaisedAt *time.Time `json:"last_raised_at,omitempty"`
	// Audit, when set, is written with the alert, in its transaction, and
	// only when the alert is opened: an event applied again (a replay)
	// neither raises its alert twice nor audits it twice.
	Audit *AuditEntry `json:"-"`
}

// AlertFilter selects alerts for a list, newest first.
type AlertFilter struct {
	Site, Locker, Kind string
	// Open, when set, keeps only open (true) or only cleared (false) alerts.
	Open  *bool
	Since time.Time // raised at or after
	// Before is the cursor: alerts with a smaller id (0: from the newest).
	Before int64
	Limit  int
}

// AlertChange is what an event does to its locker's alerts: Raise opens an
// alert (none when one of its kind is open already, for the kinds that
// hold one open at a time), and ClearKind, if set, clears the open alerts
// of that kind at compartment ClearAt (0: at every compartment).
// InsertEvents applies it in the transaction that stores the event, so a
// stored event never loses its alert, and a duplicate event (not stored
// again) raises none.
type AlertChange struct {
	Raise *Alert
	// IfRejected, when set, makes Raise conditional on the locker's
	// recently rejected codes (RejectedCodes).
	IfRejected *RejectedCodes
	ClearKind  string
	ClearAt    int
	// Raised is set by the store: Raise opened a new alert.
	Raised bool
}

// RejectedCodes makes an alert's raise conditional: the alert is raised
// only when the locker's rejected codes (its code_rejected events other
// than locked_out, which the lockout itself causes), the raising event
// included, number at least Min with a ts (the locker's clock) within
// Window up to the raising event's. So the gateway sees too many rejected
// codes at a locker that does not lock its keypad, as the locker would
// lock it (protocol.Lockout), whatever its firmware does.
type RejectedCodes struct {
	Window time.Duration
	Min    int
}

// BirthRecord is a locker's birth message, received at At, to store with
// its clock offset (Presence.TS - At; none when it has no ts). ClearSkew
// clears the locker's clock_skew alert in the same step.
type BirthRecord struct {
	ID        string
	Presence  *protocol.Presence
	At        time.Time
	ClearSkew bool
	// NoOffset records no clock offset (unknown): the birth's arrival is
	// not when it was sent (one held by a broker while no gateway instance
	// ran reads minutes behind, clock right or not).
	NoOffset bool
	// Retained: a copy an external broker handed a new subscription
	// (StartSessionWithBirth).
	Retained bool
}

// SessionStart is the start of one locker's session.
type SessionStart struct {
	ID string
	At time.Time
}

// CredsAck is the credential-set version a locker acknowledged.
type CredsAck struct {
	ID      string
	Version int64
}

// SessionEnd is the end of one locker's session.
type SessionEnd struct {
	ID     string
	Reason string
	At     time.Time
}

// CommandTarget is what sending a command needs to know of its locker.
type CommandTarget struct {
	Site string
	// HasCompartment: the locker has the command's compartment (true for a
	// command without one).
	HasCompartment bool
	// PickupEnded: the command was for a pickup (Command.Pickup) that is
	// no longer live; nothing was stored.
	PickupEnded bool
	// Disabled: the locker is disabled; nothing was stored (a disabled
	// locker is sent no command, now or when it is enabled again).
	Disabled bool
}
