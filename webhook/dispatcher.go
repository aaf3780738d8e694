package webhook

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"slices"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/provisioning"
)

// Options configure a Dispatcher.
type Options struct {
	Store     Store
	MasterKey []byte
	// Expand completes a stored body before sending (e.g. adds pickup codes
	// that are never stored). Nil sends bodies as stored.
	// It gets the receiving webhook's role: operators get no codes.
	Expand func(ctx context.Context, role string, body []byte) ([]byte, error)
	Client *http.Client
	Logger *slog.Logger
	// Registerer takes the dispatcher's metrics (nil: none).
	Registerer prometheus.Registerer
	// BackoffBase is the first retry delay (doubling, capped at BackoffMax,
	// with jitter). Defaults 5s and 1h.
	BackoffBase, BackoffMax time.Duration
	// RetryFor is how long an event is retried before it is given up. Default 25h.
	RetryFor time.Duration
	// Workers deliver in parallel. Default 8.
	Workers int
	// PollInterval bounds the wait for due deliveries. Default 1s.
	PollInterval time.Duration
	// AllowPrivate lets webhooks reach loopback, private and link-local
	// addresses (tests, lab setups). Off, the dialer refuses them after DNS
	// resolution, so a token holder cannot make the gateway probe its own
	// network.
	AllowPrivate bool
	// Resolver looks up a new webhook's host when AllowPrivate is off
	// (Create refuses one that reaches no public address). Default
	// net.DefaultResolver.
	Resolver interface {
		LookupNetIP(ctx context.Context, network, host string) ([]netip.Addr, error)
	}
	Now func() time.Time
}

// Dispatcher creates webhooks and delivers the outbox.
type Dispatcher struct {
	o    Options
	log  *slog.Logger
	seal *sealer
	wake chan struct{}
	m    *metrics

	// The workers: deliveries in flight by token, at most Workers in all
	// and perToken of one token's webhooks (Run's goroutine starts them).
	mu       sync.Mutex
	inflight map[string]int
	wg       sync.WaitGroup
}

// perToken bounds the deliveries in flight at once (and leased at once) to
// the webhooks of one token: receivers that hang, or answer just inside
// the timeout, hold up that many workers, not all of them, however many
// webhooks the token makes (up to MaxPerToken) for them. One that does not
// answer does so for one timeout: its webhook is then held (Outcome.Hold),
// so that a dead receiver costs perToken attempts per hold, not one per
// pending event.
const perToken = 2

// MaxPerToken bounds the webhooks of one token: each is sent every event
// its token may see, so a token with many (or many that hang) would hold up
// everyone's deliveries.
const MaxPerToken = 20

// ErrTooMany is the store's answer to a create past MaxPerToken.
var ErrTooMany = errors.New("too many webhooks for one token")

