//go:build !(linux || freebsd)

package subproc

import "syscall"

// HasParentDeathSignal says whether DieWithParent can do its job here: on
// this system (macOS, the other BSDs) the kernel has no parent-death
// signal.
const HasParentDeathSignal = false

// DieWithParent returns attr unchanged: this system has no parent-death
// signal, so a child outlives a process that is killed outright (SIGKILL,
// a crash). A process that stops normally stops its children itself.
func DieWithParent(attr *syscall.SysProcAttr, sig syscall.Signal) *syscall.SysProcAttr {
	return attr
}
