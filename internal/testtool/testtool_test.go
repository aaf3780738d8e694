package testtool

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"
)

// fakeT records what Program does to a test instead of ending it.
type fakeT struct {
	testing.TB
	fatal, skip string
}

func (f *fakeT) Helper()           {}
func (f *fakeT) Fatal(args ...any) { f.fatal = fmt.Sprint(args...) }
func (f *fakeT) Skip(args ...any)  { f.skip = fmt.Sprint(args...) }

// Fatalf records and ends the calling goroutine, as testing's does.
func (f *fakeT) Fatalf(format string, args ...any) {
	f.fatal = fmt.Sprintf(format, args...)
	runtime.Goexit()
}

func TestProgram(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "present"), []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", dir)

	t.Run("Found", func(t *testing.T) {
		f := &fakeT{TB: t}
		if p := Program(f, "present", "for a test", "apt-get install present"); p != filepath.Join(dir, "present") || f.fatal != "" || f.skip != "" {
			t.Fatalf("path %q, fatal %q, skip %q", p, f.fatal, f.skip)
		}
	})
	t.Run("MissingSkips", func(t *testing.T) {
		t.Setenv(RequireAll, "")
		f := &fakeT{TB: t}
		if p := Program(f, "absent", "to prove X", "apt-get install absent"); p != "" || f.fatal != "" ||
			!strings.HasPrefix(f.skip, "SKIPPED: absent not found (needed to prove X): apt-get install absent") {
			t.Fatalf("path %q, fatal %q, skip %q", p, f.fatal, f.skip)
		}
	})
	t.Run("MissingFailsInCI", func(t *testing.T) {
		t.Setenv(RequireAll, "1")
		f := &fakeT{TB: t}
		if p := Program(f, "absent", "to prove X", "apt-get install absent"); p != "" || f.skip != "" ||
			!strings.Contains(f.fatal, "absent not found") || !strings.Contains(f.fatal, RequireAll+"=1") {
			t.Fatalf("path %q, fatal %q, skip %q", p, f.fatal, f.skip)
		}
	})
}

func TestEventually(t *testing.T) {
	n := 0
	Eventually(t, time.Second, "third call", func() error {
		if n++; n < 3 {
			return fmt.Errorf("call %d", n)
		}
		return nil
	})
	if n != 3 {
		t.Fatalf("%d calls, want 3", n)
	}
	f := &fakeT{}
	done := make(chan struct{})
	go func() { // the fake's Fatalf ends this goroutine
		defer close(done)
		Eventually(f, 20*time.Millisecond, "never", func() error { return errors.New("not yet") })
	}()
	<-done
	if !strings.Contains(f.fatal, "never: not within 20ms: not yet") {
		t.Fatalf("fatal %q", f.fatal)
	}
}