// New returns a Dispatcher.
func New(o Options) (*Dispatcher, error) {
	if o.Store == nil {
		return nil, errors.New("webhook: Store is required")
	}
	s, err := newSealer(o.MasterKey)
	if err != nil {
		return nil, err
	}
	if o.Client == nil {
		o.Client = &http.Client{Timeout: 10 * time.Second, Transport: transport(o.AllowPrivate),
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.BackoffBase <= 0 {
		o.BackoffBase = 5 * time.Second
	}
	if o.BackoffMax <= 0 {
		o.BackoffMax = time.Hour
	}
	if o.RetryFor <= 0 {
		o.RetryFor = 25 * time.Hour
	}
	if o.Workers <= 0 {
		o.Workers = 8
	}
	if o.PollInterval <= 0 {
		o.PollInterval = time.Second
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Resolver == nil {
		o.Resolver = net.DefaultResolver
	}
	return &Dispatcher{o: o, log: o.Logger, seal: s, wake: make(chan struct{}, 1), m: newMetrics(o.Registerer),
		inflight: map[string]int{}}, nil
}

// Create stores a webhook and returns its signing secret (shown once).
func (d *Dispatcher) Create(ctx context.Context, w *Webhook) (string, error) {
	if err := ValidateURL(w.URL); err != nil {
		return "", fmt.Errorf("%w: %v", fleet.ErrInvalid, err)
	}
	if len(w.Events) == 0 {
		return "", fmt.Errorf("%w: events must list at least one event type", fleet.ErrInvalid)
	}
	if err := d.reachable(ctx, w.URL); err != nil {
		return "", fmt.Errorf("%w: %v", fleet.ErrUnprocessable, err)
	}
	w.ID = fleet.NewID("wh")
	secret := provisioning.NewSecret("whsec_")
	err := d.o.Store.CreateWebhook(ctx, w, d.seal.seal(secret, w.ID), MaxPerToken)
	if errors.Is(err, ErrTooMany) {
		return "", fmt.Errorf("%w: a token may have at most %d webhooks; delete one first", fleet.ErrUnprocessable, MaxPerToken)
	}
	if err != nil {
		return "", err
	}
	return secret, nil
}

// resolveWait bounds Create's lookup of a webhook's host.
const resolveWait = 2 * time.Second

// reachable refuses, unless Options.AllowPrivate, a webhook URL whose host
// is, or resolves only to, addresses the dialer would refuse (loopback,
// private, link-local and the like): every delivery would fail, so the
// caller is told now rather than finding an empty delivery log later. A
// host that cannot be resolved now is accepted (deliveries retry it), and
// the dialer still checks every address it connects to, whatever the
// name resolves to by then.
func (d *Dispatcher) reachable(ctx context.Context, raw string) error {
	if d.o.AllowPrivate {
		return nil
	}
	u, err := url.Parse(raw)
	if err != nil {
		return err // ValidateURL refused it already
	}
	host := u.Hostname()
	var addrs []netip.Addr
	if a, err := netip.ParseAddr(host); err == nil {
		addrs = []netip.Addr{a.WithZone("")}
	} else {
		lctx, cancel := context.WithTimeout(ctx, resolveWait)
		defer cancel()
		if addrs, err = d.o.Resolver.LookupNetIP(lctx, "ip", host); err != nil || len(addrs) == 0 {
			return nil
		}
	}
	if slices.ContainsFunc(addrs, public) {
		return nil
	}
	// The host only, not what it resolved to: a token holder is not told
	// the private addresses of names inside the gateway's network.
	return fmt.Errorf("url's host %s reaches no public address: this gateway delivers webhooks to public addresses only "+
		"(start it with --webhook-allow-private for a lab or a test setup; demo does)", host)
}

// SetExpand sets Options.Expand (the pickup service exists after the dispatcher).
func (d *Dispatcher) SetExpand(f func(ctx context.Context, role string, body []byte) ([]byte, error)) {
	d.o.Expand = f
}

// Wake tells the dispatcher new deliveries may be due.
func (d *Dispatcher) Wake() {
	select {
	case d.wake <- struct{}{}:
	default:
	}
}

// Run delivers until ctx ends.
func (d *Dispatcher) Run(ctx context.Context) error {
	t := time.NewTicker(d.o.PollInterval)
	defer t.Stop()
	backlog := time.NewTicker(5 * time.Second)
	defer backlog.Stop()
	defer d.wg.Wait()
	var backlogLogged time.Time
	for {
		for d.round(ctx) {
			// Workers free and deliveries leased: more may be due now.
		}
		select {
		case <-ctx.Done():
			return nil
		case <-d.wake:
		case <-t.C:
		case <-backlog.C:
			d.readBacklog(ctx, &backlogLogged)
		}
	}
}

// readBacklog sets the backlog gauges. When the store cannot say, they
// keep their last values, and that is logged at most once a minute
// (*logged: when it last was).
func (d *Dispatcher) readBacklog(ctx context.Context, logged *time.Time) {
	b, err := d.o.Store.Backlog(ctx, d.o.Now())
	switch {
	case err == nil:
		d.m.backlog.Set(float64(b.Pending))
		d.m.oldest.Set(b.Oldest.Seconds())
		d.m.held.Set(float64(b.Held))
	case ctx.Err() == nil && time.Since(*logged) >= time.Minute:
		*logged = time.Now()
		d.log.Warn("webhook backlog not read; lockergate_webhook_backlog, lockergate_webhook_oldest_pending_seconds and lockergate_webhooks_held keep their last values", "err", err)
	}
}

// round leases as many due deliveries as there are free workers and starts
// them; true when it filled every free worker (more may be due). Workers
// run on: a slow receiver holds up its own deliveries, not a round. Each
// delivery ends within the client's timeout, well inside its one-minute
// lease, so no other instance leases it meanwhile. A lease takes at most
// perToken of one token's webhooks, and none of a token with a delivery
// still in flight here, so receivers that hang hold up perToken workers
// per token and the others go on.
func (d *Dispatcher) round(ctx context.Context) bool {
	d.mu.Lock()
	free := d.o.Workers
	busy := make([]string, 0, len(d.inflight))
	for id, n := range d.inflight {
		free -= n
		busy = append(busy, id)
	}
	d.mu.Unlock()
	if free <= 0 || ctx.Err() != nil {
		return false // a worker that ends wakes Run
	}
	due, err := d.o.Store.LeaseDue(ctx, d.o.Now(), time.Minute, free, perToken, busy)
	if err != nil {
		if ctx.Err() == nil {
			d.log.Error("lease webhook deliveries", "err", err)
		}
		return false
	}
	for i := range due {
		dl := &due[i]
		d.mu.Lock()
		d.inflight[dl.TokenID]++
		d.mu.Unlock()
		d.wg.Add(1)
		go func() {
			defer d.wg.Done()
			d.deliver(ctx, dl)
			d.mu.Lock()
			if d.inflight[dl.TokenID]--; d.inflight[dl.TokenID] == 0 {
				delete(d.inflight, dl.TokenID)
			}
			d.mu.Unlock()
			d.Wake()
		}()
	}
	return len(due) == free
}

// recordFor bounds how long an attempt's outcome is tried to be recorded.
const recordFor = 30 * time.Second

func (d *Dispatcher) deliver(ctx context.Context, dl *Delivery) {
	// A failure before sending is recorded like a failed attempt, so the
	// delivery backs off (and is given up in time) instead of blocking the
	// pickup's later events forever.
	record := func(o Outcome) {
		// A database blip (a killed backend, a failover) must not leave the
		// attempt out of the delivery's log, and a delivered event pending,
		// to be sent again when its lease ends: tried again for up to
		// recordFor (well inside the lease), once when stopping.
		backoff, deadline := 100*time.Millisecond, time.Now().Add(recordFor)
		for {
			gaveUp, err := d.o.Store.RecordAttempt(context.WithoutCancel(ctx), dl.Seq, o)
			if err == nil {
				if gaveUp > 0 {
					// Counted and told as the attempts that give up are:
					// the same alert covers them.
					d.m.deliveries.WithLabelValues("given_up").Add(float64(gaveUp))
					d.log.Error("webhook deliveries given up: their receiver was unreachable until their time ran out",
						"webhook", dl.WebhookID, "deliveries", gaveUp, "last_error", o.Error)
				}
				return
			}
			if ctx.Err() != nil || time.Now().Add(backoff).After(deadline) {
				d.log.Error("record webhook attempt: not recorded; the delivery is tried again once its lease ends",
					"webhook", dl.WebhookID, "event", dl.EventID, "err", err)
				return
			}
			d.log.Warn("record webhook attempt failed; retrying", "webhook", dl.WebhookID, "event", dl.EventID, "err", err, "retry_in", backoff)
			select {
			case <-ctx.Done():
			case <-time.After(backoff):
			}
			backoff = min(2*backoff, 5*time.Second)
		}
	}
	fail := func(what string, err error) {
		d.log.Error(what, "webhook", dl.WebhookID, "event", dl.EventID, "err", err)
		o := Outcome{At: d.o.Now(), Error: what + ": " + err.Error()}
		d.m.deliveries.WithLabelValues(d.retryOrGiveUp(&o, dl, o.At)).Inc()
		record(o)
	}
	w, enc, err := d.o.Store.GetWebhook(ctx, dl.WebhookID)
	if errors.Is(err, fleet.ErrNotFound) {
		// Deleted, or its token revoked since the event was queued: the
		// event (with its codes) goes nowhere, and is not tried again.
		d.log.Warn("webhook delivery dropped: webhook deleted or its token revoked", "webhook", dl.WebhookID, "event", dl.EventID)
		d.m.deliveries.WithLabelValues("dropped").Inc()
		record(Outcome{At: d.o.Now(), Error: "webhook deleted or its token revoked"})
		return
	}
	if err != nil {
		fail("load webhook", err)
		return
	}
	secret, err := d.seal.open(enc, w.ID)
	if err != nil {
		fail("open webhook secret (was master.key replaced?)", err)
		return
	}
	body := []byte(dl.Body)
	if d.o.Expand != nil {
		if body, err = d.o.Expand(ctx, w.Role, body); err != nil {
			fail("complete webhook body", err)
			return
		}
	}
	start := d.o.Now()
	o := Outcome{At: start}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, w.URL, bytes.NewReader(body))
	if err == nil {
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("User-Agent", "Lockergate-Webhook/1")
		req.Header.Set("Lockergate-Signature", Sign(secret, start, body))
		req.Header.Set("Lockergate-Event-Id", dl.EventID)
		var resp *http.Response
		resp, err = d.o.Client.Do(req)
		if err == nil {
			io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
			resp.Body.Close()
			status := resp.StatusCode
			o.Status = &status
			o.Delivered = status >= 200 && status < 300
			if !o.Delivered {
				o.Error = fmt.Sprintf("receiver answered %d", status)
			}
		}
	}
	detail := o.Error // for the log: the request's error in full
	if err != nil {
		o.Error, detail = receiverError(err), err.Error()
	}
	end := d.o.Now()
	o.Duration = end.Sub(start)
	if unreachable(o) && ctx.Err() == nil { // a stop cancelling the request says nothing of the receiver
		// Every pending delivery of this webhook waits with this one,
		// longer the more attempts failed in a row.
		o.Hold = &Hold{Base: d.o.BackoffBase, Max: d.o.BackoffMax, GiveUpBefore: end.Add(-d.o.RetryFor)}
		d.log.Warn("webhook receiver unreachable; its deliveries are held", "webhook", w.ID, "failing", w.Failing+1, "err", detail)
	}
	d.m.latency.Observe(o.Duration.Seconds())
	outcome := "delivered"
	if !o.Delivered {
		outcome = d.retryOrGiveUp(&o, dl, end)
	}
	d.m.deliveries.WithLabelValues(outcome).Inc()
	record(o)
}

// retryOrGiveUp settles a failed attempt o of dl that ended at end: the
// next attempt's time while the delivery is within RetryFor (from the
// attempt's end: a receiver that hangs until the timeout gets the whole
// wait too, not a retry at once), else given up. It returns the outcome.
func (d *Dispatcher) retryOrGiveUp(o *Outcome, dl *Delivery, end time.Time) string {
	if end.Sub(dl.CreatedAt) < d.o.RetryFor {
		o.Next = end.Add(d.backoff(dl.Attempts + 1))
		return "retry"
	}
	d.log.Error("webhook delivery given up", "webhook", dl.WebhookID, "event", dl.EventID, "attempts", dl.Attempts+1, "last_error", o.Error)
	return "given_up"
}

// unreachable reports whether attempt o found its receiver unreachable
// rather than refusing the one event: no answer (a timeout, a refused
// connection, an address not allowed), a 5xx or a 429.
func unreachable(o Outcome) bool {
	return !o.Delivered && (o.Status == nil || *o.Status >= 500 || *o.Status == http.StatusTooManyRequests)
}

// backoff is the delay before attempt n+1: base·2^(n-1), capped, with jitter
// in [50%, 100%] so receivers that come back are not hit all at once.
func (d *Dispatcher) backoff(n int) time.Duration {
	b := d.o.BackoffBase
	for i := 1; i < n && b < d.o.BackoffMax; i++ {
		b *= 2
	}
	b = min(b, d.o.BackoffMax)
	return b/2 + time.Duration(rand.Int64N(int64(b/2)+1))
}

// Deliveries lists a webhook's deliveries with their attempt logs.
func (d *Dispatcher) Deliveries(ctx context.Context, webhookID string, after int64, limit int) ([]Delivery, error) {
	return d.o.Store.ListDeliveries(ctx, webhookID, after, limit)
}

// Get returns a webhook.
func (d *Dispatcher) Get(ctx context.Context, id string) (*Webhook, error) {
	w, _, err := d.o.Store.GetWebhook(ctx, id)
	return w, err
}

// List returns up to limit webhooks of a token ("" for all) after the id
// after, in id order.
func (d *Dispatcher) List(ctx context.Context, tokenID, after string, limit int) ([]Webhook, error) {
	return d.o.Store.ListWebhooks(ctx, tokenID, after, limit)
}

// Delete removes a webhook; queued deliveries to it stop.
func (d *Dispatcher) Delete(ctx context.Context, id string) error {
	return d.o.Store.DeleteWebhook(ctx, id)
}

type metrics struct {
	deliveries *prometheus.CounterVec
	latency    prometheus.Histogram
	backlog    prometheus.Gauge
	oldest     prometheus.Gauge
	held       prometheus.Gauge
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		deliveries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "lockergate_webhook_deliveries_total", Help: "Webhook delivery attempts, by outcome (delivered, retry, given_up, dropped); given_up also counts a held webhook's deliveries given up when their time ran out.",
		}, []string{"outcome"}),
		latency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "lockergate_webhook_delivery_duration_seconds", Help: "Duration of webhook delivery attempts.",
			Buckets: []float64{.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10},
		}),
		backlog: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "lockergate_webhook_backlog", Help: "Webhook deliveries waiting to be delivered.",
		}),
		oldest: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "lockergate_webhook_oldest_pending_seconds", Help: "Age of the oldest undelivered webhook event.",
		}),
		held: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "lockergate_webhooks_held", Help: "Webhooks held because their receiver was unreachable (no answer, a 5xx or a 429): their events wait.",
		}),
	}
	for _, o := range []string{"delivered", "retry", "given_up", "dropped"} {
		m.deliveries.WithLabelValues(o)
	}
	if reg != nil {
		reg.MustRegister(m.deliveries, m.latency, m.backlog, m.oldest, m.held)
	}
	return m
}

