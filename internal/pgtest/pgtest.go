// Package pgtest gives tests a real PostgreSQL: one throwaway cluster per test
// binary, started from the machine's server binaries on first use, and a
// fresh, empty database per test.
//
// A package using it needs a TestMain that stops the cluster afterwards:
//
//	func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }
package pgtest

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/lockergate/lockergate/internal/pgcluster"
)

// AdvisoryLocksSQL counts the advisory locks in the current database
// (the cluster is shared with other tests' databases), granted ($1 true)
// or waited for ($1 false).
const AdvisoryLocksSQL = `SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted = $1
	AND database = (SELECT oid FROM pg_database WHERE datname = current_database())`

// maxIdentLen is PostgreSQL's identifier limit (NAMEDATALEN-1) in bytes.
const maxIdentLen = 63

var (
	mainRunning atomic.Bool  // set by Main: the cluster will be stopped
	seq         atomic.Int64 // makes database names unique within the binary

	// mu guards the shared cluster. It is held while the cluster starts so
	// that parallel tests wait for the one start instead of racing it; it
	// works like a sync.Once that Main can also close.
	mu       sync.Mutex
	started  bool
	stopped  bool
	cluster  *pgcluster.Cluster
	baseDir  string
	startErr error
)

// Main runs the tests of a package and stops the shared cluster afterwards,
// returning the exit code for os.Exit (it does not exit itself, so a TestMain
// can do more after it). A cluster that fails to stop cleanly, e.g. because
// it crashed during the tests, turns a passing run into a failing one.
func Main(m *testing.M) int {
	mainRunning.Store(true)
	code := m.Run()
	if err := stop(); err != nil {
		fmt.Fprintf(os.Stderr, "pgtest: %v\n", err)
		if code == 0 {
			code = 1
		}
	}
	return code
}

// NewDB creates a fresh, empty database on the shared cluster (started on
// first use, with Fast=true, in a temp dir) and returns its DSN; the database
// is dropped in tb.Cleanup. Without PostgreSQL server binaries the test fails
// with the install hint: storage tests must not pass by skipping.
func NewDB(tb testing.TB) string {
	tb.Helper()
	if !mainRunning.Load() {
		tb.Fatalf("pgtest.NewDB: the test binary does not run pgtest.Main, so the cluster would never be stopped; add\n\tfunc TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }")
	}
	c, err := sharedCluster()
	if err != nil {
		tb.Fatalf("pgtest: start the shared PostgreSQL cluster: %v", err)
	}
	name := dbName(seq.Add(1), tb.Name())
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := admin(ctx, c, "CREATE DATABASE "+pgx.Identifier{name}.Sanitize()); err != nil {
		tb.Fatalf("pgtest: create database %s: %v", name, err)
	}
	tb.Cleanup(func() {
		// Not tb.Context(): it is already cancelled when cleanups run.
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		// FORCE ends connections the test left open (a pool not closed).
		if err := admin(ctx, c, "DROP DATABASE IF EXISTS "+pgx.Identifier{name}.Sanitize()+" WITH (FORCE)"); err != nil {
			tb.Errorf("pgtest: drop database %s: %v", name, err)
		}
	})
	return c.DSN(name)
}

// sharedCluster starts the cluster on first use and returns it.
func sharedCluster() (*pgcluster.Cluster, error) {
	mu.Lock()
	defer mu.Unlock()
	if stopped {
		return nil, errors.New("pgtest.Main has already stopped the cluster")
	}
	if !started {
		started = true
		cluster, baseDir, startErr = start()
	}
	return cluster, startErr
}

