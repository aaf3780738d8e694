package gateway

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"
)

// emqxKicker ends a locker's live session on EMQX through its REST API
// (DELETE /api/v5/clients/{clientid}) when the locker is disabled or
// replaced (DeviceAuthHTTP): EMQX does not ask the auth hook again for a
// session it admitted. local is the embedded broker, whose Kick forgets the
// secret the hook cached.
//
// For a disable, a check in flight at another instance may admit the
// locker just before the disable commits, and EMQX may register that
// session after the first DELETE; so the session is ended once more after
// the hook's longest answer. A DELETE that fails is tried again a few times.
type emqxKicker struct {
	local       interface{ Kick(id string) }
	base        string // e.g. https://emqx:18083
	key, secret string // an EMQX API key, sent as HTTP basic auth
	client      *http.Client
	log         *slog.Logger
	// again are the delays of the follow-up DELETEs.
	again []time.Duration
	// disabled, when set, tells whether the locker is still disabled: a
	// follow-up for a locker enabled since is dropped (a replacement does
	// not enable a disabled locker).
	disabled func(ctx context.Context, id string) (bool, error)

	ctx    context.Context // ends the follow-ups (close)
	stop   context.CancelFunc
	mu     sync.Mutex
	closed bool
	wg     sync.WaitGroup
}

// emqxFollowUps: once past the hook's longest answer (4 s), then retries.
var emqxFollowUps = []time.Duration{6 * time.Second, 30 * time.Second, 2 * time.Minute}

// parseBrokerAPI checks BrokerAPIURL and BrokerAPIKey ("key:secret").
func parseBrokerAPI(o Options) (base, key, secret string, err error) {
	u, err := url.Parse(o.BrokerAPIURL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.User != nil || u.RawQuery != "" || u.Fragment != "" {
		return "", "", "", fmt.Errorf("--broker-api-url %q: want http(s)://host:port of EMQX's REST API (no user, query or fragment; the key goes in --broker-api-key)", o.BrokerAPIURL)
	}
	key, secret, ok := strings.Cut(o.BrokerAPIKey, ":")
	if !ok || key == "" || secret == "" {
		return "", "", "", fmt.Errorf("--broker-api-key (env LOCKERGATE_BROKER_API_KEY): want key:secret of an EMQX API key")
	}
	return strings.TrimSuffix(u.String(), "/"), key, secret, nil
}

func newEMQXKicker(o Options, local interface{ Kick(id string) }) (*emqxKicker, error) {
	base, key, secret, err := parseBrokerAPI(o)
	if err != nil {
		return nil, err
	}
	ctx, stop := context.WithCancel(context.Background())
	return &emqxKicker{local: local, base: base, key: key, secret: secret,
		// Short: a replacement's answer waits for it (provisioning's 10 s).
		client: &http.Client{Timeout: 3 * time.Second}, log: o.Logger.With("component", "emqx-api"),
		again: emqxFollowUps, ctx: ctx, stop: stop}, nil
}

// Replace is provisioning's OnReplace: the old board's session ends once,
// and it reports whether EMQX said it did (or had none). No follow-up: the
// new board, on the same client id, takes over whatever session is left,
// and a later DELETE would end the new board's.
func (k *emqxKicker) Replace(id string) bool {
	k.local.Kick(id)
	return k.end(id, false)
}

// Kick implements httpapi.Kicker (a locker disabled).
func (k *emqxKicker) Kick(id string) {
	k.local.Kick(id)
	done := k.end(id, false)
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.closed {
		return
	}
	k.wg.Add(1)
	go func() {
		defer k.wg.Done()
		for i, d := range k.again {
			if done && i > 0 {
				return // ended, and the follow-up is done
			}
			t := time.NewTimer(d)
			select {
			case <-k.ctx.Done():
				t.Stop()
				return
			case <-t.C:
			}
			if k.disabled != nil {
				if still, err := k.disabled(k.ctx, id); err == nil && !still {
					return // enabled since: its session is legitimate
				}
			}
			done = k.end(id, true)
		}
	}()
}

// end asks EMQX to end id's session; true when it is gone.
func (k *emqxKicker) end(id string, followUp bool) bool {
	req, err := http.NewRequestWithContext(k.ctx, http.MethodDelete, k.base+"/api/v5/clients/"+url.PathEscape(id), nil)
	if err != nil {
		k.log.Error("end locker session on EMQX", "locker", id, "err", err)
		return false
	}
	req.SetBasicAuth(k.key, k.secret)
	resp, err := k.client.Do(req)
	if err != nil {
		if k.ctx.Err() == nil {
			k.log.Error("end locker session on EMQX: its API did not answer; tried again later, or end it by hand", "locker", id, "err", err)
		}
		return false
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
	switch resp.StatusCode {
	case http.StatusNoContent:
		if followUp {
			k.log.Warn("locker session ended on EMQX again: it had come back", "locker", id)
		} else {
			k.log.Info("locker session ended on EMQX", "locker", id)
		}
		return true
	case http.StatusNotFound: // not connected: nothing to end
		return true
	}
	k.log.Error("end locker session on EMQX: refused; check --broker-api-key and the key's permissions, or end it by hand",
		"locker", id, "status", resp.StatusCode, "body", string(body))
	return false
}

// close ends the follow-ups and waits for them.
func (k *emqxKicker) close() {
	k.mu.Lock()
	k.closed = true
	k.mu.Unlock()
	k.stop()
	k.wg.Wait()
}
