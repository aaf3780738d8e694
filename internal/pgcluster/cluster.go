// Package pgcluster runs a private PostgreSQL cluster from the machine's own
// server binaries: lockergate's embedded database when no DATABASE_URL is
// given, and the throwaway database of tests.
//
// The cluster listens only on a unix socket in a fresh 0700 directory, so
// trust authentication is safe, and its superuser is always "postgres".
package pgcluster

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/lockergate/lockergate/internal/subproc"
)

const (
	// superuser is the cluster's superuser (initdb -U), whoever runs it.
	superuser = "postgres"
	// port only names the socket file: the server listens on no TCP port.
	port = 5432
	// maxSocketPath is the usable length of sun_path on Linux.
	maxSocketPath = 107
	// readyTimeout bounds crash recovery plus start-up.
	readyTimeout = 60 * time.Second
	// tailLines is how much of the server log goes into an error.
	tailLines = 20
)

// stopTimeout bounds a fast shutdown before falling back to an immediate
// one, and killTimeout the immediate one before the server's processes are
// killed (a server that does not run at all: stopped, or hung in the
// kernel). Variables for the tests.
var (
	stopTimeout = 30 * time.Second
	killTimeout = 10 * time.Second
)

// Options configure a private cluster.
type Options struct {
	DataDir  string       // cluster files live here (created with initdb when empty/missing)
	BinDir   string       // optional; default: FindBinDir()
	Logger   *slog.Logger // optional; default slog.Default()
	Fast     bool         // tests only: -c fsync=off -c synchronous_commit=off -c full_page_writes=off
	Database string       // database to create if missing after start; default "lockergate"
}

// Cluster is a running private PostgreSQL server.
type Cluster struct {
	dataDir   string
	socketDir string
	// socketRecord is the record of socketDir (socketDirRecord), open and
	// locked while this cluster runs; nil when it could not be.
	socketRecord *os.File
	logPath      string
	logOffset    int64 // where this run's output starts in the log
	logFile      *os.File
	logger       *slog.Logger
	command      func() *exec.Cmd // a new postgres process for the cluster

	mu       sync.Mutex // guards proc and stopping
	proc     *process   // the server; replaced when supervise restarts it
	stopping bool
	stopped  chan struct{} // closed by Stop: supervise's back-off ends

	stopOnce sync.Once
	stopErr  error
}

