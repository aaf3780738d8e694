// Lockergate patch 15: elsewhere than on Unix, readers keep their buffers.

//go:build !unix

package mqtt

import "net"

func canAwaitReadable(net.Conn) bool { return false }

func awaitReadable(net.Conn) error { return nil }
