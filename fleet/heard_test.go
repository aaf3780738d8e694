package fleet

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"

	"github.com/lockergate/lockergate/protocol"
)

// touchStore records TouchLockers calls, failing the first fail of them
// (with err, or a database that is down).
type touchStore struct {
	*fakeStore
	fail    int
	err     error
	touched []map[string]time.Time
}

func (s *touchStore) TouchLockers(_ context.Context, ids []string, at []time.Time) error {
	if s.fail > 0 {
		s.fail--
		if s.err != nil {
			return s.err
		}
		return errors.New("database down")
	}
	m := map[string]time.Time{}
	for i, id := range ids {
		m[id] = at[i]
	}
	s.touched = append(s.touched, m)
	return nil
}

// TestHeardFlush: the lockers heard since the last flush are written in
// one call, each with the latest time it was heard; a failed write keeps
// them for the next flush, where a later time of the same locker wins; an
// empty set writes nothing.
func TestHeardFlush(t *testing.T) {
	st := &touchStore{fakeStore: newFakeStore(), fail: 1}
	m, err := New(Options{Store: st, Bus: &fakeBus{}, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	t0 := time.Date(2026, 12, 7, 1, 0, 0, 0, time.UTC)
	m.heard.add("a", t0.Add(2*time.Second))
	m.heard.add("a", t0.Add(time.Second)) // older: ignored
	m.heard.add("b", t0)
	m.flushHeard(ctx) // fails
	if len(st.touched) != 0 {
		t.Fatalf("written despite the error: %v", st.touched)
	}
	m.heard.add("b", t0.Add(3*time.Second))
	m.flushHeard(ctx)
	want := map[string]time.Time{"a": t0.Add(2 * time.Second), "b": t0.Add(3 * time.Second)}
	if len(st.touched) != 1 || !maps.Equal(st.touched[0], want) {
		t.Fatalf("touched %v, want one call with %v", st.touched, want)
	}
	m.flushHeard(ctx)
	if len(st.touched) != 1 {
		t.Fatalf("a flush with nothing heard wrote %v", st.touched[1:])
	}
	var c dto.Metric
	if err := m.m.dbErrors.WithLabelValues("last_seen").Write(&c); err != nil {
		t.Fatal(err)
	}
	if got := c.GetCounter().GetValue(); got != 1 {
		t.Fatalf("lockergate_db_errors_total{op=last_seen} = %v, want 1", got)
	}
}

// TestHeardFlushDropsInvalid: a batch the database refuses as data is not
// kept (it would be refused again, and hold up every later flush).
func TestHeardFlushDropsInvalid(t *testing.T) {
	st := &touchStore{fakeStore: newFakeStore(), fail: 1, err: fmt.Errorf("%w: bad text", ErrInvalid)}
	m, err := New(Options{Store: st, Bus: &fakeBus{}, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	m.heard.add("a", time.Now())
	m.flushHeard(context.Background())
	m.flushHeard(context.Background())
	if len(st.touched) != 0 {
		t.Fatalf("a refused batch written again: %v", st.touched)
	}
}

// TestHeardOnEveryUplink: events, command results, creds acks and
// firmware reports each count as hearing from the locker; health and
// presence write last_seen themselves and are not recorded here, nor is a
// message on another locker's topic.
func TestHeardOnEveryUplink(t *testing.T) {
	m, err := New(Options{Store: newFakeStore(), Bus: &fakeBus{}, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	for _, ch := range []protocol.Channel{protocol.ChanEvents, protocol.ChanCmdResult, protocol.ChanCredsAck, protocol.ChanFwStatus,
		protocol.ChanHealth, protocol.ChanPresence} {
		id := "lk-" + strings.ReplaceAll(string(ch), "/", "-")
		m.receive(Message{Topic: protocol.Topic(id, ch), Payload: []byte(`{}`), QoS: 1, ClientID: id})
	}
	m.receive(Message{Topic: protocol.Topic("lk-victim", protocol.ChanEvents), Payload: []byte(`{}`), QoS: 1, ClientID: "lk-other"})
	ids, _ := m.heard.take()
	slices.Sort(ids)
	want := []string{"lk-cmd-result", "lk-creds-ack", "lk-events", "lk-fw-status"}
	if !slices.Equal(ids, want) {
		t.Fatalf("heard %v, want %v", ids, want)
	}
}

// TestHeardFlushedAtStop: lockers heard since the last sweep are written
// when the manager stops, not lost with the process.
func TestHeardFlushedAtStop(t *testing.T) {
	st := &touchStore{fakeStore: newFakeStore()}
	m, err := New(Options{Store: st, Bus: &fakeBus{}, SweepInterval: time.Hour, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- m.Run(ctx) }()
	at := time.Date(2026, 12, 7, 2, 0, 0, 0, time.UTC)
	m.heard.add("a", at)
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return")
	}
	if want := map[string]time.Time{"a": at}; len(st.touched) != 1 || !maps.Equal(st.touched[0], want) {
		t.Fatalf("touched %v, want one call with %v", st.touched, want)
	}
}