// Start initialises DataDir if needed, starts postgres on it, waits until it
// accepts connections and creates opts.Database if missing. The server runs
// until Stop, or until this process dies.
func Start(ctx context.Context, opts Options) (*Cluster, error) {
	logger := opts.Logger
	if logger == nil {
		logger = slog.Default()
	}
	if opts.DataDir == "" {
		return nil, errors.New("start PostgreSQL: no data directory given")
	}
	dataDir, err := filepath.Abs(opts.DataDir)
	if err != nil {
		return nil, fmt.Errorf("start PostgreSQL: data directory %q: %w", opts.DataDir, err)
	}
	database := opts.Database
	if database == "" {
		database = "lockergate"
	}
	binDir := opts.BinDir
	if binDir == "" {
		if binDir, err = FindBinDir(); err != nil {
			return nil, err
		}
	} else if !hasServerBinaries(binDir) {
		return nil, fmt.Errorf("start PostgreSQL: %s does not hold the server binaries initdb and postgres: point the bin directory at a PostgreSQL installation (e.g. /usr/lib/postgresql/15/bin)", binDir)
	}
	acct, err := serverAccount()
	if err != nil {
		return nil, err
	}
	if acct != nil {
		logger.Info("running PostgreSQL as a system user: initdb and postgres refuse to run as root",
			"user", acct.name, "uid", acct.uid, "gid", acct.gid, "data_dir", dataDir)
	}

	initialised, err := prepareDataDir(dataDir, acct)
	if err != nil {
		return nil, err
	}

	c := &Cluster{dataDir: dataDir, logPath: dataDir + ".log", logger: logger, stopped: make(chan struct{})}
	c.logFile, err = os.OpenFile(c.logPath, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("start PostgreSQL: open its log: %w", err)
	}
	if fi, err := c.logFile.Stat(); err == nil {
		c.logOffset = fi.Size()
	}
	fail := func(err error) (*Cluster, error) {
		if c.proc != nil && !c.proc.exited() {
			if stopErr := c.Stop(); stopErr != nil {
				logger.Warn("stop PostgreSQL after failed start", "err", stopErr)
			}
		} else {
			c.release()
		}
		return nil, err
	}
	fmt.Fprintf(c.logFile, "\n==== %s lockergate: starting PostgreSQL on %s with %s\n", time.Now().Format(time.RFC3339), dataDir, binDir)

	if !initialised {
		logger.Info("initialising PostgreSQL data directory", "data_dir", dataDir, "bin_dir", binDir)
		if err := c.initdb(ctx, binDir, acct, opts.Fast); err != nil {
			return fail(err)
		}
	}
	if err := clearPidFileWhenGone(ctx, dataDir, logger); err != nil {
		return fail(err)
	}

	c.socketRecord = c.lockSocketDirRecord()
	if c.socketRecord != nil {
		c.removeStaleSocketDir(c.socketRecord)
	}
	c.socketDir, err = os.MkdirTemp("", "lg")
	if err != nil {
		return fail(fmt.Errorf("start PostgreSQL: create socket directory: %w", err))
	}
	if c.socketRecord != nil {
		if err := writeRecord(c.socketRecord, c.socketDir); err != nil {
			logger.Warn("socket directory not recorded: if this gateway is killed, the next start cannot remove it", "dir", c.socketDir, "err", err)
		}
	}
	if n := len(filepath.Join(c.socketDir, fmt.Sprintf(".s.PGSQL.%d", port))); n > maxSocketPath {
		return fail(fmt.Errorf("start PostgreSQL: socket path in %s is %d bytes, over the %d-byte limit of unix sockets: set TMPDIR to a short directory such as /tmp", c.socketDir, n, maxSocketPath))
	}
	if err := acct.checkReachable(c.socketDir); err != nil {
		return fail(fmt.Errorf("start PostgreSQL: socket directory: %w", err))
	}
	if err := acct.chownTree(c.socketDir); err != nil {
		return fail(fmt.Errorf("start PostgreSQL: socket directory: %w", err))
	}

	args := []string{"-D", dataDir, "-k", c.socketDir, "-c", "listen_addresses=", "-p", fmt.Sprint(port),
		// A new 16 MB WAL segment is zero-filled by the backend that needs
		// it, holding the WAL write lock: every commit then waits 50-90 ms
		// on this class of machine (every ~4 s at 5,000 health msgs/s
		// until checkpoints recycle old segments). Not zero-filling it
		// loses no safety: running out of disk while writing WAL stops
		// PostgreSQL either way (docs/operations.md).
		"-c", "wal_init_zero=off"}
	if opts.Fast {
		args = append(args, "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off")
	}
	c.command = func() *exec.Cmd {
		cmd := exec.Command(filepath.Join(binDir, "postgres"), args...)
		cmd.Dir = dataDir
		cmd.Stdout, cmd.Stderr = c.logFile, c.logFile
		cmd.SysProcAttr = subproc.DieWithParent(&syscall.SysProcAttr{
			Credential: acct.credential(),
			// Its own process group: a Ctrl-C in the terminal reaches only the
			// gateway, which flushes its writes and then stops PostgreSQL.
			Setpgid: true,
			// SIGQUIT is an immediate shutdown: the postmaster stops its
			// backends and exits; crash recovery runs on the next start.
		}, syscall.SIGQUIT)
		return cmd
	}
	logger.Info("starting PostgreSQL", "data_dir", dataDir, "socket_dir", c.socketDir, "log", c.logPath, "fast", opts.Fast)
	started := time.Now()
	cmd := c.command()
	if c.proc, err = spawn(cmd); err != nil {
		return fail(fmt.Errorf("start PostgreSQL: run %s: %w", cmd.Path, err))
	}
	if err := c.waitReady(ctx, c.proc); err != nil {
		return fail(err)
	}
	if err := c.ensureDatabase(ctx, database); err != nil {
		return fail(err)
	}
	logger.Info("PostgreSQL ready", "pid", cmd.Process.Pid, "database", database, "took", time.Since(started).Round(time.Millisecond))
	go c.supervise(c.proc)
	return c, nil
}

