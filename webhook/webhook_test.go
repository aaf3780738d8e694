package webhook

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"strings"
	"testing"
	"time"
)

func TestSignVerify(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	body := []byte(`{"id":"evt-1"}`)
	h := Sign("whsec_x", now, body)
	if !strings.HasPrefix(h, "t=1800000000,v1=") {
		t.Fatalf("header %q", h)
	}
	t.Run("OK", func(t *testing.T) {
		if err := Verify("whsec_x", h, body, now.Add(time.Minute), 5*time.Minute); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("ErrTampered", func(t *testing.T) {
		if Verify("whsec_x", h, []byte(`{"id":"evt-2"}`), now, time.Minute) == nil {
			t.Fatal("tampered body verified")
		}
	})
	t.Run("ErrWrongSecret", func(t *testing.T) {
		if Verify("whsec_y", h, body, now, time.Minute) == nil {
			t.Fatal("wrong secret verified")
		}
	})
	t.Run("ErrStale", func(t *testing.T) {
		if Verify("whsec_x", h, body, now.Add(time.Hour), 5*time.Minute) == nil {
			t.Fatal("stale signature verified")
		}
	})
}

// TestTransportRefusesPrivate: without AllowPrivate a webhook cannot make the
// gateway call loopback (or any private address).
func TestTransportRefusesPrivate(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	defer srv.Close()
	c := &http.Client{Transport: transport(false), Timeout: 5 * time.Second}
	_, err := c.Post(srv.URL, "application/json", nil)
	if err == nil || !strings.Contains(err.Error(), "not public") {
		t.Fatalf("loopback webhook: got %v, want a refusal", err)
	}
	// The deliveries log, which the webhook's token reads, does not say
	// which address its host resolved to.
	if got := receiverError(err); strings.Contains(got, "127.0.0.1") || !strings.Contains(got, "not public") {
		t.Fatalf("recorded as %q: want the refusal without the address", got)
	}
	c = &http.Client{Transport: transport(true), Timeout: 5 * time.Second}
	resp, err := c.Post(srv.URL, "application/json", nil)
	if err != nil {
		t.Fatalf("with AllowPrivate: %v", err)
	}
	resp.Body.Close()
}

// TestPublic: the addresses a webhook may reach. Besides loopback and the
// private ranges, carrier-grade NAT (where some clouds keep their metadata
// service), reserved and documentation ranges are refused, and IPv6 forms
// that reach an IPv4 address (mapped, NAT64, 6to4) are judged by it.
func TestPublic(t *testing.T) {
	for addr, want := range map[string]bool{
		"93.184.216.34": true, "2606:2800:220:1:248:1893:25c8:1946": true,
		"64:ff9b::5db8:d822": true, // NAT64 of 93.184.216.34
		"127.0.0.1":          false, "10.1.2.3": false, "172.16.0.1": false, "192.168.1.1": false,
		"169.254.169.254": false, "0.0.0.0": false, "0.1.2.3": false,
		"100.100.100.200": false, "100.64.0.1": false, "198.18.0.1": false, "240.0.0.1": false,
		"255.255.255.255": false, "224.0.0.1": false, "192.0.2.1": false,
		"::1": false, "::": false, "fe80::1": false, "fc00::1": false, "fec0::1": false, "ff02::1": false,
		"::ffff:127.0.0.1": false, "::ffff:10.0.0.1": false,
		"64:ff9b::a9fe:a9fe": false, "64:ff9b::7f00:1": false, // NAT64 of 169.254.169.254, 127.0.0.1
		"2002:a9fe:a9fe::1": false, "2002:c0a8:101::1": false, // 6to4 of 169.254.169.254, 192.168.1.1
		"64:ff9b:1::1": false, "2001:db8::1": false,
	} {
		if got := public(netip.MustParseAddr(addr)); got != want {
			t.Errorf("public(%s) = %v, want %v", addr, got, want)
		}
	}
}

func TestBackoff(t *testing.T) {
	d := &Dispatcher{o: Options{BackoffBase: time.Second, BackoffMax: time.Minute}}
	for n, want := range map[int]time.Duration{1: time.Second, 2: 2 * time.Second, 4: 8 * time.Second, 20: time.Minute} {
		got := d.backoff(n)
		if got < want/2 || got > want {
			t.Errorf("attempt %d: %v, want within [%v, %v]", n, got, want/2, want)
		}
	}
}

func TestSealer(t *testing.T) {
	s, err := newSealer(make([]byte, 32))
	if err != nil {
		t.Fatal(err)
	}
	enc := s.seal("whsec_abc", "wh-1")
	if strings.Contains(string(enc), "whsec_abc") {
		t.Fatal("secret stored in clear")
	}
	if got, err := s.open(enc, "wh-1"); err != nil || got != "whsec_abc" {
		t.Fatalf("open: %q %v", got, err)
	}
	if _, err := s.open(enc, "wh-2"); err == nil {
		t.Fatal("a sealed secret opened under another webhook's id")
	}
}

// TestReceiverErrorHidesTheResolver: a failed lookup is recorded without
// the address of the gateway's resolver.
func TestReceiverErrorHidesTheResolver(t *testing.T) {
	err := &url.Error{Op: "Post", URL: "https://hooks.example/", Err: &net.OpError{Op: "dial", Net: "tcp",
		Err: &net.DNSError{Name: "hooks.example", Server: "10.0.0.2:53", Err: "no such host", IsNotFound: true}}}
	if got, want := receiverError(err), "lookup hooks.example: no such host"; got != want {
		t.Fatalf("recorded as %q, want %q", got, want)
	}
	// A resolver that does not answer: Go puts the socket's error, with
	// both ends' addresses, in Err.
	timeout := &net.DNSError{Name: "hooks.example", Server: "10.0.0.2:53", IsTimeout: true,
		Err: "read udp 10.1.2.3:45012->10.0.0.2:53: i/o timeout"}
	if got, want := receiverError(&url.Error{Op: "Post", URL: "https://hooks.example/", Err: timeout}), "lookup hooks.example: timed out"; got != want {
		t.Fatalf("recorded as %q, want %q", got, want)
	}
	if got := receiverError(errors.New("receiver answered 500")); got != "receiver answered 500" {
		t.Fatalf("another error recorded as %q", got)
	}
}

// TestUnreachable: what holds a webhook is a receiver that did not answer
// or said it cannot now (5xx, 429); an answer about the one event (another
// 4xx, a redirect not followed) or a delivery holds nothing.
func TestUnreachable(t *testing.T) {
	status := func(n int) *int { return &n }
	for _, tc := range []struct {
		o    Outcome
		want bool
	}{
		{Outcome{Error: "timeout"}, true},
		{Outcome{Status: status(503)}, true},
		{Outcome{Status: status(500)}, true},
		{Outcome{Status: status(429)}, true},
		{Outcome{Status: status(404)}, false},
		{Outcome{Status: status(400)}, false},
		{Outcome{Status: status(302)}, false},
		{Outcome{Status: status(200), Delivered: true}, false},
	} {
		if got := unreachable(tc.o); got != tc.want {
			st := "none"
			if tc.o.Status != nil {
				st = fmt.Sprint(*tc.o.Status)
			}
			t.Errorf("status %s, delivered %v: unreachable %v, want %v", st, tc.o.Delivered, got, tc.want)
		}
	}
}

// TestValidateURL: absolute http(s) URLs with a real port, no credentials,
// and IPv4 addresses only as four decimal numbers (the short and numeric
// spellings inet_aton reads are names to the resolver, so the public-only
// rule could not judge them).
func TestValidateURL(t *testing.T) {
	for raw, ok := range map[string]bool{
		"https://hooks.example/x":              true,
		"http://hooks.example:8080/x?y=1":      true,
		"https://203.0.113.7/x":                true,
		"https://[2001:db8::1]:8443/x":         true,
		"https://1e100.net/x":                  true,
		"https://123.example/x":                true,
		"ftp://hooks.example/x":                false,
		"/relative":                            false,
		"https://hooks.example:99999/x":        false,
		"https://hooks.example:0/x":            false,
		"https://user:pw@hooks.example/x":      false,
		"https://user@hooks.example/x":         false,
		"https://2130706433/x":                 false,
		"http://0x7f000001/x":                  false,
		"http://127.1/x":                       false,
		"http://0x7f.0.0.1/x":                  false,
		"http://127.0.0.1./x":                  false,
		"https://" + strings.Repeat("a", 2049): false,
	} {
		if err := ValidateURL(raw); (err == nil) != ok {
			t.Errorf("ValidateURL(%q) = %v, want ok %v", raw, err, ok)
		}
	}
}
