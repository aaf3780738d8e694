//go:build unix

package main

import (
	"fmt"
	"syscall"
	"time"
)

// raiseFileLimit makes room for n open files: the soft limit up to the hard
// one, and the hard one too where allowed (root). Every locker holds one
// connection; an in-process broker holds the other end.
func raiseFileLimit(n uint64) error {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return err
	}
	if lim.Cur >= n {
		return nil
	}
	want := lim
	want.Cur = min(n, lim.Max)
	if n > lim.Max {
		want.Cur, want.Max = n, n
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &want); err == nil {
			return nil
		}
		want.Cur, want.Max = lim.Max, lim.Max // not allowed to raise the hard limit
	}
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &want); err != nil {
		return err
	}
	if want.Cur < n {
		return fmt.Errorf("open file limit is %d (hard), %d wanted: raise it (ulimit -Hn, or CAP_SYS_RESOURCE) or split the fleet over processes with --first-index", want.Cur, n)
	}
	return nil
}

// cpuTime is the CPU time the process has used (user and system).
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