// supervise starts the server again each time it exits without Stop (it
// was killed, or crashed): the gateway's connections then reconnect, and
// what it acknowledged and holds in memory (locker events) is stored, where
// a gateway left on a dead database would hold it until it stops and lose
// it. PostgreSQL runs its crash recovery; a start it refuses (backends of
// the killed server still attached, say) is tried again with a back-off.
func (c *Cluster) supervise(p *process) {
	backoff := time.Second
	started := time.Now()
	// wait waits out the back-off, or until Stop; false when stopping.
	wait := func() bool {
		t := time.NewTimer(backoff)
		defer t.Stop()
		select {
		case <-c.stopped:
			return false
		case <-t.C:
		}
		backoff = min(2*backoff, 30*time.Second)
		return true
	}
	for {
		<-p.done
		if c.isStopping() {
			return
		}
		c.logger.Error("PostgreSQL exited unexpectedly: starting it again", "status", p.exitStatus(), "data_dir", c.dataDir,
			"log", c.logPath, "log_tail", logTail(c.logPath, c.logOffset, tailLines))
		if time.Since(started) < crashLoop {
			// It died soon after a start: a crash loop is not run flat out.
			if !wait() {
				return
			}
		} else {
			backoff = time.Second
		}
		for {
			next, err := c.restart()
			if next != nil {
				p, started = next, time.Now()
				break
			}
			if c.isStopping() {
				return
			}
			c.logger.Error("PostgreSQL did not start again: retrying", "err", err, "retry_in", backoff,
				"hint", "the server log says why; the gateway stays unready (/readyz) until the database is back")
			if !wait() {
				return
			}
		}
	}
}

func (c *Cluster) isStopping() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.stopping
}

// crashLoop is how soon after a start an exit counts as a crash loop,
// whose restarts back off.
const crashLoop = 30 * time.Second

// restart starts a new server process and waits until it accepts
// connections; it returns nil and no error when the cluster is stopping.
func (c *Cluster) restart() (*process, error) {
	c.mu.Lock()
	if c.stopping {
		c.mu.Unlock()
		return nil, nil
	}
	cmd := c.command()
	p, err := spawn(cmd)
	if err == nil {
		c.proc = p
	}
	c.mu.Unlock()
	if err != nil {
		return nil, fmt.Errorf("run %s: %w", cmd.Path, err)
	}
	started := time.Now()
	if err := c.waitReady(context.Background(), p); err != nil {
		if !p.exited() {
			return p, nil // up but not ready in time: supervised like a running server
		}
		return nil, err
	}
	c.logger.Info("PostgreSQL started again", "pid", cmd.Process.Pid, "took", time.Since(started).Round(time.Millisecond))
	return p, nil
}

// prepareDataDir creates dataDir if missing, gives it to acct and reports
// whether it already holds a cluster.
func prepareDataDir(dataDir string, acct *account) (initialised bool, err error) {
	// Parents are created traversable so that the server account can reach
	// the data directory; the directory itself is private (initdb wants 0700).
	if err := os.MkdirAll(filepath.Dir(dataDir), 0o755); err != nil {
		return false, fmt.Errorf("start PostgreSQL: create parent of data directory: %w", err)
	}
	if err := os.Mkdir(dataDir, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
		return false, fmt.Errorf("start PostgreSQL: create data directory: %w", err)
	}
	if _, err := os.Stat(filepath.Join(dataDir, "PG_VERSION")); err == nil {
		initialised = true
	} else if !errors.Is(err, fs.ErrNotExist) {
		return false, fmt.Errorf("start PostgreSQL: inspect data directory: %w", err)
	}
	if !initialised {
		entries, err := os.ReadDir(dataDir)
		if err != nil {
			return false, fmt.Errorf("start PostgreSQL: inspect data directory: %w", err)
		}
		if len(entries) > 0 {
			return false, fmt.Errorf("start PostgreSQL: data directory %s is not empty and holds no PostgreSQL cluster (no PG_VERSION): empty it or choose another --data-dir", dataDir)
		}
	}
	if err := acct.checkReachable(dataDir); err != nil {
		return false, fmt.Errorf("start PostgreSQL: data directory: %w", err)
	}
	if err := acct.chownTree(dataDir); err != nil {
		return false, fmt.Errorf("start PostgreSQL: data directory: %w", err)
	}
	return initialised, nil
}

