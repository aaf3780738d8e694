// Package fleet is the domain of Lockergate: sites, lockers and their
// compartments, presence, health, events, commands and the retained state
// each locker must hold. It imports no database, broker or HTTP code: those
// adapters implement the small interfaces declared here (Store, Bus).
package fleet

import (
	"encoding/json"
	"errors"
	"fmt"
	"time"
)

// Domain errors, checked with errors.Is at the edges (HTTP status, MQTT reason).
var (
	ErrNotFound = errors.New("not found")
	ErrConflict = errors.New("conflict")
	ErrInvalid  = errors.New("invalid")
	// ErrUnprocessable is a well-formed request the fleet cannot carry out
	// (e.g. a compartment the locker does not have).
	ErrUnprocessable = errors.New("unprocessable")
	// ErrForbidden is a resource that exists but is another site's,
	// platform's or token's (the API's 403).
	ErrForbidden = errors.New("forbidden")
	// ErrExists is a record whose id is taken (Store.CreateCommand with a
	// derived id: the request ran before). A conflict, should it reach an edge.
	ErrExists = fmt.Errorf("exists: %w", ErrConflict)
)

// Site is a store or restaurant with lockers.
type Site struct {
	ID        string    `json:"id"`
	Name      string    `json:"name"`
	Timezone  string    `json:"timezone"`
	CreatedAt time.Time `json:"created_at"`
}

// Compartment is one door of a locker with its last known state.
type Compartment struct {
	N         int    `json:"n"`
	Size      string `json:"size"`
	Zone      string `json:"zone"`
	InService bool   `json:"in_service"`
	Occupied  bool   `json:"occupied"`
	Door      string `json:"door"` // "closed", "open" or "ajar"
	// Pickup is the id of the live (staging or ready) pickup in it; nil
	// (null) when there is none.
	Pickup *string `json:"pickup"`
	// Missing: the locker's board, replaced, no longer reports this
	// compartment; it is kept while a live pickup is in it (Pickup), and
	// nothing new is put there.
	Missing bool `json:"missing,omitempty"`
	// AwaitsCreds is the credential-set version the locker must
	// acknowledge (or a later one) before this compartment takes a new
	// order: the version current when the order that ended there last
	// lost its code, which opens the compartment at the locker till then.
	// 0 (omitted) when it waits for none.
	AwaitsCreds int64 `json:"awaits_creds,omitempty"`
}

// Locker is a registered locker unit as operators see it.
type Locker struct {
	ID               string     `json:"id"`
	Serial           string     `json:"serial"`
	Site             string     `json:"site"`
	Model            string     `json:"model"`
	FW               string     `json:"fw"`
	Online           bool       `json:"online"`
	Stale            bool       `json:"stale"`
	Disabled         bool       `json:"disabled"`
	Replaceable      bool       `json:"replaceable"`
	BootID           string     `json:"boot_id,omitempty"`
	LastSeen         *time.Time `json:"last_seen"`
	ConnectedAt      *time.Time `json:"connected_at,omitempty"`
	DisconnectedAt   *time.Time `json:"disconnected_at,omitempty"`
	DisconnectReason string     `json:"disconnect_reason,omitempty"`
	ConnectCount     int64      `json:"connect_count"`
	// RecentConnects counts sessions started in the last 10 minutes;
	// Flapping is set when it reaches FlappingConnects.
	RecentConnects int64           `json:"recent_connects"`
	Flapping       bool            `json:"flapping"`
	Health         json.RawMessage `json:"health"`
	HealthAt       *time.Time      `json:"health_at,omitempty"`
	HealthGaps     int64           `json:"health_gaps"`
	ConfigVersion  int64           `json:"config_version"`
	CredsVersion   int64           `json:"creds_version"`
	CredsAcked     int64           `json:"creds_acked"`
	// ClockOffsetMS is how far the locker's clock was ahead of the
	// gateway's (negative: behind) at its last birth; nil when that birth
	// had no ts.
	ClockOffsetMS *int64 `json:"clock_offset_ms,omitempty"`
	// BirthTS is the ts of the birth the current (or last) session was
	// recorded from; nil when it had none (internal: copies of a birth
	// are told from a new one by it).
	BirthTS      *time.Time    `json:"-"`
	CredsCurrent bool          `json:"creds_current"`
	Compartments []Compartment `json:"compartments,omitempty"`
	CreatedAt    time.Time     `json:"created_at"`
}

// LockerFilter selects lockers for a list.
type LockerFilter struct {
	Site   string
	Model  string
	FW     string
	Online *bool
	After  string
	Limit  int
}

// HealthRecord is one stored health message.
type HealthRecord struct {
	DeviceID   string          `json:"locker"`
	ReceivedAt time.Time       `json:"received_at"`
	TS         time.Time       `json:"ts"`
	Seq        int64           `json:"seq"`
	Body       json.RawMessage `json:"health"`
}

// EventRecord is one stored device event.
type EventRecord struct {
	DeviceID    string          `json:"locker"`
	EventID     string          `json:"id"`
	ReceivedAt  time.Time       `json:"received_at"`
	TS          time.Time       `json:"ts"`
	Type        string          `json:"type"`
	Compartment int             `json:"compartment,omitempty"`
	Body        json.RawMessage `json:"event"`
	// Pending: the event has effects to apply (EventSink.Wants); it is kept
	// in the store's outbox until they are (EffectsApplied).
	Pending bool `json:"-"`
	// Alert is the event's effect on its locker's alerts, applied with it
	// (see AlertChange); nil: none.
	Alert *AlertChange `json:"-"`
	// claimed: this copy's holder marked it in flight to the sink
	// (Manager.markEffectsBusy) and is the one to clear the mark.
	claimed bool
}

// Key names a locker's event: its locker and its id.
func (e *EventRecord) Key() string { return e.DeviceID + "\x00" + e.EventID }

// Range bounds a time-ranged list. After resumes a list after the row with
// received_at AfterTS and tie-breaker AfterKey (health: seq; events: id).
type Range struct {
	Since    time.Time
	Until    time.Time
	Limit    int
	AfterTS  time.Time
	AfterKey string
}

// AuditEntry records who did what to which locker.
type AuditEntry struct {
	// ID is sent as a string: ids are opaque strings (api-v1).
	ID    int64     `json:"id,string"`
	TS    time.Time `json:"ts"`
	Actor string    `json:"actor"`
	// Token is the id of the API token the action was taken with (empty
	// for the gateway's own doings and a locker's): token names need not
	// be unique. Filled in from the request's context (WithToken).
	Token  string         `json:"token,omitempty"`
	Action string         `json:"action"`
	Locker string         `json:"locker,omitempty"`
	Site   string         `json:"site,omitempty"`
	Detail map[string]any `json:"detail,omitempty"`
}

// AuditFilter selects audit entries.
type AuditFilter struct {
	Since  time.Time
	Locker string
	Actor  string
	Token  string // a token's id
	After  int64
	Limit  int
}
