package webhook

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
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
	gaveUp int                 // what RecordAttempt says a hold gave up
	// backlog is what Backlog answers.
	backlog    Backlog
	backlogErr error
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

func (s *memStore) LeaseDue(_ context.Context, now time.Time, lease time.Duration, n, perToken int, busy []string) ([]Delivery, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []Delivery
	per := map[string]int{}
	for i := range s.ds {
		d := &s.ds[i]
		older := slices.ContainsFunc(s.ds[:i], func(e Delivery) bool {
			return e.WebhookID == d.WebhookID && e.Subject == d.Subject && e.State == "pending"
		})
		var token string
		if w := s.hooks[d.WebhookID]; w != nil {
			token = w.TokenID
		}
		if d.State != "pending" || now.Before(s.leased[d.Seq]) || slices.Contains(busy, token) || older ||
			per[token] >= perToken || len(out) == n {
			continue
		}
		per[token]++
		s.leased[d.Seq] = now.Add(lease)
		dl := *d
		dl.TokenID = token
		out = append(out, dl)
	}
	return out, nil
}

func (s *memStore) RecordAttempt(_ context.Context, seq int64, o Outcome) (int, error) {
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
	return s.gaveUp, nil
}

func (s *memStore) Backlog(context.Context, time.Time) (Backlog, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.backlog, s.backlogErr
}

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

// hangingReceiver is a receiver that never answers until the test ends,
// and the count of requests it got.
func hangingReceiver(t *testing.T) (*httptest.Server, *atomic.Int32) {
	release := make(chan struct{})
	hanging := new(atomic.Int32)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hanging.Add(1)
		<-release
	}))
	t.Cleanup(srv.Close)
	t.Cleanup(func() { close(release) }) // first: Close waits for the handlers
	return srv, hanging
}

// testSealer is a master key and a sealer of webhook secrets with it.
func testSealer(t *testing.T) ([]byte, *sealer) {
	key := bytes.Repeat([]byte{1}, 32)
	seal, err := newSealer(key)
	if err != nil {
		t.Fatal(err)
	}
	return key, seal
}

// downReceiver is a receiver that answers every request 503.
func downReceiver(t *testing.T) *httptest.Server {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusServiceUnavailable)
	}))
	t.Cleanup(srv.Close)
	return srv
}

// runDispatcher runs a dispatcher of st's deliveries (4 workers, a
// minute's timeout, rounds only when woken) until the returned stop.
func runDispatcher(t *testing.T, st Store, key []byte) (stop func()) {
	d, err := New(Options{Store: st, MasterKey: key, AllowPrivate: true, Workers: 4, PollInterval: time.Hour,
		Client: &http.Client{Timeout: time.Minute}})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx) }()
	return func() { cancel(); <-done }
}

