package gateway

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"strings"
	"time"
)

// emqxKicker ends a locker's live session on EMQX through its REST API
// (DELETE /api/v5/clients/{clientid}) when the locker is disabled or
// replaced (DeviceAuthHTTP): EMQX does not ask the auth hook again for a
// session it admitted. local is the embedded broker, whose Kick forgets the
// secret the hook cached.
type emqxKicker struct {
	local       interface{ Kick(id string) }
	base        string // e.g. https://emqx:18083
	key, secret string // an EMQX API key, sent as HTTP basic auth
	client      *http.Client
	log         *slog.Logger
}

// newEMQXKicker parses BrokerAPIURL and BrokerAPIKey ("key:secret").
func newEMQXKicker(o Options, local interface{ Kick(id string) }) (*emqxKicker, error) {
	u, err := url.Parse(o.BrokerAPIURL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.User != nil || u.RawQuery != "" || u.Fragment != "" {
		return nil, fmt.Errorf("--broker-api-url %q: want http(s)://host:port of EMQX's REST API (no user, query or fragment; the key goes in --broker-api-key)", o.BrokerAPIURL)
	}
	key, secret, ok := strings.Cut(o.BrokerAPIKey, ":")
	if !ok || key == "" || secret == "" {
		return nil, fmt.Errorf("--broker-api-key (env LOCKERGATE_BROKER_API_KEY): want key:secret of an EMQX API key")
	}
	return &emqxKicker{local: local, base: strings.TrimSuffix(u.String(), "/"), key: key, secret: secret,
		// Short: a replacement's answer waits for it (provisioning's 10 s).
		client: &http.Client{Timeout: 3 * time.Second}, log: o.Logger.With("component", "emqx-api")}, nil
}

// Kick implements httpapi.Kicker and provisioning's OnReplace.
func (k *emqxKicker) Kick(id string) {
	k.local.Kick(id)
	req, err := http.NewRequestWithContext(context.Background(), http.MethodDelete, k.base+"/api/v5/clients/"+url.PathEscape(id), nil)
	if err != nil {
		k.log.Error("end locker session on EMQX", "locker", id, "err", err)
		return
	}
	req.SetBasicAuth(k.key, k.secret)
	resp, err := k.client.Do(req)
	if err != nil {
		k.log.Error("end locker session on EMQX: its API did not answer; end it by hand", "locker", id, "err", err)
		return
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
	switch resp.StatusCode {
	case http.StatusNoContent:
		k.log.Info("locker session ended on EMQX", "locker", id)
	case http.StatusNotFound: // not connected: nothing to end
	default:
		k.log.Error("end locker session on EMQX: refused; check --broker-api-key and the key's permissions, or end it by hand",
			"locker", id, "status", resp.StatusCode, "body", string(body))
	}
}
