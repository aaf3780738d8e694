//go:build linux || freebsd

package subproc

import "syscall"

// HasParentDeathSignal says whether DieWithParent can do its job here.
const HasParentDeathSignal = true

// DieWithParent sets attr's parent-death signal to sig, so that a child
// started with Start gets sig when this process dies (a crash, SIGKILL, a
// test binary killed by its timeout). It returns attr.
func DieWithParent(attr *syscall.SysProcAttr, sig syscall.Signal) *syscall.SysProcAttr {
	attr.Pdeathsig = sig
	return attr
}
