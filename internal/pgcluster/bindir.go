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

// pgLibRoot is where Debian and Ubuntu install the server binaries, one
// directory per major version. A variable so tests can point it elsewhere.
var pgLibRoot = "/usr/lib/postgresql"

// errNoBinaries says what to install; it is what an operator without a
// PostgreSQL installation sees first, so it names the fix.
var errNoBinaries = errors.New("PostgreSQL server binaries (initdb, postgres) not found on PATH or under " +
	"/usr/lib/postgresql/*/bin: install them (Debian: apt-get install postgresql) or set --database-url/DATABASE_URL")

// FindBinDir returns the directory holding initdb and postgres: the PATH
// first, then the highest version under /usr/lib/postgresql/*/bin.
func FindBinDir() (string, error) {
	if dir, ok := binDirOnPath(); ok {
		return dir, nil
	}
	if dir, ok := highestLibBinDir(pgLibRoot); ok {
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

// highestLibBinDir returns root/<version>/bin with the highest version that
// holds both binaries. Versions compare numerically ("9.6" < "15").
func highestLibBinDir(root string) (string, bool) {
	entries, err := os.ReadDir(root)
	if err != nil {
		return "", false
	}
	type candidate struct {
		version []int
		dir     string
	}
	var found []candidate
	for _, e := range entries {
		v, ok := parseVersion(e.Name())
		if !ok {
			continue
		}
		dir := filepath.Join(root, e.Name(), "bin")
		if hasServerBinaries(dir) {
			found = append(found, candidate{v, dir})
		}
	}
	if len(found) == 0 {
		return "", false
	}
	best := slices.MaxFunc(found, func(a, b candidate) int { return slices.Compare(a.version, b.version) })
	return best.dir, true
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
