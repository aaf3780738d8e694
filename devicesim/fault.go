package devicesim

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"strconv"
	"time"

	"github.com/lockergate/lockergate/protocol"
)

// Faults are the failures a fleet injects. Every choice (which lockers,
// when in scenario time, which door, for how long) comes from per-locker
// random streams seeded from (Options.Seed, locker index, fault kind), one
// stream per kind, so a seed and a scenario replay the same faults and
// adding one kind of fault does not move the others.
type Faults struct {
	// Drops are random network losses of single lockers.
	Drops Drops `json:"drops,omitzero"`
	// Flapping is a share of lockers whose connection keeps coming and going.
	Flapping Flapping `json:"flapping,omitzero"`
	// Outages take a share of the fleet offline at planned times.
	Outages []Outage `json:"outages,omitempty"`
	// DoorJams make doors fail (health door_faults; unlocks answer door_jammed).
	DoorJams DoorJams `json:"door_jams,omitzero"`
	// Tamper raises tamper events.
	Tamper Tamper `json:"tamper,omitzero"`
	// PowerCuts put lockers on their battery (power events; health reports
	// the battery draining).
	PowerCuts PowerCuts `json:"power_cuts,omitzero"`
	// ClockSkew sets a share of lockers' clocks wrong (timestamps, command
	// expiry and credential not_after are judged by the skewed clock).
	ClockSkew ClockSkew `json:"clock_skew,omitzero"`
	// Firmware are failure modes of the firmware updater, which reads them.
	Firmware FirmwareFaults `json:"firmware,omitzero"`
	// GatewayRestarts are planned gateway restarts, carried out by
	// Options.GatewayRestart.
	GatewayRestarts []GatewayRestart `json:"gateway_restarts,omitempty"`
}

// Drops are random network losses: each locker loses its network PerHour
// times an hour on average (Poisson). The connection ends abruptly (the
// broker publishes the Last Will); the locker keeps retrying with its
// back-off and gets through once the network is back.
type Drops struct {
	PerHour float64 `json:"per_hour"`
	// Down is how long the network stays away; zero: the next retry works.
	Down Range `json:"down,omitzero"`
}

// Flapping lockers lose their network again and again: up for Up, down for Down.
type Flapping struct {
	Share float64 `json:"share"`
	Up    Range   `json:"up"`
	Down  Range   `json:"down"`
}

// Outage takes each locker offline with probability Share at scenario time
// At, for Down (zero: the connection drops and the locker reconnects at
// once, with back-off: a reconnect storm).
type Outage struct {
	At    Duration `json:"at"`
	Share float64  `json:"share"`
	Down  Range    `json:"down,omitzero"`
}

// DoorJams jam a random compartment's door PerHour times an hour per locker
// on average, until repaired after Repair (zero: it stays jammed).
type DoorJams struct {
	PerHour float64 `json:"per_hour"`
	Repair  Range   `json:"repair,omitzero"`
}

// Tamper raises tamper events, PerHour an hour per locker on average.
type Tamper struct {
	PerHour float64 `json:"per_hour"`
}

// PowerCuts cut a locker's mains PerHour times an hour per locker on
// average: it reports a power event (source battery), its health says
// battery with the charge falling, and after Restore (zero: never) mains
// is back (a power event, source mains).
type PowerCuts struct {
	PerHour float64 `json:"per_hour"`
	Restore Range   `json:"restore,omitzero"`
}

// ClockSkew puts the clocks of a share of lockers off by up to ±Max.
type ClockSkew struct {
	Share float64  `json:"share"`
	Max   Duration `json:"max"`
}

