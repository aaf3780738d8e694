package fleet

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/lockergate/lockergate/internal/testtool"
	"github.com/lockergate/lockergate/protocol"
)

// pagedStore holds a fleet of lockers for republishAll: EnabledLockerIDs
// pages through them by id, Retained and RetainedMany answer every one.
type pagedStore struct {
	*fakeStore
	ids      []string // sorted
	disabled map[string]bool
	pages    int
	// fails, when > 0, fails that many reads of pages after the first
	// (after != ""), counting down; < 0 fails them all.
	fails int
}

func (s *pagedStore) EnabledLockerIDs(_ context.Context, after string, limit int) ([]string, error) {
	if after != "" && s.fails != 0 {
		s.fails--
		return nil, errors.New("conn closed")
	}
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

// newPagedFleet is a pagedStore of two pages and a bit of enabled lockers,
// every seventh locker besides them disabled, and a manager of it whose
// configuration changed, logging to logs.
func newPagedFleet(t *testing.T, logs io.Writer) (*pagedStore, *fakeBus, *Manager) {
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
	m, err := New(Options{Store: st, Bus: bus, Config: cfg, Logger: slog.New(slog.NewTextHandler(logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	return st, bus, m
}

// configsSent counts the configurations bus carried, by locker.
func configsSent(bus *fakeBus) map[string]int {
	configs := map[string]int{}
	for _, topic := range bus.published {
		if id, ch, ok := protocol.ParseTopic(topic); ok && ch == protocol.ChanConfig {
			configs[id]++
		}
	}
	return configs
}

// TestRepublishAllPagesThroughTheFleet: a changed configuration goes to
// every enabled locker once, page by page, and to no disabled one.
func TestRepublishAllPagesThroughTheFleet(t *testing.T) {
	st, bus, m := newPagedFleet(t, io.Discard)
	m.republishAll(context.Background())
	configs := configsSent(bus)
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

// TestRepublishAllThroughFailedReads: a page the database fails to list is
// read again (logged) and the republish goes on to every enabled locker; a
// shutdown while it fails stops it, saying how far it got and that the rest
// get their state when they connect.
func TestRepublishAllThroughFailedReads(t *testing.T) {
	logs := new(testtool.LockedBuffer) // the second part's republish writes it as the test reads
	st, bus, m := newPagedFleet(t, logs)
	st.fails = 2
	m.republishAll(context.Background())
	configs := configsSent(bus)
	for _, id := range st.ids {
		if want := btoi(!st.disabled[id]); configs[id] != want {
			t.Fatalf("%s (disabled %v) got its config %d times, want %d", id, st.disabled[id], configs[id], want)
		}
	}
	if n := strings.Count(logs.String(), "database write failed; retrying"); n != 2 || !strings.Contains(logs.String(), "op=list_lockers") {
		t.Errorf("%d retries logged for 2 failed reads, want 2 naming list_lockers:\n%s", n, logs.String())
	}

	logs = new(testtool.LockedBuffer)
	st, bus, m = newPagedFleet(t, logs)
	st.fails = -1
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { m.republishAll(ctx); close(done) }()
	testtool.Eventually(t, 10*time.Second, "a failed read of the second page", func() error {
		if !strings.Contains(logs.String(), "retrying") {
			return errors.New("none yet")
		}
		return nil
	})
	cancel()
	<-done
	if n := len(configsSent(bus)); n != republishPage {
		t.Errorf("%d lockers got their config before the stop, want the first page's %d", n, republishPage)
	}
	if !strings.Contains(logs.String(), "retained state not published to every locker; the rest get it when they next connect") ||
		!strings.Contains(logs.String(), fmt.Sprintf("published=%d", republishPage)) {
		t.Errorf("the stop did not say how far it got:\n%s", logs.String())
	}
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}
