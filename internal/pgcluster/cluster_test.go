package pgcluster

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/lockergate/lockergate/internal/subproc"
)

// The test binary doubles as a helper process (see runHelper) for what needs
// a process of its own: a parent that dies, a parent that is not root.
const (
	helperModeEnv = "LG_PGCLUSTER_TEST_HELPER"
	helperDirEnv  = "LG_PGCLUSTER_TEST_DATA_DIR"
)

func TestMain(m *testing.M) {
	if mode := os.Getenv(helperModeEnv); mode != "" {
		os.Exit(runHelper(mode, os.Getenv(helperDirEnv)))
	}
	// A live server on the data directory is refused after half a second
	// here, not after the production grace (TestStartWaitsForAServerOnItsWayOut).
	exitGrace = 500 * time.Millisecond
	os.Exit(m.Run())
}

// runHelper is the helper process's main.
//   - hold: start a cluster, print "PID <postmaster pid>", keep it until stdin
//     closes, stop it.
//   - roundtrip: start a cluster, run a query, stop it, print "OK".
func runHelper(mode, dataDir string) int {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	logger := slog.New(slog.NewTextHandler(os.Stderr, nil))
	c, err := Start(ctx, Options{DataDir: dataDir, Fast: true, Logger: logger})
	if err != nil {
		fmt.Fprintln(os.Stderr, "helper:", err)
		return 1
	}
	defer c.Stop()
	switch mode {
	case "hold":
		fmt.Printf("PID %d SOCKETDIR %s\n", c.proc.cmd.Process.Pid, c.socketDir)
		_, _ = io.Copy(io.Discard, os.Stdin)
	case "roundtrip":
		conn, err := pgx.Connect(ctx, c.DSN("lockergate"))
		if err != nil {
			fmt.Fprintln(os.Stderr, "helper:", err)
			return 1
		}
		var user string
		err = conn.QueryRow(ctx, "SELECT current_user").Scan(&user)
		conn.Close(ctx)
		if err != nil {
			fmt.Fprintln(os.Stderr, "helper:", err)
			return 1
		}
		if err := c.Stop(); err != nil {
			fmt.Fprintln(os.Stderr, "helper:", err)
			return 1
		}
		fmt.Printf("OK euid=%d user=%s\n", os.Geteuid(), user)
	default:
		fmt.Fprintln(os.Stderr, "helper: unknown mode", mode)
		return 2
	}
	return 0
}

// logBuffer collects log output for assertions and echoes it to the test log.
type logBuffer struct {
	t  testing.TB
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.t.Log(strings.TrimRight(string(p), "\n"))
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func newLogger(t testing.TB) (*slog.Logger, *logBuffer) {
	buf := &logBuffer{t: t}
	return slog.New(slog.NewTextHandler(buf, nil)), buf
}

// traversableDir returns a new empty directory that the postgres system user
// can reach when the tests run as root: t.TempDir's parent is a 0700
// directory of root's.
func traversableDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "lgpgc")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := os.RemoveAll(dir); err != nil {
			t.Errorf("remove %s: %v", dir, err)
		}
	})
	if err := os.Chmod(dir, 0o711); err != nil {
		t.Fatal(err)
	}
	return dir
}

// MustStart starts a cluster and stops it when the test ends.
func MustStart(t testing.TB, opts Options) *Cluster {
	t.Helper()
	if opts.Logger == nil {
		opts.Logger, _ = newLogger(t)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c, err := Start(ctx, opts)
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(func() {
		if err := c.Stop(); err != nil {
			t.Errorf("Stop: %v", err)
		}
	})
	return c
}

// MustConnect connects to dsn and closes the connection when the test ends.
func MustConnect(t testing.TB, dsn string) *pgx.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatalf("connect %q: %v", dsn, err)
	}
	t.Cleanup(func() { conn.Close(context.Background()) })
	return conn
}

// MustQueryRow runs sql and scans its single row into dest.
func MustQueryRow(t testing.TB, conn *pgx.Conn, sql string, dest ...any) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := conn.QueryRow(ctx, sql).Scan(dest...); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
}

// MustExec runs sql.
func MustExec(t testing.TB, conn *pgx.Conn, sql string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := conn.Exec(ctx, sql); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
}