// FirmwareFaults are the failure modes of firmware jobs, as shares of jobs
// (0..1). The firmware updater (firmware.go) draws them; the core
// simulator only validates and carries them.
type FirmwareFaults struct {
	// DownloadFail: the download breaks off and does not resume before the deadline.
	DownloadFail float64 `json:"download_fail,omitempty"`
	// Corrupt: the downloaded image fails its sha256 check.
	Corrupt float64 `json:"corrupt,omitempty"`
	// BadSignature: the image fails its signature check.
	BadSignature float64 `json:"bad_signature,omitempty"`
	// InstallFail: writing the image fails.
	InstallFail float64 `json:"install_fail,omitempty"`
	// BootFail: the new version does not boot; the locker comes back on the old one.
	BootFail float64 `json:"boot_fail,omitempty"`
	// DownloadBytesPerSecond throttles downloads (0: as fast as the network goes).
	DownloadBytesPerSecond float64 `json:"download_bytes_per_s,omitempty"`
	// Interrupt: the download connection breaks once halfway; the locker resumes it with Range.
	Interrupt float64 `json:"interrupt,omitempty"`
	// Silent: the locker says nothing on fw/status after it got the job.
	Silent float64 `json:"silent,omitempty"`
}

// GatewayRestart is a planned gateway restart at scenario time At, down for Down.
type GatewayRestart struct {
	At   Duration `json:"at"`
	Down Duration `json:"down"`
}

func share(name string, p float64) error {
	if !(p >= 0 && p <= 1) {
		return fmt.Errorf("%s must be within 0..1", name)
	}
	return nil
}

func rate(name string, r float64) error {
	if !(r >= 0) || math.IsInf(r, 1) {
		return fmt.Errorf("%s must be a non-negative number", name)
	}
	return nil
}

func (b *Behavior) validate() []error {
	errs := []error{
		share("behavior.leave_item", b.LeaveItemProb),
		rate("behavior.orders_per_hour", b.OrdersPerHour),
		b.StaffDelay.validate("behavior.staff_delay"),
		b.DriverDelay.validate("behavior.driver_delay"),
		share("behavior.wrong_code_share", b.WrongCodeShare),
		share("behavior.no_show_share", b.NoShowShare),
	}
	return slices.DeleteFunc(errs, func(e error) bool { return e == nil })
}

func (fs *Faults) validate() []error {
	errs := []error{
		rate("faults.drops.per_hour", fs.Drops.PerHour),
		fs.Drops.Down.validate("faults.drops.down"),
		share("faults.flapping.share", fs.Flapping.Share),
		fs.Flapping.Up.validate("faults.flapping.up"),
		fs.Flapping.Down.validate("faults.flapping.down"),
		rate("faults.door_jams.per_hour", fs.DoorJams.PerHour),
		fs.DoorJams.Repair.validate("faults.door_jams.repair"),
		rate("faults.tamper.per_hour", fs.Tamper.PerHour),
		rate("faults.power_cuts.per_hour", fs.PowerCuts.PerHour),
		fs.PowerCuts.Restore.validate("faults.power_cuts.restore"),
		share("faults.clock_skew.share", fs.ClockSkew.Share),
		share("faults.firmware.download_fail", fs.Firmware.DownloadFail),
		share("faults.firmware.corrupt", fs.Firmware.Corrupt),
		share("faults.firmware.bad_signature", fs.Firmware.BadSignature),
		share("faults.firmware.install_fail", fs.Firmware.InstallFail),
		share("faults.firmware.boot_fail", fs.Firmware.BootFail),
		rate("faults.firmware.download_bytes_per_s", fs.Firmware.DownloadBytesPerSecond),
		share("faults.firmware.interrupt", fs.Firmware.Interrupt),
		share("faults.firmware.silent", fs.Firmware.Silent),
	}
	if fs.ClockSkew.Max < 0 {
		errs = append(errs, errors.New("faults.clock_skew.max must not be negative"))
	}
	if fs.Flapping.Share > 0 && fs.Flapping.Up.Max <= 0 {
		errs = append(errs, errors.New("faults.flapping.up must be positive"))
	}
	for i, o := range fs.Outages {
		errs = append(errs, share(fmt.Sprintf("faults.outages[%d].share", i), o.Share),
			o.Down.validate(fmt.Sprintf("faults.outages[%d].down", i)))
		if o.At < 0 {
			errs = append(errs, fmt.Errorf("faults.outages[%d].at must not be negative", i))
		}
	}
	for i, r := range fs.GatewayRestarts {
		if r.At < 0 || r.Down < 0 {
			errs = append(errs, fmt.Errorf("faults.gateway_restarts[%d]: at and down must not be negative", i))
		}
	}
	return slices.DeleteFunc(errs, func(e error) bool { return e == nil })
}

