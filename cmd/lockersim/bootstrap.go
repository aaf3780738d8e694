package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"

	"github.com/lockergate/lockergate/client"
)

// bootstrap creates the scenario's sites (those that exist are kept) and a
// claim per site without a --site-claim, through the gateway's API, so one
// command runs a multi-site scenario against a fresh gateway.
func bootstrap(ctx context.Context, cfg *config, log *slog.Logger) error {
	if len(cfg.opts.Sites) == 0 {
		return errors.New("--bootstrap needs a scenario with sites")
	}
	api := client.New(cfg.opts.API, cfg.apiToken)
	for i := range cfg.opts.Sites {
		s := &cfg.opts.Sites[i]
		if s.ClaimToken != "" || s.Lockers == 0 {
			continue
		}
		err := api.Post(ctx, "/v1/sites", map[string]string{"id": s.ID, "name": "Simulated " + s.ID, "timezone": "UTC"}, nil)
		var pe *client.Error
		if err != nil && !(errors.As(err, &pe) && pe.Status == http.StatusConflict) {
			return fmt.Errorf("create site %s: %w", s.ID, err)
		}
		var claim struct {
			ID    string `json:"id"`
			Token string `json:"token"`
		}
		if err := api.Post(ctx, "/v1/claims", map[string]any{"site": s.ID, "uses": s.Lockers, "expires_in_s": 86400}, &claim); err != nil {
			return fmt.Errorf("create claim for site %s: %w", s.ID, err)
		}
		if claim.Token == "" {
			return fmt.Errorf("claim for site %s: answer without a token", s.ID)
		}
		s.ClaimToken = claim.Token
		log.Info("site ready", "site", s.ID, "claim", claim.ID, "uses", s.Lockers)
	}
	return nil
}
