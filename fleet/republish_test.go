package fleet

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"testing"

	"github.com/lockergate/lockergate/protocol"
)

// pagedStore holds a fleet of lockers for republishAll: EnabledLockerIDs
// pages through them by id, Retained and RetainedMany answer every one.
type pagedStore struct {
	*fakeStore
	ids      []string // sorted
	disabled map[string]bool
	pages    int
}

func (s *pagedStore) EnabledLockerIDs(_ context.Context, after string, limit int) ([]string, error) {
	s.pages++
	i, _ := slices.BinarySearch(s.ids, after)
	if i < len(s.ids) && s.ids[i] == after {
		i++
	}
	var out []string
	for ; i < len(s.ids) && len(out) < limit; i++ {
		if !s.disabled[s.ids[i]] {
			out = append(out, s.ids[i])
		}
	}
	return out, nil
}

func (s *pagedStore) Retained(context.Context, string) (*Retained, error) { return &Retained{}, nil }

func (s *pagedStore) RetainedMany(_ context.Context, ids []string) (map[string]*Retained, error) {
	out := make(map[string]*Retained, len(ids))
	for _, id := range ids {
		out[id] = &Retained{}
	}
	return out, nil
}

// TestRepublishAllPagesThroughTheFleet: a changed configuration goes to
// every enabled locker once, page by page (two pages and a bit of enabled
// lockers, every seventh locker besides them disabled), and to no disabled
// one.
func TestRepublishAllPagesThroughTheFleet(t *testing.T) {
	st := &pagedStore{fakeStore: newFakeStore(), disabled: map[string]bool{}}
	for i, enabled := 0, 0; enabled < 2*republishPage+1; i++ {
		id := fmt.Sprintf("lk-%05d", i)
		st.ids = append(st.ids, id)
		if i%7 == 0 {
			st.disabled[id] = true
		} else {
			enabled++
		}
	}
	bus := &fakeBus{}
	cfg := DefaultConfig
	cfg.Version = 3
	m, err := New(Options{Store: st, Bus: bus, Config: cfg, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	m.republishAll(context.Background())
	configs := map[string]int{}
	for _, topic := range bus.published {
		if id, ch, ok := protocol.ParseTopic(topic); ok && ch == protocol.ChanConfig {
			configs[id]++
		}
	}
	for _, id := range st.ids {
		want := 1
		if st.disabled[id] {
			want = 0
		}
		if configs[id] != want {
			t.Fatalf("%s (disabled %v) got its config %d times, want %d", id, st.disabled[id], configs[id], want)
		}
	}
	if st.pages != 3 {
		t.Fatalf("%d pages read, want 3", st.pages)
	}
}