// initdb creates the cluster in the (empty) data directory.
func (c *Cluster) initdb(ctx context.Context, binDir string, acct *account, fast bool) error {
	args := []string{"-D", c.dataDir, "-U", superuser, "--auth=trust", "--encoding=UTF8", "--locale=C"}
	if fast {
		args = append(args, "--no-sync")
	}
	cmd := exec.CommandContext(ctx, filepath.Join(binDir, "initdb"), args...)
	cmd.Dir = c.dataDir
	cmd.Stdout, cmd.Stderr = c.logFile, c.logFile
	// SIGTERM, not the default SIGKILL, so that initdb removes what it
	// created and the next start does not find a half-made cluster.
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = 30 * time.Second
	cmd.SysProcAttr = subproc.DieWithParent(&syscall.SysProcAttr{Credential: acct.credential(), Setpgid: true}, syscall.SIGTERM)
	p, err := spawn(cmd)
	if err != nil {
		return fmt.Errorf("initialise PostgreSQL data directory: run %s: %w", cmd.Path, err)
	}
	<-p.done
	if err := p.err(); err != nil {
		return fmt.Errorf("initialise PostgreSQL data directory %s: initdb failed (%v); %s", c.dataDir, err, logTail(c.logPath, c.logOffset, tailLines))
	}
	return nil
}

// waitReady connects until the server accepts connections, it exits, or the
// deadline passes.
func (c *Cluster) waitReady(ctx context.Context, p *process) error {
	ctx, cancel := context.WithTimeout(ctx, readyTimeout)
	defer cancel()
	dsn := c.DSN("postgres")
	delay := 5 * time.Millisecond
	for {
		attemptCtx, cancelAttempt := context.WithTimeout(ctx, 5*time.Second)
		conn, err := pgx.Connect(attemptCtx, dsn)
		cancelAttempt()
		if err == nil {
			return conn.Close(ctx)
		}
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && pgErr.Code != "57P03" { // 57P03: starting up or recovering
			return fmt.Errorf("start PostgreSQL: connect: %w; %s", err, logTail(c.logPath, c.logOffset, tailLines))
		}
		timer := time.NewTimer(delay)
		select {
		case <-p.done:
			timer.Stop()
			return fmt.Errorf("start PostgreSQL: postgres exited before accepting connections (%s); %s", p.exitStatus(), logTail(c.logPath, c.logOffset, tailLines))
		case <-ctx.Done():
			timer.Stop()
			return fmt.Errorf("start PostgreSQL: not accepting connections on %s (%w; last error: %v); %s", c.socketDir, ctx.Err(), err, logTail(c.logPath, c.logOffset, tailLines))
		case <-timer.C:
		}
		delay = min(2*delay, 250*time.Millisecond)
	}
}

// ensureDatabase creates database unless it exists.
func (c *Cluster) ensureDatabase(ctx context.Context, database string) error {
	conn, err := pgx.Connect(ctx, c.DSN("postgres"))
	if err != nil {
		return fmt.Errorf("create database %s: connect: %w", database, err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	var exists bool
	if err := conn.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)", database).Scan(&exists); err != nil {
		return fmt.Errorf("create database %s: look it up: %w", database, err)
	}
	if exists {
		return nil
	}
	_, err = conn.Exec(ctx, "CREATE DATABASE "+pgx.Identifier{database}.Sanitize())
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "42P04" { // duplicate_database: created meanwhile
		return nil
	}
	if err != nil {
		return fmt.Errorf("create database %s: %w", database, err)
	}
	c.logger.Info("created database", "database", database)
	return nil
}

