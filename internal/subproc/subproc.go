// Package subproc starts child processes that die with this one and not
// before.
//
// A child started with SysProcAttr.Pdeathsig is signalled when the OS
// *thread* that forked it exits, not when the process does
// (go.dev/issue/27505). Go moves goroutines between threads freely and ends
// a thread when a goroutine locked to it exits without unlocking, so a child
// forked from an arbitrary goroutine can be killed while it is still needed:
// the thread that forked it later runs a goroutine that locks it and
// returns (starting a PostgreSQL cluster does, for one), and the thread and
// the child go with it. Start forks on a goroutine of its own that locks
// itself to its thread first and stays there, blocked in cmd.Wait, for as
// long as the child lives; the thread then ends only when this process
// dies (a crash, SIGKILL, a test binary killed by its timeout), and then
// the kernel signals the child. The goroutine never unlocks: when it
// returns the runtime discards the thread, which is harmless because the
// child is gone by then.
package subproc

import (
	"os/exec"
	"runtime"
)

// Process is a started child.
type Process struct {
	done chan struct{}
	err  error
}

// Start starts cmd (set the signal it should get when this process dies
// with DieWithParent).
func Start(cmd *exec.Cmd) (*Process, error) {
	p := &Process{done: make(chan struct{})}
	started := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread lives as long as the child
		if err := cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		p.err = cmd.Wait()
		close(p.done)
	}()
	if err := <-started; err != nil {
		return nil, err
	}
	return p, nil
}

// Done is closed once the child has exited and been reaped.
func (p *Process) Done() <-chan struct{} { return p.done }

// Err is cmd.Wait's result; call it after Done is closed.
func (p *Process) Err() error { return p.err }

// Exited reports whether the child has exited.
func (p *Process) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}
