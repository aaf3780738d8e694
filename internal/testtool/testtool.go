// Package testtool holds what tests share about the outside programs some
// of them need (promtool, prometheus, mosquitto): found on PATH, or the
// test skips loudly, except in CI, which sets LOCKERGATE_REQUIRE_ALL=1 and
// where a missing program fails the test.
package testtool

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/lockergate/lockergate/internal/subproc"
)

// RequireAll is the environment variable that turns a skip for a missing
// program into a failure (.ci/run sets it to 1).
const RequireAll = "LOCKERGATE_REQUIRE_ALL"

// Program returns the path of the program name, or skips the test (fails
// it under LOCKERGATE_REQUIRE_ALL=1); why says what the test needs it for,
// install how to get it.
func Program(t testing.TB, name, why, install string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err == nil {
		return p
	}
	msg := fmt.Sprintf("%s not found (needed %s): %s", name, why, install)
	if os.Getenv(RequireAll) == "1" {
		t.Fatal(msg + "; " + RequireAll + "=1 requires it")
	} else {
		t.Skip("SKIPPED: " + msg)
	}
	return ""
}

// DynsecPlugin returns the path of mosquitto's dynamic security plugin
// (Debian ships it with the mosquitto package), or fails the test.
func DynsecPlugin(t testing.TB) string {
	t.Helper()
	plugins, _ := filepath.Glob("/usr/lib/*/mosquitto_dynamic_security.so")
	if len(plugins) == 0 {
		plugins, _ = filepath.Glob("/usr/lib/mosquitto_dynamic_security.so")
	}
	if len(plugins) == 0 {
		t.Fatal("mosquitto_dynamic_security.so not found (Debian ships it with the mosquitto package)")
	}
	return plugins[0]
}

// PostgresDir returns a fresh temporary directory a private PostgreSQL
// cluster can live in: when tests run as root the cluster runs as the
// postgres user, which must be able to pass through it and its parent.
func PostgresDir(tb testing.TB) string {
	tb.Helper()
	base := tb.TempDir()
	for _, d := range []string{filepath.Dir(base), base} {
		if err := os.Chmod(d, 0o711); err != nil {
			tb.Fatal(err)
		}
	}
	return base
}

// Start starts cmd, whose SysProcAttr.Pdeathsig should kill it with the
// test process, so that the signal comes then and not before
// (internal/subproc says why: a mosquitto forked from an arbitrary goroutine
// was killed at the start of a test now and then, when the same binary
// started its PostgreSQL cluster). exited is closed once the child has
// exited and been reaped.
func Start(cmd *exec.Cmd) (exited <-chan struct{}, err error) {
	c, err := subproc.Start(cmd)
	if err != nil {
		return nil, err
	}
	return c.Done(), nil
}