// Random streams of the scenario layer; ids 4..15 are free for other
// device features (the firmware updater).
const (
	streamClock uint64 = iota + 16
	streamDrop
	streamFlap
	streamOutage
	streamJam
	streamTamper
	streamRestart // fleet-wide: index -1
	streamOrders  // per site: index = site number
	streamPower   // after the others: adding it moved none of their draws
)

// lockerSim is a locker's scenario state: where it stands, its clock, the
// network losses in force and its fault schedules. Guarded by Locker.mu,
// except site, claim and skew, which are fixed before Start.
type lockerSim struct {
	site, claim string
	skew        time.Duration
	holds       int // network losses in force; > 0: no connection gets through
	// onBattery: mains cut (LosePower, PowerCuts) since batterySince.
	onBattery    bool
	batterySince time.Time
	powerCuts    int  // cuts so far: a scheduled restore ends only its own cut
	manualHold   bool // LoseNetwork is one of them
	streams      []*faultStream
	armed        bool          // Start armed the streams: a decision made before then plans no timer
	pending      []*time.Timer // hold releases and door repairs to come
	keypadN      int           // keypad decisions made
	// credsHeld (HoldCreds): credential sets that arrive are kept in
	// heldCreds (the newest), not applied nor acknowledged.
	credsHeld bool
	heldCreds []byte
}

// faultStream is one kind of fault of one locker: a random stream and the
// scenario time of its next event.
type faultStream struct {
	name    string
	r       *rand.Rand
	n       int           // decisions made
	next    time.Duration // scenario time of the next event; < 0: none
	timer   *time.Timer
	outages []plannedOutage // the outage stream's selected outages, in time order
}

type plannedOutage struct {
	at, down time.Duration
}

var tamperDetails = []string{"enclosure_opened", "shock", "keypad_cover_removed", "service_panel_forced"}

// expDraw is the wait until the next event of a Poisson process.
func expDraw(r *rand.Rand, perHour float64) time.Duration {
	return time.Duration(r.ExpFloat64() / perHour * float64(time.Hour))
}