func start() (*pgcluster.Cluster, string, error) {
	if gone := sweep(os.TempDir()); len(gone) > 0 {
		fmt.Fprintf(os.Stderr, "pgtest: removed %d cluster directories left by test binaries that were killed: %s\n", len(gone), strings.Join(gone, " "))
	}
	dir, err := os.MkdirTemp("", "lgtest")
	if err != nil {
		return nil, "", err
	}
	// When tests run as root the server runs as the postgres system user,
	// which must be able to traverse this directory to its data directory.
	if err := os.Chmod(dir, 0o711); err != nil {
		os.RemoveAll(dir)
		return nil, "", err
	}
	self := os.Getpid()
	if err := os.WriteFile(filepath.Join(dir, ownerFile), fmt.Appendf(nil, "%d %s\n", self, procStart(self)), 0o644); err != nil {
		os.RemoveAll(dir)
		return nil, "", err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c, err := pgcluster.Start(ctx, pgcluster.Options{
		DataDir:  filepath.Join(dir, "data"),
		Fast:     true,
		Database: "postgres", // tests get their own databases from NewDB
		Logger:   logger(),
	})
	if err != nil {
		os.RemoveAll(dir)
		return nil, "", err
	}
	return c, dir, nil
}

// logger logs the cluster's warnings: progress messages would clutter every
// test binary's output.
func logger() *slog.Logger {
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
}

// ownerFile, in a cluster's base directory, names the test binary that
// owns it: its pid and its start time, so that a directory left by a
// binary killed mid-run (by its timeout: Main's cleanup never ran, and the
// cluster died with it, by its parent-death signal) can be told from one
// in use, whatever the pid is used for since.
const ownerFile = "owner"

// procStart is process pid's start time in clock ticks since boot
// (/proc/<pid>/stat, field 22); "" when there is no such process.
func procStart(pid int) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return ""
	}
	// Field 2, the command name, is in parentheses and may hold spaces.
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return ""
	}
	f := strings.Fields(string(b[i+1:])) // from field 3 on
	if len(f) < 20 {
		return ""
	}
	return f[19]
}

// sweep removes the lgtest* directories under root whose owner is gone,
// with the socket directory each cluster recorded (outside it, and left
// behind too), and returns them. One without an owner file (being made, or
// from an older binary) is left alone, and so is another user's.
func sweep(root string) []string {
	dirs, _ := filepath.Glob(filepath.Join(root, "lgtest*"))
	var gone []string
	for _, d := range dirs {
		if fi, err := os.Stat(d); err != nil || !ownedByMe(fi) {
			continue
		}
		b, err := os.ReadFile(filepath.Join(d, ownerFile))
		if err != nil {
			continue
		}
		var pid int
		var started string
		if _, err := fmt.Sscan(string(b), &pid, &started); err != nil || procStart(pid) == started {
			continue
		}
		pgcluster.RemoveStaleSocketDir(filepath.Join(d, "data"), logger())
		if os.RemoveAll(d) == nil {
			gone = append(gone, d)
		}
	}
	return gone
}

// ownedByMe reports whether this process's user owns fi's file.
func ownedByMe(fi os.FileInfo) bool {
	st, ok := fi.Sys().(*syscall.Stat_t)
	return ok && int(st.Uid) == os.Getuid()
}

// stop stops the cluster, if it was started, and removes its files.
func stop() error {
	mu.Lock()
	defer mu.Unlock()
	stopped = true
	if cluster == nil {
		return nil
	}
	err := cluster.Stop()
	if rmErr := os.RemoveAll(baseDir); rmErr != nil && err == nil {
		err = rmErr
	}
	return err
}

// admin runs one statement as superuser in the postgres database.
// CREATE/DROP DATABASE cannot run inside the database they act on.
func admin(ctx context.Context, c *pgcluster.Cluster, sql string) error {
	conn, err := pgx.Connect(ctx, c.DSN("postgres"))
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	_, err = conn.Exec(ctx, sql)
	return err
}

// dbName makes a database name from a sequence number, unique within the
// binary, and the test name, for finding a test's database when debugging.
func dbName(n int64, testName string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "t_%d_", n)
	for _, r := range strings.ToLower(testName) {
		if b.Len() >= maxIdentLen {
			break
		}
		if (r >= 'a' && r <= 'z') || (r >= '0' && r <= '9') || r == '_' {
			b.WriteRune(r)
		} else {
			b.WriteByte('_')
		}
	}
	return b.String()
}
