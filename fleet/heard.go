package fleet

import (
	"context"
	"sync"
	"time"
)

// heardSet holds, per locker, when it was last heard on a topic whose
// handling does not write its last_seen (events, command results, creds
// acks, firmware reports), until the next flush writes them all in one
// statement. Health, connects and births write last_seen themselves.
//
// It is what keeps a locker that talks but sends no health from reading
// as stale (and from being passed over for pickups) while it is plainly
// alive: last_seen is the last message from the locker (docs/api.md).
type heardSet struct {
	mu sync.Mutex
	at map[string]time.Time // nil when empty
}

// add records that locker id was heard at at.
func (h *heardSet) add(id string, at time.Time) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.at == nil {
		h.at = make(map[string]time.Time)
	}
	if prev, ok := h.at[id]; !ok || at.After(prev) {
		h.at[id] = at
	}
}

// take empties the set and returns what it held.
func (h *heardSet) take() (ids []string, at []time.Time) {
	h.mu.Lock()
	m := h.at
	h.at = nil
	h.mu.Unlock()
	for id, t := range m {
		ids = append(ids, id)
		at = append(at, t)
	}
	return ids, at
}

// flushHeard writes last_seen for the lockers heard since the last flush.
// On an error they are kept for the next flush (a later message of the
// same locker supersedes its time).
func (m *Manager) flushHeard(ctx context.Context) {
	ids, at := m.heard.take()
	if len(ids) == 0 {
		return
	}
	// A database that hangs must not hold up the sweeps and the shutdown.
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := m.store.TouchLockers(ctx, ids, at); err != nil {
		m.m.dbErrors.WithLabelValues("last_seen").Inc()
		m.log.Error("record last heard", "lockers", len(ids), "first", ids[0], "err", err)
		for i, id := range ids {
			m.heard.add(id, at[i])
		}
	}
}
