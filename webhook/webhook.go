// Package webhook delivers pickup events to delivery platforms and stores:
// a durable outbox in PostgreSQL, signed requests, retries with exponential
// back-off and jitter for at least 24 hours, in order per pickup.
package webhook

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// EventAlertRaised is the event of an alert opened on a locker (GET
// /v1/alerts): admin and operator webhooks get every one, a store's those
// of its site; platforms get none. Webhooks get it only when they list it.
const EventAlertRaised = "alert.raised"

// Webhook is a subscription: events of its owner's scope go to URL.
type Webhook struct {
	ID        string    `json:"id"`
	TokenID   string    `json:"token,omitempty"`
	Role      string    `json:"role"`
	Site      string    `json:"site,omitempty"`
	Platform  string    `json:"platform,omitempty"`
	URL       string    `json:"url"`
	Events    []string  `json:"events"`
	CreatedAt time.Time `json:"created_at"`
	// Failing counts the attempts that found the receiver unreachable in
	// a row (no answer, a 5xx or a 429); while HeldUntil is set, none of
	// the webhook's deliveries is tried (Outcome.Hold).
	Failing   int        `json:"failing"`
	HeldUntil *time.Time `json:"held_until,omitempty"`
}

// Delivery is one event queued for one webhook.
type Delivery struct {
	Seq         int64           `json:"seq"`
	WebhookID   string          `json:"webhook"`
	TokenID     string          `json:"-"` // its webhook's token (LeaseDue)
	EventID     string          `json:"event_id"`
	Type        string          `json:"type"`
	Subject     string          `json:"subject"`
	Body        json.RawMessage `json:"-"`
	State       string          `json:"state"`
	Attempts    int             `json:"attempts"`
	NextAttempt time.Time       `json:"next_attempt"`
	LastStatus  *int            `json:"last_status,omitempty"`
	LastError   string          `json:"last_error,omitempty"`
	CreatedAt   time.Time       `json:"created_at"`
	DeliveredAt *time.Time      `json:"delivered_at,omitempty"`
	Log         []Attempt       `json:"attempts_log,omitempty"`
}

// Attempt is one try to deliver.
type Attempt struct {
	TS         time.Time `json:"ts"`
	Status     *int      `json:"status,omitempty"`
	Error      string    `json:"error,omitempty"`
	DurationMS float64   `json:"duration_ms"`
}

// Outcome of an attempt recorded by the store.
type Outcome struct {
	At        time.Time
	Status    *int
	Error     string
	Duration  time.Duration
	Delivered bool
	// Next is the next attempt's time; zero with !Delivered means give up.
	Next time.Time
	// Hold, when set, holds every pending delivery of the webhook and
	// counts the attempt in the webhook's Failing: the receiver was
	// unreachable, so its other deliveries would fare no better.
	// Delivered sets Failing back to 0 and lifts a hold.
	Hold *Hold
}

// Hold is how long an unreachable receiver's webhook is held: Base·2^f
// from the attempt's time, f being the webhook's failures in a row before
// this one as the store reads them when it records the attempt (so that a
// success recorded meanwhile, which reset them, is not undone by a longer
// hold), capped at Max and jittered to 50-100%; a longer hold already set
// stays. The webhook's pending deliveries created before GiveUpBefore, and
// not leased, are given up (they would not be tried again in their time).
type Hold struct {
	Base, Max    time.Duration
	GiveUpBefore time.Time
}

// Backlog is what waits in the outbox.
type Backlog struct {
	Pending int           // deliveries pending
	Oldest  time.Duration // age of the oldest pending one
	Held    int           // live webhooks held: their receiver was unreachable
}

// Store is the outbox.
type Store interface {
	// CreateWebhook stores w unless its token has limit live webhooks
	// already (ErrTooMany); concurrent creates for one token take turns, so
	// none passes the limit.
	CreateWebhook(ctx context.Context, w *Webhook, secretEnc []byte, limit int) error
	GetWebhook(ctx context.Context, id string) (*Webhook, []byte, error)
	// ListWebhooks lists the live webhooks of a token ("" for all) in id
	// order: up to limit after the id after ("" from the first).
	ListWebhooks(ctx context.Context, tokenID, after string, limit int) ([]Webhook, error)
	DeleteWebhook(ctx context.Context, id string) error
	// LeaseDue leases up to n pending deliveries that are due and are the
	// oldest pending one of their (webhook, subject), at most perToken of
	// the webhooks of one token (slow receivers, however many webhooks
	// one token makes for them, do not take every worker) and none of the
	// tokens in busy (those whose webhooks the caller is still sending
	// to), for lease. Each delivery comes with its webhook's TokenID.
	LeaseDue(ctx context.Context, now time.Time, lease time.Duration, n, perToken int, busy []string) ([]Delivery, error)
	// RecordAttempt records an attempt at a delivery and, if the delivery
	// is still pending (a copy sent under an expired lease may finish
	// after another), its new state. It returns how many of the webhook's
	// pending deliveries a hold (o.Hold) gave up, their time being over
	// (the attempted one too if o asked to retry it past the hold's
	// GiveUpBefore, which the dispatcher never does); 0 when the attempt
	// was recorded already.
	RecordAttempt(ctx context.Context, seq int64, o Outcome) (gaveUp int, err error)
	ListDeliveries(ctx context.Context, webhookID string, after int64, limit int) ([]Delivery, error)
	// Backlog counts pending deliveries and the age of the oldest, and
	// the webhooks held at now (Outcome.Hold).
	Backlog(ctx context.Context, now time.Time) (Backlog, error)
}