// setupSim places the locker and draws its fixed scenario decisions; NewFleet
// calls it before anything runs.
func (l *Locker) setupSim(site Site) {
	o := &l.f.opts
	fs := &o.Faults
	l.x.site, l.x.claim = site.ID, site.ClaimToken

	clock := newRand(o.Seed, l.index, streamClock)
	if u, v := clock.Float64(), clock.Float64(); u < fs.ClockSkew.Share {
		l.x.skew = time.Duration((2*v - 1) * float64(fs.ClockSkew.Max)).Truncate(time.Millisecond)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.decideLocked(streamSetup, 0, 0, DecideSetup, Decision{Value: site.ID + "/" + l.model.Name, Duration: Duration(l.x.skew)})

	if fs.Drops.PerHour > 0 {
		r := newRand(o.Seed, l.index, streamDrop)
		l.x.streams = append(l.x.streams, &faultStream{name: "drop", r: r, next: expDraw(r, fs.Drops.PerHour)})
	}
	if fs.Flapping.Share > 0 {
		r := newRand(o.Seed, l.index, streamFlap)
		if r.Float64() < fs.Flapping.Share {
			l.decideLocked(streamSetup, 1, 0, DecideFlapping, Decision{})
			l.x.streams = append(l.x.streams, &faultStream{name: "flap", r: r, next: fs.Flapping.Up.draw(r)})
		}
	}
	if len(fs.Outages) > 0 {
		r := newRand(o.Seed, l.index, streamOutage)
		outs := slices.Clone(fs.Outages)
		slices.SortStableFunc(outs, func(a, b Outage) int { return cmp.Compare(a.At, b.At) })
		s := &faultStream{name: "outage", r: r, next: -1}
		for _, out := range outs {
			hit := r.Float64() < out.Share
			down := out.Down.draw(r)
			if hit {
				s.outages = append(s.outages, plannedOutage{at: out.At.D(), down: down})
			}
		}
		if len(s.outages) > 0 {
			s.next = s.outages[0].at
			l.x.streams = append(l.x.streams, s)
		}
	}
	if fs.DoorJams.PerHour > 0 && len(l.comps) > 0 {
		r := newRand(o.Seed, l.index, streamJam)
		l.x.streams = append(l.x.streams, &faultStream{name: "jam", r: r, next: expDraw(r, fs.DoorJams.PerHour)})
	}
	if fs.Tamper.PerHour > 0 {
		r := newRand(o.Seed, l.index, streamTamper)
		l.x.streams = append(l.x.streams, &faultStream{name: "tamper", r: r, next: expDraw(r, fs.Tamper.PerHour)})
	}
	if fs.PowerCuts.PerHour > 0 {
		r := newRand(o.Seed, l.index, streamPower)
		l.x.streams = append(l.x.streams, &faultStream{name: "power", r: r, next: expDraw(r, fs.PowerCuts.PerHour)})
	}
}

// armFaults starts the fault schedules; Start calls it.
func (l *Locker) armFaults() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.x.armed = true
	for _, s := range l.x.streams {
		l.armLocked(s)
	}
}

func (l *Locker) armLocked(s *faultStream) {
	if s.next < 0 || l.stopped || !l.x.armed {
		return
	}
	d := time.Until(l.f.realTime(s.next))
	if s.timer == nil {
		s.timer = time.AfterFunc(d, func() { l.fire(s) })
		return
	}
	s.timer.Reset(d)
}

// fire makes the due decision of stream s, plans its next one, and then
// carries out the decision.
func (l *Locker) fire(s *faultStream) {
	fs := &l.f.opts.Faults
	l.mu.Lock()
	if l.stopped || s.next < 0 {
		l.mu.Unlock()
		return
	}
	at := s.next
	var effect func()
	switch s.name {
	case "drop":
		down := fs.Drops.Down.draw(s.r)
		l.decideLocked(s.name, s.n, at, DecideDrop, Decision{Duration: Duration(down)})
		effect = l.loseNetworkLocked(down, false)
		s.next = at + expDraw(s.r, fs.Drops.PerHour)
	case "flap":
		down := fs.Flapping.Down.draw(s.r)
		up := fs.Flapping.Up.draw(s.r)
		l.decideLocked(s.name, s.n, at, DecideFlap, Decision{Duration: Duration(down)})
		effect = l.loseNetworkLocked(down, false)
		s.next = at + down + max(up, time.Millisecond)
	case "outage":
		out := s.outages[s.n]
		l.decideLocked(s.name, s.n, at, DecideOutage, Decision{Duration: Duration(out.down)})
		effect = l.loseNetworkLocked(out.down, false)
		s.next = -1
		if s.n+1 < len(s.outages) {
			s.next = s.outages[s.n+1].at
		}
	case "jam":
		n := 1 + s.r.IntN(len(l.comps))
		repair := fs.DoorJams.Repair.draw(s.r)
		l.decideLocked(s.name, s.n, at, DecideDoorJam, Decision{Compartment: n, Duration: Duration(repair)})
		c := l.comps[n-1]
		started := !c.fault // a jam of a faulty door changes nothing, and repairs nothing
		if started {
			l.f.c.doorJams.Add(1)
		}
		c.setFault(true)
		if gen := c.faultGen; started && repair > 0 {
			l.afterLocked(repair, func() { l.repairDoor(n, gen) })
		}
		s.next = at + expDraw(s.r, fs.DoorJams.PerHour)
	case "tamper":
		detail := tamperDetails[s.r.IntN(len(tamperDetails))]
		l.decideLocked(s.name, s.n, at, DecideTamper, Decision{Value: detail})
		l.f.c.tampers.Add(1)
		l.emitLocked(protocol.Event{Type: protocol.EventTamper, Detail: detail})
		s.next = at + expDraw(s.r, fs.Tamper.PerHour)
	case "power":
		restore := fs.PowerCuts.Restore.draw(s.r)
		// Logged even when the locker is on its battery already (the cut
		// then changes nothing): the log is the seed's draws, and whether an
		// earlier restore came first is a matter of timers, not of the seed.
		l.decideLocked(s.name, s.n, at, DecidePowerCut, Decision{Duration: Duration(restore)})
		if l.setPowerLocked(true) && restore > 0 {
			cut := l.x.powerCuts
			l.afterLocked(restore, func() { l.restorePower(cut) })
		}
		s.next = at + expDraw(s.r, fs.PowerCuts.PerHour)
	}
	s.n++
	l.armLocked(s)
	l.mu.Unlock()
	if effect != nil {
		effect()
	}
}

