package pgcluster

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// installRoot is a directory that holds PostgreSQL installations side by
// side, one per major version: entries named prefix+version, with the
// binaries in entry/bin.
type installRoot struct{ dir, prefix string }

// installRoots are where packages put the server binaries off the PATH. A
// variable so tests can point it elsewhere.
var installRoots = []installRoot{
	{"/usr/lib/postgresql", ""},                          // Debian, Ubuntu
	{"/usr", "pgsql-"},                                   // PGDG packages for RHEL, Fedora
	{"/opt/homebrew/opt", "postgresql@"},                 // Homebrew, Apple silicon (keg-only)
	{"/usr/local/opt", "postgresql@"},                    // Homebrew, Intel
	{"/Applications/Postgres.app/Contents/Versions", ""}, // Postgres.app
}

// errNoBinaries says what to install; it is what an operator without a
// PostgreSQL installation sees first, so it names the fix.
var errNoBinaries = errors.New("PostgreSQL server binaries (initdb, postgres) not found on PATH or under " +
	"/usr/lib/postgresql/*/bin, /usr/pgsql-*/bin, Homebrew's postgresql@* or Postgres.app: install them " +
	"(Debian, Ubuntu: apt-get install postgresql; Fedora, RHEL: dnf install postgresql-server; macOS: brew install postgresql@15), " +
	"put their directory on PATH, or set --database-url/DATABASE_URL")

// FindBinDir returns the directory holding initdb and postgres: the PATH
// first, then the highest version in installRoots.
func FindBinDir() (string, error) {
	if dir, ok := binDirOnPath(); ok {
		return dir, nil
	}
	if dir, ok := highestInstalled(installRoots); ok {
		return dir, nil
	}
	return "", errNoBinaries
}

// binDirOnPath finds initdb and postgres on PATH. They must live in one
// directory, either as found or after resolving symlinks (/usr/local/bin
// links into a versioned directory), because initdb runs the postgres next
// to itself.
func binDirOnPath() (string, bool) {
	initdb, err := exec.LookPath("initdb")
	if err != nil {
		return "", false
	}
	postgres, err := exec.LookPath("postgres")
	if err != nil {
		return "", false
	}
	if filepath.Dir(initdb) == filepath.Dir(postgres) {
		return filepath.Dir(initdb), true
	}
	ri, err1 := filepath.EvalSymlinks(initdb)
	rp, err2 := filepath.EvalSymlinks(postgres)
	if err1 == nil && err2 == nil && filepath.Dir(ri) == filepath.Dir(rp) {
		return filepath.Dir(ri), true
	}
	return "", false
}

// highestInstalled returns the bin directory of the highest version in
// roots that holds both binaries. Versions compare numerically ("9.6" <
// "15"); on a tie the earlier root wins.
func highestInstalled(roots []installRoot) (string, bool) {
	var best []int
	var dir string
	for _, r := range roots {
		entries, err := os.ReadDir(r.dir)
		if err != nil {
			continue
		}
		for _, e := range entries {
			name, ok := strings.CutPrefix(e.Name(), r.prefix)
			if !ok {
				continue
			}
			v, ok := parseVersion(name)
			if !ok {
				continue
			}
			bin := filepath.Join(r.dir, e.Name(), "bin")
			if (dir == "" || slices.Compare(v, best) > 0) && hasServerBinaries(bin) {
				best, dir = v, bin
			}
		}
	}
	return dir, dir != ""
}

func parseVersion(name string) ([]int, bool) {
	var v []int
	for part := range strings.SplitSeq(name, ".") {
		n, err := strconv.Atoi(part)
		if err != nil || n < 0 {
			return nil, false
		}
		v = append(v, n)
	}
	return v, true
}

func hasServerBinaries(dir string) bool {
	return isExecutable(filepath.Join(dir, "initdb")) && isExecutable(filepath.Join(dir, "postgres"))
}

func isExecutable(path string) bool {
	fi, err := os.Stat(path)
	return err == nil && fi.Mode().IsRegular() && fi.Mode().Perm()&0o111 != 0
}
