package testtool

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// fakeT records what Program does to a test instead of ending it.
type fakeT struct {
	testing.TB
	fatal, skip string
}

func (f *fakeT) Helper()           {}
func (f *fakeT) Fatal(args ...any) { f.fatal = fmt.Sprint(args...) }
func (f *fakeT) Skip(args ...any)  { f.skip = fmt.Sprint(args...) }

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
