package httpapi

import (
	"context"

	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/provisioning"
)

// TokenStore stores API tokens.
type TokenStore interface {
	CreateToken(ctx context.Context, t *fleet.Token, hash []byte) error
	RevokeToken(ctx context.Context, id string) error
	Audit(ctx context.Context, e fleet.AuditEntry) error
}

// CreateToken mints a token with spec's role, site, name and sites, stores
// its hash and audits it; the token itself is returned once and never
// stored.
func CreateToken(ctx context.Context, st TokenStore, spec fleet.Token, actor string) (*fleet.Token, string, error) {
	t := &fleet.Token{ID: fleet.NewID("tk"), Role: spec.Role, Site: spec.Site, Name: spec.Name, Sites: spec.Sites, CreatedBy: actor}
	secret := provisioning.NewSecret("lgt_")
	if err := st.CreateToken(ctx, t, provisioning.HashSecret(secret)); err != nil {
		return nil, "", err
	}
	detail := map[string]any{"token": t.ID, "role": t.Role, "name": t.Name}
	if len(t.Sites) > 0 {
		detail["sites"] = t.Sites
	}
	if err := st.Audit(ctx, fleet.AuditEntry{Actor: actor, Action: "token.create", Site: t.Site, Detail: detail}); err != nil {
		return nil, "", err
	}
	return t, secret, nil
}

// RevokeToken revokes token id and audits it. An API that caches tokens
// forgets them itself (the handler resets its cache).
func RevokeToken(ctx context.Context, st TokenStore, id, actor string) error {
	if err := st.RevokeToken(ctx, id); err != nil {
		return err
	}
	return st.Audit(ctx, fleet.AuditEntry{Actor: actor, Action: "token.revoke", Detail: map[string]any{"token": id}})
}