// ValidateURL accepts absolute http and https URLs, with a port (if any)
// from 1 to 65535, no user name or password (a receiver authenticates the
// gateway by the signature; a password in the URL would be shown back in
// every listing), and an IPv4 address only in dotted-decimal form: a host
// like 2130706433, 0x7f000001 or 127.1 is an address spelled the way
// inet_aton reads it, which the gateway's resolver takes for a name, so
// the address rules (public only) could not judge it.
func ValidateURL(raw string) error {
	u, err := url.Parse(raw)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || len(raw) > 2048 {
		return fmt.Errorf("url must be an absolute http(s) URL of at most 2048 bytes")
	}
	if u.User != nil {
		return fmt.Errorf("url must not hold a user name or password: receivers check the Lockergate-Signature header")
	}
	if p := u.Port(); p != "" {
		if n, err := strconv.Atoi(p); err != nil || n < 1 || n > 65535 {
			return fmt.Errorf("url's port %q: want 1 to 65535", p)
		}
	}
	if host := u.Hostname(); numericHost(host) {
		if _, err := netip.ParseAddr(host); err != nil {
			return fmt.Errorf("url's host %q is an IPv4 address in a short or numeric form: write it as four decimal numbers (a.b.c.d), or use a name", host)
		}
	}
	return nil
}

// numericHost reports whether every dot-separated label of host is a
// decimal number or 0x and hex digits: an IPv4 address in some spelling
// (no DNS name has an all-numeric top-level label).
func numericHost(host string) bool {
	labels := strings.Split(strings.TrimSuffix(host, "."), ".")
	for _, l := range labels {
		digits := l
		if len(l) > 2 && (l[:2] == "0x" || l[:2] == "0X") {
			digits = l[2:]
			if strings.Trim(digits, "0123456789abcdefABCDEF") != "" {
				return false
			}
			continue
		}
		if digits == "" || strings.Trim(digits, "0123456789") != "" {
			return false
		}
	}
	return true
}

// Sign returns the Lockergate-Signature header value for body sent at t:
// t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>.
func Sign(secret string, t time.Time, body []byte) string {
	ts := strconv.FormatInt(t.Unix(), 10)
	m := hmac.New(sha256.New, []byte(secret))
	m.Write([]byte(ts + "."))
	m.Write(body)
	return "t=" + ts + ",v1=" + hex.EncodeToString(m.Sum(nil))
}

// Verify checks a Lockergate-Signature header against body, accepting
// timestamps within tolerance of now (receivers use it; so do our tests).
func Verify(secret, header string, body []byte, now time.Time, tolerance time.Duration) error {
	var ts int64
	var sig string
	for _, part := range splitComma(header) {
		switch {
		case len(part) > 2 && part[:2] == "t=":
			ts, _ = strconv.ParseInt(part[2:], 10, 64)
		case len(part) > 3 && part[:3] == "v1=":
			sig = part[3:]
		}
	}
	if ts == 0 || sig == "" {
		return errors.New("malformed signature header")
	}
	t := time.Unix(ts, 0)
	if d := now.Sub(t); d > tolerance || d < -tolerance {
		return errors.New("signature timestamp outside tolerance")
	}
	want := Sign(secret, t, body)
	if !hmac.Equal([]byte(want), []byte("t="+strconv.FormatInt(ts, 10)+",v1="+sig)) {
		return errors.New("signature mismatch")
	}
	return nil
}

func splitComma(s string) []string {
	var out []string
	start := 0
	for i := 0; i <= len(s); i++ {
		if i == len(s) || s[i] == ',' {
			out = append(out, s[start:i])
			start = i + 1
		}
	}
	return out
}

// sealer encrypts webhook secrets at rest (they must be usable to sign, so
// they cannot be hashed) with a key derived from the master key.
type sealer struct{ aead cipher.AEAD }

func newSealer(master []byte) (*sealer, error) {
	m := hmac.New(sha256.New, master)
	m.Write([]byte("lockergate/webhook-secret/v1"))
	block, err := aes.NewCipher(m.Sum(nil))
	if err != nil {
		return nil, err
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, err
	}
	return &sealer{aead: aead}, nil
}

func (s *sealer) seal(plain, id string) []byte {
	nonce := make([]byte, s.aead.NonceSize())
	rand.Read(nonce)
	return s.aead.Seal(nonce, nonce, []byte(plain), []byte(id))
}

func (s *sealer) open(enc []byte, id string) (string, error) {
	n := s.aead.NonceSize()
	if len(enc) < n {
		return "", errors.New("sealed secret too short")
	}
	b, err := s.aead.Open(nil, enc[:n], enc[n:], []byte(id))
	return string(b), err
}