// processUID returns the real uid of a running process.
func processUID(t testing.TB, pid int) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "Uid:"); ok {
			uid, err := strconv.Atoi(strings.Fields(rest)[0])
			if err != nil {
				t.Fatal(err)
			}
			return uid
		}
	}
	t.Fatalf("no Uid line in /proc/%d/status", pid)
	return -1
}

// isAlive reports whether pid is a live process; zombies count as dead (a
// container's init may not reap our orphans).
func isAlive(pid int) bool {
	if !haveProcfs() {
		return isRunning(pid)
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	i := bytes.LastIndexByte(b, ')')
	return i < 0 || !bytes.HasPrefix(b[i+1:], []byte(" Z"))
}

// pollUntil checks cond every 10 ms until it holds (true) or d passes (false).
func pollUntil(d time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(d)
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		<-tick.C
	}
	return true
}

// waitFor fails the test unless cond holds within d.
func waitFor(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	if !pollUntil(d, cond) {
		t.Fatalf("timed out after %v waiting for %s", d, what)
	}
}

func TestStart(t *testing.T) {
	t.Run("OK", func(t *testing.T) {
		dataDir := filepath.Join(traversableDir(t), "data")
		c := MustStart(t, Options{DataDir: dataDir, Fast: true})
		pid := c.proc.cmd.Process.Pid

		conn := MustConnect(t, c.DSN("lockergate")) // the default database
		var db, user, fsync, listen, walZero string
		MustQueryRow(t, conn, "SELECT current_database(), current_user, current_setting('fsync'), current_setting('listen_addresses'), current_setting('wal_init_zero')",
			&db, &user, &fsync, &listen, &walZero)
		if got, want := db, "lockergate"; got != want {
			t.Errorf("current_database() = %q, want %q", got, want)
		}
		if got, want := user, "postgres"; got != want {
			t.Errorf("current_user = %q, want %q", got, want)
		}
		if got, want := fsync, "off"; got != want {
			t.Errorf("fsync = %q, want %q (Fast)", got, want)
		}
		if listen != "" {
			t.Errorf("listen_addresses = %q, want none (socket only)", listen)
		}
		if walZero != "off" {
			t.Errorf("wal_init_zero = %q, want off (new WAL segments are not zero-filled under the write lock)", walZero)
		}
		if n := len(filepath.Join(c.socketDir, ".s.PGSQL.5432")); n > maxSocketPath {
			t.Errorf("socket path is %d bytes, over %d", n, maxSocketPath)
		}
		fi, err := os.Stat(c.socketDir)
		if err != nil {
			t.Fatal(err)
		}
		if got, want := fi.Mode().Perm(), fs.FileMode(0o700); got != want {
			t.Errorf("socket dir mode = %v, want %v", got, want)
		}
		if os.Geteuid() == 0 {
			acct, err := serverAccount()
			if err != nil {
				t.Fatal(err)
			}
			if got, want := processUID(t, pid), int(acct.uid); got != want {
				t.Errorf("postgres runs as uid %d, want %d (user %s)", got, want, acct.name)
			}
		}
		if _, err := os.Stat(dataDir + ".log"); err != nil {
			t.Errorf("server log: %v", err)
		}

		if err := c.Stop(); err != nil {
			t.Fatalf("Stop: %v", err)
		}
		if isAlive(pid) {
			t.Errorf("postgres (pid %d) still running after Stop", pid)
		}
		if _, err := os.Stat(c.socketDir); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("socket dir after Stop: err = %v, want it gone", err)
		}
		if err := c.Stop(); err != nil {
			t.Errorf("second Stop: %v, want nil", err)
		}
	})

	t.Run("CreatesDatabase", func(t *testing.T) {
		c := MustStart(t, Options{DataDir: filepath.Join(traversableDir(t), "data"), Fast: true, Database: "my app"})
		conn := MustConnect(t, c.DSN("my app"))
		var db string
		MustQueryRow(t, conn, "SELECT current_database()", &db)
		if got, want := db, "my app"; got != want {
			t.Errorf("current_database() = %q, want %q", got, want)
		}
	})

	t.Run("ErrNotEmpty", func(t *testing.T) {
		dataDir := filepath.Join(traversableDir(t), "data")
		if err := os.MkdirAll(dataDir, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dataDir, "notes.txt"), []byte("mine"), 0o600); err != nil {
			t.Fatal(err)
		}
		logger, _ := newLogger(t)
		c, err := Start(context.Background(), Options{DataDir: dataDir, Fast: true, Logger: logger})
		if err == nil {
			c.Stop()
			t.Fatal("Start on a non-empty, non-cluster directory succeeded")
		}
		if !strings.Contains(err.Error(), "not empty") {
			t.Errorf("error %q does not say the directory is not empty", err)
		}
		if _, err := os.Stat(filepath.Join(dataDir, "notes.txt")); err != nil {
			t.Errorf("the directory's file was touched: %v", err)
		}
	})

	t.Run("ErrUnreachable", func(t *testing.T) {
		if os.Geteuid() != 0 {
			t.Skip("not root: the server runs as the current user, who can reach its own directories")
		}
		private := filepath.Join(traversableDir(t), "private")
		if err := os.Mkdir(private, 0o700); err != nil {
			t.Fatal(err)
		}
		logger, _ := newLogger(t)
		_, err := Start(context.Background(), Options{DataDir: filepath.Join(private, "data"), Fast: true, Logger: logger})
		if err == nil {
			t.Fatal("Start under a directory the postgres user cannot enter succeeded")
		}
		for _, want := range []string{"cannot reach", private, "chmod o+x"} {
			if !strings.Contains(err.Error(), want) {
				t.Errorf("error %q does not contain %q", err, want)
			}
		}
	})

	t.Run("ErrBinDir", func(t *testing.T) {
		logger, _ := newLogger(t)
		_, err := Start(context.Background(), Options{DataDir: filepath.Join(traversableDir(t), "data"), BinDir: t.TempDir(), Logger: logger})
		if err == nil || !strings.Contains(err.Error(), "initdb and postgres") {
			t.Errorf("Start with an empty BinDir: err = %v, want one naming the binaries", err)
		}
	})

	t.Run("ErrServerExits", func(t *testing.T) {
		// A cluster of a version these binaries cannot run: postgres
		// exits at once, and Start must say why without waiting 60 s.
		dataDir := filepath.Join(traversableDir(t), "data")
		c := MustStart(t, Options{DataDir: dataDir, Fast: true})
		if err := c.Stop(); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dataDir, "PG_VERSION"), []byte("99\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		logger, _ := newLogger(t)
		began := time.Now()
		c2, err := Start(context.Background(), Options{DataDir: dataDir, Fast: true, Logger: logger})
		if err == nil {
			c2.Stop()
			t.Fatal("Start on an incompatible cluster succeeded")
		}
		for _, want := range []string{"exited before accepting connections", "incompatible", dataDir + ".log"} {
			if !strings.Contains(err.Error(), want) {
				t.Errorf("error %q does not contain %q", err, want)
			}
		}
		if d := time.Since(began); d > readyTimeout/2 {
			t.Errorf("Start took %v to notice the exit", d)
		}
		if pid := findServerOn(dataDir); pid != 0 {
			t.Errorf("postgres pid %d still running on %s", pid, dataDir)
		}
	})
}