// TestHangingReceiverHoldsUpOnlyItself: receivers that never answer keep
// at most perToken workers, however many webhooks their token made for
// them; another token's webhook's events, one after the other (the second
// is due only once the first is delivered), go out while they hang.
// Before, every round waited for its slowest delivery, so the second event
// waited for the hanging one's timeout; and the limit was per webhook.
func TestHangingReceiverHoldsUpOnlyItself(t *testing.T) {
	hang, hanging := hangingReceiver(t)
	ok := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	defer ok.Close()

	key, seal := testSealer(t)
	st := &memStore{hooks: map[string]*Webhook{}, enc: map[string][]byte{}, leased: map[int64]time.Time{}}
	for id, url := range map[string]string{"wh-hang-1": hang.URL, "wh-hang-2": hang.URL, "wh-hang-3": hang.URL, "wh-ok": ok.URL} {
		token := "t-hang"
		if id == "wh-ok" {
			token = "t-ok"
		}
		st.hooks[id] = &Webhook{ID: id, URL: url, TokenID: token}
		st.enc[id] = seal.seal("whsec_x", id)
	}
	now := time.Now()
	add := func(webhook, subject string) {
		st.ds = append(st.ds, Delivery{Seq: int64(len(st.ds) + 1), WebhookID: webhook, EventID: "ev", Subject: subject,
			Body: []byte(`{}`), State: "pending", NextAttempt: now, CreatedAt: now})
	}
	for i, p := range []string{"p-1", "p-2", "p-3", "p-4", "p-5", "p-6"} {
		add(fmt.Sprintf("wh-hang-%d", 1+i/2), p) // two pickups to each
	}
	add("wh-ok", "p-9")
	add("wh-ok", "p-9")
	defer runDispatcher(t, st, key)()

	testtool.Eventually(t, 5*time.Second, "the hanging receiver holding two requests", func() error {
		if n := hanging.Load(); n < perToken {
			return fmt.Errorf("%d hanging", n)
		}
		return nil
	})
	testtool.Eventually(t, 5*time.Second, "wh-ok's two events delivered while t-hang's receivers hang", func() error {
		if n := st.delivered("wh-ok"); n < 2 {
			return fmt.Errorf("%d of 2 delivered", n)
		}
		return nil
	})
	if n := hanging.Load(); n > perToken {
		t.Fatalf("the hanging receiver got %d requests over t-hang's three webhooks, want %d (the rest wait for their lease)", n, perToken)
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

// TestHoldGiveUpsCounted: deliveries a hold gives up (out of time while
// their receiver was unreachable) are counted as given_up, as an attempt
// that gives up is, so the alert on give-ups sees them.
func TestHoldGiveUpsCounted(t *testing.T) {
	down := downReceiver(t)
	key, seal := testSealer(t)
	st := &memStore{hooks: map[string]*Webhook{"wh-down": {ID: "wh-down", URL: down.URL, TokenID: "t-1"}},
		enc: map[string][]byte{"wh-down": seal.seal("whsec_x", "wh-down")}, leased: map[int64]time.Time{},
		tried: map[int64][]Outcome{}, gaveUp: 3}
	now := time.Now()
	dl := Delivery{Seq: 1, WebhookID: "wh-down", EventID: "ev", Subject: "p-1", Body: []byte(`{}`),
		State: "pending", NextAttempt: now, CreatedAt: now}
	d, err := New(Options{Store: st, MasterKey: key, AllowPrivate: true, Client: down.Client()})
	if err != nil {
		t.Fatal(err)
	}
	d.deliver(context.Background(), &dl)
	if got := st.tried[1]; len(got) != 1 || got[0].Hold == nil || got[0].Next.IsZero() {
		t.Fatalf("recorded %+v, want one attempt that holds its webhook and is tried again", got)
	}
	wantDeliveries(t, d, map[string]float64{"given_up": 3, "retry": 1})
}

// wantDeliveries wants d's deliveries counted by outcome as want says.
func wantDeliveries(t *testing.T, d *Dispatcher, want map[string]float64) {
	t.Helper()
	for outcome, n := range want {
		var m dto.Metric
		if err := d.m.deliveries.WithLabelValues(outcome).Write(&m); err != nil {
			t.Fatal(err)
		}
		if got := m.GetCounter().GetValue(); got != n {
			t.Errorf("%s counted %v times, want %v", outcome, got, n)
		}
	}
}

// TestBacklogUnreadLogged: when the store cannot count the backlog, the
// gauges keep their last values and that is logged, once a minute at most.
func TestBacklogUnreadLogged(t *testing.T) {
	key, _ := testSealer(t)
	st := &memStore{backlog: Backlog{Pending: 7, Oldest: time.Minute, Held: 2}}
	var logs bytes.Buffer
	d, err := New(Options{Store: st, MasterKey: key, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	var logged time.Time
	gauges := func() (v [3]float64) {
		for i, g := range []prometheus.Gauge{d.m.backlog, d.m.oldest, d.m.held} {
			var m dto.Metric
			if err := g.Write(&m); err != nil {
				t.Fatal(err)
			}
			v[i] = m.GetGauge().GetValue()
		}
		return v
	}
	d.readBacklog(context.Background(), &logged)
	if got := gauges(); got != [3]float64{7, 60, 2} {
		t.Fatalf("gauges %v after a read, want [7 60 2]", got)
	}
	st.mu.Lock()
	st.backlog, st.backlogErr = Backlog{}, errors.New("conn closed")
	st.mu.Unlock()
	d.readBacklog(context.Background(), &logged)
	d.readBacklog(context.Background(), &logged)
	if got := gauges(); got != [3]float64{7, 60, 2} {
		t.Errorf("gauges %v after failed reads, want them kept", got)
	}
	if n := strings.Count(logs.String(), "webhook backlog not read"); n != 1 {
		t.Errorf("%d log lines for two failed reads a moment apart, want 1:\n%s", n, logs.String())
	}
}

// TestUnsendableGivenUpCounted: a delivery that cannot be sent (its
// secret does not open) is tried again while it has time, and given up,
// counted and logged as such, once it has none: the alert on give-ups
// sees it.
func TestUnsendableGivenUpCounted(t *testing.T) {
	key, _ := testSealer(t)
	st := &memStore{hooks: map[string]*Webhook{"wh-1": {ID: "wh-1", URL: "http://127.0.0.1:1", TokenID: "t-1"}},
		enc: map[string][]byte{"wh-1": []byte("not sealed")}, leased: map[int64]time.Time{}, tried: map[int64][]Outcome{}}
	var logs bytes.Buffer
	d, err := New(Options{Store: st, MasterKey: key, AllowPrivate: true, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	for seq, age := range map[int64]time.Duration{1: time.Minute, 2: 26 * time.Hour} {
		d.deliver(context.Background(), &Delivery{Seq: seq, WebhookID: "wh-1", EventID: "ev", Subject: "p-1", Body: []byte(`{}`),
			State: "pending", NextAttempt: now, CreatedAt: now.Add(-age)})
	}
	if got := st.tried[1]; len(got) != 1 || got[0].Next.IsZero() {
		t.Errorf("the young delivery recorded %+v, want one failed attempt to retry", got)
	}
	if got := st.tried[2]; len(got) != 1 || !got[0].Next.IsZero() || !strings.Contains(got[0].Error, "open webhook secret") {
		t.Errorf("the old delivery recorded %+v, want one last attempt saying why", got)
	}
	wantDeliveries(t, d, map[string]float64{"given_up": 1, "retry": 1})
	if n := strings.Count(logs.String(), "webhook delivery given up"); n != 1 {
		t.Errorf("%d give-ups logged, want 1:\n%s", n, logs.String())
	}
}

// TestStopHoldsNothing: a request a stop cancels is recorded as a failed
// attempt, to be tried again, but does not hold its webhook: the receiver
// was not found unreachable. One that fails on its own does.
func TestStopHoldsNothing(t *testing.T) {
	hang, hanging := hangingReceiver(t)
	down := downReceiver(t)
	key, seal := testSealer(t)
	st := &memStore{hooks: map[string]*Webhook{}, enc: map[string][]byte{}, leased: map[int64]time.Time{},
		tried: map[int64][]Outcome{}}
	now := time.Now()
	for i, w := range []*Webhook{{ID: "wh-hang", URL: hang.URL, TokenID: "t-1"}, {ID: "wh-down", URL: down.URL, TokenID: "t-2"}} {
		st.hooks[w.ID], st.enc[w.ID] = w, seal.seal("whsec_x", w.ID)
		st.ds = append(st.ds, Delivery{Seq: int64(i + 1), WebhookID: w.ID, EventID: "ev", Subject: "p-1", Body: []byte(`{}`),
			State: "pending", NextAttempt: now, CreatedAt: now})
	}
	stop := runDispatcher(t, st, key)
	tried := func(seq int64) []Outcome {
		st.mu.Lock()
		defer st.mu.Unlock()
		return slices.Clone(st.tried[seq])
	}
	testtool.Eventually(t, 5*time.Second, "the hanging receiver called, the down one answered", func() error {
		if hanging.Load() == 0 || len(tried(2)) == 0 {
			return fmt.Errorf("hanging %d, down's attempts %d", hanging.Load(), len(tried(2)))
		}
		return nil
	})
	stop()
	if got := tried(2); got[0].Hold == nil {
		t.Errorf("the 503 recorded %+v, want a hold", got[0])
	}
	got := tried(1)
	if len(got) != 1 || got[0].Delivered || got[0].Next.IsZero() || got[0].Hold != nil {
		t.Fatalf("the attempt the stop cancelled recorded as %+v, want a failed attempt to retry, no hold", got)
	}
}

func (s *memStore) CreateWebhook(_ context.Context, w *Webhook, secretEnc []byte, _ int) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.hooks[w.ID], s.enc[w.ID] = w, secretEnc
	return nil
}

// hosts resolves names from a map; any other name fails to resolve.
type hosts map[string][]netip.Addr

func (h hosts) LookupNetIP(_ context.Context, _, host string) ([]netip.Addr, error) {
	if a, ok := h[host]; ok {
		return a, nil
	}
	return nil, &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}
}

// TestCreateRefusesUnreachableURL: without AllowPrivate, a webhook whose
// host is, or resolves only to, an address the dialer refuses is refused
// when it is created (422, saying what to do), not left to fail at every
// delivery. A host that resolves to a public address among others, or
// that cannot be resolved now, is taken: the dialer judges each address
// when it delivers.
func TestCreateRefusesUnreachableURL(t *testing.T) {
	res := hosts{
		"localhost":         {netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("::1")},
		"receiver.internal": {netip.MustParseAddr("172.18.0.5")},
		"hooks.example":     {netip.MustParseAddr("10.0.0.9"), netip.MustParseAddr("93.184.215.14")},
	}
	for _, tc := range []struct {
		url, refused string // refused: the host named, "" when taken
	}{
		{"http://127.0.0.1:9/hook", "127.0.0.1"},
		{"http://[::1]:9/hook", "::1"},
		{"http://[fe80::1%25eth0]/hook", "fe80::1%eth0"},
		{"https://10.1.2.3/hook", "10.1.2.3"},
		{"http://169.254.169.254/latest", "169.254.169.254"},
		{"http://0.0.0.0/hook", "0.0.0.0"},
		{"http://localhost:8080/hook", "localhost"},
		{"http://receiver.internal/hook", "receiver.internal"},
		{"https://hooks.example/hook", ""},
		{"https://93.184.215.14/hook", ""},
		{"https://not-resolvable.example/hook", ""},
	} {
		t.Run(tc.url, func(t *testing.T) {
			for _, allow := range []bool{false, true} {
				st := &memStore{hooks: map[string]*Webhook{}, enc: map[string][]byte{}}
				d, err := New(Options{Store: st, MasterKey: bytes.Repeat([]byte{1}, 32), AllowPrivate: allow, Resolver: res})
				if err != nil {
					t.Fatal(err)
				}
				_, err = d.Create(context.Background(), &Webhook{URL: tc.url, Events: []string{"pickup.ready"}})
				switch {
				case tc.refused == "" || allow:
					if err != nil || len(st.hooks) != 1 {
						t.Fatalf("allow private %v: %v, %d stored; want it taken", allow, err, len(st.hooks))
					}
				case !errors.Is(err, fleet.ErrUnprocessable) || !strings.Contains(err.Error(), "host "+tc.refused+" reaches no public") ||
					strings.Contains(err.Error(), "172.18.0.5") ||
					!strings.Contains(err.Error(), "--webhook-allow-private") || len(st.hooks) != 0:
					t.Fatalf("got %v (%d stored), want it refused as unprocessable, naming %s and the flag", err, len(st.hooks), tc.refused)
				}
			}
		})
	}
}

// failingRecordStore fails the first fails RecordAttempt calls, as a
// database whose backend was killed does.
type failingRecordStore struct {
	*memStore
	fails atomic.Int32
}

func (s *failingRecordStore) RecordAttempt(ctx context.Context, seq int64, o Outcome) (int, error) {
	if s.fails.Add(-1) >= 0 {
		return 0, errors.New("conn closed")
	}
	return s.memStore.RecordAttempt(ctx, seq, o)
}

// TestAttemptRecordedThroughADatabaseBlip: an attempt whose outcome the
// store fails to record at first is recorded once it can be (it was left
// out of the delivery's log, and the delivered event was sent again when
// its lease ended).
func TestAttemptRecordedThroughADatabaseBlip(t *testing.T) {
	ok := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	defer ok.Close()
	key, seal := testSealer(t)
	now := time.Now()
	mem := &memStore{hooks: map[string]*Webhook{"wh-1": {ID: "wh-1", URL: ok.URL}}, enc: map[string][]byte{"wh-1": seal.seal("whsec_x", "wh-1")},
		leased: map[int64]time.Time{}, tried: map[int64][]Outcome{},
		ds: []Delivery{{Seq: 1, WebhookID: "wh-1", EventID: "ev", Subject: "p-1", Body: []byte(`{}`), State: "pending", NextAttempt: now, CreatedAt: now}}}
	st := &failingRecordStore{memStore: mem}
	st.fails.Store(2)
	d, err := New(Options{Store: st, MasterKey: key, AllowPrivate: true, PollInterval: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	d.deliver(context.Background(), &mem.ds[0])
	if got := mem.tried[1]; len(got) != 1 || !got[0].Delivered {
		t.Fatalf("recorded %+v, want the one delivered attempt", got)
	}
	if mem.delivered("wh-1") != 1 {
		t.Fatal("the delivery is still pending")
	}
}

// TestRetryWaitsFromTheAttemptsEnd: the next attempt after a failure is
// due a back-off after the attempt ended, not after it began: a receiver
// that takes 10 s to fail (a hang until the timeout) is not tried again at
// once.
func TestRetryWaitsFromTheAttemptsEnd(t *testing.T) {
	fail := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusInternalServerError) }))
	defer fail.Close()
	key, seal := testSealer(t)
	t0 := time.Now()
	mem := &memStore{hooks: map[string]*Webhook{"wh-1": {ID: "wh-1", URL: fail.URL}}, enc: map[string][]byte{"wh-1": seal.seal("whsec_x", "wh-1")},
		leased: map[int64]time.Time{}, tried: map[int64][]Outcome{},
		ds: []Delivery{{Seq: 1, WebhookID: "wh-1", EventID: "ev", Subject: "p-1", Body: []byte(`{}`), State: "pending", NextAttempt: t0, CreatedAt: t0}}}
	// The clock reads t0 as the attempt starts and 10 s later after it.
	var reads atomic.Int32
	clock := func() time.Time {
		if reads.Add(1) == 1 {
			return t0
		}
		return t0.Add(10 * time.Second)
	}
	d, err := New(Options{Store: mem, MasterKey: key, AllowPrivate: true, PollInterval: time.Hour, BackoffBase: 4 * time.Second, Now: clock})
	if err != nil {
		t.Fatal(err)
	}
	d.deliver(context.Background(), &mem.ds[0])
	got := mem.tried[1]
	if len(got) != 1 || got[0].Delivered || got[0].Duration != 10*time.Second {
		t.Fatalf("recorded %+v, want one failed attempt of 10 s", got)
	}
	// The first retry waits 2-4 s (base 4 s, jittered to 50-100 %).
	if next := got[0].Next; next.Before(t0.Add(12*time.Second)) || next.After(t0.Add(14*time.Second)) {
		t.Fatalf("next attempt at +%v, want 12-14 s after the start: 2-4 s after the attempt ended", next.Sub(t0))
	}
}
