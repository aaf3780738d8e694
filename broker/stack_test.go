package broker

import (
	"fmt"
	"runtime"
	"runtime/debug"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/lockergate/lockergate/internal/testtool"
)

// TestParkedStacksShrink: an idle client has one goroutine, its reader,
// and it must park on a small stack. The runtime halves a parked stack only
// while less than a quarter of it is in use, so a few hundred bytes more in
// the parked frames kept every reader on 8 KiB (mochi patch 11; 10 KiB per
// client before it). A writer runs only while packets are queued for the
// client (patch 12; before it, one more goroutine per client). A rested
// reader (patch 13) starts on 2 KiB and parks waiting for input without a
// buffer (patch 15); its frames must fit there, or it grows to 4 KiB.
func TestParkedStacksShrink(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector changes frame sizes; .ci/run runs this test without -race")
	}
	h := newHarness(t, nil, nil)
	const n = 300
	settled := func() (stack uint64, goroutines int) {
		// Each collection halves a stack at most once.
		for range 6 {
			runtime.GC()
		}
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		return m.StackInuse, runtime.NumGoroutine()
	}
	s0, g0 := settled()
	connectIdle(t, h, n, false)
	// A client's writer ends once its queue (the CONNACK, the SUBACK) is
	// written: the last ones may still be on their way out.
	var s1 uint64
	testtool.Eventually(t, waitTimeout, "one goroutine per idle client", func() error {
		var g1 int
		if s1, g1 = settled(); g1-g0 != n {
			return fmt.Errorf("%d goroutines more with %d idle clients, want %d (one reader each)", g1-g0, n, n)
		}
		return nil
	})
	perClient := float64(s1-s0) / n / 1024
	t.Logf("goroutine stacks per idle client: %.2f KiB", perClient)
	if perClient > 3.5 {
		t.Errorf("goroutine stacks per idle client: %.2f KiB, want about 2 (a 2 KiB reader)", perClient)
	}
}

// TestIdleReadersRest: a reader that has handled packets rests (moves to a
// new goroutine) once its connection is idle for Options.ReaderRest, so an
// idle fleet's stacks are small without waiting for collections. Each
// client's CONNECT, SUBSCRIBE and QoS 1 PUBLISH grow its reader to 16 KiB
// or more; the runtime would halve that once per collection, and no
// collection is forced here.
//
// It runs in a process of its own with the runtime's adaptive starting
// stack off: a rested reader is a new goroutine, and other tests'
// goroutines (TestParkedStacksShrink's collections, say) could make new
// ones start on more than 2 KiB.
func TestIdleReadersRest(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector changes frame sizes; .ci/run runs this test without -race")
	}
	if !testtool.FreshProcess(t) {
		return
	}
	h := newHarness(t, nil, nil) // ReaderRest: 20 ms
	const n = 300
	for range 6 {
		runtime.GC()
	}
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	s0, g0, gc0 := m.StackInuse, runtime.NumGoroutine(), m.NumGC
	connectIdle(t, h, n, true)
	var perClient float64
	testtool.Eventually(t, waitTimeout, "idle readers on small stacks", func() error {
		runtime.ReadMemStats(&m)
		perClient = float64(int64(m.StackInuse)-int64(s0)) / n / 1024
		if perClient > 3.5 {
			return fmt.Errorf("goroutine stacks per idle client: %.2f KiB, want about 2", perClient)
		}
		if g := runtime.NumGoroutine() - g0; g != n {
			return fmt.Errorf("%d goroutines more with %d idle clients, want %d (one reader each)", g, n, n)
		}
		return nil
	})
	t.Logf("goroutine stacks per idle client, no collection forced: %.2f KiB (%d collections ran meanwhile)", perClient, m.NumGC-gc0)
}

// TestPingreqStackThroughTheBroker: a fleet's PINGREQs come in waves, and
// each grows its reader's stack to what a PINGREQ's path needs, here with
// the broker's own hooks on it (mochi's TestPingreqStack measures the path
// with a hook of its own): 8 KiB since mochi patch 26, 16 before. Idle
// readers' stacks are shrunk by collections first, then every client
// pings with collections off, and the stacks' growth per client is what a
// reader grew by. It also logs what a QoS 1 health PUBLISH grows a reader
// to (16 KiB today: see docs/benchmarks.md).
func TestPingreqStackThroughTheBroker(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector changes frame sizes; .ci/run runs this test without -race")
	}
	if !testtool.FreshProcess(t) {
		return
	}
	// Readers must not rest (move to a new goroutine) during the test.
	h := newHarness(t, func(o *Options) { o.ReaderRest = time.Hour }, nil)
	const n = 200
	clients := connectIdle(t, h, n, false)
	// grown returns the growth of goroutine stacks, per client, while
	// each client does what exchange does, with no collection to shrink
	// them meanwhile.
	grown := func(exchange func(r *raw)) float64 {
		// Each collection halves a stack at most once.
		for range 6 {
			runtime.GC()
		}
		defer debug.SetGCPercent(debug.SetGCPercent(-1))
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		before := m.StackInuse
		for _, r := range clients {
			exchange(r)
		}
		runtime.ReadMemStats(&m)
		return float64(int64(m.StackInuse)-int64(before)) / n / 1024
	}
	ping := grown(func(r *raw) {
		r.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pingreq}})
		r.mustRead(packets.Pingresp)
	})
	health := grown(func(r *raw) {
		r.publish("lockers/v1/"+r.id+"/health", 1, []byte(`{"seq":1}`))
		r.mustRead(packets.Puback)
	})
	t.Logf("a parked reader's stack grows by %.2f KiB for a PINGREQ, %.2f KiB for a QoS 1 health PUBLISH", ping, health)
	// The readers park on 2 or 4 KiB: to 8 KiB is 6 or 4 more, to 16 KiB
	// 14 or 12 (or 8 from a reader parked on 8, which
	// TestParkedStacksShrink fails).
	if ping > 7 {
		t.Errorf("a PINGREQ grows its reader's stack by %.2f KiB, want at most 6 (to 8 KiB; 8 or more is to 16 KiB)", ping)
	}
}

// connectIdle connects n lockers the way a locker starts: CONNECT and a
// SUBSCRIBE to its cmd topic, and, with health, one QoS 1 health message
// (which grows its reader's stack to 16 KiB); it returns their connections.
func connectIdle(t *testing.T, h *harness, n int, health bool) []*raw {
	t.Helper()
	var clients []*raw
	for i := range n {
		id := fmt.Sprintf("S%d", i)
		h.auth.setDevice(id, fakeDevice{secret: "s"})
		r := dialRaw(t, h.addr, 4)
		if ack := r.connect(id, id, "s", 60, nil); ack.ReasonCode != 0 {
			t.Fatalf("%s: CONNACK %#x", id, ack.ReasonCode)
		}
		r.subscribe("lockers/v1/"+id+"/cmd", 1)
		if health {
			r.publish("lockers/v1/"+id+"/health", 1, []byte(`{"seq":1}`))
			r.mustRead(packets.Puback)
		}
		r.id = id
		clients = append(clients, r)
	}
	return clients
}
