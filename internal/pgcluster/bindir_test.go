package pgcluster

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// setRoots points FindBinDir's fallback at roots for one test.
func setRoots(t *testing.T, roots ...installRoot) {
	t.Helper()
	old := installRoots
	installRoots = roots
	t.Cleanup(func() { installRoots = old })
}

// setLibRoot points FindBinDir's fallback at one Debian-style root.
func setLibRoot(t *testing.T, root string) { setRoots(t, installRoot{dir: root}) }

// fakeBinDir creates dir with executable files named after the binaries.
func fakeBinDir(t *testing.T, dir string, names ...string) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, n := range names {
		if err := os.WriteFile(filepath.Join(dir, n), []byte("#!/bin/sh\nexit 1\n"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
}

func TestFindBinDir(t *testing.T) {
	t.Run("ErrNotFound", func(t *testing.T) {
		t.Setenv("PATH", "")
		setLibRoot(t, t.TempDir())
		dir, err := FindBinDir()
		if err == nil {
			t.Fatalf("FindBinDir() = %q, want an error", dir)
		}
		for _, want := range []string{"initdb", "postgres", "apt-get install postgresql", "brew install postgresql@15", "DATABASE_URL"} {
			if !strings.Contains(err.Error(), want) {
				t.Errorf("error %q does not mention %q", err, want)
			}
		}
	})

	t.Run("HighestVersion", func(t *testing.T) {
		t.Setenv("PATH", "")
		root := t.TempDir()
		setLibRoot(t, root)
		fakeBinDir(t, filepath.Join(root, "9.6", "bin"), "initdb", "postgres")
		fakeBinDir(t, filepath.Join(root, "15", "bin"), "initdb", "postgres")
		fakeBinDir(t, filepath.Join(root, "17", "bin"), "initdb") // client-only install: no server
		fakeBinDir(t, filepath.Join(root, "notaversion", "bin"), "initdb", "postgres")
		got, err := FindBinDir()
		if err != nil {
			t.Fatal(err)
		}
		if want := filepath.Join(root, "15", "bin"); got != want {
			t.Errorf("FindBinDir() = %q, want %q", got, want)
		}
	})

	t.Run("HighestVersionAcrossRoots", func(t *testing.T) {
		t.Setenv("PATH", "")
		deb, brew := t.TempDir(), t.TempDir()
		setRoots(t, installRoot{dir: filepath.Join(deb, "missing")}, installRoot{dir: deb}, installRoot{brew, "postgresql@"})
		fakeBinDir(t, filepath.Join(deb, "15", "bin"), "initdb", "postgres")
		fakeBinDir(t, filepath.Join(brew, "postgresql@16", "bin"), "initdb", "postgres")
		fakeBinDir(t, filepath.Join(brew, "postgresql@18", "bin"), "postgres") // no initdb
		fakeBinDir(t, filepath.Join(brew, "postgresql", "bin"), "initdb", "postgres")
		fakeBinDir(t, filepath.Join(brew, "libpq@17", "bin"), "initdb", "postgres")
		got, err := FindBinDir()
		if err != nil {
			t.Fatal(err)
		}
		if want := filepath.Join(brew, "postgresql@16", "bin"); got != want {
			t.Errorf("FindBinDir() = %q, want %q", got, want)
		}
		// The same version in two roots: the earlier root wins.
		fakeBinDir(t, filepath.Join(deb, "16", "bin"), "initdb", "postgres")
		if got, _ := FindBinDir(); got != filepath.Join(deb, "16", "bin") {
			t.Errorf("FindBinDir() with 16 in both roots = %q, want the first root's", got)
		}
	})

	t.Run("PathFirst", func(t *testing.T) {
		onPath := t.TempDir()
		fakeBinDir(t, onPath, "initdb", "postgres")
		t.Setenv("PATH", onPath)
		root := t.TempDir()
		setLibRoot(t, root)
		fakeBinDir(t, filepath.Join(root, "16", "bin"), "initdb", "postgres")
		got, err := FindBinDir()
		if err != nil {
			t.Fatal(err)
		}
		if got != onPath {
			t.Errorf("FindBinDir() = %q, want %q", got, onPath)
		}
	})

	t.Run("PathSymlinksIntoOneDir", func(t *testing.T) {
		real := t.TempDir()
		fakeBinDir(t, real, "initdb", "postgres")
		a, b := t.TempDir(), t.TempDir()
		if err := os.Symlink(filepath.Join(real, "initdb"), filepath.Join(a, "initdb")); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(filepath.Join(real, "postgres"), filepath.Join(b, "postgres")); err != nil {
			t.Fatal(err)
		}
		t.Setenv("PATH", a+string(os.PathListSeparator)+b)
		setLibRoot(t, t.TempDir())
		got, err := FindBinDir()
		if err != nil {
			t.Fatal(err)
		}
		if want, _ := filepath.EvalSymlinks(real); got != want {
			t.Errorf("FindBinDir() = %q, want %q", got, want)
		}
	})
}
