package webhook

import (
	"net/http"
	"net/http/httptest"
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
	if _, err := c.Post(srv.URL, "application/json", nil); err == nil || !strings.Contains(err.Error(), "not public") {
		t.Fatalf("loopback webhook: got %v, want a refusal", err)
	}
	c = &http.Client{Transport: transport(true), Timeout: 5 * time.Second}
	resp, err := c.Post(srv.URL, "application/json", nil)
	if err != nil {
		t.Fatalf("with AllowPrivate: %v", err)
	}
	resp.Body.Close()
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
