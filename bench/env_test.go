package bench

import (
	"fmt"
	"net"
	"testing"
)

// TestFreePortOutsideEphemeralRange: listen ports are picked below the
// kernel's ephemeral range, where no outgoing connection can take one
// between a server's runs.
func TestFreePortOutsideEphemeralRange(t *testing.T) {
	lo := ephemeralLow()
	if lo <= listenPortBase+1000 {
		t.Skipf("ephemeral range starts at %d: freePort falls back to a kernel-chosen port", lo)
	}
	for range 20 {
		p, err := freePort()
		if err != nil {
			t.Fatal(err)
		}
		if p < listenPortBase || p >= lo {
			t.Fatalf("freePort() = %d, want in [%d, %d)", p, listenPortBase, lo)
		}
		ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p))
		if err != nil {
			t.Fatalf("port %d from freePort is not free: %v", p, err)
		}
		ln.Close()
	}
}
