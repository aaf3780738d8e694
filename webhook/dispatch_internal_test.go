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
}

func (s *memStore) GetWebhook(_ context.Context, id string) (*Webhook, []byte, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.hooks[id], s.enc[id], nil
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
