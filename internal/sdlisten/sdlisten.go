// Package sdlisten takes the listening sockets a service manager passed to
// the process: systemd's socket activation protocol (sd_listen_fds(3)).
//
// A socket the service manager holds outlives the process: while the
// gateway restarts, connections to it wait in the kernel's accept queue
// instead of being refused, so lockers reconnecting meanwhile are answered
// by the next process rather than pushed into their back-off.
package sdlisten

import (
	"errors"
	"fmt"
	"maps"
	"net"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"syscall"
)

// firstFD is SD_LISTEN_FDS_START: passed sockets are fds 3, 4, ...
const firstFD = 3

// maxFDs bounds LISTEN_FDS: the gateway takes three sockets, and a count
// far beyond that is a mistake, not sockets to mark and close.
const maxFDs = 64

// Listeners returns the listening TCP sockets passed to this process by
// name (LISTEN_FDNAMES; systemd's FileDescriptorName=), or nil when none
// were passed. It unsets LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES and
// marks the sockets close-on-exec, so child processes (the private
// PostgreSQL) inherit neither. Call it once, early.
func Listeners() (map[string]net.Listener, error) {
	return listeners(os.Getenv, os.Unsetenv, os.Getpid(), firstFD)
}

func listeners(getenv func(string) string, unsetenv func(string) error, pid, first int) (map[string]net.Listener, error) {
	pidS, nS, namesS := getenv("LISTEN_PID"), getenv("LISTEN_FDS"), getenv("LISTEN_FDNAMES")
	for _, k := range []string{"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} {
		_ = unsetenv(k)
	}
	if pidS == "" || nS == "" {
		return nil, nil // nothing passed
	}
	p, err := strconv.Atoi(pidS)
	if err != nil {
		return nil, fmt.Errorf("socket activation: LISTEN_PID=%q: want a process id", pidS)
	}
	if p != pid {
		return nil, nil // meant for another process (sd_listen_fds(3): ignored)
	}
	n, err := strconv.Atoi(nS)
	if err != nil || n < 0 || n > maxFDs {
		return nil, fmt.Errorf("socket activation: LISTEN_FDS=%q: want a count of sockets, at most %d", nS, maxFDs)
	}
	if n == 0 {
		return nil, nil
	}
	for i := range n {
		// Not for children, whatever happens next.
		syscall.CloseOnExec(first + i)
	}
	out := make(map[string]net.Listener, n)
	fds := make(map[string]int, n)
	next := 0 // fds before first+next are closed or held by out
	fail := func(err error) (map[string]net.Listener, error) {
		for _, ln := range out {
			_ = ln.Close()
		}
		for i := next; i < n; i++ {
			_ = syscall.Close(first + i)
		}
		return nil, err
	}
	var names []string
	if namesS != "" {
		names = strings.Split(namesS, ":")
	}
	if len(names) != n {
		return fail(fmt.Errorf("socket activation: %d sockets passed with %d names (LISTEN_FDNAMES=%q): "+
			"name each one (FileDescriptorName= in the .socket unit)", n, len(names), namesS))
	}
	for i, name := range names {
		fd := first + i
		if other, dup := fds[name]; dup {
			return fail(fmt.Errorf("socket activation: fds %d and %d are both named %q: name each socket once", other, fd, name))
		}
		fds[name] = fd
		// A socket that does not listen would pass as a listener and
		// then fail every Accept.
		if on, err := syscall.GetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_ACCEPTCONN); err != nil {
			return fail(fmt.Errorf("socket activation: fd %d (%s): %w: want a listening socket (ListenStream=)", fd, name, err))
		} else if on == 0 {
			return fail(fmt.Errorf("socket activation: fd %d (%s) is not a listening socket: want ListenStream=", fd, name))
		}
		f := os.NewFile(uintptr(fd), name)
		ln, err := net.FileListener(f)
		_ = f.Close() // FileListener holds a duplicate
		next = i + 1
		if err != nil {
			return fail(fmt.Errorf("socket activation: fd %d (%s): %w", fd, name, err))
		}
		if _, ok := ln.(*net.TCPListener); !ok {
			_ = ln.Close()
			return fail(fmt.Errorf("socket activation: fd %d (%s) is a %s socket: want a listening TCP socket (ListenStream=)",
				fd, name, ln.Addr().Network()))
		}
		out[name] = ln
	}
	return out, nil
}

// ErrUnknownName is wrapped by Take's error for a socket nobody asked for.
var ErrUnknownName = errors.New("unknown socket name")

// Take removes and returns the listeners named in want (nil for a name not
// passed), and an error wrapping ErrUnknownName when others are left: a
// socket passed but never served would leave its clients hanging.
func Take(lns map[string]net.Listener, want ...string) ([]net.Listener, error) {
	out := make([]net.Listener, len(want))
	for i, name := range want {
		out[i] = lns[name]
		delete(lns, name)
	}
	if len(lns) > 0 {
		left := slices.Sorted(maps.Keys(lns))
		for _, ln := range lns {
			_ = ln.Close()
		}
		for _, ln := range out {
			if ln != nil {
				_ = ln.Close()
			}
		}
		return nil, fmt.Errorf("socket activation: %w %q: want %s", ErrUnknownName, strings.Join(left, ", "), strings.Join(want, ", "))
	}
	return out, nil
}

// Socket is a listening socket to pass to a child process, and its name
// there (LISTEN_FDNAMES).
type Socket struct {
	Name string
	File *os.File
}

// Pass makes cmd start its program with sockets as a service manager
// passes them: from fd 3 on (cmd.ExtraFiles must be empty), named, and for
// the program's own pid. That pid is known only once it runs, so a shell
// sets LISTEN_PID to its own and execs the program in its place. For test
// and benchmark harnesses that stand in for systemd.
func Pass(cmd *exec.Cmd, sockets ...Socket) {
	if len(sockets) == 0 {
		return
	}
	if len(cmd.ExtraFiles) > 0 {
		panic("sdlisten.Pass: cmd.ExtraFiles already in use; the sockets must be fds 3 and on")
	}
	cmd.Args = append([]string{"/bin/sh", "-c", `LISTEN_PID=$$; export LISTEN_PID; exec "$0" "$@"`, cmd.Path}, cmd.Args[1:]...)
	cmd.Path = "/bin/sh"
	if cmd.Env == nil {
		cmd.Env = os.Environ()
	}
	names := make([]string, len(sockets))
	for i, s := range sockets {
		names[i] = s.Name
		cmd.ExtraFiles = append(cmd.ExtraFiles, s.File)
	}
	cmd.Env = append(cmd.Env, fmt.Sprintf("LISTEN_FDS=%d", len(sockets)), "LISTEN_FDNAMES="+strings.Join(names, ":"))
}