func TestRestartKeepsData(t *testing.T) {
	dataDir := filepath.Join(traversableDir(t), "data")
	c := MustStart(t, Options{DataDir: dataDir}) // durable settings, as in production
	conn := MustConnect(t, c.DSN("lockergate"))
	MustExec(t, conn, "CREATE TABLE lockers (id text PRIMARY KEY)")
	MustExec(t, conn, "INSERT INTO lockers VALUES ('L-1'), ('L-2')")
	conn.Close(context.Background())
	if err := c.Stop(); err != nil {
		t.Fatalf("Stop: %v", err)
	}

	logger, logs := newLogger(t)
	c2 := MustStart(t, Options{DataDir: dataDir, Logger: logger})
	if strings.Contains(logs.String(), "initialising") {
		t.Errorf("restart ran initdb again; log:\n%s", logs)
	}
	conn2 := MustConnect(t, c2.DSN("lockergate"))
	var n int
	MustQueryRow(t, conn2, "SELECT count(*) FROM lockers", &n)
	if got, want := n, 2; got != want {
		t.Errorf("rows after restart = %d, want %d", got, want)
	}
}

// writePidFile leaves a postmaster.pid naming pid, as a crashed server would.
func writePidFile(t testing.TB, dataDir string, pid int) {
	t.Helper()
	body := fmt.Sprintf("%d\n%s\n1700000000\n5432\n/tmp/lgstale\n\n  5432001         0\nready   \n", pid, dataDir)
	if err := os.WriteFile(filepath.Join(dataDir, "postmaster.pid"), []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
}

// deadPID returns the pid of a process that has exited.
func deadPID(t testing.TB) int {
	t.Helper()
	cmd := exec.Command("true")
	if err := cmd.Run(); err != nil {
		t.Fatal(err)
	}
	if isAlive(cmd.Process.Pid) {
		t.Fatalf("pid %d reused already", cmd.Process.Pid)
	}
	return cmd.Process.Pid
}

// startSleeper starts a long sleep as the account the server runs as (so
// that PostgreSQL itself would take its pid for a live postmaster) and ends
// it when the test ends.
func startSleeper(t testing.TB) int {
	t.Helper()
	acct, err := serverAccount()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("sleep", "600")
	cmd.Dir = "/"
	cmd.SysProcAttr = subproc.DieWithParent(&syscall.SysProcAttr{Credential: acct.credential()}, syscall.SIGKILL)
	p, err := spawn(cmd) // Pdeathsig from a thread that stays
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-p.done
	})
	return cmd.Process.Pid
}

