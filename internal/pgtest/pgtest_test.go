package pgtest

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

func TestMain(m *testing.M) { os.Exit(Main(m)) }

// MustConnect connects to dsn and closes the connection when the test ends.
func MustConnect(tb testing.TB, dsn string) *pgx.Conn {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		tb.Fatalf("connect %q: %v", dsn, err)
	}
	tb.Cleanup(func() { conn.Close(context.Background()) })
	return conn
}

// MustQueryRow runs sql and scans its single row into dest.
func MustQueryRow(tb testing.TB, conn *pgx.Conn, sql string, dest ...any) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := conn.QueryRow(ctx, sql).Scan(dest...); err != nil {
		tb.Fatalf("%s: %v", sql, err)
	}
}

// MustExec runs sql.
func MustExec(tb testing.TB, conn *pgx.Conn, sql string) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := conn.Exec(ctx, sql); err != nil {
		tb.Fatalf("%s: %v", sql, err)
	}
}

func TestNewDB(t *testing.T) {
	t.Run("Isolated", func(t *testing.T) {
		a, b := NewDB(t), NewDB(t)
		if a == b {
			t.Fatalf("two NewDB calls returned the same DSN %q", a)
		}
		ca, cb := MustConnect(t, a), MustConnect(t, b)
		MustExec(t, ca, "CREATE TABLE lockers (id text PRIMARY KEY)")
		MustExec(t, ca, "INSERT INTO lockers VALUES ('L-1')")

		var dbA, dbB string
		MustQueryRow(t, ca, "SELECT current_database()", &dbA)
		MustQueryRow(t, cb, "SELECT current_database()", &dbB)
		if dbA == dbB {
			t.Errorf("both DSNs lead to database %q", dbA)
		}
		var seen *string
		MustQueryRow(t, cb, "SELECT to_regclass('lockers')::text", &seen)
		if seen != nil {
			t.Errorf("table created in %s is visible in %s as %s", dbA, dbB, *seen)
		}
		var tables int
		MustQueryRow(t, cb, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'", &tables)
		if tables != 0 {
			t.Errorf("fresh database %s has %d tables, want 0", dbB, tables)
		}
	})

	t.Run("DroppedAfterTest", func(t *testing.T) {
		var name string
		t.Run("Inner", func(t *testing.T) {
			conn := MustConnect(t, NewDB(t))
			MustQueryRow(t, conn, "SELECT current_database()", &name)
		})
		other := MustConnect(t, NewDB(t))
		var n int
		MustQueryRow(t, other, fmt.Sprintf("SELECT count(*) FROM pg_database WHERE datname = '%s'", name), &n)
		if n != 0 {
			t.Errorf("database %s still exists after its test ended", name)
		}
	})

	t.Run("DroppedWithOpenConnection", func(t *testing.T) {
		var name string
		var leaked *pgx.Conn
		t.Run("Inner", func(t *testing.T) {
			dsn := NewDB(t)
			var err error
			leaked, err = pgx.Connect(context.Background(), dsn) // never closed by the test
			if err != nil {
				t.Fatal(err)
			}
			MustQueryRow(t, leaked, "SELECT current_database()", &name)
		})
		defer leaked.Close(context.Background())
		other := MustConnect(t, NewDB(t))
		var n int
		MustQueryRow(t, other, fmt.Sprintf("SELECT count(*) FROM pg_database WHERE datname = '%s'", name), &n)
		if n != 0 {
			t.Errorf("database %s with an open connection still exists after its test ended", name)
		}
	})

	t.Run("Parallel", func(t *testing.T) {
		for i := range 4 {
			t.Run(fmt.Sprint(i), func(t *testing.T) {
				t.Parallel()
				conn := MustConnect(t, NewDB(t))
				MustExec(t, conn, "CREATE TABLE t (n int)")
				MustExec(t, conn, fmt.Sprintf("INSERT INTO t VALUES (%d)", i))
				var sum int
				MustQueryRow(t, conn, "SELECT sum(n) FROM t", &sum)
				if sum != i {
					t.Errorf("sum = %d, want %d: databases are shared", sum, i)
				}
			})
		}
	})
}

func TestDBName(t *testing.T) {
	valid := regexp.MustCompile(`^[a-z0-9_]+$`)
	long := "TestSomething/" + strings.Repeat("Very Long Sub-Test Name ", 10)
	for _, tc := range []struct {
		n    int64
		name string
		want string
	}{
		{1, "TestStore/OK", "t_1_teststore_ok"},
		{12, "TestX/ünïcode#01", "t_12_testx__n_code_01"},
		{3, long, ""},
	} {
		got := dbName(tc.n, tc.name)
		if len(got) > maxIdentLen {
			t.Errorf("dbName(%d, %q) = %q: %d bytes, over %d", tc.n, tc.name, got, len(got), maxIdentLen)
		}
		if !valid.MatchString(got) {
			t.Errorf("dbName(%d, %q) = %q: not a plain identifier", tc.n, tc.name, got)
		}
		if prefix := fmt.Sprintf("t_%d_", tc.n); !strings.HasPrefix(got, prefix) {
			t.Errorf("dbName(%d, %q) = %q, want prefix %q", tc.n, tc.name, got, prefix)
		}
		if tc.want != "" && got != tc.want {
			t.Errorf("dbName(%d, %q) = %q, want %q", tc.n, tc.name, got, tc.want)
		}
	}
	if a, b := dbName(1, long), dbName(2, long); a == b {
		t.Errorf("names for different sequence numbers collide: %q", a)
	}
}

// TestSweep: a cluster directory whose owner process is gone (or whose pid
// now names another process) is removed, with the socket directory its
// cluster recorded outside it; one whose owner lives, and one with no owner
// file yet, are not. A recorded socket directory is kept while another
// process holds the record (another sweep) or when it holds a file that is
// not PostgreSQL's.
func TestSweep(t *testing.T) {
	root := t.TempDir()
	ended := exec.Command("true")
	if err := ended.Run(); err != nil {
		t.Fatal(err)
	}
	self := os.Getpid()
	if procStart(self) == "" {
		if _, err := os.Stat("/proc/self"); err != nil && runtime.GOOS != "linux" {
			t.Skip("no /proc here: test directories are not swept on this system")
		}
		t.Fatal("no start time for this process: /proc/self/stat unreadable")
	}
	owners := map[string]string{
		"lgtest-ended":  fmt.Sprintf("%d %s", ended.Process.Pid, "1"),
		"lgtest-reused": fmt.Sprintf("%d %s", self, "0"),
		"lgtest-live":   fmt.Sprintf("%d %s", self, procStart(self)),
		"lgtest-new":    "",
		"lgtest-held":   fmt.Sprintf("%d %s", ended.Process.Pid, "1"),
		"lgtest-other":  fmt.Sprintf("%d %s", ended.Process.Pid, "1"),
	}
	for name, owner := range owners {
		dir := filepath.Join(root, name)
		if err := os.MkdirAll(filepath.Join(dir, "data"), 0o700); err != nil {
			t.Fatal(err)
		}
		if owner != "" {
			if err := os.WriteFile(filepath.Join(dir, ownerFile), []byte(owner+"\n"), 0o600); err != nil {
				t.Fatal(err)
			}
		}
		// The cluster's socket directory, outside its own (as pgcluster
		// makes it: "lg" and random), recorded beside its data directory.
		sock := filepath.Join(root, "lgsock-"+name)
		if err := os.Mkdir(sock, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(sock, ".s.PGSQL.5432.lock"), nil, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "data.socketdir"), []byte(sock+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(root, "lgsock-lgtest-other", "notes.txt"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	held, err := os.Open(filepath.Join(root, "lgtest-held", "data.socketdir"))
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	if err := syscall.Flock(int(held.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		t.Fatal(err)
	}
	gone := sweep(root)
	slices.Sort(gone)
	if want := []string{filepath.Join(root, "lgtest-ended"), filepath.Join(root, "lgtest-held"), filepath.Join(root, "lgtest-other"),
		filepath.Join(root, "lgtest-reused")}; !slices.Equal(gone, want) {
		t.Fatalf("swept %v, want %v", gone, want)
	}
	for _, name := range []string{"lgtest-held", "lgtest-other"} {
		if _, err := os.Stat(filepath.Join(root, "lgsock-"+name)); err != nil {
			t.Errorf("the socket directory of %s: %v, want it kept", name, err)
		}
	}
	for _, name := range []string{"lgtest-live", "lgtest-new"} {
		for _, kept := range []string{filepath.Join(root, name, "data"), filepath.Join(root, "lgsock-"+name)} {
			if _, err := os.Stat(kept); err != nil {
				t.Errorf("%s: %v, want it kept", kept, err)
			}
		}
	}
	for _, name := range []string{"lgtest-ended", "lgtest-reused"} {
		if _, err := os.Stat(filepath.Join(root, "lgsock-"+name)); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("the socket directory of %s: %v, want it removed", name, err)
		}
	}

	NewDB(t) // the shared cluster's directory names this binary as its owner
	if b, err := os.ReadFile(filepath.Join(baseDir, ownerFile)); err != nil || string(b) != fmt.Sprintf("%d %s\n", self, procStart(self)) {
		t.Errorf("the shared cluster's owner file: %q (%v), want this binary's pid and start", b, err)
	}
}
