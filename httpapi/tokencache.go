package httpapi

import (
	"errors"
	"sync"
	"time"

	"github.com/lockergate/lockergate/fleet"
)

// TokenCacheTTL is how long a verified API token is trusted without asking
// the database again. A token revoked through this instance stops working at
// once; one revoked through another gateway instance within this time.
const TokenCacheTTL = time.Second

// When the database does not answer a token lookup within tokenLookupTimeout,
// a broker token verified within tokenStaleMax is still trusted: an external
// broker's auth hook must keep answering then (httpapi/brokerauth.go).
const (
	tokenLookupTimeout = time.Second
	tokenStaleMax      = 10 * time.Minute
)

// maxTokenLookups bounds the token lookups in the database at once. Only
// found tokens are cached, so every request with an unknown token is a
// lookup: a flood of them waits for these slots (and gets a 503 after
// tokenLookupTimeout) instead of taking the connection pool from the
// fleet. Cached tokens do not need a slot.
const maxTokenLookups = 8

// errTokenLookupsBusy: no lookup slot came free within tokenLookupTimeout.
var errTokenLookupsBusy = errors.New("too many token lookups in flight")

// tokenCache remembers recently verified tokens by the hash of their secret,
// which takes a database round trip off every API call of a busy client.
// Only found tokens are kept: an unknown secret always asks the database.
type tokenCache struct {
	ttl time.Duration
	now func() time.Time

	mu      sync.Mutex
	entries map[string]tokenEntry
	// gen counts resets: a lookup that began before one (and so may have
	// read a token as it was before a revocation or a change) is not
	// cached.
	gen uint64
}

type tokenEntry struct {
	tok      *fleet.Token
	verified time.Time
}

// maxTokenEntries bounds the cache; past it, expired entries are dropped and,
// if that is not enough, everything (the next calls re-verify).
const maxTokenEntries = 4096

func newTokenCache(ttl time.Duration, now func() time.Time) *tokenCache {
	return &tokenCache{ttl: ttl, now: now, entries: make(map[string]tokenEntry)}
}

// get returns the token whose secret hashes to hash, if it was verified
// within maxAge.
func (c *tokenCache) get(hash []byte, maxAge time.Duration) (*fleet.Token, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.entries[string(hash)]
	if !ok || c.now().Sub(e.verified) >= maxAge {
		return nil, false
	}
	return e.tok, true
}

// generation is what put needs to know whether a reset came between: read
// it before looking a token up.
func (c *tokenCache) generation() uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.gen
}

// put caches tok, looked up after generation returned gen, unless a reset
// came since.
func (c *tokenCache) put(hash []byte, tok *fleet.Token, gen uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if gen != c.gen {
		return
	}
	now := c.now()
	if len(c.entries) >= maxTokenEntries {
		for k, e := range c.entries {
			if now.Sub(e.verified) >= tokenStaleMax {
				delete(c.entries, k)
			}
		}
		if len(c.entries) >= maxTokenEntries {
			clear(c.entries)
		}
	}
	c.entries[string(hash)] = tokenEntry{tok: tok, verified: now}
}

// forget drops one token (the database no longer has it).
func (c *tokenCache) forget(hash []byte) {
	c.mu.Lock()
	delete(c.entries, string(hash))
	c.mu.Unlock()
}

// reset forgets every token (after a revocation or a change), and keeps
// lookups already under way from caching what they read.
func (c *tokenCache) reset() {
	c.mu.Lock()
	clear(c.entries)
	c.gen++
	c.mu.Unlock()
}
