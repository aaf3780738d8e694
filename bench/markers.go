package bench

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/lockergate/lockergate/protocol"
)

// markerBase lifts marker sequence numbers far above any ordinary health
// message of the run, so a query can tell them apart.
const markerBase = int64(1) << 40

// Markers measures publish → visible in PostgreSQL end to end: marker
// health messages (ordinary messages with a distinctive seq) are published
// by a few lockers; a poller queries PostgreSQL every pollEvery for the
// ones outstanding; a marker's lag is from just before its PUBLISH was
// written to the start of the first query that returned it. The
// resolution is therefore the poll interval.
type Markers struct {
	conns []*Conn
	pool  *pgxpool.Pool
	db    *pgxpool.Conn // the poller's own session (see NewMarkers); Run's alone
	pid   atomic.Int64  // its backend
	mu    sync.Mutex
	sent  map[markerKey]time.Time
	next  int64
	lags  []time.Duration
	lost  int
	// Published counts markers written, all runs.
	Published atomic.Int64
}

type markerKey struct {
	id  string
	seq int64
}

const pollEvery = 5 * time.Millisecond

// NewMarkers uses conns to publish markers and a session of its own from
// pool to find them; Close returns the session.
//
// The poller is measurement overhead that runs on the measured
// PostgreSQL (~0.1 cores at 200 queries a second), so PollerCPU lets a
// step subtract the poller's backend from PostgreSQL's CPU. (A generic
// plan would save the planning but is a sequential scan of the day's
// health partition: the parameters hide how few rows qualify.)
func NewMarkers(ctx context.Context, conns []*Conn, pool *pgxpool.Pool) (*Markers, error) {
	m := &Markers{conns: conns, pool: pool, sent: map[markerKey]time.Time{}, next: markerBase}
	if err := m.connect(ctx); err != nil {
		return nil, err
	}
	return m, nil
}

// connect takes the poller's session from the pool and finds its backend.
func (m *Markers) connect(ctx context.Context) error {
	db, err := m.pool.Acquire(ctx)
	if err != nil {
		return fmt.Errorf("markers: take a PostgreSQL session for the poller: %w", err)
	}
	var pid int
	if err := db.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&pid); err != nil {
		db.Release()
		return fmt.Errorf("markers: find the poller's PostgreSQL backend: %w", err)
	}
	m.db = db
	m.pid.Store(int64(pid))
	return nil
}

// Close returns the poller's session to its pool. No Run may be in
// progress.
func (m *Markers) Close() {
	if m.db != nil {
		m.db.Release()
		m.db = nil
	}
}

// PollerSample is the CPU time the poller's PostgreSQL backend had used
// at one moment; OK is false when it could not be read.
type PollerSample struct {
	PID int
	CPU CPU
	OK  bool
}

// PollerCPU samples the poller's backend. Two samples of the same backend
// give the poller's share of PostgreSQL's CPU between them; across a new
// session they give nothing (the old backend's time moved to its parent).
func (m *Markers) PollerCPU() PollerSample {
	pid := int(m.pid.Load())
	c, err := ProcCPU(pid, false)
	return PollerSample{PID: pid, CPU: c, OK: err == nil}
}

// Run publishes rate markers per second for d, then waits (up to grace)
// for the outstanding ones; it returns the lags found in this call, the
// markers not found, and the first error of the poller's queries (a
// broken session is replaced).
func (m *Markers) Run(ctx context.Context, rate float64, d, grace time.Duration) (lags []time.Duration, lost int, pollErr error) {
	m.mu.Lock()
	m.lags, m.lost = nil, 0
	m.mu.Unlock()
	pubDone := make(chan struct{})
	go func() {
		defer close(pubDone)
		t := time.NewTicker(time.Duration(float64(time.Second) / rate))
		defer t.Stop()
		end := time.After(d)
		buf := make([]byte, 0, 512)
		for i := 0; ; i++ {
			select {
			case <-ctx.Done():
				return
			case <-end:
				return
			case <-t.C:
			}
			c := m.conns[i%len(m.conns)]
			m.mu.Lock()
			m.next++
			seq := m.next
			now := time.Now()
			m.sent[markerKey{c.ID, seq}] = now
			m.mu.Unlock()
			buf = AppendHealth(buf[:0], now, seq, 0)
			m.Published.Add(1)
			if c.Publish(protocol.Topic(c.ID, protocol.ChanHealth), buf, 1, false) != nil {
				m.Published.Add(-1)
				m.mu.Lock()
				delete(m.sent, markerKey{c.ID, seq})
				m.lost++
				m.mu.Unlock()
			}
		}
	}()
	ids := make([]string, len(m.conns))
	for i, c := range m.conns {
		ids[i] = c.ID
	}
	var deadline time.Time
	for {
		select {
		case <-pubDone:
			if deadline.IsZero() {
				deadline = time.Now().Add(grace)
			}
		default:
		}
		m.mu.Lock()
		pending := len(m.sent)
		m.mu.Unlock()
		if !deadline.IsZero() && (pending == 0 || time.Now().After(deadline)) {
			break
		}
		if ctx.Err() != nil {
			break
		}
		if pending > 0 {
			if err := m.pollOnce(ctx, ids); err != nil && ctx.Err() == nil && pollErr == nil {
				pollErr = err
			}
		}
		time.Sleep(pollEvery)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.lost += len(m.sent)
	clear(m.sent)
	return m.lags, m.lost, pollErr
}

// Pending is how many markers are outstanding.
func (m *Markers) Pending() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.sent)
}

// pollOnce polls with the poller's session, taking a new one first if the
// last was found broken (its backend ended): the poll after a failure
// works again.
func (m *Markers) pollOnce(ctx context.Context, ids []string) error {
	if m.db == nil {
		if err := m.connect(ctx); err != nil {
			return err
		}
	}
	err := m.poll(ctx, ids)
	if err != nil && m.db.Conn().IsClosed() {
		m.db.Release()
		m.db = nil
	}
	return err
}

// poll asks only for rows from the oldest outstanding marker on: asking
// for every marker of the step read a growing set again on every poll.
// The gateway stamps received_at on arrival, after the marker's sent
// time on this machine's clock; the second of slack covers a step of the
// clock up to a second back.
func (m *Markers) poll(ctx context.Context, ids []string) error {
	// Sequence numbers and sent times are taken together under mu, so
	// the lowest outstanding seq is also the oldest marker.
	m.mu.Lock()
	var first markerKey
	for k := range m.sent {
		if first.seq == 0 || k.seq < first.seq {
			first = k
		}
	}
	oldest := m.sent[first]
	m.mu.Unlock()
	if first.seq == 0 {
		return nil
	}
	minSeq := first.seq
	at := time.Now()
	rows, err := m.db.Query(ctx, "SELECT device_id, seq FROM health WHERE device_id = ANY($1) AND received_at >= $2 AND seq >= $3",
		ids, oldest.Add(-time.Second), minSeq)
	if err != nil {
		return fmt.Errorf("markers: poll PostgreSQL: %w", err)
	}
	defer rows.Close()
	m.mu.Lock()
	defer m.mu.Unlock()
	for rows.Next() {
		var k markerKey
		if err := rows.Scan(&k.id, &k.seq); err != nil {
			return fmt.Errorf("markers: read a polled row: %w", err)
		}
		if t0, ok := m.sent[k]; ok {
			m.lags = append(m.lags, at.Sub(t0))
			delete(m.sent, k)
		}
	}
	if err := rows.Err(); err != nil {
		return fmt.Errorf("markers: poll PostgreSQL: %w", err)
	}
	return nil
}
