package fleet

import (
	"context"
	"errors"
	"log/slog"
	"maps"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
)

// touchStore records TouchLockers calls, failing the first fail of them.
type touchStore struct {
	*fakeStore
	fail    int
	touched []map[string]time.Time
}

func (s *touchStore) TouchLockers(_ context.Context, ids []string, at []time.Time) error {
	if s.fail > 0 {
		s.fail--
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
