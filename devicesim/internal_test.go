package devicesim

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/lockergate/lockergate/protocol"
)

func offlineFleet(t *testing.T, seed int64, mutate func(*Options)) *Fleet {
	t.Helper()
	opts := Options{Broker: "tcp://127.0.0.1:1883", ClaimToken: "x", Lockers: 3, Seed: seed, DoorCloseDelay: -1}
	if mutate != nil {
		mutate(&opts)
	}
	f, err := NewFleet(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(f.Close)
	return f
}

// trace drives every locker of f offline through the same inputs and records
// every decision and sensor reading.
func trace(t *testing.T, f *Fleet) []string {
	t.Helper()
	var out []string
	for _, l := range f.lockers {
		key := []byte("key-" + l.serial)
		l.ident, l.hasIdent = Identity{DeviceID: "lk-" + l.serial, CredKey: key}, true
		set := protocol.CredSet{Version: 1}
		for _, c := range l.comps {
			c.occupied = true
			n := c.spec.N
			set.Creds = append(set.Creds, protocol.Credential{ID: fmt.Sprintf("k-%d", n), Kind: protocol.KindPIN,
				MAC: protocol.CredMAC(key, fmt.Sprintf("%06d", n)), Compartments: []int{n}, NotAfter: protocol.T(time.Now().Add(time.Hour))})
		}
		l.handleCreds(protocol.Encode(set))
		out = append(out, l.serial+" "+l.model.Name)
		for _, c := range l.comps {
			n := c.spec.N
			if res := l.EnterCode(fmt.Sprintf("%06d", n)); !res.Accepted {
				t.Fatalf("%s: code for %d: %+v", l.serial, n, res)
			}
			l.CloseDoor(n)
			out = append(out, fmt.Sprintf("%d:%v", n, l.Compartment(n).Occupied))
		}
		l.mu.Lock()
		for range 3 {
			h := l.healthLocked()
			out = append(out, fmt.Sprintf("t=%.1f rssi=%d", *h.TempC, *h.RSSIdBm))
		}
		l.mu.Unlock()
	}
	return out
}

func TestSameSeedSameDecisions(t *testing.T) {
	leaveHalf := func(o *Options) { o.Behavior.LeaveItemProb = 0.5 }
	a := trace(t, offlineFleet(t, 1, leaveHalf))
	b := trace(t, offlineFleet(t, 1, leaveHalf))
	c := trace(t, offlineFleet(t, 2, leaveHalf))
	if !slices.Equal(a, b) {
		t.Errorf("same seed, different decisions:\n%v\n%v", a, b)
	}
	if slices.Equal(a, c) {
		t.Error("another seed made the same decisions")
	}
	left := 0
	for _, s := range a {
		if strings.HasSuffix(s, ":true") {
			left++
		}
	}
	if left == 0 || left == len(a) {
		t.Errorf("with probability 0.5 drivers left %d items; want some, not all", left)
	}
}

func TestLeaveItemProbability(t *testing.T) {
	for _, tc := range []struct {
		name string
		p    float64
		want bool
	}{{"TakesAll", 0, false}, {"LeavesAll", 1, true}} {
		t.Run(tc.name, func(t *testing.T) {
			for _, s := range trace(t, offlineFleet(t, 3, func(o *Options) { o.Behavior.LeaveItemProb = tc.p })) {
				if strings.HasSuffix(s, fmt.Sprintf(":%v", !tc.want)) {
					t.Fatalf("compartment %s with probability %v", s, tc.p)
				}
			}
		})
	}
}

func TestOfflineEventsQueueBounded(t *testing.T) {
	f := offlineFleet(t, 1, func(o *Options) { o.OfflineQueue = 4; o.Lockers = 1 })
	l := f.lockers[0]
	l.ident, l.hasIdent = Identity{DeviceID: "lk-1", CredKey: []byte("k")}, true
	for range 6 {
		l.EnterCode("nope")
	}
	l.mu.Lock()
	queued := len(l.offline)
	l.mu.Unlock()
	if queued != 4 || f.Stats().Dropped != 2 {
		t.Errorf("queued %d, dropped %d; want 4 and 2", queued, f.Stats().Dropped)
	}
}

func TestBackoffFullJitter(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	base, ceil := 100*time.Millisecond, 5*time.Second
	for attempt := range 70 {
		limit := ceil
		if attempt < 6 {
			limit = base << attempt
		}
		seen := map[time.Duration]bool{}
		for range 50 {
			d := backoff(r, attempt, base, ceil)
			if d < 0 || d >= limit {
				t.Fatalf("attempt %d: %v outside [0, %v)", attempt, d, limit)
			}
			seen[d] = true
		}
		if len(seen) < 40 {
			t.Fatalf("attempt %d: only %d distinct delays in 50: no jitter", attempt, len(seen))
		}
	}
}

func TestLimiter(t *testing.T) {
	if newLimiter(-1) != nil || newLimiter(0) != nil {
		t.Error("non-positive rate should not limit")
	}
	l := newLimiter(100) // one slot per 10 ms
	start := time.Now()
	for range 4 {
		if err := l.wait(t.Context()); err != nil {
			t.Fatal(err)
		}
	}
	// Timers never fire early: the 4th slot is at least 30 ms after the 1st.
	if el := time.Since(start); el < 30*time.Millisecond {
		t.Errorf("4 slots at 100/s took %v", el)
	}
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if err := l.wait(ctx); !errors.Is(err, context.Canceled) {
		t.Errorf("wait with cancelled ctx = %v", err)
	}
}

func TestStartErrorGroupsReasons(t *testing.T) {
	taken := &ProvisionError{Code: protocol.ProvSerialTaken}
	dial := errors.New("dial tcp: connection refused")
	e := &StartError{Total: 10, Failed: map[string]error{
		"SIM-000004": taken, "SIM-000001": taken, "SIM-000003": taken, "SIM-000009": taken, "SIM-000002": dial,
	}}
	want := "devicesim: 5 of 10 lockers not connected; 4× provisioning refused: serial_taken (SIM-000001, SIM-000003, SIM-000004, ...); 1× dial tcp: connection refused (SIM-000002)"
	if got := e.Error(); got != want {
		t.Errorf("got  %s\nwant %s", got, want)
	}
	if !errors.Is(e, ErrProvisionRefused) || !errors.Is(e, dial) || errors.Is(e, ErrConnRefused) {
		t.Error("errors.Is does not see the grouped reasons")
	}
}

func TestDefaultModels(t *testing.T) {
	for _, m := range DefaultModels {
		if err := m.Validate(); err != nil {
			t.Error(err)
		}
	}
	sizes, zones := map[string]bool{}, map[string]bool{}
	for _, c := range DefaultModels[0].Compartments {
		sizes[c.Size], zones[c.Zone] = true, true
	}
	if DefaultModels[0].Name != "LX-24" || len(DefaultModels[0].Compartments) != 24 || len(sizes) != 4 || !zones["ambient"] || !zones["chilled"] {
		t.Errorf("LX-24: %d compartments, sizes %v, zones %v", len(DefaultModels[0].Compartments), sizes, zones)
	}
	heated := 0
	for _, c := range DefaultModels[1].Compartments {
		if c.Zone == "heated" {
			heated++
		}
	}
	if DefaultModels[1].Name != "LX-8" || len(DefaultModels[1].Compartments) != 8 || heated == 0 {
		t.Errorf("LX-8: %+v", DefaultModels[1])
	}
	bad := Model{Name: "X", Compartments: []protocol.CompartmentSpec{{N: 2, Size: "S", Zone: "ambient"}}}
	if bad.Validate() == nil {
		t.Error("a model numbered from 2 validates")
	}
}

func TestNewFleetRejectsBadOptions(t *testing.T) {
	ok := Options{Broker: "tcp://127.0.0.1:1883", ClaimToken: "x", Lockers: 1}
	for _, tc := range []struct {
		name   string
		mutate func(*Options)
	}{
		{"NoBroker", func(o *Options) { o.Broker = "" }},
		{"BadScheme", func(o *Options) { o.Broker = "http://127.0.0.1:1883" }},
		{"NegativeLockers", func(o *Options) { o.Lockers = -1 }},
		{"BadPrefix", func(o *Options) { o.SerialPrefix = "a/b" }},
		{"NoClaimToken", func(o *Options) { o.ClaimToken = "" }},
		{"HealthQoS2", func(o *Options) { o.HealthQoS = 2 }},
		{"BadProbability", func(o *Options) { o.Behavior.LeaveItemProb = 1.5 }},
		{"BadModel", func(o *Options) { o.Models = []Model{{Name: "empty"}} }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := ok
			tc.mutate(&o)
			if f, err := NewFleet(o); err == nil {
				f.Close()
				t.Error("NewFleet accepted bad options")
			}
		})
	}
	t.Run("OK", func(t *testing.T) {
		f, err := NewFleet(ok)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		o := f.Options()
		if o.SerialPrefix != "SIM" || o.FW != "1.4.2" || o.HealthInterval != time.Minute || o.KeepAlive != time.Minute ||
			o.ConnectRate != 200 || o.DoorCloseDelay != 500*time.Millisecond || len(o.Models) != 2 {
			t.Errorf("defaults not applied: %+v", o)
		}
		if err := f.Lockers()[0].Reconnect(t.Context()); !errors.Is(err, ErrNotStarted) {
			t.Errorf("Reconnect before Start = %v", err)
		}
	})
}