func TestStalePidFile(t *testing.T) {
	dataDir := filepath.Join(traversableDir(t), "data")
	first := MustStart(t, Options{DataDir: dataDir, Fast: true})
	if err := first.Stop(); err != nil {
		t.Fatal(err)
	}

	t.Run("DeadPIDRemoved", func(t *testing.T) {
		pid := deadPID(t)
		writePidFile(t, dataDir, pid)
		logger, logs := newLogger(t)
		c := MustStart(t, Options{DataDir: dataDir, Fast: true, Logger: logger})
		if !strings.Contains(logs.String(), "removed stale postmaster.pid") {
			t.Errorf("no warning about the stale postmaster.pid in the log:\n%s", logs)
		}
		conn := MustConnect(t, c.DSN("lockergate"))
		MustExec(t, conn, "SELECT 1")
	})

	t.Run("ReusedPIDRemoved", func(t *testing.T) {
		// The pid is alive but not a postgres: PostgreSQL alone would
		// refuse to start ("Is another postmaster running?").
		pid := startSleeper(t)
		writePidFile(t, dataDir, pid)
		c := MustStart(t, Options{DataDir: dataDir, Fast: true})
		conn := MustConnect(t, c.DSN("lockergate"))
		MustExec(t, conn, "SELECT 1")
	})

	// Without procfs (macOS) a pid cannot be told from a server: a live
	// one is refused with the fix named, a dead one's file removed.
	t.Run("NoProcfs", func(t *testing.T) {
		old := procRoot
		procRoot = filepath.Join(t.TempDir(), "none")
		t.Cleanup(func() { procRoot = old })

		pid := startSleeper(t)
		writePidFile(t, dataDir, pid)
		logger, _ := newLogger(t)
		c, err := Start(context.Background(), Options{DataDir: dataDir, Fast: true, Logger: logger})
		if err == nil {
			c.Stop()
			t.Fatal("Start with a live pid in postmaster.pid and no procfs succeeded")
		}
		want := fmt.Sprintf("its postmaster.pid names pid %d, which is running (this system has no /proc to tell what it is): stop that server (kill -INT %d), or if pid %d is not one, delete %s",
			pid, pid, pid, filepath.Join(dataDir, "postmaster.pid"))
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not contain %q", err, want)
		}
		if _, err := os.Stat(filepath.Join(dataDir, "postmaster.pid")); err != nil {
			t.Errorf("postmaster.pid of a live pid: %v", err)
		}

		writePidFile(t, dataDir, deadPID(t))
		logger, logs := newLogger(t)
		c = MustStart(t, Options{DataDir: dataDir, Fast: true, Logger: logger})
		if !strings.Contains(logs.String(), "removed stale postmaster.pid") {
			t.Errorf("no warning about the stale postmaster.pid in the log:\n%s", logs)
		}
		conn := MustConnect(t, c.DSN("lockergate"))
		MustExec(t, conn, "SELECT 1")
	})

	t.Run("LiveServerRefused", func(t *testing.T) {
		running := MustStart(t, Options{DataDir: dataDir, Fast: true})
		pid := running.proc.cmd.Process.Pid
		logger, _ := newLogger(t)
		c, err := Start(context.Background(), Options{DataDir: dataDir, Fast: true, Logger: logger})
		if err == nil {
			c.Stop()
			t.Fatal("second Start on a running cluster's data directory succeeded")
		}
		want := fmt.Sprintf("another PostgreSQL is running on %s (pid %d)", dataDir, pid)
		if !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), "another lockergate runs with this data directory: stop that gateway") {
			t.Errorf("error %q does not contain %q and what to stop", err, want)
		}
		if _, err := os.Stat(filepath.Join(dataDir, "postmaster.pid")); err != nil {
			t.Errorf("running server's postmaster.pid: %v", err)
		}
		conn := MustConnect(t, running.DSN("lockergate"))
		MustExec(t, conn, "SELECT 1")
	})
}

