package pgcluster

import (
	"fmt"
	"io/fs"
	"os"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"syscall"
)

// serverUser is the system account the server runs as when we are root:
// Debian's postgresql package creates it.
const serverUser = "postgres"

// account is who initdb and postgres run as. A nil *account means "as this
// process" (we are not root).
type account struct {
	name   string
	uid    uint32
	gid    uint32
	groups []uint32
}

// serverAccount returns the account to run the server as: nil when not root
// (run as ourselves), the postgres system user when root, because initdb and
// postgres refuse to run as root.
func serverAccount() (*account, error) {
	if os.Geteuid() != 0 {
		return nil, nil
	}
	u, err := user.Lookup(serverUser)
	if err != nil {
		return nil, fmt.Errorf("running as root, and PostgreSQL refuses to run as root, but there is no %q system user to run it as (%w): create one (Debian: apt-get install postgresql creates it) or run lockergate as an unprivileged user", serverUser, err)
	}
	uid, err := strconv.ParseUint(u.Uid, 10, 32)
	if err != nil {
		return nil, fmt.Errorf("user %s: parse uid %q: %w", serverUser, u.Uid, err)
	}
	gid, err := strconv.ParseUint(u.Gid, 10, 32)
	if err != nil {
		return nil, fmt.Errorf("user %s: parse gid %q: %w", serverUser, u.Gid, err)
	}
	a := &account{name: u.Username, uid: uint32(uid), gid: uint32(gid)}
	if a.uid == 0 {
		return nil, fmt.Errorf("system user %s has uid 0: PostgreSQL refuses to run as root; give it an unprivileged uid", serverUser)
	}
	gids, err := u.GroupIds()
	if err != nil {
		return nil, fmt.Errorf("user %s: list groups: %w", serverUser, err)
	}
	for _, g := range gids {
		if n, err := strconv.ParseUint(g, 10, 32); err == nil && !slices.Contains(a.groups, uint32(n)) {
			a.groups = append(a.groups, uint32(n))
		}
	}
	return a, nil
}

// credential returns the SysProcAttr credential that runs a child as a, or
// nil to run it as this process.
func (a *account) credential() *syscall.Credential {
	if a == nil {
		return nil
	}
	return &syscall.Credential{Uid: a.uid, Gid: a.gid, Groups: a.groups}
}

// chownTree gives dir and everything below it to a (chown -R), touching only
// entries that are not already a's. No-op when a is nil.
func (a *account) chownTree(dir string) error {
	if a == nil {
		return nil
	}
	return filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		if st, ok := info.Sys().(*syscall.Stat_t); ok && st.Uid == a.uid && st.Gid == a.gid {
			return nil
		}
		if err := os.Lchown(path, int(a.uid), int(a.gid)); err != nil {
			return fmt.Errorf("give %s to user %s: %w", path, a.name, err)
		}
		return nil
	})
}

// checkReachable reports, with the fix, when a cannot traverse every
// ancestor of path: the server would otherwise fail later with a bare
// "permission denied". A typical case is a root-owned 0700 temp directory.
// No-op when a is nil.
func (a *account) checkReachable(path string) error {
	if a == nil {
		return nil
	}
	for dir := filepath.Dir(path); ; dir = filepath.Dir(dir) {
		fi, err := os.Stat(dir)
		if err != nil {
			return err
		}
		st, ok := fi.Sys().(*syscall.Stat_t)
		if !ok {
			return nil
		}
		perm := fi.Mode().Perm()
		var can bool
		switch {
		case st.Uid == a.uid:
			can = perm&0o100 != 0
		case st.Gid == a.gid || slices.Contains(a.groups, st.Gid):
			can = perm&0o010 != 0
		default:
			can = perm&0o001 != 0
		}
		if !can {
			return fmt.Errorf("PostgreSQL runs as system user %s (uid %d) because we are root, and it cannot reach %s: directory %s is mode %v owned by uid %d; make it traversable (chmod o+x %s) or choose a directory elsewhere",
				a.name, a.uid, path, dir, perm, st.Uid, dir)
		}
		if parent := filepath.Dir(dir); parent == dir {
			return nil
		}
	}
}
