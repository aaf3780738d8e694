package fleet

import (
	"cmp"
	"sync"
	"time"

	"github.com/lockergate/lockergate/protocol"
)

// dropLogEvery is how often a locker's dropped messages of one channel,
// dropped for one reason, are logged: a locker that sends a malformed
// message a second (a firmware bug) writes a line a minute, not one per
// message. lockergate_ingest_messages_dropped_total counts every one.
const dropLogEvery = time.Minute

// dropLogMax bounds the keys dropLog remembers between sweeps; past it (a
// whole fleet sending bad messages at once), the drops of keys it does not
// hold are counted together and told at the next sweep.
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

// dropUnlogged is a key's count of drops no line told, given at the sweep
// that forgets it; with the zero key, the drops of keys past dropLogMax.
type dropUnlogged struct {
	key   dropKey
	quiet int
}

// dropLog rate-limits the log of dropped device messages per locker,
// channel and reason.
type dropLog struct {
	mu       sync.Mutex
	seen     map[dropKey]*dropSeen
	swept    time.Time
	overflow int // drops of keys past the bound since the last sweep
	max      int // the keys held at most; 0: dropLogMax
}

// allow reports whether a message of k dropped at now is logged, and how
// many of k's were dropped without a line since the last one; unlogged are
// the counts of keys a sweep forgot before another drop of theirs came,
// for the caller to log.
func (d *dropLog) allow(k dropKey, now time.Time) (log bool, quiet int, unlogged []dropUnlogged) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if now.Sub(d.swept) >= dropLogEvery {
		for key, s := range d.seen {
			if now.Sub(s.logged) >= dropLogEvery && key != k {
				if s.quiet > 0 {
					unlogged = append(unlogged, dropUnlogged{key: key, quiet: s.quiet})
				}
				delete(d.seen, key)
			}
		}
		if d.overflow > 0 {
			unlogged = append(unlogged, dropUnlogged{quiet: d.overflow})
			d.overflow = 0
		}
		d.swept = now
	}
	s, ok := d.seen[k]
	switch {
	case !ok && len(d.seen) >= cmp.Or(d.max, dropLogMax):
		d.overflow++
		return false, 0, unlogged
	case !ok:
		if d.seen == nil {
			d.seen = make(map[dropKey]*dropSeen)
		}
		d.seen[k] = &dropSeen{logged: now}
		return true, 0, unlogged
	case now.Sub(s.logged) >= dropLogEvery:
		quiet := s.quiet
		s.logged, s.quiet = now, 0
		return true, quiet, unlogged
	default:
		s.quiet++
		return false, 0, unlogged
	}
}
