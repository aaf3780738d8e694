package httpapi

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"sync"
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
	c.put([]byte("h1"), tok, c.generation())
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
	c.put([]byte("h1"), tok, c.generation())
	c.reset()
	if _, ok := c.get([]byte("h1"), tokenStaleMax); ok {
		t.Fatal("trusted after reset (a revocation)")
	}
	// A lookup that began before a reset read the token as it was: not
	// cached, else a revoked or changed token would be trusted again.
	gen := c.generation()
	c.reset()
	c.put([]byte("h1"), tok, gen)
	if _, ok := c.get([]byte("h1"), tokenStaleMax); ok {
		t.Fatal("cached from a lookup that began before a reset")
	}
	// Bounded: past maxTokenEntries the cache starts over instead of growing.
	for i := range maxTokenEntries + 10 {
		c.put(fmt.Appendf(nil, "k%d", i), tok, c.generation())
	}
	if n := len(c.entries); n > maxTokenEntries {
		t.Fatalf("%d entries, want at most %d", n, maxTokenEntries)
	}
}

// slowStore holds every lookup of an unknown token until release is
// closed, and says when one started.
type slowStore struct {
	fakeStore
	started chan struct{}
	release chan struct{}
}

func (s *slowStore) TokenByHash(ctx context.Context, hash []byte) (*fleet.Token, error) {
	tok, err := s.fakeStore.TokenByHash(ctx, hash)
	if err == nil {
		return tok, nil
	}
	s.started <- struct{}{}
	<-s.release
	return nil, err
}

// TestTokenLookupsBounded: requests with unknown tokens (each a database
// lookup) take at most maxTokenLookups lookups at once; the next one gets a
// 503 with Retry-After once tokenLookupTimeout passes, while a cached token
// keeps working.
func TestTokenLookupsBounded(t *testing.T) {
	st := &slowStore{started: make(chan struct{}, maxTokenLookups+1), release: make(chan struct{})}
	s := New(Options{Store: st})
	now := time.Unix(1000, 0) // the cache's clock stands still: the 1 s wait below is not its TTL
	s.tokens = newTokenCache(TokenCacheTTL, func() time.Time { return now })
	if a := call(t, s, "GET", "/v1/sites", "admin"); a.status != 200 { // now cached
		t.Fatalf("admin: %d", a.status)
	}
	// A broker token may not list sites, but its 403 says it was accepted.
	if a := call(t, s, "GET", "/v1/sites", "broker"); a.status != http.StatusForbidden { // now cached
		t.Fatalf("broker: %d", a.status)
	}
	var wg sync.WaitGroup
	codes := make(chan int, maxTokenLookups)
	for i := range maxTokenLookups {
		wg.Go(func() {
			req := httptest.NewRequest("GET", "/v1/sites", nil)
			req.Header.Set("Authorization", fmt.Sprintf("Bearer guess-%d", i))
			rec := httptest.NewRecorder()
			s.ServeHTTP(rec, req)
			codes <- rec.Code
		})
	}
	for range maxTokenLookups {
		<-st.started
	}
	a := call(t, s, "GET", "/v1/sites", "guess-more")
	if a.status != http.StatusServiceUnavailable || a.header.Get("Retry-After") != "1" {
		t.Fatalf("one lookup past the bound: %d, Retry-After %q; want 503, 1", a.status, a.header.Get("Retry-After"))
	}
	if a := call(t, s, "GET", "/v1/sites", "admin"); a.status != 200 {
		t.Fatalf("cached admin token while the lookups are taken: %d, want 200", a.status)
	}
	// Past the cache's TTL a token needs a lookup, and none is free: a
	// broker token verified within tokenStaleMax is still accepted (an
	// external broker must not refuse lockers), any other gets the 503.
	now = now.Add(TokenCacheTTL + time.Second)
	if a := call(t, s, "GET", "/v1/sites", "broker"); a.status != http.StatusForbidden {
		t.Fatalf("stale broker token while the lookups are taken: %d, want it accepted (403 here)", a.status)
	}
	if a := call(t, s, "GET", "/v1/sites", "admin"); a.status != http.StatusServiceUnavailable {
		t.Fatalf("stale admin token while the lookups are taken: %d, want 503", a.status)
	}
	close(st.release)
	wg.Wait()
	close(codes)
	for c := range codes {
		if c != http.StatusUnauthorized {
			t.Fatalf("an unknown token answered %d, want 401", c)
		}
	}
}
