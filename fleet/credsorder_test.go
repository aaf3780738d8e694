package fleet

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"testing"

	dto "github.com/prometheus/client_model/go"

	"github.com/lockergate/lockergate/protocol"
)

// versionStore answers Retained and RetainedMany with each locker's current
// credential-set version, which a test moves on as another instance's
// commit would.
type versionStore struct {
	*fakeStore
	mu       sync.Mutex
	versions map[string]int64
}

func (s *versionStore) set(id string, v int64) {
	s.mu.Lock()
	s.versions[id] = v
	s.mu.Unlock()
}

func (s *versionStore) CredsVersions(_ context.Context, ids []string) (map[string]int64, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[string]int64, len(ids))
	for _, id := range ids {
		out[id] = s.versions[id]
	}
	return out, nil
}

func (s *versionStore) Retained(ctx context.Context, id string) (*Retained, error) {
	rs, err := s.RetainedMany(ctx, []string{id})
	return rs[id], err
}

func (s *versionStore) RetainedMany(_ context.Context, ids []string) (map[string]*Retained, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[string]*Retained, len(ids))
	for _, id := range ids {
		out[id] = &Retained{Creds: protocol.CredSet{Version: s.versions[id]}}
	}
	return out, nil
}

// credsBus records the credential-set versions published to each locker;
// before the first one to a locker goes out, it runs commitBefore (another
// instance committing, and publishing, a newer set in between this one's
// read and its publish). Publishes to failOn fail.
type credsBus struct {
	fakeBus
	mu           sync.Mutex
	sets         map[string][]int64
	commitBefore func(id string)
	failOn       string
}

func (b *credsBus) Publish(ctx context.Context, topic string, payload []byte, qos byte, retain bool) error {
	id, ch, _ := protocol.ParseTopic(topic)
	if id == b.failOn {
		return errors.New("broker refused the publish")
	}
	if ch == protocol.ChanCreds {
		var set protocol.CredSet
		if err := json.Unmarshal(payload, &set); err != nil {
			return err
		}
		b.mu.Lock()
		first := len(b.sets[id]) == 0
		b.sets[id] = append(b.sets[id], set.Version)
		b.mu.Unlock()
		if first && b.commitBefore != nil {
			b.commitBefore(id)
		}
	}
	return b.fakeBus.Publish(ctx, topic, payload, qos, retain)
}