// TestParentDeathStopsServer kills (SIGKILL) a process that runs a cluster
// and expects the server to go away with it, and the next start to recover.
func TestParentDeathStopsServer(t *testing.T) {
	if !subproc.HasParentDeathSignal {
		t.Skip("no parent-death signal on this system: a killed gateway's server outlives it (README)")
	}
	dataDir := filepath.Join(traversableDir(t), "data")
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), helperModeEnv+"=hold", helperDirEnv+"="+dataDir)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	stdin, err := cmd.StdinPipe() // held open: the helper keeps its cluster until it closes
	if err != nil {
		t.Fatal(err)
	}
	defer stdin.Close()
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	helperGone := false
	defer func() {
		if !helperGone {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
		}
	}()

	pid, socketDir := 0, ""
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		if _, err := fmt.Sscanf(sc.Text(), "PID %d SOCKETDIR %s", &pid, &socketDir); err == nil {
			break
		}
	}
	if pid == 0 {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		helperGone = true
		t.Fatalf("helper printed no postmaster pid; stderr:\n%s", stderr.String())
	}
	// If the server outlives this test, end it: it is ours. The killed
	// helper could not remove its socket directory; do it for it.
	t.Cleanup(func() {
		defer os.RemoveAll(socketDir)
		if isAlive(pid) {
			_ = syscall.Kill(pid, syscall.SIGQUIT)
			if !pollUntil(10*time.Second, func() bool { return !isAlive(pid) }) {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	})
	if !isAlive(pid) {
		t.Fatalf("postmaster %d not running while its parent lives", pid)
	}

	if err := cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	_ = cmd.Wait()
	helperGone = true

	waitFor(t, 30*time.Second, "the postmaster to exit after its parent was killed", func() bool { return !isAlive(pid) })
	waitFor(t, 30*time.Second, "the backends to exit", func() bool { return findServerOn(dataDir) == 0 })

	// The crash left postmaster.pid behind; the next start must recover.
	if _, err := os.Stat(filepath.Join(dataDir, "postmaster.pid")); err != nil {
		t.Logf("no postmaster.pid left behind (%v)", err)
	}
	c := MustStart(t, Options{DataDir: dataDir, Fast: true})
	conn := MustConnect(t, c.DSN("lockergate"))
	MustExec(t, conn, "SELECT 1")
	// The killed helper's socket directory is removed by that start.
	if _, err := os.Lstat(socketDir); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("the killed run's socket directory %s: %v, want removed by the next start", socketDir, err)
	}
}

