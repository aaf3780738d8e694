package bench

import (
	"cmp"
	"fmt"
	"io"
	"slices"
	"strings"
	"time"

	"golang.org/x/exp/trace"
)

// UnlockFrame is the function whose goroutines TraceTail follows by
// default: the API handler of POST /v1/lockers/{id}/commands.
const UnlockFrame = "httpapi.(*Server).createCommand"

// TracedCall is one call of the followed function found in an execution
// trace: how long it took and where the time went.
type TracedCall struct {
	Start time.Time // wall clock: when the run slice the call was first seen in began
	// Total runs from Start to the goroutine's first park (a blocking
	// wait) outside the function.
	Total    time.Duration
	Running  time.Duration
	Runnable time.Duration // ready but waiting for a processor
	// Waits is blocked time by reason and the innermost frames outside the
	// runtime ("network: net.(*conn).Read < pgconn…").
	Waits map[string]time.Duration
}

// TraceReport is what TraceTail found.
type TraceReport struct {
	Calls []TracedCall // slowest first
	// GC lists each garbage collection's concurrent mark phase: start and
	// length. STW lists stop-the-world pauses over 100 µs.
	GC, STW []TracedSpan
}

// TracedSpan is an interval in an execution trace.
type TracedSpan struct {
	Start time.Time
	Len   time.Duration
	What  string
}

// open is a call in progress: the goroutine's state since last.
type open struct {
	TracedCall
	started, last trace.Time
	state         trace.GoState
	why           string // what it waits for, while it waits
}

// account books the time since the last transition to the state the
// goroutine was in, and moves it to state to (waiting for why).
func (c *open) account(now trace.Time, to trace.GoState, why string) {
	d := time.Duration(now - c.last)
	switch c.state {
	case trace.GoRunning:
		c.Running += d
	case trace.GoRunnable:
		c.Runnable += d
	case trace.GoWaiting, trace.GoSyscall:
		c.Waits[c.why] += d
	}
	c.last, c.state = now, to
	if to == trace.GoWaiting || to == trace.GoSyscall {
		c.why = why
	}
}

// TraceTail reads an execution trace (lockerbench --profile saves one of
// each unlock run; go tool trace reads the same file) and follows every
// goroutine while a frame of its stack contains frame: each stretch from
// the first state change inside the function to the goroutine parking
// outside it is one call. The slowest calls, with their waits broken down,
// say what the tail of a latency distribution waited for; the GC and STW
// spans can be set beside them.
func TraceTail(r io.Reader, frame string) (*TraceReport, error) {
	tr, err := trace.NewReader(r)
	if err != nil {
		return nil, fmt.Errorf("read trace: %w", err)
	}
	var (
		rep     TraceReport
		calls   = map[trace.GoID]*open{}
		runFrom = map[trace.GoID]trace.Time{} // when each goroutine last started running
		ranges  = map[string]trace.Time{}
		wall    time.Time // zero until the first clock snapshot
		wallAt  trace.Time
	)
	clock := func(t trace.Time) time.Time { return wall.Add(time.Duration(t - wallAt)) }
	for {
		ev, err := tr.ReadEvent()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("read trace: %w", err)
		}
		switch ev.Kind() {
		case trace.EventSync:
			if cs := ev.Sync().ClockSnapshot; cs != nil && wall.IsZero() {
				wall, wallAt = cs.Wall, cs.Trace
			}
		case trace.EventRangeBegin:
			rg := ev.Range()
			ranges[rg.Name+rg.Scope.String()] = ev.Time()
		case trace.EventRangeEnd:
			rg := ev.Range()
			start, ok := ranges[rg.Name+rg.Scope.String()]
			if !ok {
				continue // began before the trace did
			}
			span := TracedSpan{Start: clock(start), Len: time.Duration(ev.Time() - start), What: rg.Name}
			switch {
			case rg.Name == "GC concurrent mark phase":
				rep.GC = append(rep.GC, span)
			case strings.HasPrefix(rg.Name, "stop-the-world") && span.Len > 100*time.Microsecond:
				rep.STW = append(rep.STW, span)
			}
		case trace.EventStateTransition:
			st := ev.StateTransition()
			if st.Resource.Kind != trace.ResourceGoroutine {
				continue
			}
			g := st.Resource.Goroutine()
			from, to := st.Goroutine()
			if from == to || from == trace.GoUndetermined {
				// The trace (re)announcing a state at its start or at a
				// generation boundary (about once a second), with no
				// stack: nothing changed.
				if _, seen := runFrom[g]; to == trace.GoRunning && !seen {
					runFrom[g] = ev.Time()
				}
				continue
			}
			if to == trace.GoRunning {
				runFrom[g] = ev.Time()
			}
			c := calls[g]
			if from != trace.GoRunning || st.Stack == trace.NoStack {
				// Woken or scheduled by someone else (the event's stack is
				// theirs, not g's), or stopped by the runtime without a
				// stack: where g is cannot be told. Only the time counts.
				if c != nil {
					c.account(ev.Time(), to, c.why)
				}
				continue
			}
			// g stops running: st.Stack is its own stack, where it is now.
			inside := stackHas(st.Stack, frame)
			if c == nil {
				if !inside {
					continue
				}
				// The call began in the run slice that ends here.
				at, ok := runFrom[g]
				if !ok {
					at = ev.Time()
				}
				c = &open{TracedCall: TracedCall{Waits: map[string]time.Duration{}}, started: at, last: at, state: trace.GoRunning}
				calls[g] = c
			}
			c.account(ev.Time(), to, waitReason(st.Reason, to, st.Stack))
			// Only parking outside ends a call: a preemption's stack can
			// miss frames (a leaf function interrupted before it set up
			// its frame), so "outside" is believed only when g blocks.
			if !inside && to == trace.GoWaiting {
				c.Start, c.Total = clock(c.started), time.Duration(ev.Time()-c.started)
				rep.Calls = append(rep.Calls, c.TracedCall)
				delete(calls, g)
			}
		}
	}
	slices.SortFunc(rep.Calls, func(a, b TracedCall) int { return cmp.Compare(b.Total, a.Total) })
	return &rep, nil
}

