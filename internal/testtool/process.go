package testtool

import (
	"bytes"
	"os"
	"os/exec"
	"testing"
)

// freshProcessEnv names the test a child process of FreshProcess runs.
const freshProcessEnv = "LOCKERGATE_FRESH_PROCESS"

// FreshProcess runs the calling test again in a process of its own (the
// test binary, -test.run matching only it) with the runtime's adaptive
// starting stack off, and reports whether this is that process, where the
// test goes on; the caller returns otherwise. By default the runtime starts
// goroutines on the average stack the last collection scanned, which the
// goroutines other tests left behind raise: a test that measures goroutine
// stacks would measure them. The child's output is logged; its failure
// fails the test.
func FreshProcess(t *testing.T) bool {
	t.Helper()
	if os.Getenv(freshProcessEnv) == t.Name() {
		return true
	}
	cmd := exec.Command(os.Args[0], "-test.run=^"+t.Name()+"$", "-test.v", "-test.count=1")
	godebug := "adaptivestackstart=0"
	if g := os.Getenv("GODEBUG"); g != "" {
		godebug = g + "," + godebug
	}
	cmd.Env = append(os.Environ(), freshProcessEnv+"="+t.Name(), "GODEBUG="+godebug)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s in its own process: %v\n%s", t.Name(), err, out)
	}
	if !bytes.Contains(out, []byte("--- PASS: "+t.Name())) {
		t.Fatalf("%s in its own process did not pass (skipped, or never ran):\n%s", t.Name(), out)
	}
	t.Logf("in its own process:\n%s", out)
	return false
}