// TestStaleSocketDir: a start removes the socket directory its data
// directory's previous run recorded, only when that run no longer holds
// the record's lock and the directory looks like one of ours (a "lg..."
// directory, not a symlink, holding PostgreSQL's socket files alone).
func TestStaleSocketDir(t *testing.T) {
	base := t.TempDir()
	logger, logs := newLogger(t)
	c := &Cluster{dataDir: filepath.Join(base, "pg"), logger: logger}
	record := func(dir string) {
		t.Helper()
		if err := os.WriteFile(c.socketDirRecord(), []byte(dir+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	mkdir := func(name string, files ...string) string {
		t.Helper()
		dir := filepath.Join(base, name)
		if err := os.Mkdir(dir, 0o700); err != nil {
			t.Fatal(err)
		}
		for _, f := range files {
			if err := os.WriteFile(filepath.Join(dir, f), nil, 0o600); err != nil {
				t.Fatal(err)
			}
		}
		return dir
	}
	exists := func(p string) bool {
		_, err := os.Lstat(p)
		return err == nil
	}
	// clean is what a start does: it locks the record, and removes the
	// directory it names when it may.
	clean := func() {
		t.Helper()
		rec := c.lockSocketDirRecord()
		if rec == nil {
			t.Fatalf("record not locked; log:\n%s", logs)
		}
		defer rec.Close()
		c.removeStaleSocketDir(rec)
	}
	ours := mkdir("lg123", ".s.PGSQL.5432", ".s.PGSQL.5432.lock")
	// A run still holding its record (another start on this data
	// directory, whose server may not be up yet) keeps its directory.
	record(ours)
	live := c.lockSocketDirRecord()
	if live == nil {
		t.Fatal("record not locked")
	}
	if c.lockSocketDirRecord() != nil || !exists(ours) {
		t.Fatal("a second start locked a record a running start holds")
	}
	live.Close() // that run is gone
	clean()
	if exists(ours) {
		t.Fatalf("%s left; log:\n%s", ours, logs)
	}
	clean() // gone already: nothing to do, nothing to say
	if strings.Contains(logs.String(), "left in place") {
		t.Fatalf("a recorded directory that is gone was reported; log:\n%s", logs)
	}

	foreign := mkdir("lg456", ".s.PGSQL.5432", "notes.txt")
	link := filepath.Join(base, "lg789")
	if err := os.Symlink(mkdir("target"), link); err != nil {
		t.Fatal(err)
	}
	other := mkdir("other", ".s.PGSQL.5432")
	for _, dir := range []string{foreign, link, other, "lg-relative"} {
		record(dir)
		clean()
		if filepath.IsAbs(dir) && !exists(dir) {
			t.Fatalf("%s removed, want left", dir)
		}
	}
	if n := strings.Count(logs.String(), "left in place"); n != 4 {
		t.Fatalf("%d directories reported left, want 4; log:\n%s", n, logs)
	}
	if n := strings.Count(logs.String(), "held by another start"); n != 1 {
		t.Fatalf("%d records reported held, want 1; log:\n%s", n, logs)
	}
	if !exists(filepath.Join(base, "target")) {
		t.Fatal("a symlink's target was removed")
	}
}

// TestNotRoot runs a cluster from a process that is not root, the way
// developers run it: the server then runs as that user. When the tests run
// as an unprivileged user every other test covers this already.
func TestNotRoot(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("not root: the other tests already run the server as the current user")
	}
	acct, err := serverAccount()
	if err != nil {
		t.Fatal(err)
	}
	dir := traversableDir(t)
	// The test binary lives in a directory only root can enter: copy it.
	bin := filepath.Join(dir, "pgcluster.test")
	src, err := os.ReadFile(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bin, src, 0o755); err != nil {
		t.Fatal(err)
	}
	home := filepath.Join(dir, "home")
	if err := os.Mkdir(home, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := acct.chownTree(home); err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, "-test.run=^$")
	cmd.Dir = home
	cmd.Env = append(os.Environ(), "HOME="+home, helperModeEnv+"=roundtrip", helperDirEnv+"="+filepath.Join(home, "data"))
	cmd.SysProcAttr = subproc.DieWithParent(&syscall.SysProcAttr{Credential: acct.credential()}, syscall.SIGKILL)
	var buf bytes.Buffer
	cmd.Stdout, cmd.Stderr = &buf, &buf
	p, err := spawn(cmd) // Pdeathsig from a thread that stays
	if err != nil {
		t.Fatal(err)
	}
	<-p.done
	out, err := buf.Bytes(), p.err()
	if err != nil {
		t.Fatalf("helper as %s: %v; output:\n%s", acct.name, err, out)
	}
	want := fmt.Sprintf("OK euid=%d user=postgres", acct.uid)
	if !strings.Contains(string(out), want) {
		t.Errorf("helper output does not contain %q:\n%s", want, out)
	}
	if strings.Contains(string(out), "running PostgreSQL as a system user") {
		t.Errorf("an unprivileged process tried to switch users:\n%s", out)
	}
}

func TestDSN(t *testing.T) {
	c := &Cluster{socketDir: "/tmp/lg 1'x"}
	for _, db := range []string{"lockergate", "my app", `we'ird\name`} {
		cfg, err := pgconn.ParseConfig(c.DSN(db))
		if err != nil {
			t.Fatalf("ParseConfig(%q): %v", c.DSN(db), err)
		}
		if cfg.Host != c.socketDir || cfg.Port != 5432 || cfg.User != "postgres" || cfg.Database != db {
			t.Errorf("DSN(%q) = %q parses to host=%q port=%d user=%q dbname=%q", db, c.DSN(db), cfg.Host, cfg.Port, cfg.User, cfg.Database)
		}
	}
	if got, want := (&Cluster{socketDir: "/tmp/lg123"}).DSN("x"), "host=/tmp/lg123 port=5432 user=postgres dbname=x sslmode=disable"; got != want {
		t.Errorf("DSN = %q, want %q", got, want)
	}
}

// TestKilledServerStartedAgain: a server killed outright (kill -9, the OOM
// killer) is started again on the same socket, with what it had committed,
// so its clients reconnect and a gateway's queued writes get stored; Stop
// then stops the new one.
func TestKilledServerStartedAgain(t *testing.T) {
	logger, logs := newLogger(t)
	c := MustStart(t, Options{DataDir: filepath.Join(traversableDir(t), "data"), Logger: logger})
	conn := MustConnect(t, c.DSN("lockergate"))
	MustExec(t, conn, "CREATE TABLE events (id text PRIMARY KEY)")
	MustExec(t, conn, "INSERT INTO events VALUES ('e-1')")
	conn.Close(context.Background())
	c.mu.Lock()
	killed := c.proc
	c.mu.Unlock()
	if err := killed.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	<-killed.done
	var n int
	waitFor(t, 90*time.Second, "the server started again", func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		conn, err := pgx.Connect(ctx, c.DSN("lockergate"))
		if err != nil {
			return false
		}
		defer conn.Close(ctx)
		return conn.QueryRow(ctx, "SELECT count(*) FROM events").Scan(&n) == nil
	})
	if n != 1 {
		t.Errorf("%d rows after the restart, want 1", n)
	}
	if !strings.Contains(logs.String(), "PostgreSQL exited unexpectedly") {
		t.Errorf("no error logged for the exit; log:\n%s", logs)
	}
	c.mu.Lock()
	now := c.proc
	c.mu.Unlock()
	if now == killed {
		t.Fatal("the cluster still names the killed process")
	}
	if err := c.Stop(); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	if !now.exited() {
		t.Fatal("Stop left the new server running")
	}
}

// TestStartWaitsForAServerOnItsWayOut: a start that finds a server still
// running on its data directory (that of a gateway killed a moment ago,
// still shutting down) waits for it to exit and then starts, instead of
// sending the operator to kill a process that is going away.
func TestStartWaitsForAServerOnItsWayOut(t *testing.T) {
	defer func(g time.Duration) { exitGrace = g }(exitGrace)
	exitGrace = 60 * time.Second
	dataDir := filepath.Join(traversableDir(t), "data")
	old, err := Start(context.Background(), Options{DataDir: dataDir, Fast: true})
	if err != nil {
		t.Fatal(err)
	}
	old.mu.Lock()
	old.stopping = true // its gateway is gone: nothing starts it again
	p := old.proc
	old.mu.Unlock()
	defer old.Stop()
	pid := p.cmd.Process.Pid
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil { // held alive until the new start waits
		t.Fatal(err)
	}
	defer syscall.Kill(pid, syscall.SIGCONT) // a failed test leaves no stopped server behind
	logger, logs := newLogger(t)
	started := make(chan error, 1)
	var c *Cluster
	go func() {
		var err error
		c, err = Start(context.Background(), Options{DataDir: dataDir, Fast: true, Logger: logger})
		started <- err
	}()
	waitFor(t, 30*time.Second, "the start waiting", func() bool { return strings.Contains(logs.String(), "waiting for it to exit") })
	// Its immediate shutdown, as the parent-death signal asks.
	if err := syscall.Kill(pid, syscall.SIGQUIT); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(pid, syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	if err := <-started; err != nil {
		t.Fatalf("Start after the old server exited: %v", err)
	}
	defer c.Stop()
	conn := MustConnect(t, c.DSN("lockergate"))
	MustExec(t, conn, "SELECT 1")
}