func stackHas(s trace.Stack, sub string) bool {
	for f := range s.Frames() {
		if strings.Contains(f.Func, sub) {
			return true
		}
	}
	return false
}

// waitReason names a wait by its reason, the innermost frame that is not
// the runtime's, the poller's or sync's, and the innermost frame of this
// module below it (which of our calls waited: "network: net.(*netFD).Read
// … postgres.(*DB).CreateCommand").
func waitReason(reason string, to trace.GoState, s trace.Stack) string {
	if to == trace.GoSyscall {
		reason = "syscall"
	}
	var inner, ours string
	for f := range s.Frames() {
		n := f.Func
		if strings.HasPrefix(n, "runtime.") || strings.HasPrefix(n, "internal/poll.") || strings.HasPrefix(n, "sync.") {
			continue
		}
		if inner == "" {
			inner = n
		}
		if strings.HasPrefix(n, ourModule) {
			ours = strings.TrimPrefix(n, ourModule)
			break
		}
	}
	switch {
	case ours == "":
		return reason + ": " + inner
	case inner == ourModule+ours:
		return reason + ": " + ours
	}
	return reason + ": " + inner + " … " + ours
}

const ourModule = "github.com/lockergate/lockergate/"

// WriteTraceTail prints the n slowest calls with every wait of at least
// minWait, then the GC marks and STW pauses, as plain text.
func WriteTraceTail(w io.Writer, rep *TraceReport, n int, minWait time.Duration) {
	fmt.Fprintf(w, "%d calls traced; the %d slowest:\n", len(rep.Calls), min(n, len(rep.Calls)))
	for i, c := range rep.Calls {
		if i == n {
			break
		}
		fmt.Fprintf(w, "%s  total %v  running %v  runnable %v\n", c.Start.UTC().Format("15:04:05.000"),
			c.Total.Round(time.Microsecond), c.Running.Round(time.Microsecond), c.Runnable.Round(time.Microsecond))
		type wait struct {
			why string
			d   time.Duration
		}
		var ws []wait
		for why, d := range c.Waits {
			if d >= minWait {
				ws = append(ws, wait{why, d})
			}
		}
		slices.SortFunc(ws, func(a, b wait) int { return cmp.Compare(b.d, a.d) })
		for _, x := range ws {
			fmt.Fprintf(w, "    %10v  %s\n", x.d.Round(time.Microsecond), x.why)
		}
	}
	for _, sp := range rep.GC {
		fmt.Fprintf(w, "GC mark      %s  %v\n", sp.Start.UTC().Format("15:04:05.000"), sp.Len.Round(time.Microsecond))
	}
	for _, sp := range rep.STW {
		fmt.Fprintf(w, "%s  %s  %v\n", sp.What, sp.Start.UTC().Format("15:04:05.000"), sp.Len.Round(time.Microsecond))
	}
}
