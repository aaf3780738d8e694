package broker

import (
	"crypto/sha256"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
)

// TestRateLimitSparesKnownSecret: wrong secrets sent with a device's id (or
// from its address) must not lock the device out once its cache entry has
// expired; device ids are not secret.
func TestRateLimitSparesKnownSecret(t *testing.T) {
	t.Run("ByClientID", func(t *testing.T) {
		h := newHarness(t, func(o *Options) { o.AuthCacheTTL = time.Nanosecond }, nil)
		h.mustDialDevice(t, "A").Disconnect(50)
		for i := 0; i < 6; i++ {
			if _, err := h.dial(t, "A", "A", "guess"); err == nil {
				t.Fatal("wrong secret accepted")
			}
		}
		if got := h.metric(t, failures, "reason", refuseRateLimited); got != 1 {
			t.Fatalf("rate_limited = %v, want 1 (the sixth guess)", got)
		}
		h.mustDialDevice(t, "A").Disconnect(50)
		if got, want := h.auth.calls("A"), 1+5+1; got != want {
			t.Errorf("AuthDevice calls = %d, want %d (the known secret is still checked)", got, want)
		}
		if _, err := h.dial(t, "A", "A", "guess"); err == nil {
			t.Fatal("wrong secret accepted")
		}
		// The device's success reset the id's count; the guess is checked and refused.
		if got := h.metric(t, failures, "reason", refuseBadCredentials); got != 6 {
			t.Errorf("bad_credentials = %v, want 6", got)
		}
	})
	t.Run("ByAddress", func(t *testing.T) {
		h := newHarness(t, func(o *Options) { o.AuthCacheTTL = time.Nanosecond },
			func(b *Broker) { b.limiter.ipLimit, b.limiter.limitLocalhost = 3, true })
		h.mustDialDevice(t, "A").Disconnect(50)
		for _, id := range []string{"X1", "X2", "X3"} {
			if _, err := h.dial(t, id, id, "x"); err == nil {
				t.Fatalf("%s accepted", id)
			}
		}
		if _, err := h.dial(t, "B", "B", "secret-B"); err == nil {
			t.Fatal("B, never verified, connected from a blocked address")
		}
		h.mustDialDevice(t, "A")
	})
	t.Run("ChangedSecretForgotten", func(t *testing.T) {
		h := newHarness(t, func(o *Options) { o.AuthCacheTTL = time.Nanosecond }, nil)
		h.mustDialDevice(t, "A").Disconnect(50)
		// Replaced without a Kick: the old secret is refused by the backend
		// and no longer spared by the limiter.
		h.auth.setDevice("A", fakeDevice{secret: "secret-A2"})
		if _, err := h.dial(t, "A", "A", "secret-A"); err == nil {
			t.Fatal("old secret accepted")
		}
		if _, known := h.b.cache.lookup("A", sha256.Sum256([]byte("secret-A")), time.Now()); known {
			t.Error("refused secret still known")
		}
	})
}

// TestInvalidTopicPublishCounted: mochi drops a publish to $SYS before the
// ACL sees it; it is refused and counted all the same. (A topic name with
// wildcards is a protocol error that ends the connection.)
func TestInvalidTopicPublishCounted(t *testing.T) {
	h := newHarness(t, nil, nil)
	in := h.subscribe(t, "lockers/v1/#")
	r := dialRaw(t, h.addr, 4)
	if ack := r.connect("A", "A", "secret-A", 30, nil); ack.ReasonCode != 0 {
		t.Fatalf("CONNACK 0x%02x", ack.ReasonCode)
	}
	for _, topic := range []string{"$SYS/broker/clients/connected", "$sys/x", "$SYS"} {
		r.publish(topic, 0, []byte(`{}`))
	}
	r.publish("lockers/v1/A/events", 1, []byte(`{"marker":true}`))
	r.mustRead(packets.Puback)
	waitFor(t, "marker delivered", func() bool { return len(in.get()) == 1 })
	if got := in.topics(); got[0] != "lockers/v1/A/events" {
		t.Errorf("delivered %v, want only the marker", got)
	}
	if got := h.metric(t, "lockergate_mqtt_acl_denied_total", "action", "publish"); got != 3 {
		t.Errorf("acl_denied{publish} = %v, want 3", got)
	}
}
