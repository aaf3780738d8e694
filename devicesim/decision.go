package devicesim

import (
	"cmp"
	"slices"
	"time"
)

// Decision is one choice a simulated device (or the fleet) made from the
// seed: its set-up, a fault, a person's behaviour. Two runs of a scenario
// with the same seed make the same decisions; only when they happen in
// wall-clock time differs. Compare runs with SortDecisions.
type Decision struct {
	// Locker is the fleet index of the locker; -1 for fleet-wide decisions
	// (gateway restarts).
	Locker int    `json:"locker"`
	Serial string `json:"serial,omitempty"`
	// Stream names the random stream that made the decision (setup, drop,
	// flap, outage, jam, tamper, power, restart, keypad, order); N counts the
	// decisions of that stream, from 0.
	Stream string `json:"stream"`
	N      int    `json:"n"`
	// At is the scenario time the decision was planned for, from the start
	// of the fleet (before TimeScale); 0 for set-up and for decisions made in
	// reaction to outside input (keypad).
	At Duration `json:"at"`
	// Kind says what was decided, e.g. "network_drop", "door_jam".
	Kind string `json:"kind"`
	// Details, where they apply.
	Compartment int      `json:"compartment,omitempty"`
	Duration    Duration `json:"duration,omitempty"`
	Value       string   `json:"value,omitempty"`
}

// Decision kinds.
const (
	DecideSetup       = "setup"        // Value: site/model; Duration: clock skew
	DecideFlapping    = "flapping"     // the locker is one of the flapping share
	DecideDrop        = "network_drop" // Duration: how long the network stays away (0: reconnect at once)
	DecideFlap        = "flap"         // Duration: down time
	DecideOutage      = "outage"       // Duration: down time
	DecideDoorJam     = "door_jam"     // Compartment; Duration: until repaired (0: never)
	DecideTamper      = "tamper"       // Value: detail
	DecidePowerCut    = "power_cut"    // Duration: until mains is back (0: never)
	DecideRestart     = "gateway_restart"
	DecideLeaveItem   = "leave_item" // Compartment; Value: "true"/"false"
	DecideOrder       = "order"      // see OrderPlanner
	streamSetup       = "setup"
	streamNameKeypad  = "keypad"
	streamNameRestart = "restart"
)

// SortDecisions puts decisions in their canonical order (locker, stream, n),
// which is the same for two runs with the same seed and scenario whatever
// the scheduling was.
func SortDecisions(ds []Decision) {
	slices.SortFunc(ds, func(a, b Decision) int {
		return cmp.Or(cmp.Compare(a.Locker, b.Locker), cmp.Compare(a.Stream, b.Stream), cmp.Compare(a.N, b.N))
	})
}

// decideLocked reports a decision of l (l.mu held).
func (l *Locker) decideLocked(stream string, n int, at time.Duration, kind string, d Decision) {
	fn := l.f.opts.OnDecision
	if fn == nil {
		return
	}
	d.Locker, d.Serial, d.Stream, d.N, d.At, d.Kind = l.index, l.serial, stream, n, Duration(at), kind
	fn(d)
}