// notGlobal are ranges a webhook must not reach that netip.Addr's own
// predicates (loopback, private, link-local, multicast, unspecified) do
// not cover.
var notGlobal = []netip.Prefix{
	netip.MustParsePrefix("0.0.0.0/8"),       // this network
	netip.MustParsePrefix("100.64.0.0/10"),   // carrier-grade NAT; also some clouds' metadata (100.100.100.200)
	netip.MustParsePrefix("192.0.0.0/24"),    // IETF protocol assignments
	netip.MustParsePrefix("192.0.2.0/24"),    // documentation
	netip.MustParsePrefix("198.18.0.0/15"),   // benchmarking
	netip.MustParsePrefix("198.51.100.0/24"), // documentation
	netip.MustParsePrefix("203.0.113.0/24"),  // documentation
	netip.MustParsePrefix("240.0.0.0/4"),     // reserved, and the broadcast address
	netip.MustParsePrefix("100::/64"),        // discard-only
	netip.MustParsePrefix("2001:db8::/32"),   // documentation
	netip.MustParsePrefix("fec0::/10"),       // site-local (deprecated)
	netip.MustParsePrefix("64:ff9b:1::/48"),  // local-use NAT64
}

var (
	nat64  = netip.MustParsePrefix("64:ff9b::/96") // well-known NAT64: the IPv4 address in the last 4 bytes
	sixTo4 = netip.MustParsePrefix("2002::/16")    // 6to4: the IPv4 address in bytes 2-5
)