func TestStartAfterClose(t *testing.T) {
	f := offlineFleet(t, 1, nil)
	f.Close()
	if err := f.Start(t.Context()); !errors.Is(err, ErrClosed) {
		t.Errorf("Start after Close = %v", err)
	}
}

// TestScheduledRestoreEndsOnlyItsCut: a PowerCuts restore that comes due
// after the mains came back and was cut again (by hand) leaves the later
// cut in force; the later cut's own restore ends it.
func TestScheduledRestoreEndsOnlyItsCut(t *testing.T) {
	f := offlineFleet(t, 1, nil)
	l := f.lockers[0]
	cuts := func() int {
		l.mu.Lock()
		defer l.mu.Unlock()
		return l.x.powerCuts
	}
	l.LosePower()
	first := cuts()
	l.RestorePower()
	l.LosePower()
	l.restorePower(first)
	if !l.OnBattery() {
		t.Fatal("the first cut's restore ended the second cut")
	}
	l.restorePower(cuts())
	if l.OnBattery() {
		t.Fatal("the second cut's restore left it in force")
	}
}

// TestScheduledRepairEndsOnlyItsJam: a DoorJams repair that comes due
// after the door was mended and failed again (by hand) leaves the later
// fault in force; the later fault's own end ends it.
func TestScheduledRepairEndsOnlyItsJam(t *testing.T) {
	f := offlineFleet(t, 1, nil)
	l := f.lockers[0]
	gen := func() uint64 {
		l.mu.Lock()
		defer l.mu.Unlock()
		return l.comps[0].faultGen
	}
	l.SetDoorFault(1, true)
	first := gen()
	l.SetDoorFault(1, false)
	l.SetDoorFault(1, true)
	l.repairDoor(1, first)
	if !l.Compartment(1).Fault {
		t.Fatal("the first jam's repair ended the second fault")
	}
	l.repairDoor(1, gen())
	if l.Compartment(1).Fault {
		t.Fatal("the second fault's repair left it in force")
	}
}

// TestJamOfAFaultyDoorNotCounted: a scheduled jam that finds its door
// already failing changes nothing and is not counted in door_jams; one
// that jams a working door is.
func TestJamOfAFaultyDoorNotCounted(t *testing.T) {
	f := offlineFleet(t, 1, func(o *Options) {
		o.Lockers = 1
		o.Faults.DoorJams = DoorJams{PerHour: 0.001, Repair: Between(time.Hour, 2*time.Hour)}
	})
	l := f.lockers[0]
	i := slices.IndexFunc(l.x.streams, func(s *faultStream) bool { return s.name == "jam" })
	if i < 0 {
		t.Fatal("no jam stream")
	}
	jam := l.x.streams[i]
	for _, c := range l.comps {
		l.SetDoorFault(c.spec.N, true)
	}
	l.fire(jam)
	if n := f.Stats().DoorJams; n != 0 {
		t.Fatalf("door_jams %d after a jam of a door already failing, want 0", n)
	}
	for _, c := range l.comps {
		l.SetDoorFault(c.spec.N, false)
	}
	l.fire(jam)
	if n := f.Stats().DoorJams; n != 1 {
		t.Fatalf("door_jams %d after a jam of a working door, want 1", n)
	}
}
