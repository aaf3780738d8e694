package gateway

import (
	"context"
	"sync"
	"sync/atomic"
)

// rerun runs one job at a time and never loses a request: a request made
// while the job runs has it run once more when it ends (however many came
// meanwhile), and one made between the job's last look and its release is
// taken by the caller that made it. The identity check uses it: a check
// under way may have asked a broker that went away meanwhile.
type rerun struct {
	running sync.Mutex  // held by the caller that runs the job
	again   atomic.Bool // asked for since the job last started

	beforeUnlock func() // tests: called after the job's last look, before its release
}

// Do asks for the job and runs it until nobody has asked since its last
// start, or returns at once when another caller is running it (that caller
// runs it once more). It stops asking once ctx is done.
func (r *rerun) Do(ctx context.Context, job func(context.Context)) {
	r.again.Store(true)
	for r.again.Load() && r.running.TryLock() {
		for r.again.Swap(false) && ctx.Err() == nil {
			job(ctx)
		}
		if r.beforeUnlock != nil {
			r.beforeUnlock()
		}
		r.running.Unlock()
		if ctx.Err() != nil {
			return
		}
	}
}

// Wait returns once no job is running (one started later may run).
func (r *rerun) Wait() {
	r.running.Lock()
	r.running.Unlock()
}
