package httpapi

import (
	"sync"
	"time"

	"github.com/lockergate/lockergate/fleet"
)

// TokenCacheTTL is how long a verified API token is trusted without asking
// the database again. A token revoked through this instance stops working at
// once; one revoked through another gateway instance within this time.
const TokenCacheTTL = time.Second

// tokenCache remembers recently verified tokens by the hash of their secret,
// which takes a database round trip off every API call of a busy client.
// Only found tokens are kept: an unknown secret always asks the database.
type tokenCache struct {
	ttl time.Duration
	now func() time.Time

	mu      sync.Mutex
	entries map[string]tokenEntry
}

type tokenEntry struct {
	tok     *fleet.Token
	expires time.Time
}

// maxTokenEntries bounds the cache; past it, expired entries are dropped and,
// if that is not enough, everything (the next calls re-verify).
const maxTokenEntries = 4096

func newTokenCache(ttl time.Duration, now func() time.Time) *tokenCache {
	return &tokenCache{ttl: ttl, now: now, entries: make(map[string]tokenEntry)}
}

func (c *tokenCache) get(hash []byte) (*fleet.Token, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.entries[string(hash)]
	if !ok || !c.now().Before(e.expires) {
		return nil, false
	}
	return e.tok, true
}

func (c *tokenCache) put(hash []byte, tok *fleet.Token) {
	c.mu.Lock()
	defer c.mu.Unlock()
	now := c.now()
	if len(c.entries) >= maxTokenEntries {
		for k, e := range c.entries {
			if !now.Before(e.expires) {
				delete(c.entries, k)
			}
		}
		if len(c.entries) >= maxTokenEntries {
			clear(c.entries)
		}
	}
	c.entries[string(hash)] = tokenEntry{tok: tok, expires: now.Add(c.ttl)}
}

// reset forgets every token (after a revocation).
func (c *tokenCache) reset() {
	c.mu.Lock()
	clear(c.entries)
	c.mu.Unlock()
}
