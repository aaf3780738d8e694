package fleet

import (
	"sync"
	"time"

	"github.com/lockergate/lockergate/protocol"
)

// dropLogEvery is how often a locker's dropped messages of one channel,
// dropped for one reason, are logged: a locker that sends a malformed
// message a second (a firmware bug) writes a line a minute, not one per
// message. lockergate_ingest_messages_dropped_total counts every one.
const dropLogEvery = time.Minute

// dropLogMax bounds the lockers dropLog remembers between sweeps; past it
// (a whole fleet sending bad messages at once), each message is logged.
const dropLogMax = 100_000

// dropKey is what one line of the dropped-message log stands for.
type dropKey struct {
	id     string
	ch     protocol.Channel
	reason string
}

// dropSeen is when a key was last logged and how many of its messages
// were dropped since without a line.
type dropSeen struct {
	logged time.Time
	quiet  int
}

// dropLog rate-limits the log of dropped device messages per locker,
// channel and reason.
type dropLog struct {
	mu    sync.Mutex
	seen  map[dropKey]*dropSeen
	swept time.Time
}

// allow reports whether a message of k dropped at now is logged, and how
// many of k's were dropped without a line since the last one.
func (d *dropLog) allow(k dropKey, now time.Time) (bool, int) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if now.Sub(d.swept) >= dropLogEvery {
		for key, s := range d.seen {
			// One with drops still to report is kept for its next line,
			// a while; the metric counts them either way.
			if age := now.Sub(s.logged); age >= dropLogEvery && s.quiet == 0 || age >= 10*dropLogEvery {
				delete(d.seen, key)
			}
		}
		d.swept = now
	}
	s, ok := d.seen[k]
	switch {
	case !ok:
		if d.seen == nil {
			d.seen = make(map[dropKey]*dropSeen)
		}
		if len(d.seen) < dropLogMax {
			d.seen[k] = &dropSeen{logged: now}
		}
		return true, 0
	case now.Sub(s.logged) >= dropLogEvery:
		quiet := s.quiet
		s.logged, s.quiet = now, 0
		return true, quiet
	default:
		s.quiet++
		return false, 0
	}
}
