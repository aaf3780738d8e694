package bench

import (
	"bytes"
	"errors"
	"runtime"
	"runtime/trace"
	"strings"
	"testing"
	"time"

	"github.com/lockergate/lockergate/internal/testtool"
)

// tracedWork is the function the test follows: it waits 20 ms on a timer
// (its workload) and on a channel the test fills.
//
//go:noinline
func tracedWork(in <-chan int) int {
	time.Sleep(20 * time.Millisecond)
	return <-in
}

// traceOf runs call on a goroutine of its own under the execution tracer,
// lets that goroutine park outside call (so the call has visibly ended),
// and returns the trace.
func traceOf(t *testing.T, call func()) *bytes.Buffer {
	t.Helper()
	var buf bytes.Buffer
	if err := trace.Start(&buf); err != nil {
		t.Skipf("execution tracing unavailable: %v", err)
	}
	done, release := make(chan struct{}), make(chan struct{})
	go func() {
		call()
		close(done)
		<-release // parks outside call: the call has ended
	}()
	<-done
	// Stop the trace only once the goroutine has parked (its state is in
	// the trace by then).
	testtool.Eventually(t, 5*time.Second, "traced goroutine parked", func() error {
		if !parkedOn(t, "bench.traceOf.func1") {
			return errors.New("not parked yet")
		}
		return nil
	})
	trace.Stop()
	close(release)
	return &buf
}

func TestTraceTail(t *testing.T) {
	in := make(chan int, 1)
	in <- 7
	buf := traceOf(t, func() { tracedWork(in) })
	rep, err := TraceTail(buf, "bench.tracedWork")
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Calls) != 1 {
		var out bytes.Buffer
		WriteTraceTail(&out, rep, 5, 0)
		t.Fatalf("%d calls traced, want 1:\n%s", len(rep.Calls), out.String())
	}
	c := rep.Calls[0]
	if c.Total < 20*time.Millisecond {
		t.Errorf("total %v, want at least the 20 ms sleep", c.Total)
	}
	var slept time.Duration
	for why, d := range c.Waits {
		if strings.Contains(why, "sleep") && strings.Contains(why, "tracedWork") {
			slept += d
		}
	}
	if slept < 20*time.Millisecond {
		t.Errorf("waits %v: want ≥ 20 ms asleep in tracedWork", c.Waits)
	}
	var out bytes.Buffer
	WriteTraceTail(&out, rep, 5, time.Millisecond)
	if !strings.Contains(out.String(), "1 calls traced") || !strings.Contains(out.String(), "tracedWork") {
		t.Errorf("report:\n%s", out.String())
	}
}

// parkedOn reports whether a goroutine whose stack has fn is blocked in a
// channel receive (from the full goroutine dump).
func parkedOn(t *testing.T, fn string) bool {
	t.Helper()
	buf := make([]byte, 1<<20)
	n := runtime.Stack(buf, true)
	for _, g := range strings.Split(string(buf[:n]), "\n\n") {
		if strings.Contains(g, fn) && strings.Contains(g, "[chan receive") && !strings.Contains(g, "tracedWork") {
			return true
		}
	}
	return false
}

// tracedSpin runs on the CPU for d: a call that is running when the trace
// starts a new generation (about once a second).
//
//go:noinline
func tracedSpin(d time.Duration) int {
	n := 0
	for end := time.Now().Add(d); time.Now().Before(end); n++ {
	}
	return n
}

func TestTraceTailAcrossGenerations(t *testing.T) {
	if testing.Short() {
		t.Skip("spins for 2.2 s")
	}
	buf := traceOf(t, func() { tracedSpin(2200 * time.Millisecond) })
	rep, err := TraceTail(buf, "bench.tracedSpin")
	if err != nil {
		t.Fatal(err)
	}
	// One call, not split at the generation boundaries (about one a
	// second). The trace sees it from its first event, which can come a few
	// tens of milliseconds after the call began on a loaded machine.
	if len(rep.Calls) != 1 || rep.Calls[0].Total < 2*time.Second {
		var out bytes.Buffer
		WriteTraceTail(&out, rep, 5, 0)
		t.Fatalf("want one call of about 2.2 s, got:\n%s", out.String())
	}
}