// DSN returns a libpq/pgx connection string for database over the cluster's
// unix socket.
func (c *Cluster) DSN(database string) string {
	return fmt.Sprintf("host=%s port=%d user=%s dbname=%s sslmode=disable",
		quoteDSN(c.socketDir), port, superuser, quoteDSN(database))
}

// quoteDSN quotes a keyword/value connection string value when needed.
func quoteDSN(v string) string {
	if v != "" && !strings.ContainsAny(v, ` '\`+"\t\n\r") {
		return v
	}
	return "'" + strings.NewReplacer(`\`, `\\`, `'`, `\'`).Replace(v) + "'"
}

// Stop shuts the server down (fast shutdown: clients are disconnected, data
// is flushed), waits for it to exit and removes the socket directory. It is
// safe to call more than once; later calls return the first call's result.
// It returns an error if the server had died before Stop.
func (c *Cluster) Stop() error {
	c.stopOnce.Do(func() { c.stopErr = c.stop() })
	return c.stopErr
}

func (c *Cluster) stop() error {
	defer c.release()
	c.mu.Lock()
	c.stopping = true
	p := c.proc
	c.mu.Unlock()
	close(c.stopped)
	if p.exited() {
		return fmt.Errorf("stop PostgreSQL: it had already exited (%s); %s", p.exitStatus(), logTail(c.logPath, c.logOffset, tailLines))
	}
	if err := p.cmd.Process.Signal(syscall.SIGINT); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("stop PostgreSQL (pid %d): %w", p.cmd.Process.Pid, err)
	}
	if !exitedWithin(p, stopTimeout) {
		c.logger.Warn("PostgreSQL did not finish a fast shutdown in time: shutting down immediately",
			"pid", p.cmd.Process.Pid, "waited", stopTimeout)
		if err := p.cmd.Process.Signal(syscall.SIGQUIT); err != nil && !errors.Is(err, os.ErrProcessDone) {
			return fmt.Errorf("stop PostgreSQL (pid %d): %w", p.cmd.Process.Pid, err)
		}
		if !exitedWithin(p, killTimeout) {
			// Its process group: the postmaster and every backend (an
			// orphaned one holds the shared memory, and the next start
			// would wait for it). The next start recovers from the WAL.
			c.logger.Error("PostgreSQL did not finish an immediate shutdown either: killing its processes (the next start recovers from its log)",
				"pid", p.cmd.Process.Pid, "waited", killTimeout)
			if err := syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
				return fmt.Errorf("stop PostgreSQL (kill process group %d): %w", p.cmd.Process.Pid, err)
			}
			<-p.done
			return fmt.Errorf("stop PostgreSQL: killed after %v of fast and %v of immediate shutdown", stopTimeout, killTimeout)
		}
	}
	if err := p.err(); err != nil {
		return fmt.Errorf("stop PostgreSQL: %w; %s", err, logTail(c.logPath, c.logOffset, tailLines))
	}
	c.logger.Info("PostgreSQL stopped", "data_dir", c.dataDir)
	return nil
}

// exitedWithin reports whether p exits within d.
func exitedWithin(p *process, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-p.done:
		return true
	case <-t.C:
		return false
	}
}

// socketDirRecord is the file, beside the data directory (as the log is),
// where a start records its socket directory, so that the next start can
// remove one that a gateway killed with SIGKILL left behind.
func (c *Cluster) socketDirRecord() string { return c.dataDir + ".socketdir" }

// lockSocketDirRecord opens the socket directory's record, creating it,
// and locks it (flock) for as long as this cluster runs, so that another
// start on this data directory (refused later, at the postmaster's pid
// file) never takes this run's directory for a dead run's. The lock ends
// with the process however it ends. nil, logged, when it cannot: then no
// directory is removed or recorded.
func (c *Cluster) lockSocketDirRecord() *os.File {
	f, err := os.OpenFile(c.socketDirRecord(), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		c.logger.Warn("socket directory record not opened: a directory a killed run left is not removed", "path", c.socketDirRecord(), "err", err)
		return nil
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		c.logger.Warn("socket directory record held by another start on this data directory: it is left alone", "path", c.socketDirRecord(), "err", err)
		return nil
	}
	return f
}