// TestCredsCaughtUp: with SharedPublish, a credential set published after
// a newer one was committed (and, by another instance, published) is
// followed by the newer one, on every path that publishes sets; without
// it (one instance, whose publish lock orders its publishes) nothing more
// is read or sent.
func TestCredsCaughtUp(t *testing.T) {
	paths := map[string]func(ctx context.Context, m *Manager) error{
		"PublishCreds":    func(ctx context.Context, m *Manager) error { return m.PublishCreds(ctx, "lk-a") },
		"PublishRetained": func(ctx context.Context, m *Manager) error { return m.PublishRetained(ctx, "lk-a") },
		"syncDevices": func(ctx context.Context, m *Manager) error {
			m.syncDevices(ctx, []string{"lk-a", "lk-b", "lk-c"})
			return nil
		},
	}
	for name, publish := range paths {
		for _, shared := range []bool{true, false} {
			bus, m := movingOnA(t, shared, "")
			if err := publish(context.Background(), m); err != nil {
				t.Fatalf("%s: %v", name, err)
			}
			want := []int64{10, 11}
			if !shared {
				want = []int64{10}
			}
			if got := bus.sets["lk-a"]; !slices.Equal(got, want) {
				t.Errorf("%s, shared %v: lk-a got sets %v, want %v", name, shared, got, want)
			}
			if name == "syncDevices" {
				for id, v := range map[string]int64{"lk-b": 4, "lk-c": 7} {
					if got := bus.sets[id]; !slices.Equal(got, []int64{v}) {
						t.Errorf("%s, shared %v: %s got sets %v, want [%d] once", name, shared, id, got, v)
					}
				}
			}
		}
	}

	// A set that keeps moving on is followed at most maxCredsCatchUp
	// times; the instance moving it publishes the rest.
	st := &versionStore{fakeStore: newFakeStore(), versions: map[string]int64{"lk-a": 1}}
	bus := &credsBus{sets: map[string][]int64{}}
	moving := &movingBus{credsBus: bus, st: st}
	m, err := New(Options{Store: st, Bus: moving, SharedPublish: true, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	if err := m.PublishCreds(context.Background(), "lk-a"); err != nil {
		t.Fatal(err)
	}
	if got, want := bus.sets["lk-a"], []int64{1, 2, 3, 4}; !slices.Equal(got, want) {
		t.Errorf("a set moving on at every publish: sets %v, want %v", got, want)
	}
}

// TestCredsCaughtUpWhenTheGroupFails: in a group of lockers synced
// together, a publish that fails part-way leaves the rest to be synced
// alone, and still catches up the lockers published before it.
func TestCredsCaughtUpWhenTheGroupFails(t *testing.T) {
	bus, m := movingOnA(t, true, "lk-b")
	failed := m.publishRetainedGroup(context.Background(), 0, []string{"lk-a", "lk-b", "lk-c"})
	if !slices.Equal(failed, []string{"lk-b", "lk-c"}) {
		t.Errorf("failed %v, want lk-b and lk-c (to sync alone)", failed)
	}
	if got := bus.sets["lk-a"]; !slices.Equal(got, []int64{10, 11}) {
		t.Errorf("lk-a got sets %v, want [10 11]: caught up though a later publish failed", got)
	}
}

// movingOnA is a manager over lockers lk-a (set 10), lk-b (4) and lk-c
// (7), with shared, whose bus records the sets published (failing those to
// failOn) and moves lk-a's set on to 11 just as 10 goes out, as another
// instance's commit would; lk-b's and lk-c's do not move.
func movingOnA(t *testing.T, shared bool, failOn string) (*credsBus, *Manager) {
	t.Helper()
	st := &versionStore{fakeStore: newFakeStore(), versions: map[string]int64{"lk-a": 10, "lk-b": 4, "lk-c": 7}}
	bus := &credsBus{sets: map[string][]int64{}, failOn: failOn}
	bus.commitBefore = func(id string) {
		if id == "lk-a" {
			st.set(id, 11)
		}
	}
	m, err := New(Options{Store: st, Bus: bus, SharedPublish: shared, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	return bus, m
}

// movingBus moves the locker's set on by one at every publish.
type movingBus struct {
	*credsBus
	st *versionStore
}

func (b *movingBus) Publish(ctx context.Context, topic string, payload []byte, qos byte, retain bool) error {
	err := b.credsBus.Publish(ctx, topic, payload, qos, retain)
	if id, ch, _ := protocol.ParseTopic(topic); ch == protocol.ChanCreds {
		b.st.mu.Lock()
		b.st.versions[id]++
		b.st.mu.Unlock()
	}
	return err
}

// backStore answers AckCredsMany with back: the lockers whose
// acknowledgement went back to an older set, at their current version.
type backStore struct {
	*versionStore
	back []CredsLag
}

func (s *backStore) AckCredsMany(context.Context, []CredsAck) ([]CredsLag, error) { return s.back, nil }

// TestOlderAckPublishesTheSet: the current set of a locker whose
// acknowledgement went back is published at once (counted as a
// republish); one whose publish fails is logged for the census to retry,
// and the acks of the batch are recorded all the same.
func TestOlderAckPublishesTheSet(t *testing.T) {
	for _, fail := range []bool{false, true} {
		st := &backStore{versionStore: &versionStore{fakeStore: newFakeStore(), versions: map[string]int64{"lk-a": 10, "lk-b": 4}},
			back: []CredsLag{{DeviceID: "lk-a", Version: 10}}}
		bus := &credsBus{sets: map[string][]int64{}}
		if fail {
			bus.failOn = "lk-a"
		}
		var logs strings.Builder
		m, err := New(Options{Store: st, Bus: bus, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
		if err != nil {
			t.Fatal(err)
		}
		m.credsAcked(context.Background(), []control{
			{kind: ctrlCredsAck, id: "lk-a", payload: []byte(`{"version":9}`)},
			{kind: ctrlCredsAck, id: "lk-b", payload: []byte(`{"version":4}`)},
		})
		want, republished := []int64{10}, 1.0
		if fail {
			want, republished = nil, 0
			if !strings.Contains(logs.String(), "the census tries again") || !strings.Contains(logs.String(), "locker=lk-a") {
				t.Errorf("failed republish not logged for lk-a:\n%s", logs.String())
			}
		}
		if got := bus.sets["lk-a"]; !slices.Equal(got, want) {
			t.Errorf("fail %v: lk-a got sets %v, want %v", fail, got, want)
		}
		if got := bus.sets["lk-b"]; len(got) != 0 {
			t.Errorf("fail %v: lk-b, whose ack did not go back, got sets %v", fail, got)
		}
		var c dto.Metric
		if err := m.m.credsRepublished.Write(&c); err != nil {
			t.Fatal(err)
		}
		if got := c.GetCounter().GetValue(); got != republished {
			t.Errorf("fail %v: lockergate_creds_republished_total %v, want %v", fail, got, republished)
		}
		// Going back again at the same version (firmware that re-applies
		// a stale copy after every set) gets nothing more once it was
		// sent; at a new version, the set once more. One that failed is
		// tried at the next.
		bus.failOn = ""
		m.credsAcked(context.Background(), []control{{kind: ctrlCredsAck, id: "lk-a", payload: []byte(`{"version":9}`)}})
		st.set("lk-a", 11)
		st.back = []CredsLag{{DeviceID: "lk-a", Version: 11}}
		for range 3 {
			m.credsAcked(context.Background(), []control{{kind: ctrlCredsAck, id: "lk-a", payload: []byte(`{"version":9}`)}})
		}
		if got, want := bus.sets["lk-a"], []int64{10, 11}; !slices.Equal(got, want) {
			t.Errorf("fail %v: after going back again, at 10 then three times at 11: lk-a got sets %v, want %v", fail, got, want)
		}
	}
}

// TestAckAheadIsDroppedAndTheSetSent: an acknowledgement of a set never
// published (the store answers it ahead, not recorded) is dropped as
// invalid, counted and logged, and the locker is sent its current set, once
// per version.
func TestAckAheadIsDroppedAndTheSetSent(t *testing.T) {
	st := &backStore{versionStore: &versionStore{fakeStore: newFakeStore(), versions: map[string]int64{"lk-a": 10}},
		back: []CredsLag{{DeviceID: "lk-a", Version: 10, Ahead: 999}}}
	bus := &credsBus{sets: map[string][]int64{}}
	var logs strings.Builder
	m, err := New(Options{Store: st, Bus: bus, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	for range 2 {
		m.credsAcked(context.Background(), []control{{kind: ctrlCredsAck, id: "lk-a", payload: []byte(`{"version":999}`)}})
	}
	if got, want := bus.sets["lk-a"], []int64{10}; !slices.Equal(got, want) {
		t.Errorf("lk-a got sets %v, want %v (its current set, once)", got, want)
	}
	var c dto.Metric
	if err := m.m.dropped.WithLabelValues(string(protocol.ChanCredsAck), "invalid").Write(&c); err != nil || c.GetCounter().GetValue() != 2 {
		t.Errorf("dropped creds/ack invalid = %v (%v), want 2", c.GetCounter().GetValue(), err)
	}
	if out := logs.String(); !strings.Contains(out, "acknowledged credential set 999 is ahead of the current set 10") ||
		!strings.Contains(out, "the locker acknowledged one never published") {
		t.Errorf("log does not say the ack was ahead and the set sent:\n%s", out)
	}
}
