package fleet

import (
	"context"
	"slices"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"
)

// Roles of API tokens (api-v1.md).
const (
	RoleAdmin    = "admin"
	RoleOperator = "operator"
	RoleStore    = "store"
	RolePlatform = "platform"
	// RoleBroker may only call the broker auth hooks: it is the token an
	// external broker (EMQX) sends when it asks about a locker.
	RoleBroker = "broker"
)

// ValidRole reports whether r is a role.
func ValidRole(r string) bool {
	return r == RoleAdmin || r == RoleOperator || r == RoleStore || r == RolePlatform || r == RoleBroker
}

// MaxNameLen bounds a token's name.
const MaxNameLen = 64

// ValidName reports whether s can be a token's name (for a platform token,
// the platform's name that pickups give as recipient.platform): 1 to
// MaxNameLen bytes of UTF-8 text without control or format characters
// (zero-width spaces, bidi overrides), and without spaces at either end:
// none of which would let two names that look the same differ.
func ValidName(s string) bool {
	if len(s) == 0 || len(s) > MaxNameLen || !utf8.ValidString(s) || strings.TrimSpace(s) != s {
		return false
	}
	for _, r := range s {
		if unicode.IsControl(r) || unicode.Is(unicode.Cf, r) {
			return false
		}
	}
	return true
}

// Token is an API token as stored: never the token itself, only its hash.
type Token struct {
	ID        string     `json:"id"`
	Role      string     `json:"role"`
	Site      string     `json:"site,omitempty"`
	Name      string     `json:"name"`
	CreatedAt time.Time  `json:"created_at"`
	CreatedBy string     `json:"created_by,omitempty"`
	RevokedAt *time.Time `json:"revoked_at,omitempty"`
	// LastUsedAt is when the token was last accepted, to within
	// TokenUseResolution; nil when it has not been since it was made (or
	// since the upgrade that added it).
	LastUsedAt *time.Time `json:"last_used_at,omitempty"`
	// Sites, for a platform token, are the sites it may make pickups and
	// codes at; empty: every site.
	Sites []string `json:"sites,omitempty"`
}

// TokenUseResolution is how often a token's use is recorded at most: a
// use within this time of the recorded one is not written again.
const TokenUseResolution = time.Minute

// TokenFilter selects tokens to list: by role and site (empty: any; a
// site matches a store token's site and a platform token's Sites that list
// it), and revoked or live (nil: both).
type TokenFilter struct {
	Role, Site string
	// Name, when set, is the token's name exactly.
	Name    string
	Revoked *bool
	After   string
	Limit   int
}

// MaxTokenSites bounds a platform token's Sites (a platform at more sites
// than this is given every site).
const MaxTokenSites = 1000

// TokenSites is sites as a platform token keeps them: sorted, without
// repeats (nil for none). A client that asked for sites compares what the
// gateway answered with this.
func TokenSites(sites []string) []string {
	return slices.Compact(slices.Sorted(slices.Values(sites)))
}

// SitesOrEvery is sites, or an empty list (every site) for none: what is
// written where nil would read otherwise (pgx writes a nil slice as NULL;
// an audit entry shows [] for every site).
func SitesOrEvery(sites []string) []string {
	if sites == nil {
		return []string{}
	}
	return sites
}

// PlatformAt reports whether a platform token may make pickups and codes
// at site: one of its Sites, or any when it lists none.
func (t *Token) PlatformAt(site string) bool {
	return len(t.Sites) == 0 || slices.Contains(t.Sites, site)
}

// Actor names the token in audit entries: "role:name".
func (t *Token) Actor() string { return t.Role + ":" + t.Name }

type tokenKey struct{}

// WithToken returns ctx carrying the API token a request was made with:
// the audit entries written on its behalf (those whose actor is the
// token's) record its id (AuditEntry.Token).
func WithToken(ctx context.Context, t *Token) context.Context {
	return context.WithValue(ctx, tokenKey{}, t)
}

// AuditToken is the id of the token ctx carries (WithToken) when actor is
// that token's, else "".
func AuditToken(ctx context.Context, actor string) string {
	if t, ok := ctx.Value(tokenKey{}).(*Token); ok && t != nil && t.Actor() == actor {
		return t.ID
	}
	return ""
}

// Idempotent is a stored answer to a create request sent with an Idempotency-Key.
type Idempotent struct {
	Route    string
	BodyHash []byte
	Status   int
	// Response is the answer without its secrets (httpapi's secretFields).
	Response []byte
	// Sealed holds those secrets, encrypted, while a replay may repeat
	// them (ReplaySecretsFor); nil after that, or when there were none.
	Sealed []byte
}

// ReplaySecretsFor is how long after its first answer an Idempotency-Key
// replay repeats the secrets that answer held; later replays leave them
// out, and their sealed copy is wiped.
const ReplaySecretsFor = 24 * time.Hour
