package testtool

import (
	"os"
	"os/exec"
	"strings"
	"testing"
)

// TestFreshProcess: the test runs again, alone, with the adaptive
// starting stack off.
func TestFreshProcess(t *testing.T) {
	if !FreshProcess(t) {
		return
	}
	if !strings.Contains(os.Getenv("GODEBUG"), "adaptivestackstart=0") {
		t.Fatalf("GODEBUG=%q in the fresh process, want adaptivestackstart=0", os.Getenv("GODEBUG"))
	}
}

// failChild makes TestFreshProcessFailing run; only
// TestFreshProcessReportsFailure sets it.
const failChild = "LOCKERGATE_TESTTOOL_FAIL_CHILD"

// TestFreshProcessFailing fails in its own process, when
// TestFreshProcessReportsFailure runs it.
func TestFreshProcessFailing(t *testing.T) {
	if os.Getenv(failChild) == "" {
		t.Skip("run by TestFreshProcessReportsFailure")
	}
	if !FreshProcess(t) {
		return
	}
	t.Fatal("the fresh process's test fails")
}

// TestFreshProcessReportsFailure: a test failing in its own process fails
// the test that started it, with the child's output.
func TestFreshProcessReportsFailure(t *testing.T) {
	cmd := exec.Command(os.Args[0], "-test.run=^TestFreshProcessFailing$", "-test.v", "-test.count=1")
	cmd.Env = append(os.Environ(), failChild+"=1")
	out, err := cmd.CombinedOutput()
	if err == nil {
		t.Fatalf("a test whose fresh process failed passed:\n%s", out)
	}
	for _, want := range []string{"in its own process", "the fresh process's test fails", "--- FAIL: TestFreshProcessFailing"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
}
