package pgcluster

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"

	"github.com/lockergate/lockergate/internal/subproc"
)

// process is a started child (internal/subproc: its Pdeathsig comes when
// this whole process dies, not before) and its command.
type process struct {
	cmd  *exec.Cmd
	ch   *subproc.Process
	done <-chan struct{} // closed once the child has exited and been reaped
}

// spawn starts cmd so that its SysProcAttr.Pdeathsig fires when this whole
// process dies and not before.
func spawn(cmd *exec.Cmd) (*process, error) {
	c, err := subproc.Start(cmd)
	if err != nil {
		return nil, err
	}
	return &process{cmd: cmd, ch: c, done: c.Done()}, nil
}

// exited reports whether the child has exited.
func (p *process) exited() bool { return p.ch.Exited() }

// err is cmd.Wait's result; call after done is closed.
func (p *process) err() error { return p.ch.Err() }

// exitStatus describes how the child ended; call after done is closed.
func (p *process) exitStatus() string {
	if err := p.err(); err != nil {
		return err.Error()
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