// afterLocked runs f after scenario time d, unless the fleet closes first.
func (l *Locker) afterLocked(d time.Duration, f func()) {
	var t *time.Timer
	t = time.AfterFunc(l.f.scaled(d), func() {
		l.mu.Lock()
		l.x.pending = slices.DeleteFunc(l.x.pending, func(p *time.Timer) bool { return p == t })
		stopped := l.stopped
		l.mu.Unlock()
		if !stopped {
			f()
		}
	})
	l.x.pending = append(l.x.pending, t)
}

// loseNetworkLocked ends the connection abruptly, as a network loss does:
// no DISCONNECT, so the broker publishes the Last Will. For down > 0 (or
// manual) the network stays away that long: the locker keeps retrying
// with its back-off and nothing gets through. It returns the part to run
// after unlocking.
func (l *Locker) loseNetworkLocked(down time.Duration, manual bool) func() {
	l.f.c.networkLosses.Add(1)
	s := l.sess
	l.dropSessionLocked(s, false)
	var cancel context.CancelFunc
	if down > 0 || manual {
		l.x.holds++
		cancel = l.cancelAttempt // an attempt under way fails
		if manual {
			l.x.manualHold = true
		} else {
			l.afterLocked(down, l.releaseHold)
		}
		l.notifyLocked()
	}
	return func() {
		if cancel != nil {
			cancel()
		}
		if s != nil {
			s.abort()
		}
	}
}

func (l *Locker) releaseHold() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.x.holds > 0 {
		l.x.holds--
	}
	l.notifyLocked()
	// No wake-up: the locker notices at its next retry, like a real one.
}

// networkDown reports whether a network loss is in force.
func (l *Locker) networkDown() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.x.holds > 0
}

// LoseNetwork cuts the locker's network until RestoreNetwork: the
// connection ends abruptly (Last Will), and the locker keeps retrying with
// its jittered back-off, failing, as a real one would. Unlike Disconnect,
// getting back needs no call that reconnects at once: after
// RestoreNetwork the next retry gets through.
func (l *Locker) LoseNetwork() {
	l.mu.Lock()
	if l.x.manualHold || l.stopped {
		l.mu.Unlock()
		return
	}
	effect := l.loseNetworkLocked(0, true)
	l.mu.Unlock()
	effect()
}

// RestoreNetwork ends a LoseNetwork (faults in force stay).
func (l *Locker) RestoreNetwork() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.x.manualHold {
		return
	}
	l.x.manualHold = false
	if l.x.holds > 0 {
		l.x.holds--
	}
	l.notifyLocked()
}