// public reports whether a webhook may be delivered to a: a global unicast
// address in none of the ranges above. An IPv6 address that embeds an IPv4
// one (mapped, NAT64, 6to4) is judged by the IPv4 address it reaches.
func public(a netip.Addr) bool {
	a = a.Unmap()
	if b := a.As16(); nat64.Contains(a) {
		a = netip.AddrFrom4([4]byte(b[12:16]))
	} else if sixTo4.Contains(a) {
		a = netip.AddrFrom4([4]byte(b[2:6]))
	}
	if !a.IsGlobalUnicast() || a.IsPrivate() {
		return false
	}
	for _, p := range notGlobal {
		if p.Contains(a) {
			return false
		}
	}
	return true
}

// errNotPublic is the dialer's refusal of an address that is not public.
var errNotPublic = errors.New("webhook address is not public (set --webhook-allow-private for lab setups)")

// receiverError is what the deliveries log, which the webhook's token
// reads, says of a request that failed: not the address a name resolved to
// when it is not public (the private address of a name inside the
// gateway's network, say), nor the address of the gateway's resolver.
func receiverError(err error) string {
	var dnsErr *net.DNSError
	switch {
	case errors.Is(err, errNotPublic):
		return "the webhook's host resolved to an address that is not public (set --webhook-allow-private for lab setups)"
	case errors.As(err, &dnsErr):
		// Its Err can hold the socket's error, with the resolver's and
		// the gateway's own addresses in it.
		switch {
		case dnsErr.IsNotFound:
			return "lookup " + dnsErr.Name + ": no such host"
		case dnsErr.IsTimeout:
			return "lookup " + dnsErr.Name + ": timed out"
		}
		return "lookup " + dnsErr.Name + ": failed"
	}
	return err.Error()
}

// transport dials only public addresses unless allowPrivate.
func transport(allowPrivate bool) *http.Transport {
	d := &net.Dialer{Timeout: 5 * time.Second, Control: func(_, address string, _ syscall.RawConn) error {
		if allowPrivate {
			return nil
		}
		ap, err := netip.ParseAddrPort(address)
		if err != nil {
			return err
		}
		if !public(ap.Addr()) {
			return fmt.Errorf("%w: %s", errNotPublic, ap.Addr())
		}
		return nil
	}}
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.DialContext = d.DialContext
	t.Proxy = nil
	return t
}
