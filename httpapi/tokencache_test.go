package httpapi

import (
	"fmt"
	"testing"
	"time"

	"github.com/lockergate/lockergate/fleet"
)

func TestTokenCache(t *testing.T) {
	now := time.Unix(1000, 0)
	c := newTokenCache(time.Second, func() time.Time { return now })
	tok := &fleet.Token{ID: "t1", Role: fleet.RoleAdmin}
	if _, ok := c.get([]byte("h1"), c.ttl); ok {
		t.Fatal("empty cache answered")
	}
	c.put([]byte("h1"), tok)
	if got, ok := c.get([]byte("h1"), c.ttl); !ok || got != tok {
		t.Fatalf("get after put = %v, %v", got, ok)
	}
	now = now.Add(999 * time.Millisecond)
	if _, ok := c.get([]byte("h1"), c.ttl); !ok {
		t.Fatal("forgotten before the TTL")
	}
	now = now.Add(time.Millisecond)
	if _, ok := c.get([]byte("h1"), c.ttl); ok {
		t.Fatal("trusted at the TTL: must ask the database again")
	}
	if _, ok := c.get([]byte("h1"), tokenStaleMax); !ok {
		t.Fatal("not kept for a database outage")
	}
	c.forget([]byte("h1"))
	if _, ok := c.get([]byte("h1"), tokenStaleMax); ok {
		t.Fatal("kept after forget (the database no longer has it)")
	}
	c.put([]byte("h1"), tok)
	c.reset()
	if _, ok := c.get([]byte("h1"), tokenStaleMax); ok {
		t.Fatal("trusted after reset (a revocation)")
	}
	// Bounded: past maxTokenEntries the cache starts over instead of growing.
	for i := range maxTokenEntries + 10 {
		c.put(fmt.Appendf(nil, "k%d", i), tok)
	}
	if n := len(c.entries); n > maxTokenEntries {
		t.Fatalf("%d entries, want at most %d", n, maxTokenEntries)
	}
}
