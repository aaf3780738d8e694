// Package orders plays the people around the lockers: store staff who stage
// orders through the API (the simulated lockers close loaded compartments
// themselves) and delivery drivers who arrive after a delay and type the
// code, sometimes a wrong one first, or never come. It drives the same API
// and lockers a real deployment has, so it doubles as the pickup workload of
// benchmarks.
package orders

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/lockergate/lockergate/client"
	"github.com/lockergate/lockergate/devicesim"
	"github.com/lockergate/lockergate/pickup"
)

// Options configure a workload.
type Options struct {
	// API creates pickups and reads their codes; an admin token (or a
	// platform token of Platform, for one site's store token see Sites).
	API *client.Client
	// Fleet holds the simulated lockers the orders land in.
	Fleet *devicesim.Fleet
	// Sites to place orders at (round robin).
	Sites []string
	// Platform is the delivery platform of driver pickups.
	Platform string
	// RefPrefix starts every order reference (then -000000, -000001, ...).
	// Default SIM-<Seed>: runs with one seed use the same references, and
	// a site refuses one while a pickup under it is live (409).
	RefPrefix string
	// Orders is how many orders to place in all (0: until ctx ends).
	Orders int
	// Rate is orders per second across all sites.
	Rate float64
	// DriverDelay is the range of driver arrival after ready.
	DriverDelay [2]time.Duration
	// WrongCode and NoShow are probabilities per order.
	WrongCode, NoShow float64
	// ExpiresIn is the pickups' lifetime. Default 1h.
	ExpiresIn time.Duration
	// BusyWait is how long a create answered 429 waits before it is sent
	// again. Default 1s (the gateway's Retry-After).
	BusyWait time.Duration
	// Concurrency bounds orders in flight. Default 256.
	Concurrency int
	Seed        int64
	Logger      *slog.Logger
}

// Stats count what happened.
type Stats struct {
	Created, NoCompartment, Ready, PickedUp, NoShows, WrongCodes, Failed int64
	// ReadyLatency and PickupLatency sum the API-observed durations
	// (create → ready, code → picked up) for means.
	ReadyLatency, PickupLatency time.Duration
}

type counters struct {
	created, noComp, ready, picked, noShow, wrong, failed atomic.Int64
	readyNS, pickNS                                       atomic.Int64
}

// DefaultDriverDelay is when drivers come, after their order is ready, in
// the demo and in a scenario that does not say.
var DefaultDriverDelay = [2]time.Duration{20 * time.Second, 3 * time.Minute}

