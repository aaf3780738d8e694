package devicesim

import (
	"errors"
	"fmt"
	"regexp"
	"sort"
	"strings"
)

// Errors of the simulator, checked with errors.Is.
var (
	// ErrClosed is returned once the fleet is closed.
	ErrClosed = errors.New("devicesim: fleet closed")
	// ErrNotStarted is returned by calls that need a started fleet.
	ErrNotStarted = errors.New("devicesim: fleet not started")
	// ErrProvisionRefused wraps a provisioning answer with status error.
	ErrProvisionRefused = errors.New("provisioning refused")
	// ErrConnRefused wraps a CONNACK that refuses the credentials or client
	// id; the locker does not retry it on its own (Reconnect does).
	ErrConnRefused = errors.New("connection refused by broker")
	// ErrDisconnected is returned while a locker is held down by Disconnect.
	ErrDisconnected = errors.New("devicesim: locker disconnected")
)

// ProvisionError is a provisioning answer with status error; Code is the
// protocol's error code (claim_expired, claim_exhausted, serial_taken, invalid).
type ProvisionError struct {
	Code string
}

// Error implements error.
func (e *ProvisionError) Error() string { return "provisioning refused: " + e.Code }

// Is makes errors.Is(err, ErrProvisionRefused) hold.
func (e *ProvisionError) Is(target error) bool { return target == ErrProvisionRefused }

// permanent reports whether retrying err without outside change is pointless.
func permanent(err error) bool {
	return errors.Is(err, ErrProvisionRefused) || errors.Is(err, ErrConnRefused)
}

// StartError tells which lockers Start could not connect, and why.
type StartError struct {
	Total  int
	Failed map[string]error // by serial
}

type errGroup struct {
	msg     string
	err     error
	serials []string
}

// perLocker matches the parts of error messages that differ from locker to
// locker (device ids, local ports), so failures group by their cause.
var perLocker = regexp.MustCompile(`\blk-[A-Za-z0-9_-]+|:[0-9]{2,5}->`)

func (e *StartError) groups() []errGroup {
	by := map[string]*errGroup{}
	for serial, err := range e.Failed {
		key := perLocker.ReplaceAllStringFunc(err.Error(), func(m string) string {
			if strings.HasPrefix(m, ":") {
				return ":*->"
			}
			return "lk-*"
		})
		g := by[key]
		if g == nil {
			g = &errGroup{msg: key, err: err}
			by[key] = g
		}
		g.serials = append(g.serials, serial)
	}
	out := make([]errGroup, 0, len(by))
	for _, g := range by {
		sort.Strings(g.serials)
		out = append(out, *g)
	}
	sort.Slice(out, func(i, j int) bool {
		if len(out[i].serials) != len(out[j].serials) {
			return len(out[i].serials) > len(out[j].serials)
		}
		return out[i].msg < out[j].msg
	})
	return out
}

// Error summarises the failures by reason, most frequent first.
func (e *StartError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "devicesim: %d of %d lockers not connected", len(e.Failed), e.Total)
	gs := e.groups()
	for i, g := range gs {
		if i == 5 {
			fmt.Fprintf(&b, "; and %d more reasons", len(gs)-i)
			break
		}
		ex := g.serials
		more := ""
		if len(ex) > 3 {
			ex, more = ex[:3], ", ..."
		}
		fmt.Fprintf(&b, "; %d× %s (%s%s)", len(g.serials), g.msg, strings.Join(ex, ", "), more)
	}
	return b.String()
}

// Unwrap returns one error per distinct reason.
func (e *StartError) Unwrap() []error {
	gs := e.groups()
	out := make([]error, len(gs))
	for i, g := range gs {
		out[i] = g.err
	}
	return out
}
