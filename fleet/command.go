package fleet

import (
	"encoding/json"
	"fmt"
	"time"

	"github.com/lockergate/lockergate/protocol"
)

// Command statuses. pending → sent → ok | failed | rejected | expired | timed_out;
// pending → expired when it could not be sent before expires_at.
const (
	CmdPending  = "pending"
	CmdSent     = "sent"
	CmdOK       = "ok"
	CmdFailed   = "failed"
	CmdRejected = "rejected"
	CmdExpired  = "expired"
	CmdTimedOut = "timed_out"
)

// CommandStatuses lists every status (for metrics).
var CommandStatuses = []string{CmdPending, CmdSent, CmdOK, CmdFailed, CmdRejected, CmdExpired, CmdTimedOut}

// Final reports whether status ends a command.
func Final(status string) bool { return status != CmdPending && status != CmdSent }

// Command TTL bounds (protocol-v1.md: an unlock must not fire hours later).
const (
	DefaultCommandTTL = 30 * time.Second
	MaxCommandTTL     = 300 * time.Second
	// MaxAdminCommandTTL bounds even an admin's explicit request.
	MaxAdminCommandTTL = time.Hour
	// resultGrace is how long after expires_at a sent command may still be
	// answered before it is timed_out (a device answers "expired" itself).
	resultGrace = 5 * time.Second
)

// Command is a command to one locker and its state.
type Command struct {
	ID          string     `json:"id"`
	DeviceID    string     `json:"locker"`
	Type        string     `json:"type"`
	Compartment int        `json:"compartment,omitempty"`
	Reason      string     `json:"reason,omitempty"`
	InService   *bool      `json:"in_service,omitempty"`
	Status      string     `json:"status"`
	Error       string     `json:"error,omitempty"`
	Actor       string     `json:"actor,omitempty"`
	CreatedAt   time.Time  `json:"created_at"`
	ExpiresAt   time.Time  `json:"expires_at"`
	SentAt      *time.Time `json:"sent_at,omitempty"`
	DoneAt      *time.Time `json:"done_at,omitempty"`
	// Pickup is the pickup whose staging unlock this is, when made for one
	// (CommandRequest.Pickup); not stored with the command.
	Pickup string `json:"-"`
	// LateAnswer is set by Store.CompleteCommand when the answer replaced
	// a status the gateway had ended the command with (timed_out, or
	// expired): the command was counted as ended then.
	LateAnswer bool `json:"-"`
	// TimedOut is set in the JSON form of a command whose Status is
	// CmdTimedOut (MarshalJSON), which shows Status as CmdExpired.
	TimedOut bool `json:"timed_out,omitempty"`
}

// MarshalJSON shows a timed_out command (delivered, never answered) as
// api-v1 lists it, status expired ("the device did not run it before
// expires_at"), with timed_out true: api-v1's statuses are the contract's
// six, and timed_out is this gateway's own. The store and the metrics keep
// timed_out.
func (c Command) MarshalJSON() ([]byte, error) {
	type plain Command // without this method
	p := plain(c)
	if p.Status == CmdTimedOut {
		p.Status, p.TimedOut = CmdExpired, true
	}
	return json.Marshal(p)
}

// Wire returns the command as the device receives it.
func (c *Command) Wire() protocol.Command {
	return protocol.Command{
		ID: c.ID, Type: c.Type, Compartment: c.Compartment, Reason: c.Reason,
		InService: c.InService, IssuedAt: protocol.T(c.CreatedAt), ExpiresAt: protocol.T(c.ExpiresAt),
	}
}

// CommandRequest asks for a command to a locker.
type CommandRequest struct {
	// ID, when set, is the command's id; a command with it made before is
	// answered instead of a new one (a request retried under one
	// Idempotency-Key after its first run died with its gateway derives
	// the same id: it never makes a second command, a second unlock).
	ID          string
	DeviceID    string
	Type        string
	Compartment int
	Reason      string
	InService   *bool
	TTL         time.Duration // 0: DefaultCommandTTL
	Actor       string
	// AllowLongTTL lifts MaxCommandTTL (admins only).
	AllowLongTTL bool
	// Site, when set, scopes the request to one site's lockers (a store
	// token): a locker of another site is not found.
	Site string
	// Pickup, when set, is the pickup whose staging unlock this is: the
	// command is made only while the pickup is live (staging or ready), and
	// recorded on it, in the same statement; ErrConflict when it has ended
	// (a cancel that came first: nothing is sent). A cancel after it finds
	// the command on the pickup and withdraws it.
	Pickup string
}

// validate checks what the request says on its own and fills defaults;
// whether the locker has the compartment is checked where the command is
// stored (Store.CreateCommand), in the same round trip.
func (r *CommandRequest) validate() error {
	if r.TTL == 0 {
		r.TTL = DefaultCommandTTL
	}
	max := MaxCommandTTL
	if r.AllowLongTTL {
		max = MaxAdminCommandTTL
	}
	if r.TTL < time.Second || r.TTL > max {
		return fmt.Errorf("%w: ttl_s must be between 1 and %d", ErrInvalid, int(max/time.Second))
	}
	switch r.Type {
	case protocol.CmdUnlock:
		switch r.Reason {
		case "":
			r.Reason = protocol.ReasonRemote
		case protocol.ReasonStaging, protocol.ReasonPickup, protocol.ReasonRemote, protocol.ReasonService:
		default:
			return fmt.Errorf("%w: reason %q: want staging, pickup, remote or service", ErrInvalid, r.Reason)
		}
		r.InService = nil
		return r.needCompartment()
	case protocol.CmdSetService:
		if r.InService == nil {
			return fmt.Errorf("%w: set_service needs in_service", ErrInvalid)
		}
		r.Reason = ""
		return r.needCompartment()
	case protocol.CmdReboot:
		r.Compartment, r.Reason, r.InService = 0, "", nil
		return nil
	default:
		return fmt.Errorf("%w: type %q: want unlock, set_service or reboot", ErrInvalid, r.Type)
	}
}

// needCompartment refuses a request without a compartment (left out, or
// below 1: no locker numbers one so) as malformed. Whether the locker has
// it is the store's check (noCompartment).
func (r *CommandRequest) needCompartment() error {
	if r.Compartment < 1 {
		return fmt.Errorf("%w: %s needs compartment, a number from 1", ErrInvalid, r.Type)
	}
	return nil
}

func (r *CommandRequest) noCompartment() error {
	return fmt.Errorf("%w: locker %s has no compartment %d", ErrUnprocessable, r.DeviceID, r.Compartment)
}
