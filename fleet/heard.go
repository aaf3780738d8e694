package fleet

import (
	"context"
	"errors"
	"sync"
	"time"
)

// heardShards spreads heardSet over locks: receive runs on every locker's
// connection goroutine.
const heardShards = 16

// heardSet holds, per locker, when it was last heard on a topic whose
// handling does not write its last_seen (events, command results, creds
// acks, firmware reports), until the next flush writes them all in one
// statement. Health, connects and births write last_seen themselves.
//
// It is what keeps a locker that talks but sends no health from reading
// as stale (and from being passed over for pickups) while it is plainly
// alive: last_seen is the last message from the locker (docs/api.md).
type heardSet struct {
	shards [heardShards]struct {
		mu sync.Mutex
		at map[string]time.Time // nil when empty
	}
}

// add records that locker id was heard at at.
func (h *heardSet) add(id string, at time.Time) {
	s := &h.shards[shard(id, heardShards)]
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.at == nil {
		s.at = make(map[string]time.Time)
	}
	if prev, ok := s.at[id]; !ok || at.After(prev) {
		s.at[id] = at
	}
}

// take empties the set and returns what it held.
func (h *heardSet) take() (ids []string, at []time.Time) {
	for i := range h.shards {
		s := &h.shards[i]
		s.mu.Lock()
		m := s.at
		s.at = nil
		s.mu.Unlock()
		for id, t := range m {
			ids = append(ids, id)
			at = append(at, t)
		}
	}
	return ids, at
}

// flushHeard writes last_seen for the lockers heard since the last flush.
// On an error they are kept for the next flush (a later message of the
// same locker supersedes its time), unless the database refused the data
// itself (ErrInvalid), which it would do again.
func (m *Manager) flushHeard(ctx context.Context) {
	ids, at := m.heard.take()
	if len(ids) == 0 {
		return
	}
	// A database that hangs must not hold up the sweeps and the shutdown.
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	err := m.store.TouchLockers(ctx, ids, at)
	if err == nil {
		return
	}
	m.m.dbErrors.WithLabelValues("last_seen").Inc()
	if errors.Is(err, ErrInvalid) {
		m.log.Error("last heard not recorded; dropped", "lockers", len(ids), "first", ids[0], "err", err)
		return
	}
	m.log.Error("record last heard; kept for the next flush", "lockers", len(ids), "first", ids[0], "err", err)
	for i, id := range ids {
		m.heard.add(id, at[i])
	}
}