// LoseNetwork cuts every locker's network at once (Locker.LoseNetwork).
func (f *Fleet) LoseNetwork() {
	for _, l := range f.lockers {
		l.LoseNetwork()
	}
}

// RestoreNetwork gives every locker its network back (Locker.RestoreNetwork).
func (f *Fleet) RestoreNetwork() {
	for _, l := range f.lockers {
		l.RestoreNetwork()
	}
}

// HoldCreds makes the locker slow to apply its credential sets, as one
// whose set's delivery was delayed: until ReleaseCreds, a set that arrives
// is neither applied nor acknowledged, and the locker goes on validating
// codes by the set it holds.
func (l *Locker) HoldCreds() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.x.credsHeld = true
}

// ReleaseCreds ends HoldCreds: the newest set that arrived meanwhile, if
// any, is applied and acknowledged.
func (l *Locker) ReleaseCreds() {
	l.mu.Lock()
	held := l.x.heldCreds
	l.x.credsHeld, l.x.heldCreds = false, nil
	l.mu.Unlock()
	if held != nil {
		l.handleCreds(held)
	}
}

// Tamper raises a tamper event with detail, as the enclosure sensor would.
func (l *Locker) Tamper(detail string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.f.c.tampers.Add(1)
	l.emitLocked(protocol.Event{Type: protocol.EventTamper, Detail: detail})
}

// LosePower cuts the locker's mains: it runs on its battery, reports a
// power event (source battery) and health with the battery draining, until
// RestorePower. A locker on its battery already is left alone.
func (l *Locker) LosePower() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.setPowerLocked(true)
}

// RestorePower brings the mains back (a power event, source mains).
func (l *Locker) RestorePower() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.setPowerLocked(false)
}

// repairDoor ends compartment n's door fault number gen (DoorJams'
// repair), unless it ended meanwhile and a later one is in force.
func (l *Locker) repairDoor(n int, gen uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if c := l.compLocked(n); c != nil && c.faultGen == gen {
		c.setFault(false)
	}
}

// restorePower ends power cut number cut (PowerCuts' restore), unless the
// mains came back meanwhile and a later cut is in force: that one is not
// this restore's to end.
func (l *Locker) restorePower(cut int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.x.powerCuts == cut {
		l.setPowerLocked(false)
	}
}

// OnBattery reports whether the locker runs on its battery.
func (l *Locker) OnBattery() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.x.onBattery
}

// setPowerLocked switches the locker to its battery (or back to mains) and
// reports the change; false when it was so already.
func (l *Locker) setPowerLocked(battery bool) bool {
	if l.x.onBattery == battery || l.stopped {
		return false
	}
	l.x.onBattery = battery
	src := protocol.PowerMains
	if battery {
		l.x.powerCuts++
		l.f.c.powerCuts.Add(1)
		l.x.batterySince = l.f.now()
		src = protocol.PowerBattery
	}
	l.emitLocked(protocol.Event{Type: protocol.EventPower, Source: src})
	return true
}

// batteryLocked is the battery's charge: full on mains, and on the battery
// down 1 % every batteryDrain of scenario time, to 5 % at the least.
func (l *Locker) batteryLocked() int {
	if !l.x.onBattery {
		return 100
	}
	return max(5, 100-int(l.f.now().Sub(l.x.batterySince)/batteryDrain))
}

// batteryDrain is how long the battery takes to lose 1 % (a locker lasts
// about 8 hours on it).
const batteryDrain = 5 * time.Minute

// ClockSkew is how far the locker's clock is off (positive: ahead).
func (l *Locker) ClockSkew() time.Duration { return l.x.skew }

// now is the locker's clock, skew included.
func (l *Locker) now() time.Time { return l.f.now().Add(l.x.skew) }

// stopSim stops the locker's fault timers; Close calls it.
func (l *Locker) stopSim() {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, s := range l.x.streams {
		if s.timer != nil {
			s.timer.Stop()
		}
	}
	for _, t := range l.x.pending {
		t.Stop()
	}
	l.x.pending = nil
}

