package devicesim

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"time"
)

// Order is one planned order at a site, for the pickup flow: when it comes
// in and how the people handling it behave. The simulator plans orders
// from the seed; the pickup flow (an API client: create the order, stage
// it, hand the code to the driver) acts them out with Locker.EnterCode and
// the staging unlock the gateway sends.
type Order struct {
	Site string `json:"site"`
	// N numbers the site's orders from 0.
	N int `json:"n"`
	// At is the scenario time the order comes in.
	At Duration `json:"at"`
	// StaffDelay is how long staff take from the staging unlock to closing
	// the loaded compartment.
	StaffDelay Duration `json:"staff_delay"`
	// DriverDelay is how long after staging the driver is at the locker.
	DriverDelay Duration `json:"driver_delay"`
	// WrongCodes is how many wrong codes the driver types before the right one.
	WrongCodes int `json:"wrong_codes"`
	// NoShow: nobody comes to collect.
	NoShow bool `json:"no_show"`
}

// OrderPlanner plans a site's orders: Poisson arrivals at
// Behavior.OrdersPerHour and people's behaviour from the Behavior rates,
// all from the seed and the site, so a rerun plans the same orders. It is
// not safe for concurrent use; take one per site.
type OrderPlanner struct {
	f    *Fleet
	site string
	r    *rand.Rand
	n    int
	at   time.Duration
}

// Orders returns the order planner of site ("" for a fleet without sites).
func (f *Fleet) Orders(site string) (*OrderPlanner, error) {
	k := slices.IndexFunc(f.place.sites, func(s Site) bool { return s.ID == site })
	if k < 0 {
		return nil, fmt.Errorf("devicesim: no site %q", site)
	}
	return &OrderPlanner{f: f, site: site, r: newRand(f.opts.Seed, k, streamOrders)}, nil
}

// Next plans the site's next order; ok is false when the site gets no
// orders (OrdersPerHour 0). Every order takes the same count of random
// draws, so changing one rate does not move the others.
func (p *OrderPlanner) Next() (o Order, ok bool) {
	b := &p.f.opts.Behavior
	if b.OrdersPerHour <= 0 {
		return Order{}, false
	}
	p.at += expDraw(p.r, b.OrdersPerHour)
	staff := b.StaffDelay.draw(p.r)
	driver := b.DriverDelay.draw(p.r)
	wrong := p.r.Float64() < b.WrongCodeShare
	tries := 1 + p.r.IntN(3)
	noShow := p.r.Float64() < b.NoShowShare
	o = Order{Site: p.site, N: p.n, At: Duration(p.at), StaffDelay: Duration(staff), DriverDelay: Duration(driver), NoShow: noShow}
	if wrong {
		o.WrongCodes = tries
	}
	if fn := p.f.opts.OnDecision; fn != nil {
		fn(Decision{Locker: -1, Stream: "order/" + p.site, N: p.n, At: o.At, Kind: DecideOrder,
			Duration: o.DriverDelay, Value: fmt.Sprintf("wrong=%d no_show=%v staff=%v", o.WrongCodes, o.NoShow, o.StaffDelay)})
	}
	p.n++
	return o, true
}

// Sites returns the fleet's sites (one with an empty id when Options.Sites
// was empty).
func (f *Fleet) Sites() []Site { return slices.Clone(f.place.sites) }

// LockersAt returns the lockers of site, in index order.
func (f *Fleet) LockersAt(site string) []*Locker {
	var out []*Locker
	for _, l := range f.lockers {
		if l.x.site == site {
			out = append(out, l)
		}
	}
	return out
}
