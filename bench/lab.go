package bench

import (
	"context"
	"fmt"
	"net/http"
	"time"

	"github.com/lockergate/lockergate/client"
)

// Lab is a gateway with its PostgreSQL and n provisioned lockers; the
// ingest, unlock and storm workloads share one when run together.
type Lab struct {
	PG      *PG
	GW      *Server
	IDs     []Identity
	Site    string
	Prov    time.Duration // time to provision IDs
	fresh   bool          // GW has not been used by a run yet
	runner  *Runner
	lockers int
}

// Lab returns the runner's lab for n lockers, creating it (PostgreSQL, the
// gateway, a site, a claim and n lockers provisioned over MQTT) if needed.
func (r *Runner) Lab(ctx context.Context, n int) (*Lab, error) {
	r.mu.Lock()
	if r.labs == nil {
		r.labs = map[int]*Lab{}
	}
	l := r.labs[n]
	r.mu.Unlock()
	if l != nil {
		return l, nil
	}
	pg, err := r.StartPG(ctx)
	if err != nil {
		return nil, err
	}
	gw, err := r.StartGateway(ctx, pg)
	if err != nil {
		return nil, err
	}
	l = &Lab{PG: pg, GW: gw, Site: "bench", fresh: true, runner: r, lockers: n}
	token, err := CreateSiteClaim(ctx, gw.API, l.Site, n)
	if err != nil {
		return nil, err
	}
	r.Log.Info("provisioning lockers through the gateway", "lockers", n)
	start := time.Now()
	if l.IDs, err = Provision(ctx, gw.MQTTAddr, token, n, 32); err != nil {
		return nil, err
	}
	l.Prov = time.Since(start)
	r.Log.Info("provisioned", "lockers", n, "took", l.Prov.Round(time.Millisecond))
	r.mu.Lock()
	r.labs[n] = l
	r.mu.Unlock()
	return l, nil
}

// CreateSiteClaim creates a site and a claim for n lockers through the API.
func CreateSiteClaim(ctx context.Context, api *client.Client, site string, n int) (string, error) {
	err := api.Post(ctx, "/v1/sites", map[string]string{"id": site, "name": "Bench " + site, "timezone": "UTC"}, nil)
	if err != nil {
		return "", fmt.Errorf("create site: %w", err)
	}
	var claim struct {
		Token string `json:"token"`
	}
	if err := api.Post(ctx, "/v1/claims", map[string]any{"site": site, "uses": n, "expires_in_s": 86400}, &claim); err != nil {
		return "", fmt.Errorf("create claim: %w", err)
	}
	return claim.Token, nil
}

// FreshGateway gives a run a gateway process of its own (CPU and peak
// memory counted from zero): the first run uses the one that provisioned
// (restarted, so provisioning does not count), later ones restart it.
func (l *Lab) FreshGateway(ctx context.Context) error {
	l.fresh = false
	return l.GW.Restart(ctx)
}

// WaitOnline waits until the gateway's database shows want lockers online.
func (l *Lab) WaitOnline(ctx context.Context, want int, d time.Duration) error {
	deadline := time.Now().Add(d)
	var n int
	for time.Now().Before(deadline) {
		if err := l.PG.Pool.QueryRow(ctx, "SELECT count(*) FROM devices WHERE online").Scan(&n); err != nil {
			return err
		}
		if n >= want {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
	return fmt.Errorf("%d of %d lockers online after %v", n, want, d)
}

// HealthRows counts stored health messages.
func (l *Lab) HealthRows(ctx context.Context) (int64, error) {
	var n int64
	err := l.PG.Pool.QueryRow(ctx, "SELECT count(*) FROM health").Scan(&n)
	return n, err
}

// apiHTTP is an HTTP client that keeps enough idle connections for a
// hundred requests in flight.
func apiHTTP() *http.Client {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.MaxIdleConns = 512
	tr.MaxIdleConnsPerHost = 512
	return &http.Client{Transport: tr, Timeout: time.Minute}
}
