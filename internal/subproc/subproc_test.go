//go:build linux

package subproc

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

var errMainThread = errors.New("on the main thread")

func sleeper() *exec.Cmd {
	cmd := exec.Command("sleep", "60")
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	return cmd
}

// TestOutlivesTheCallersThread: a goroutine locked to its thread starts two
// children and returns, so the runtime ends its thread. The child it forked
// itself (plain cmd.Start) gets its Pdeathsig then, which shows the thread
// is gone; the one started through Start lives on.
func TestOutlivesTheCallersThread(t *testing.T) {
	control, kept := sleeper(), sleeper()
	var p *Process
	errs := make(chan error, 1)
	for started := false; !started; {
		go func() {
			runtime.LockOSThread() // never unlocked: the thread ends with the goroutine
			if syscall.Gettid() == syscall.Getpid() {
				// The main thread is not ended but parked for good: try
				// another goroutine, which lands on another thread.
				runtime.UnlockOSThread()
				errs <- errMainThread
				return
			}
			var err error
			if p, err = Start(kept); err == nil {
				err = control.Start()
			}
			errs <- err
		}()
		switch err := <-errs; {
		case err == nil:
			started = true
		case !errors.Is(err, errMainThread):
			t.Fatal(err)
		}
	}
	t.Cleanup(func() {
		kept.Process.Kill()
		<-p.Done()
	})
	if err := control.Wait(); err == nil || !errors.As(err, new(*exec.ExitError)) ||
		!err.(*exec.ExitError).Sys().(syscall.WaitStatus).Signaled() {
		t.Fatalf("the control child ended with %v, want killed by its Pdeathsig", err)
	}
	// The kernel signalled both children as the thread ended, before the
	// control died: a kept child signalled too has the SIGKILL pending, or
	// is dying or gone.
	if p.Exited() || killed(t, kept.Process.Pid) {
		t.Fatal("the child started through Start was killed with its caller's thread")
	}
}

// killed reports whether process pid is gone, dying, or has a SIGKILL
// pending, from /proc/<pid>/status.
func killed(t *testing.T, pid int) bool {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if errors.Is(err, os.ErrNotExist) {
		return true
	}
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		k, v, _ := strings.Cut(line, ":")
		v = strings.TrimSpace(v)
		switch k {
		case "State":
			if strings.HasPrefix(v, "Z") || strings.HasPrefix(v, "X") {
				return true
			}
		case "SigPnd", "ShdPnd":
			mask, err := strconv.ParseUint(v, 16, 64)
			if err != nil {
				t.Fatalf("%s: %q: %v", k, v, err)
			}
			if mask&(1<<(syscall.SIGKILL-1)) != 0 {
				return true
			}
		}
	}
	return false
}
