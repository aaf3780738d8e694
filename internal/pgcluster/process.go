package pgcluster

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime"
	"strings"
)

// process is a started child and the outcome of waiting for it.
type process struct {
	cmd  *exec.Cmd
	done chan struct{} // closed once the child has exited and been reaped
	err  error         // cmd.Wait's result; read only after done is closed
}

// spawn starts cmd so that its SysProcAttr.Pdeathsig fires when this whole
// process dies and not before.
//
// The kernel sends Pdeathsig when the OS *thread* that forked the child exits,
// not when the process does (go.dev/issue/27505). Go moves goroutines between
// threads freely and terminates a thread when a goroutine locked to it exits
// without unlocking, so a child forked from an arbitrary goroutine could be
// signalled while we still need it, for example if the caller happened to be
// locked to its thread. Therefore the fork happens in a goroutine of our own
// that locks itself to its thread first and then stays there, blocked in
// cmd.Wait, for as long as the child lives. The thread is thus alive exactly
// as long as the child is needed; it ends only when this process dies (crash,
// SIGKILL, a test binary killed by its timeout), and then the kernel signals
// the child. The goroutine never unlocks: when it returns, the runtime
// discards the thread, which is harmless because the child is gone by then.
func spawn(cmd *exec.Cmd) (*process, error) {
	p := &process{cmd: cmd, done: make(chan struct{})}
	started := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
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

// exited reports whether the child has exited.
func (p *process) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// exitStatus describes how the child ended; call after done is closed.
func (p *process) exitStatus() string {
	if p.err != nil {
		return p.err.Error()
	}
	return "exit status 0"
}

// logTail returns the last lines written to path since offset, indented, for
// error messages: what postgres or initdb said before failing.
func logTail(path string, offset int64, lines int) string {
	const maxBytes = 8 << 10
	f, err := os.Open(path)
	if err != nil {
		return fmt.Sprintf("(cannot read %s: %v)", path, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return fmt.Sprintf("(cannot read %s: %v)", path, err)
	}
	start := max(offset, fi.Size()-maxBytes)
	b, err := io.ReadAll(io.NewSectionReader(f, start, fi.Size()-start))
	if err != nil {
		return fmt.Sprintf("(cannot read %s: %v)", path, err)
	}
	all := strings.Split(strings.TrimRight(string(bytes.ToValidUTF8(b, []byte("?"))), "\n"), "\n")
	if len(all) > lines {
		all = all[len(all)-lines:]
	}
	if len(all) == 1 && all[0] == "" {
		return fmt.Sprintf("(%s is empty)", path)
	}
	return fmt.Sprintf("last lines of %s:\n\t%s", path, strings.Join(all, "\n\t"))
}