// scaled converts scenario time to wall-clock time.
func (f *Fleet) scaled(d time.Duration) time.Duration {
	return time.Duration(float64(d) / f.opts.TimeScale)
}

// realTime is the wall-clock time of scenario time at.
func (f *Fleet) realTime(at time.Duration) time.Time { return f.epoch.Add(f.scaled(at)) }

// ScenarioTime is the scenario time now: wall-clock time since Start times
// TimeScale (0 before Start).
func (f *Fleet) ScenarioTime() time.Duration {
	f.mu.Lock()
	epoch := f.epoch
	f.mu.Unlock()
	if epoch.IsZero() {
		return 0
	}
	return time.Duration(float64(time.Since(epoch)) * f.opts.TimeScale)
}

// PlannedThrough returns the scenario time up to which every planned
// decision has been made: all decisions with At < PlannedThrough are in the
// decision log. Tests wait on it rather than on the clock.
func (f *Fleet) PlannedThrough() time.Duration {
	low := time.Duration(math.MaxInt64)
	for _, l := range f.lockers {
		l.mu.Lock()
		for _, s := range l.x.streams {
			if s.next >= 0 {
				low = min(low, s.next)
			}
		}
		l.mu.Unlock()
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.restartNext < len(f.restarts) {
		low = min(low, f.restarts[f.restartNext].At.D())
	}
	return low
}

// armRestartsLocked plans the gateway restarts; Start calls it with f.mu held.
func (f *Fleet) armRestartsLocked(ctx context.Context) {
	f.restarts = slices.Clone(f.opts.Faults.GatewayRestarts)
	slices.SortStableFunc(f.restarts, func(a, b GatewayRestart) int { return cmp.Compare(a.At, b.At) })
	if len(f.restarts) == 0 {
		return
	}
	f.restartTimer = time.AfterFunc(time.Until(f.realTime(f.restarts[0].At.D())), func() { f.restartGateway(ctx) })
}

// restartGateway carries out the due restart through Options.GatewayRestart
// and plans the next; restarts never overlap.
func (f *Fleet) restartGateway(ctx context.Context) {
	f.mu.Lock()
	if f.closed || f.restartNext >= len(f.restarts) {
		f.mu.Unlock()
		return
	}
	i := f.restartNext
	r := f.restarts[i]
	// Logged before PlannedThrough can move past it (as a locker's
	// decisions are, under its lock).
	if fn := f.opts.OnDecision; fn != nil {
		fn(Decision{Locker: -1, Stream: streamNameRestart, N: i, At: r.At, Kind: DecideRestart, Duration: r.Down})
	}
	f.restartNext++
	f.hooks.Add(1)
	f.mu.Unlock()
	defer f.hooks.Done()

	switch hook := f.opts.GatewayRestart; {
	case hook == nil:
		f.c.restartsSkipped.Add(1)
		f.log.Warn("gateway restart planned but no restart hook: skipped", "at", r.At, "down", r.Down)
	default:
		f.log.Info("restarting the gateway", "at", r.At, "down", r.Down)
		if err := hook(ctx, f.scaled(r.Down.D())); err != nil && ctx.Err() == nil {
			f.c.restartErrors.Add(1)
			f.log.Error("gateway restart failed", "err", err)
		} else {
			f.c.gatewayRestarts.Add(1)
		}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed || f.restartNext >= len(f.restarts) {
		return
	}
	f.restartTimer = time.AfterFunc(time.Until(f.realTime(f.restarts[f.restartNext].At.D())), func() { f.restartGateway(ctx) })
}

// keypadDecisionLocked reports one keypad decision (leave an item or not).
func (l *Locker) keypadDecisionLocked(compartment int, leave bool) {
	l.decideLocked(streamNameKeypad, l.x.keypadN, 0, DecideLeaveItem, Decision{Compartment: compartment, Value: strconv.FormatBool(leave)})
	l.x.keypadN++
}
