package pgcluster

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// procRoot is where process information lives (Linux). Where there is none
// (macOS, the BSDs without procfs), a live pid is taken for a running server.
// A variable so tests can take it away.
var procRoot = "/proc"

// clearStalePidFile refuses to go on when a server is running on dataDir and
// removes a postmaster.pid left behind by one that died.
//
// PostgreSQL checks this itself, but it refuses whenever the recorded pid is
// alive, and after a crash in a container that pid is often reused by some
// unrelated process, which would leave the gateway unable to start until
// someone deletes the file by hand. So a pid counts as "running on dataDir"
// only if it is a postgres process whose working directory is dataDir (the
// postmaster and its backends chdir there). Orphaned backends of a dead
// postmaster count too: they still use the shared memory.
func clearStalePidFile(dataDir string, logger *slog.Logger) error {
	path := filepath.Join(dataDir, "postmaster.pid")
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("read %s: %w", path, err)
	}
	first, _, _ := strings.Cut(string(b), "\n")
	pid, err := strconv.Atoi(strings.TrimSpace(first))
	if err == nil && pid > 0 && !haveProcfs() && isRunning(pid) {
		return fmt.Errorf("another PostgreSQL may be running on %s: its postmaster.pid names pid %d, which is running (this system has no /proc to tell what it is): stop that server (kill -INT %d), or if pid %d is not one, delete %s, or use another --data-dir: %w",
			dataDir, pid, pid, pid, path, errRunning)
	}
	if err == nil && pid > 0 && usesDataDir(pid, dataDir) {
		return fmt.Errorf("another PostgreSQL is running on %s (pid %d), and it did not exit within %v: %s: %w",
			dataDir, pid, exitGrace, stopOther(pid), errRunning)
	}
	if other := findServerOn(dataDir); other > 0 {
		return fmt.Errorf("another PostgreSQL is running on %s (pid %d, not the one in postmaster.pid), and it did not exit within %v: %s: %w",
			dataDir, other, exitGrace, stopOther(other), errRunning)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove stale %s: %w", path, err)
	}
	logger.Warn("removed stale postmaster.pid: its server is not running (a previous run did not shut down cleanly)",
		"data_dir", dataDir, "pid_in_file", strings.TrimSpace(first))
	return nil
}

// stopOther says what to do about server pid running on the data
// directory: most likely another gateway runs on it, whose database that is.
func stopOther(pid int) string {
	return fmt.Sprintf("most likely another lockergate runs with this data directory: stop that gateway, or give this one another --data-dir "+
		"(if no gateway runs, stop the server: kill -INT %d)", pid)
}

// exitGrace is how long a start waits for a server still running on its
// data directory to exit before it refuses: that of a gateway killed a
// moment ago is on its way out (the parent-death signal is an immediate
// shutdown, which takes a few seconds with busy backends).
var exitGrace = 15 * time.Second

// errRunning marks clearStalePidFile's refusals of a live server.
var errRunning = errors.New("server running")

// clearPidFileWhenGone is clearStalePidFile that, while a server runs on
// dataDir, waits up to exitGrace for it to exit.
func clearPidFileWhenGone(ctx context.Context, dataDir string, logger *slog.Logger) error {
	deadline := time.Now().Add(exitGrace)
	logged := false
	for {
		err := clearStalePidFile(dataDir, logger)
		if !errors.Is(err, errRunning) || !time.Now().Before(deadline) {
			return err
		}
		if !logged {
			logger.Warn("a PostgreSQL is still running on the data directory: waiting for it to exit", "data_dir", dataDir,
				"wait", exitGrace)
			logged = true
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// haveProcfs reports whether processes can be looked at under procRoot.
func haveProcfs() bool {
	_, err := os.Stat(filepath.Join(procRoot, "self"))
	return err == nil
}

// isRunning reports whether pid is a live process (one we may not signal
// counts: it exists).
func isRunning(pid int) bool {
	err := syscall.Kill(pid, 0)
	return err == nil || errors.Is(err, syscall.EPERM)
}

// usesDataDir reports whether pid is a live postgres process working in
// dataDir. When we may not look at its working directory, it says yes: better
// a refusal with a clear message than two servers on one data directory.
func usesDataDir(pid int, dataDir string) bool {
	comm, err := os.ReadFile(filepath.Join(procRoot, strconv.Itoa(pid), "comm"))
	if err != nil || strings.TrimSpace(string(comm)) != "postgres" {
		return false // gone, or a reused pid
	}
	cwd, err := os.Readlink(filepath.Join(procRoot, strconv.Itoa(pid), "cwd"))
	if errors.Is(err, fs.ErrPermission) {
		return true
	}
	if err != nil {
		return false // exited meanwhile, or a zombie
	}
	return sameDir(cwd, dataDir)
}

// findServerOn returns the pid of some postgres process working in dataDir,
// or 0. Processes we may not inspect are skipped: a server started by another
// unprivileged user could not use our data directory anyway.
func findServerOn(dataDir string) int {
	entries, err := os.ReadDir(procRoot)
	if err != nil {
		return 0
	}
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		comm, err := os.ReadFile(filepath.Join(procRoot, e.Name(), "comm"))
		if err != nil || strings.TrimSpace(string(comm)) != "postgres" {
			continue
		}
		cwd, err := os.Readlink(filepath.Join(procRoot, e.Name(), "cwd"))
		if err == nil && sameDir(cwd, dataDir) {
			return pid
		}
	}
	return 0
}

func sameDir(a, b string) bool {
	if a == b {
		return true
	}
	ra, err1 := filepath.EvalSymlinks(a)
	rb, err2 := filepath.EvalSymlinks(b)
	return err1 == nil && err2 == nil && ra == rb
}
