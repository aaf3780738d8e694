package bench

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/lockergate/lockergate/internal/sdlisten"
	"github.com/lockergate/lockergate/internal/subproc"
)

// clockTicks is USER_HZ, the unit of utime and stime in /proc/<pid>/stat.
// It is 100 on every Linux architecture Go supports.
const clockTicks = 100

// Proc is a child process of the benchmark: a system under test or a
// baseline broker. It runs in its own process group and dies with us.
type Proc struct {
	Name string
	cmd  *exec.Cmd
	ch   *subproc.Process
	done <-chan struct{}
	log  *os.File
}

// StartProc starts bin with args, output appended to logPath. The child gets
// SIGKILL if this process dies (Pdeathsig, from a thread that stays alive
// for as long as the child: see internal/subproc for why).
func StartProc(name, bin string, args []string, logPath string, env ...string) (*Proc, error) {
	return startProc(name, bin, args, logPath, env, nil)
}

// startProc is StartProc passing sockets as a service manager does (systemd
// socket activation: sdlisten.Pass).
func startProc(name, bin string, args []string, logPath string, env []string, sockets []sdlisten.Socket) (*Proc, error) {
	lf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = lf, lf
	if len(env) > 0 {
		cmd.Env = append(os.Environ(), env...)
	}
	sdlisten.Pass(cmd, sockets...)
	cmd.SysProcAttr = subproc.DieWithParent(&syscall.SysProcAttr{Setpgid: true}, syscall.SIGKILL)
	c, err := subproc.Start(cmd)
	if err != nil {
		lf.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	return &Proc{Name: name, cmd: cmd, ch: c, done: c.Done(), log: lf}, nil
}

// Pid is the child's process id.
func (p *Proc) Pid() int { return p.cmd.Process.Pid }

// Exited reports whether the child has ended.
func (p *Proc) Exited() bool { return p.ch.Exited() }

// Stop asks the child to stop (SIGTERM), waits up to grace, then kills its
// process group. It is safe to call more than once.
func (p *Proc) Stop(grace time.Duration) error {
	if p == nil {
		return nil
	}
	if !p.Exited() {
		_ = p.cmd.Process.Signal(syscall.SIGTERM)
		t := time.NewTimer(grace)
		select {
		case <-p.done:
		case <-t.C:
			_ = syscall.Kill(-p.Pid(), syscall.SIGKILL)
			<-p.done
		}
		t.Stop()
	}
	_ = syscall.Kill(-p.Pid(), syscall.SIGKILL) // anything left in its group
	p.log.Close()
	var ee *exec.ExitError
	if errors.As(p.ch.Err(), &ee) && ee.Sys().(syscall.WaitStatus).Signaled() {
		return nil // stopped by us
	}
	return p.ch.Err()
}

// Wait waits for the child to exit or ctx to end.
func (p *Proc) Wait(ctx context.Context) error {
	select {
	case <-p.done:
		return p.ch.Err()
	case <-ctx.Done():
		return ctx.Err()
	}
}

// CPU is CPU time in seconds (user + system).
type CPU float64

// ProcCPU returns the CPU time pid has used; with children it adds the CPU
// of its reaped children (cutime, cstime).
func ProcCPU(pid int, children bool) (CPU, error) {
	f, err := statFields(pid)
	if err != nil {
		return 0, err
	}
	// Fields after "(comm)": 0 state, 1 ppid, ..., 11 utime, 12 stime, 13 cutime, 14 cstime.
	n := 13
	if children {
		n = 15
	}
	var ticks int64
	for i := 11; i < n; i++ {
		v, _ := strconv.ParseInt(f[i], 10, 64)
		ticks += v
	}
	return CPU(float64(ticks) / clockTicks), nil
}

func statFields(pid int) ([]string, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return nil, err
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return nil, fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 15 {
		return nil, fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	return f, nil
}

// TreeCPU returns the CPU time of pid, of its exited children and of its
// live children: for a PostgreSQL postmaster, the whole server.
func TreeCPU(pid int) (CPU, error) {
	total, err := ProcCPU(pid, true)
	if err != nil {
		return 0, err
	}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return 0, err
	}
	want := strconv.Itoa(pid)
	for _, e := range ents {
		cpid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		f, err := statFields(cpid)
		if err != nil || f[1] != want {
			continue
		}
		c, err := ProcCPU(cpid, false)
		if err == nil {
			total += c
		}
	}
	return total, nil
}

// Mem is a process's resident memory in bytes: now and at its peak.
type Mem struct{ RSS, HWM int64 }

// ProcMem reads VmRSS and VmHWM from /proc/<pid>/status.
func ProcMem(pid int) (Mem, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return Mem{}, err
	}
	defer f.Close()
	var m Mem
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok || (k != "VmRSS" && k != "VmHWM") {
			continue
		}
		fs := strings.Fields(v)
		if len(fs) == 0 {
			continue
		}
		kb, _ := strconv.ParseInt(fs[0], 10, 64)
		if k == "VmRSS" {
			m.RSS = kb << 10
		} else {
			m.HWM = kb << 10
		}
	}
	return m, sc.Err()
}

// SelfCPU is this process's CPU time (the load generator's).
func SelfCPU() CPU {
	var ru syscall.Rusage
	if syscall.Getrusage(syscall.RUSAGE_SELF, &ru) != nil {
		return 0
	}
	return CPU(time.Duration(ru.Utime.Nano() + ru.Stime.Nano()).Seconds())
}

// PostgresCPU is the CPU time so far of the whole PostgreSQL server whose
// data directory is dataDir.
func PostgresCPU(dataDir string) (CPU, error) {
	pid, err := postmasterPid(dataDir)
	if err != nil {
		return 0, err
	}
	return TreeCPU(pid)
}

// postmasterPid reads the pid of the PostgreSQL server in dataDir.
func postmasterPid(dataDir string) (int, error) {
	b, err := os.ReadFile(filepath.Join(dataDir, "postmaster.pid"))
	if err != nil {
		return 0, err
	}
	line, _, _ := strings.Cut(string(b), "\n")
	return strconv.Atoi(strings.TrimSpace(line))
}

// RaiseFileLimit lifts RLIMIT_NOFILE (soft and hard) to want, for this
// process and the servers it starts: 50,000 connections need more than the
// usual 20,000 descriptors on both ends. Raising the hard limit needs root.
func RaiseFileLimit(want uint64) (uint64, error) {
	var r syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &r); err != nil {
		return 0, err
	}
	if r.Cur >= want {
		return r.Cur, nil
	}
	nr := syscall.Rlimit{Cur: want, Max: max(want, r.Max)}
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &nr); err != nil {
		// Not root: take what the hard limit allows.
		nr = syscall.Rlimit{Cur: r.Max, Max: r.Max}
		if err2 := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &nr); err2 != nil {
			return r.Cur, err
		}
		return r.Max, err
	}
	return want, nil
}

// tail returns the last n lines of a log file, for error messages.
func tail(path string, n int) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	st, _ := f.Stat()
	if st != nil && st.Size() > 16<<10 {
		f.Seek(-16<<10, io.SeekEnd)
	}
	b, _ := io.ReadAll(f)
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// FileLimit is this process's RLIMIT_NOFILE (soft), which children inherit.
func FileLimit() int {
	var r syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &r); err != nil {
		return 1024
	}
	return int(min(r.Cur, 1<<30))
}

// OpenFiles counts this process's open descriptors.
func OpenFiles() int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return 0
	}
	return len(ents)
}