// Run places orders until Orders are done or ctx ends and returns the counts.
func Run(ctx context.Context, o Options) (Stats, error) {
	if o.API == nil || o.Fleet == nil || len(o.Sites) == 0 || o.Rate <= 0 {
		return Stats{}, errors.New("orders: API, Fleet, Sites and Rate are required")
	}
	if o.ExpiresIn <= 0 {
		o.ExpiresIn = time.Hour
	}
	if o.BusyWait <= 0 {
		o.BusyWait = time.Second
	}
	if o.Concurrency <= 0 {
		o.Concurrency = 256
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.RefPrefix == "" {
		o.RefPrefix = fmt.Sprintf("SIM-%d", o.Seed)
	}
	rng := rand.New(rand.NewPCG(uint64(o.Seed), 0x6f72646572))
	var c counters
	var wg sync.WaitGroup
	sem := make(chan struct{}, o.Concurrency)
	interval := time.Duration(float64(time.Second) / o.Rate)
	next := time.Now()
	for i := 0; o.Orders == 0 || i < o.Orders; i++ {
		if d := time.Until(next); d > 0 {
			select {
			case <-ctx.Done():
				wg.Wait()
				return c.stats(), nil
			case <-time.After(d):
			}
		}
		next = next.Add(interval)
		select {
		case <-ctx.Done():
			wg.Wait()
			return c.stats(), nil
		case sem <- struct{}{}:
		}
		// Every decision is drawn here, in order, so a seed gives the same
		// sequence of orders whatever the timing.
		ord := order{
			ref:    fmt.Sprintf("%s-%06d", o.RefPrefix, i),
			site:   o.Sites[i%len(o.Sites)],
			delay:  o.DriverDelay[0] + time.Duration(rng.Float64()*float64(o.DriverDelay[1]-o.DriverDelay[0])),
			wrong:  rng.Float64() < o.WrongCode,
			noShow: rng.Float64() < o.NoShow,
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			o.play(ctx, ord, &c)
		}()
	}
	wg.Wait()
	return c.stats(), nil
}

type order struct {
	ref, site     string
	delay         time.Duration
	wrong, noShow bool
}

// create makes ord's pickup. A 429 (the platform's token has as many
// requests in flight as the gateway allows) was not acted on: it is sent
// again BusyWait later, while ctx lasts.
func (o *Options) create(ctx context.Context, ord order, p *pickup.Pickup) (int, error) {
	for {
		status, err := o.API.Do(ctx, client.Request{Method: "POST", Path: "/v1/pickups", Body: map[string]any{
			"site": ord.site, "order_ref": ord.ref, "size": "S", "zone": "ambient",
			"recipient": map[string]string{"kind": "driver", "platform": o.Platform}, "expires_at": time.Now().Add(o.ExpiresIn),
		}}, p)
		if status != http.StatusTooManyRequests {
			return status, err
		}
		select {
		case <-ctx.Done():
			return status, err
		case <-time.After(o.BusyWait):
		}
	}
}

func (o *Options) play(ctx context.Context, ord order, c *counters) {
	start := time.Now()
	var p pickup.Pickup
	status, err := o.create(ctx, ord, &p)
	switch {
	case status == 422:
		c.noComp.Add(1)
		return
	case err != nil:
		c.fail(ctx)
		o.warn(ctx, "create pickup", "order", ord.ref, "err", err)
		return
	}
	c.created.Add(1)
	ready, err := o.await(ctx, p.ID, pickup.Ready)
	if err != nil {
		c.fail(ctx)
		o.warn(ctx, "pickup not ready", "order", ord.ref, "pickup", p.ID, "err", err)
		return
	}
	c.ready.Add(1)
	c.readyNS.Add(int64(time.Since(start)))
	if ord.noShow {
		c.noShow.Add(1)
		return
	}
	select {
	case <-ctx.Done():
		return
	case <-time.After(ord.delay):
	}
	// The driver's app shows the code as it is now: a rotation
	// (rotate-codes) while the driver was on the way replaced it.
	if now, err := o.await(ctx, p.ID, pickup.Ready); err == nil {
		ready = now
	}
	l := o.Fleet.Locker(p.Locker)
	if l == nil || ready.Credential == nil {
		c.fail(ctx)
		o.warn(ctx, "pickup's locker not simulated here, or no code to read", "order", ord.ref, "pickup", p.ID, "locker", p.Locker)
		return
	}
	// A driver types the code once the locker holds it (the set is pushed
	// within a second of the change).
	if err := awaitCreds(ctx, l, ready.Credential.ID); err != nil {
		c.fail(ctx)
		o.warn(ctx, "locker never got the credential", "order", ord.ref, "locker", p.Locker, "err", err)
		return
	}
	if ord.wrong {
		c.wrong.Add(1)
		l.EnterCode("99999999")
	}
	typed := time.Now()
	if res := l.EnterCode(ready.Credential.Code); !res.Accepted {
		c.fail(ctx)
		o.warn(ctx, "code not accepted", "order", ord.ref, "reason", res.Reason)
		return
	}
	if _, err := o.await(ctx, p.ID, pickup.PickedUp); err != nil {
		c.fail(ctx)
		o.warn(ctx, "pickup not picked up after its code", "order", ord.ref, "pickup", p.ID, "err", err)
		return
	}
	c.picked.Add(1)
	c.pickNS.Add(int64(time.Since(typed)))
}

// awaitCreds waits until simulated locker l holds credential id, up to 30 s.
func awaitCreds(ctx context.Context, l *devicesim.Locker, id string) error {
	deadline := time.Now().Add(30 * time.Second)
	for !l.HasCredential(id) {
		if time.Now().After(deadline) {
			return fmt.Errorf("credential %s not in the locker's set (version %d) after 30 s", id, l.CredsVersion())
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
	return nil
}

// await polls a pickup until it reaches state (a simulated person checking
// an app), up to a minute. A read that fails (the gateway restarting) is
// tried again until then, as an app would: it is no answer about the
// pickup.
func (o *Options) await(ctx context.Context, id, state string) (*pickup.Pickup, error) {
	deadline := time.Now().Add(time.Minute)
	var last error
	for time.Now().Before(deadline) {
		var p pickup.Pickup
		err := o.API.Get(ctx, "/v1/pickups/"+id, nil, &p)
		switch {
		case err != nil:
			last = err
		case p.State == state:
			return &p, nil
		case !pickup.Live(p.State):
			return nil, fmt.Errorf("pickup %s ended %s", id, p.State)
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
	if last != nil {
		return nil, fmt.Errorf("pickup %s not %s within a minute (last read failed: %w)", id, state, last)
	}
	return nil, fmt.Errorf("pickup %s not %s within a minute", id, state)
}

// warn logs a failed order's cause, unless the workload is stopping.
func (o *Options) warn(ctx context.Context, msg string, args ...any) {
	if ctx.Err() == nil {
		o.Logger.Warn(msg, args...)
	}
}

// fail counts an order that failed, unless the workload is stopping (ctx
// ended): an order cut short is not a failure.
func (c *counters) fail(ctx context.Context) {
	if ctx.Err() == nil {
		c.failed.Add(1)
	}
}

func (c *counters) stats() Stats {
	return Stats{
		Created: c.created.Load(), NoCompartment: c.noComp.Load(), Ready: c.ready.Load(), PickedUp: c.picked.Load(),
		NoShows: c.noShow.Load(), WrongCodes: c.wrong.Load(), Failed: c.failed.Load(),
		ReadyLatency: time.Duration(c.readyNS.Load()), PickupLatency: time.Duration(c.pickNS.Load()),
	}
}
