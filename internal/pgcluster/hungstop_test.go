package pgcluster

import (
	"context"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestStopKillsAHungServer: a server that runs no more (stopped here with
// SIGSTOP, as one hung in the kernel would be) takes neither a fast nor an
// immediate shutdown; Stop then kills its processes rather than waiting
// for ever, says so, and the next start recovers.
func TestStopKillsAHungServer(t *testing.T) {
	defer func(s, k time.Duration) { stopTimeout, killTimeout = s, k }(stopTimeout, killTimeout)
	stopTimeout, killTimeout = 500*time.Millisecond, 500*time.Millisecond
	dataDir := filepath.Join(traversableDir(t), "data")
	logger, _ := newLogger(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c, err := Start(ctx, Options{DataDir: dataDir, Fast: true, Logger: logger})
	if err != nil {
		t.Fatal(err)
	}
	pid := c.proc.cmd.Process.Pid
	if err := syscall.Kill(-pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	stopped := make(chan error, 1)
	go func() { stopped <- c.Stop() }()
	select {
	case err := <-stopped:
		if err == nil || !strings.Contains(err.Error(), "killed after") {
			t.Fatalf("Stop of a hung server: %v, want an error saying it was killed", err)
		}
	case <-time.After(time.Minute):
		_ = syscall.Kill(-pid, syscall.SIGKILL)
		t.Fatal("Stop of a hung server did not return within a minute")
	}
	waitFor(t, 30*time.Second, "the server's processes to go", func() bool { return !isAlive(pid) && findServerOn(dataDir) == 0 })
	MustStart(t, Options{DataDir: dataDir, Fast: true})
}
