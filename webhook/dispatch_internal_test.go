package webhook

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"

	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/internal/testtool"
)

// memStore is an outbox in memory for the dispatcher's own logic (the
// PostgreSQL outbox has its tests in package postgres).
type memStore struct {
	Store
	mu     sync.Mutex
	hooks  map[string]*Webhook
	enc    map[string][]byte
	ds     []Delivery
	leased map[int64]time.Time
	tried  map[int64][]Outcome // by delivery, when non-nil
}

func (s *memStore) GetWebhook(_ context.Context, id string) (*Webhook, []byte, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	w, ok := s.hooks[id]
	if !ok {
		return nil, nil, fleet.ErrNotFound // as the store answers for a deleted webhook or a revoked token
	}
	return w, s.enc[id], nil
}

func (s *memStore) LeaseDue(_ context.Context, now time.Time, lease time.Duration, n, perWebhook int, busy []string) ([]Delivery, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []Delivery
	per := map[string]int{}
	for i := range s.ds {
		d := &s.ds[i]
		older := slices.ContainsFunc(s.ds[:i], func(e Delivery) bool {
			return e.WebhookID == d.WebhookID && e.Subject == d.Subject && e.State == "pending"
		})
		if d.State != "pending" || now.Before(s.leased[d.Seq]) || slices.Contains(busy, d.WebhookID) || older ||
			per[d.WebhookID] >= perWebhook || len(out) == n {
			continue
		}
		per[d.WebhookID]++
		s.leased[d.Seq] = now.Add(lease)
		out = append(out, *d)
	}
	return out, nil
}

func (s *memStore) RecordAttempt(_ context.Context, seq int64, o Outcome) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.tried != nil {
		s.tried[seq] = append(s.tried[seq], o)
	}
	for i := range s.ds {
		if s.ds[i].Seq == seq && o.Delivered {
			s.ds[i].State = "delivered"
		}
	}
	return nil
}

func (s *memStore) Backlog(context.Context, time.Time) (int, time.Duration, error) { return 0, 0, nil }

func (s *memStore) delivered(webhookID string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, d := range s.ds {
		if d.WebhookID == webhookID && d.State == "delivered" {
			n++
		}
	}
	return n
}

// TestHangingReceiverHoldsUpOnlyItself: a receiver that never answers
// keeps at most perWebhook workers; another webhook's events, one after
// the other (the second is due only once the first is delivered), go out
// while it hangs. Before, every round waited for its slowest delivery, so
// the second event waited for the hanging one's timeout.
func TestHangingReceiverHoldsUpOnlyItself(t *testing.T) {
	release := make(chan struct{})
	var hanging atomic.Int32
	hang := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hanging.Add(1)
		<-release
	}))
	defer hang.Close()
	defer close(release)
	ok := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	defer ok.Close()

	key := bytes.Repeat([]byte{1}, 32)
	seal, err := newSealer(key)
	if err != nil {
		t.Fatal(err)
	}
	st := &memStore{hooks: map[string]*Webhook{}, enc: map[string][]byte{}, leased: map[int64]time.Time{}}
	for id, url := range map[string]string{"wh-hang": hang.URL, "wh-ok": ok.URL} {
		st.hooks[id] = &Webhook{ID: id, URL: url}
		st.enc[id] = seal.seal("whsec_x", id)
	}
	now := time.Now()
	add := func(webhook, subject string) {
		st.ds = append(st.ds, Delivery{Seq: int64(len(st.ds) + 1), WebhookID: webhook, EventID: "ev", Subject: subject,
			Body: []byte(`{}`), State: "pending", NextAttempt: now, CreatedAt: now})
	}
	for _, p := range []string{"p-1", "p-2", "p-3", "p-4", "p-5", "p-6"} {
		add("wh-hang", p)
	}
	add("wh-ok", "p-9")
	add("wh-ok", "p-9")
	d, err := New(Options{Store: st, MasterKey: key, AllowPrivate: true, Workers: 4, PollInterval: time.Hour,
		Client: &http.Client{Timeout: time.Minute}})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx) }()
	defer func() { cancel(); <-done }()

	testtool.Eventually(t, 5*time.Second, "wh-hang's receiver holding two requests", func() error {
		if n := hanging.Load(); n < perWebhook {
			return fmt.Errorf("%d hanging", n)
		}
		return nil
	})
	testtool.Eventually(t, 5*time.Second, "wh-ok's two events delivered while wh-hang hangs", func() error {
		if n := st.delivered("wh-ok"); n < 2 {
			return fmt.Errorf("%d of 2 delivered", n)
		}
		return nil
	})
	if n := hanging.Load(); n > perWebhook {
		t.Fatalf("the hanging receiver got %d requests, want %d (the rest wait for their lease)", n, perWebhook)
	}
}

// TestDroppedWhenWebhookGone: a delivery whose webhook was deleted, or
// whose token was revoked, after its event was queued is recorded as a
// last attempt (no retry) and counted as dropped; nothing is sent.
func TestDroppedWhenWebhookGone(t *testing.T) {
	var sent atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { sent.Add(1) }))
	defer srv.Close()
	key := bytes.Repeat([]byte{1}, 32)
	st := &memStore{hooks: map[string]*Webhook{}, enc: map[string][]byte{}, leased: map[int64]time.Time{},
		tried: map[int64][]Outcome{}}
	now := time.Now()
	dl := Delivery{Seq: 1, WebhookID: "wh-gone", EventID: "ev", Subject: "p-1", Body: []byte(`{}`),
		State: "pending", NextAttempt: now, CreatedAt: now}
	d, err := New(Options{Store: st, MasterKey: key, AllowPrivate: true, Client: srv.Client()})
	if err != nil {
		t.Fatal(err)
	}
	d.deliver(context.Background(), &dl)
	got := st.tried[1]
	if len(got) != 1 || got[0].Delivered || !got[0].Next.IsZero() || got[0].Error != "webhook deleted or its token revoked" {
		t.Fatalf("recorded %+v, want one last attempt: not delivered, no retry, the reason", got)
	}
	var m dto.Metric
	if err := d.m.deliveries.WithLabelValues("dropped").Write(&m); err != nil {
		t.Fatal(err)
	}
	if n := m.GetCounter().GetValue(); n != 1 {
		t.Fatalf("dropped counted %v times, want 1", n)
	}
	if n := sent.Load(); n != 0 {
		t.Fatalf("%d requests sent for a webhook that is gone", n)
	}
}