// writeRecord replaces the record's content with dir.
func writeRecord(f *os.File, dir string) error {
	if err := f.Truncate(0); err != nil {
		return err
	}
	_, err := f.WriteAt([]byte(dir+"\n"), 0)
	return err
}

// removeStaleSocketDir removes the socket directory that the previous run
// on this data directory recorded in rec (locked: that run is gone), if it
// is still there: that run's server is gone too (clearPidFileWhenGone ran
// first) and, killed, it could not remove it. Only what looks like one of
// ours is removed: an absolute path named as MkdirTemp names them
// ("lg..."), a directory and not a symlink, holding nothing but
// PostgreSQL's socket and lock files.
func (c *Cluster) removeStaleSocketDir(rec *os.File) {
	b, err := io.ReadAll(io.NewSectionReader(rec, 0, 4096))
	if err != nil || len(b) == 0 {
		return // none recorded: a first start, or the last one stopped cleanly
	}
	dir := strings.TrimSpace(string(b))
	leave := func(why string) {
		c.logger.Warn("socket directory of a previous run left in place: "+why, "dir", dir, "record", c.socketDirRecord())
	}
	if !filepath.IsAbs(dir) || !strings.HasPrefix(filepath.Base(dir), "lg") {
		leave("not a name this gateway gives")
		return
	}
	fi, err := os.Lstat(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return
	}
	if err != nil || !fi.IsDir() {
		leave("not a directory")
		return
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		leave(err.Error())
		return
	}
	for _, e := range entries {
		if !strings.HasPrefix(e.Name(), ".s.PGSQL.") {
			leave("it holds " + e.Name())
			return
		}
	}
	if err := os.RemoveAll(dir); err != nil {
		leave(err.Error())
		return
	}
	c.logger.Info("removed the socket directory a previous run left behind (it was stopped without a clean shutdown)", "dir", dir)
}

// RemoveStaleSocketDir removes the socket directory that a run on dataDir
// recorded and left behind when it was killed, for a caller that knows the
// run is over and deletes its data directory instead of starting on it
// again (pgtest's sweep of killed test binaries' clusters: their servers
// die with them). It does nothing when there is no record, or while a run
// holds it (another sweep, or a live run); it removes only what a start
// would, and says nothing of what it leaves unless it is a directory that
// is not ours.
func RemoveStaleSocketDir(dataDir string, logger *slog.Logger) {
	c := &Cluster{dataDir: dataDir, logger: logger}
	rec, err := os.OpenFile(c.socketDirRecord(), os.O_RDWR, 0)
	if err != nil {
		return // none recorded (a clean stop removes it), or not ours to read
	}
	defer rec.Close()
	if syscall.Flock(int(rec.Fd()), syscall.LOCK_EX|syscall.LOCK_NB) != nil {
		return
	}
	c.removeStaleSocketDir(rec)
}

// release removes the socket directory and closes the log.
func (c *Cluster) release() {
	if c.socketDir != "" {
		if err := os.RemoveAll(c.socketDir); err != nil {
			c.logger.Warn("remove PostgreSQL socket directory", "dir", c.socketDir, "err", err)
		} else if c.socketRecord != nil {
			if err := os.Remove(c.socketDirRecord()); err != nil && !errors.Is(err, fs.ErrNotExist) {
				c.logger.Warn("remove the record of the PostgreSQL socket directory", "path", c.socketDirRecord(), "err", err)
			}
		}
	}
	if c.socketRecord != nil {
		c.socketRecord.Close() // and its lock
	}
	if c.logFile != nil {
		if err := c.logFile.Close(); err != nil {
			c.logger.Warn("close PostgreSQL log", "path", c.logPath, "err", err)
		}
	}
}
