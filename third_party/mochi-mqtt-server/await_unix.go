// Lockergate patch 15: a resting reader's connection is waited on without
// a read buffer.

//go:build unix

package mqtt

import (
	"errors"
	"net"
	"syscall"
)

// canAwaitReadable reports that awaitReadable can wait on c: a socket whose
// descriptor the runtime's poller watches (TCP, Unix). Not TLS, whose
// records are read through buffers of its own.
func canAwaitReadable(c net.Conn) bool {
	_, ok := c.(syscall.Conn)
	return ok
}

// awaitReadable blocks until c has a byte to read, has reached its end or
// failed, or its read deadline passes (the error then, as a read's). It
// consumes nothing: it peeks.
func awaitReadable(c net.Conn) error {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return nil
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return nil // the read that follows reports it
	}
	var b [1]byte
	return rc.Read(func(fd uintptr) bool {
		for {
			// Go's sockets are non-blocking, so no MSG_DONTWAIT (which
			// some Unix systems, AIX, do not define).
			_, _, err := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK)
			switch {
			case errors.Is(err, syscall.EINTR):
				continue
			case errors.Is(err, syscall.EAGAIN), errors.Is(err, syscall.EWOULDBLOCK):
				return false // wait for the poller
			default:
				return true // a byte, the end, or an error the read will report
			}
		}
	})
}
