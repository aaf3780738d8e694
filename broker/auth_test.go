package broker

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/mochi-mqtt/server/v2/packets"
)

const failures = "lockergate_mqtt_auth_failures_total"

// TestConnectRefused is the CONNECT half of the attack suite: every shape of
// credentials that must not get a session, over real TCP.
func TestConnectRefused(t *testing.T) {
	tests := []struct {
		name             string
		id, user, pass   string
		mod              func(*paho.ClientOptions)
		opt              func(*Options)
		backendDown      bool
		reason           string
		wantDeviceChecks int // AuthDevice calls for id
	}{
		{name: "BadSecret", id: "A", user: "A", pass: "wrong", reason: refuseBadCredentials, wantDeviceChecks: 1},
		{name: "OtherDevicesSecret", id: "A", user: "A", pass: "secret-B", reason: refuseBadCredentials, wantDeviceChecks: 1},
		{name: "UnknownDevice", id: "Z", user: "Z", pass: "secret-Z", reason: refuseUnknownDevice, wantDeviceChecks: 1},
		{name: "Disabled", id: "D", user: "D", pass: "secret-D", reason: refuseDisabled, wantDeviceChecks: 1},
		{name: "ClientIDNotUsername", id: "A", user: "B", pass: "secret-B", reason: refuseClientIDMismatch},
		{name: "EmptyCredentials", id: "A", reason: refuseBadCredentials},
		{name: "EmptyPassword", id: "A", user: "A", reason: refuseBadCredentials},
		{name: "WildcardID", id: "a+b", user: "a+b", pass: "pw-wildcard", reason: refuseInvalidClientID},
		{name: "SlashID", id: "lockers/v1", user: "lockers/v1", pass: "pw-slash", reason: refuseInvalidClientID},
		{name: "ReservedInlineID", id: "inline", user: "inline", pass: "pw-inline", reason: refuseInvalidClientID},
		{name: "TooLongID", id: strings.Repeat("x", 65), user: strings.Repeat("x", 65), pass: "pw-long", reason: refuseInvalidClientID},
		{name: "BackendDown", id: "A", user: "A", pass: "secret-A", backendDown: true, reason: refuseBackendError, wantDeviceChecks: 1},
		{name: "WillOnOtherDevice", id: "A", user: "A", pass: "secret-A", reason: refuseWillDenied,
			mod: func(o *paho.ClientOptions) { o.SetWill("lockers/v1/B/presence", `{"online":false}`, 1, true) }},
		{name: "WillOnCommandTopic", id: "A", user: "A", pass: "secret-A", reason: refuseWillDenied,
			mod: func(o *paho.ClientOptions) { o.SetWill("lockers/v1/A/cmd", `{}`, 1, true) }},
		{name: "ClaimWrongUsername", id: "prov-SN1", user: "SN1", pass: claimToken, reason: refuseClientIDMismatch},
		{name: "ClaimDeviceUsername", id: "prov-SN1", user: "A", pass: "secret-A", reason: refuseClientIDMismatch},
		{name: "ClaimUnknownToken", id: "prov-SN1", user: "claim", pass: "no-such-claim", reason: refuseUnknownClaim},
		{name: "ClaimInvalidSerial", id: "prov-SN/1", user: "claim", pass: claimToken, reason: refuseInvalidClientID},
		{name: "ClaimEmptySerial", id: "prov-", user: "claim", pass: claimToken, reason: refuseInvalidClientID},
		{name: "ClaimWithWill", id: "prov-SN1", user: "claim", pass: claimToken, reason: refuseWillDenied,
			mod: func(o *paho.ClientOptions) { o.SetWill("provision/v1/SN1/request", `{}`, 1, false) }},
		{name: "ClaimBackendDown", id: "prov-SN1", user: "claim", pass: claimToken, backendDown: true, reason: refuseBackendError},
		{name: "ClaimWithoutProvisioner", id: "prov-SN1", user: "claim", pass: claimToken, reason: refuseNoProvisioning,
			opt: func(o *Options) { o.Provisioner = nil }},
		{name: "DeviceUsingClaim", id: "A", user: "claim", pass: claimToken, reason: refuseClientIDMismatch},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, tc.opt, nil)
			if tc.backendDown {
				h.auth.fail(errors.New("connection refused"))
			}
			var mods []func(*paho.ClientOptions)
			if tc.mod != nil {
				mods = append(mods, tc.mod)
			}
			if c, err := h.dial(t, tc.id, tc.user, tc.pass, mods...); err == nil {
				c.Disconnect(0)
				t.Fatal("connected, want refused")
			}
			if got := h.metric(t, failures, "reason", tc.reason); got != 1 {
				t.Errorf("%s{reason=%q} = %v, want 1", failures, tc.reason, got)
			}
			if got := h.auth.calls(tc.id); got != tc.wantDeviceChecks {
				t.Errorf("AuthDevice calls = %d, want %d", got, tc.wantDeviceChecks)
			}
			if got := h.obs.get(); len(got) != 0 {
				t.Errorf("observer events = %v, want none", got)
			}
			for _, k := range []string{"device", "provisioning"} {
				if got := h.metric(t, "lockergate_mqtt_connects_total", "kind", k); got != 0 {
					t.Errorf("connects{kind=%s} = %v, want 0", k, got)
				}
			}
			if tc.pass != "" && strings.Contains(h.logs.String(), tc.pass) {
				t.Errorf("log contains the password %q", tc.pass)
			}
			if !strings.Contains(h.logs.String(), "reason="+tc.reason) {
				t.Errorf("refusal not logged with its reason:\n%s", h.logs)
			}
		})
	}
}

// TestEmptyPasswordRefusedAsBadCredentials: a CONNECT whose password flag
// is set with a zero-length password (mosquitto_pub -P "" sends one) is
// valid MQTT and refused as wrong credentials, with the code each version
// has for that; mochi refused it as a protocol error, 0x82, which MQTT 3.1.1
// has no CONNACK code for, and the refusal went uncounted (patch 31).
func TestEmptyPasswordRefusedAsBadCredentials(t *testing.T) {
	for v, want := range map[byte]byte{4: packets.Err3NotAuthorized.Code, 5: packets.ErrBadUsernameOrPassword.Code} {
		t.Run(fmt.Sprintf("MQTT%d", v), func(t *testing.T) {
			h := newHarness(t, nil, nil)
			r := dialRaw(t, h.addr, v)
			ack := r.connect("A", "A", "", 30, func(pk *packets.Packet) { pk.Connect.PasswordFlag = true })
			if ack.ReasonCode != want {
				t.Errorf("CONNACK %#x, want %#x", ack.ReasonCode, want)
			}
			r.waitClosed()
			if got := h.metric(t, failures, "reason", refuseBadCredentials); got != 1 {
				t.Errorf("%s{reason=%q} = %v, want 1", failures, refuseBadCredentials, got)
			}
		})
	}
}

func TestConnectAccepted(t *testing.T) {
	h := newHarness(t, nil, nil)
	t.Run("Device", func(t *testing.T) {
		c := h.mustDialDevice(t, "A")
		waitFor(t, "device connected", func() bool { return h.b.ConnectedDevices() == 1 })
		if got := h.metric(t, "lockergate_mqtt_connections", "kind", "device"); got != 1 {
			t.Errorf("connections{device} = %v, want 1", got)
		}
		c.Disconnect(50)
		waitFor(t, "device gone", func() bool { return h.b.ConnectedDevices() == 0 })
		if got, want := h.obs.get(), []string{"+A", "-A:" + ReasonClientDisconnect}; !equal(got, want) {
			t.Errorf("observer = %v, want %v", got, want)
		}
	})
	t.Run("DeviceWithOwnWill", func(t *testing.T) {
		h.mustDial(t, "B", "B", "secret-B", func(o *paho.ClientOptions) {
			o.SetWill("lockers/v1/B/presence", `{"online":false}`, 1, true)
		})
	})
	t.Run("Claim", func(t *testing.T) {
		h.mustDial(t, "prov-SN-00042", "claim", claimToken)
		if got := h.metric(t, "lockergate_mqtt_connects_total", "kind", "provisioning"); got != 1 {
			t.Errorf("connects{provisioning} = %v, want 1", got)
		}
	})
}

func TestAuthCache(t *testing.T) {
	h := newHarness(t, nil, nil)
	connect := func(pass string) error {
		c, err := h.dial(t, "A", "A", pass)
		if err == nil {
			c.Disconnect(50)
		}
		return err
	}
	if err := connect("secret-A"); err != nil {
		t.Fatal(err)
	}
	if err := connect("secret-A"); err != nil {
		t.Fatal(err)
	}
	if got := h.auth.calls("A"); got != 1 {
		t.Fatalf("AuthDevice calls after two connects = %d, want 1 (cached)", got)
	}
	if got := h.metric(t, "lockergate_mqtt_auth_cache_total", "result", "hit"); got != 1 {
		t.Errorf("cache hits = %v, want 1", got)
	}

	t.Run("WrongSecretAsksBackend", func(t *testing.T) {
		if err := connect("guess"); err == nil {
			t.Fatal("wrong secret accepted")
		}
		if got := h.auth.calls("A"); got != 2 {
			t.Errorf("AuthDevice calls = %d, want 2", got)
		}
		if err := connect("secret-A"); err != nil {
			t.Fatalf("cached secret refused after a failure: %v", err)
		}
		if got := h.auth.calls("A"); got != 2 {
			t.Errorf("AuthDevice calls = %d, want 2 (still cached)", got)
		}
	})
	t.Run("NewSecretAfterReplacement", func(t *testing.T) {
		h.auth.setDevice("A", fakeDevice{secret: "secret-A2"})
		if err := connect("secret-A2"); err != nil {
			t.Fatalf("new secret refused: %v", err)
		}
		if err := connect("secret-A2"); err != nil {
			t.Fatal(err)
		}
		if got := h.auth.calls("A"); got != 3 {
			t.Errorf("AuthDevice calls = %d, want 3 (new secret checked once, then cached)", got)
		}
		if err := connect("secret-A"); err == nil {
			t.Error("old secret still accepted after the new one was cached")
		}
	})
}

func TestAuthCacheUnit(t *testing.T) {
	now := time.Unix(1000, 0)
	c := newAuthCache(time.Minute)
	sum := sha256.Sum256([]byte("s"))
	other := sha256.Sum256([]byte("t"))

	c.store("A", sum, c.epoch("A"), now)
	if !c.match("A", sum, now.Add(59*time.Second)) {
		t.Error("fresh entry does not match")
	}
	if c.match("A", other, now) {
		t.Error("other secret matches")
	}
	if c.match("A", sum, now.Add(time.Minute)) {
		t.Error("expired entry matches")
	}

	t.Run("InvalidationDuringCheck", func(t *testing.T) {
		e := c.epoch("B")
		c.invalidate("B") // e.g. Kick while the backend was being asked
		c.store("B", sum, e, now)
		if c.match("B", sum, now) {
			t.Error("answer from before the invalidation was cached")
		}
	})
	t.Run("Bounded", func(t *testing.T) {
		c := newAuthCache(time.Minute)
		c.max = 8
		for i := 0; i < 100; i++ {
			id := string(rune('a' + i%26))
			c.store(id+strings.Repeat("x", i), sum, c.epoch(id), now)
		}
		if len(c.entries) > c.max {
			t.Errorf("cache holds %d entries, max %d", len(c.entries), c.max)
		}
	})
}

func TestRateLimit(t *testing.T) {
	t.Run("ByClientID", func(t *testing.T) {
		h := newHarness(t, nil, nil)
		for i := 0; i < 5; i++ {
			if _, err := h.dial(t, "A", "A", "guess"); err == nil {
				t.Fatal("wrong secret accepted")
			}
		}
		if _, err := h.dial(t, "A", "A", "secret-A"); err == nil {
			t.Fatal("connected while rate limited")
		}
		if got := h.metric(t, failures, "reason", refuseRateLimited); got != 1 {
			t.Errorf("rate_limited = %v, want 1", got)
		}
		if got := h.auth.calls("A"); got != 5 {
			t.Errorf("AuthDevice calls = %d, want 5 (blocked attempts never reach it)", got)
		}
		// Another device from the same address is unaffected.
		h.mustDialDevice(t, "B")
	})
	t.Run("CachedDeviceStillConnects", func(t *testing.T) {
		h := newHarness(t, nil, nil)
		h.mustDialDevice(t, "A").Disconnect(50)
		for i := 0; i < 6; i++ {
			if _, err := h.dial(t, "A", "A", "guess"); err == nil {
				t.Fatal("wrong secret accepted")
			}
		}
		if got := h.metric(t, failures, "reason", refuseRateLimited); got != 1 {
			t.Errorf("rate_limited = %v, want 1 (the sixth guess)", got)
		}
		h.mustDialDevice(t, "A") // its verified secret is not locked out by someone else's guesses
	})
	t.Run("ByAddress", func(t *testing.T) {
		h := newHarness(t, nil, func(b *Broker) { b.limiter.ipLimit, b.limiter.limitLocalhost = 3, true })
		for _, id := range []string{"X1", "X2", "X3"} {
			if _, err := h.dial(t, id, id, "x"); err == nil {
				t.Fatalf("%s accepted", id)
			}
		}
		if _, err := h.dial(t, "X4", "X4", "x"); err == nil {
			t.Fatal("X4 accepted")
		}
		if got := h.auth.calls("X4"); got != 0 {
			t.Errorf("AuthDevice(X4) calls = %d, want 0", got)
		}
		if got := h.metric(t, failures, "reason", refuseRateLimited); got != 1 {
			t.Errorf("rate_limited = %v, want 1", got)
		}
		if _, err := h.dial(t, "prov-SN1", "claim", claimToken); err == nil {
			t.Error("claim session accepted from a blocked address")
		}
	})
	t.Run("LocalhostIsNotLimitedAsAnAddress", func(t *testing.T) {
		// A proxy on this host makes every client loopback: wrong guesses
		// must not refuse everyone else. The client id limit still holds.
		h := newHarness(t, nil, func(b *Broker) { b.limiter.ipLimit = 3 })
		for _, id := range []string{"X1", "X2", "X3", "X4"} {
			if _, err := h.dial(t, id, id, "x"); err == nil {
				t.Fatalf("%s accepted", id)
			}
		}
		if got := h.auth.calls("X4"); got != 1 {
			t.Errorf("AuthDevice(X4) calls = %d, want 1 (127.0.0.1 is not blocked as an address)", got)
		}
		if got := h.metric(t, failures, "reason", refuseRateLimited); got != 0 {
			t.Errorf("rate_limited = %v, want 0", got)
		}
		h.mustDialDevice(t, "B")
		c, err := h.dial(t, "prov-SN1", "claim", claimToken)
		if err != nil {
			t.Fatalf("claim session from 127.0.0.1 after others' wrong guesses: %v", err)
		}
		c.Disconnect(50)
	})
}

func TestFailLimiterUnit(t *testing.T) {
	now := time.Unix(1000, 0)
	l := newFailLimiter()
	for i := 0; i < 4; i++ {
		l.fail("k", 5, now.Add(time.Duration(i)*time.Second))
	}
	if l.blocked("k", now.Add(5*time.Second)) {
		t.Fatal("blocked after 4 failures")
	}
	l.fail("k", 5, now.Add(5*time.Second))
	if !l.blocked("k", now.Add(6*time.Second)) {
		t.Fatal("not blocked after 5 failures in a minute")
	}
	if l.blocked("k", now.Add(5*time.Second+l.block)) {
		t.Error("still blocked after the back-off")
	}

	t.Run("SlowFailuresNeverBlock", func(t *testing.T) {
		l := newFailLimiter()
		for i := 0; i < 20; i++ {
			at := now.Add(time.Duration(i) * 20 * time.Second)
			l.fail("k", 5, at)
			if l.blocked("k", at) {
				t.Fatalf("blocked at failure %d, 20 s apart", i+1)
			}
		}
	})
	t.Run("Bounded", func(t *testing.T) {
		l := newFailLimiter()
		l.max = 64
		for i := 0; i < 1000; i++ {
			l.fail("k"+strings.Repeat("x", i), 5, now)
		}
		if len(l.m) > l.max {
			t.Errorf("limiter tracks %d keys, max %d", len(l.m), l.max)
		}
	})
}

func TestKick(t *testing.T) {
	h := newHarness(t, nil, nil)
	c := h.mustDialDevice(t, "A")
	waitFor(t, "connected", func() bool { return h.b.ConnectedDevices() == 1 })

	h.b.Kick("A")
	c.waitLost(t)
	waitFor(t, "disconnect reported", func() bool { return len(h.obs.get()) == 2 })
	if got, want := h.obs.get(), []string{"+A", "-A:" + ReasonKicked}; !equal(got, want) {
		t.Errorf("observer = %v, want %v", got, want)
	}
	if got := h.metric(t, "lockergate_mqtt_disconnects_total", "reason", ReasonKicked); got != 1 {
		t.Errorf("disconnects{kicked} = %v, want 1", got)
	}

	t.Run("ReconnectIsRechecked", func(t *testing.T) {
		h.mustDialDevice(t, "A")
		if got := h.auth.calls("A"); got != 2 {
			t.Errorf("AuthDevice calls = %d, want 2 (cache dropped by Kick)", got)
		}
	})
	t.Run("DisabledStaysOut", func(t *testing.T) {
		h.auth.setDevice("A", fakeDevice{secret: "secret-A", disabled: true})
		h.b.Kick("A")
		if _, err := h.dial(t, "A", "A", "secret-A"); err == nil {
			t.Fatal("disabled device reconnected")
		}
		if got := h.metric(t, failures, "reason", refuseDisabled); got != 1 {
			t.Errorf("disabled refusals = %v, want 1", got)
		}
	})
	t.Run("ClaimSession", func(t *testing.T) {
		c := h.mustDial(t, "prov-SN1", "claim", claimToken)
		h.b.Kick("prov-SN1")
		c.waitLost(t)
	})
	t.Run("Nobody", func(t *testing.T) {
		h.b.Kick("nobody") // no session: nothing happens
	})
}

// TestCheckNotSettled: a device check whose cache stripe is invalidated
// during each of its three attempts (lockers kicked meanwhile: a burst of
// re-provisionings) gives up as "not now", and the log says why.
func TestCheckNotSettled(t *testing.T) {
	h := newHarness(t, nil, nil)
	h.auth.mu.Lock()
	h.auth.afterEach = func(id string) { h.b.Invalidate(id) }
	h.auth.mu.Unlock()
	if _, err := h.dial(t, "A", "A", "secret-A"); err == nil {
		t.Fatal("connected though every check was overtaken")
	}
	if got := h.auth.calls("A"); got != 3 {
		t.Errorf("AuthDevice calls = %d, want 3", got)
	}
	if got := h.metric(t, failures, "reason", refuseBackendError); got != 1 {
		t.Errorf("backend_error refusals = %v, want 1", got)
	}
	if logs := h.logs.String(); !strings.Contains(logs, "mqtt device check not settled") || !strings.Contains(logs, "re-provisioned") {
		t.Errorf("the log does not say why:\n%s", logs)
	}
	h.auth.mu.Lock()
	h.auth.afterEach = nil
	h.auth.mu.Unlock()
	h.mustDialDevice(t, "A") // once the kicks stop, it gets in
}

func TestInvalidate(t *testing.T) {
	h := newHarness(t, nil, nil)
	h.mustDialDevice(t, "A").Disconnect(50)
	h.mustDialDevice(t, "A").Disconnect(50)
	if got := h.auth.calls("A"); got != 1 {
		t.Fatalf("AuthDevice calls = %d, want 1", got)
	}
	h.b.Invalidate("A")
	h.mustDialDevice(t, "A")
	if got := h.auth.calls("A"); got != 2 {
		t.Errorf("AuthDevice calls after Invalidate = %d, want 2", got)
	}
}

func equal(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// TestConnackSaysRetryOrNot: a refusal that means "not now" (database
// unreachable, every check slot taken, too many recent failures) must not be
// answered "bad user name or password", which devices take as final
// (protocol: reconnect with a back-off on server unavailable / busy).
func TestConnackSaysRetryOrNot(t *testing.T) {
	const (
		v3Unavailable = 3 // MQTT 3.1.1 return codes
		v3BadCreds    = 5 // mochi answers 0x86 as "not authorised" to 3.1.1 clients
	)
	tests := []struct {
		name   string
		setup  func(t *testing.T, h *harness)
		pass   string
		reason string
		v3, v5 byte
	}{
		{name: "BadSecret", pass: "wrong", reason: refuseBadCredentials,
			v3: v3BadCreds, v5: packets.ErrBadUsernameOrPassword.Code},
		{name: "BackendDown", pass: "secret-A", reason: refuseBackendError,
			setup: func(t *testing.T, h *harness) {
				h.auth.fail(errors.New("connection refused"))
			},
			v3: v3Unavailable, v5: packets.ErrServerUnavailable.Code},
		{name: "AllCheckSlotsTaken", pass: "secret-A", reason: refuseBusy,
			setup: func(t *testing.T, h *harness) {
				for range cap(h.b.authSem) {
					h.b.authSem <- struct{}{}
				}
				t.Cleanup(func() {
					for range cap(h.b.authSem) {
						<-h.b.authSem
					}
				})
			},
			v3: v3Unavailable, v5: packets.ErrServerBusy.Code},
		{name: "RateLimited", pass: "wrong", reason: refuseRateLimited,
			setup: func(t *testing.T, h *harness) {
				for range 5 { // the id limit: five failures
					r := dialRaw(t, h.addr, 4)
					r.connect("A", "A", "wrong", 30, nil)
				}
			},
			v3: v3Unavailable, v5: packets.ErrServerUnavailable.Code},
	}
	for _, tc := range tests {
		for _, v := range []byte{4, 5} {
			t.Run(fmt.Sprintf("%s/v%d", tc.name, map[byte]int{4: 3, 5: 5}[v]), func(t *testing.T) {
				h := newHarness(t, nil, nil)
				if tc.setup != nil {
					tc.setup(t, h)
				}
				before := h.metric(t, failures, "reason", tc.reason)
				ack := dialRaw(t, h.addr, v).connect("A", "A", tc.pass, 30, nil)
				want := map[byte]byte{4: tc.v3, 5: tc.v5}[v]
				if ack.FixedHeader.Type != packets.Connack || ack.ReasonCode != want {
					t.Fatalf("CONNACK type %d code %#x, want code %#x", ack.FixedHeader.Type, ack.ReasonCode, want)
				}
				if got := h.metric(t, failures, "reason", tc.reason); got != before+1 {
					t.Errorf("%s{reason=%q} = %v, want %v", failures, tc.reason, got, before+1)
				}
				if h.b.ConnectedDevices() != 0 {
					t.Error("refused device counted as connected")
				}
			})
		}
	}
}

// TestEnhancedAuthRefused: an MQTT 5 CONNECT with an Authentication Method
// asks for enhanced authentication (AUTH exchanges), which the gateway does
// not support: it is refused with bad authentication method (0x8C), even
// with the device's right secret, not read as a password login
// [MQTT-4.12.0-1]; the same CONNECT without the method is admitted.
func TestEnhancedAuthRefused(t *testing.T) {
	h := newHarness(t, nil, nil)
	withMethod := func(pk *packets.Packet) { pk.Properties.AuthenticationMethod = "SCRAM-SHA-256" }
	ack := dialRaw(t, h.addr, 5).connect("A", "A", "secret-A", 30, withMethod)
	if ack.FixedHeader.Type != packets.Connack || ack.ReasonCode != packets.ErrBadAuthenticationMethod.Code {
		t.Fatalf("CONNACK type %d code %#x, want code %#x", ack.FixedHeader.Type, ack.ReasonCode, packets.ErrBadAuthenticationMethod.Code)
	}
	if got := h.metric(t, failures, "reason", refuseAuthMethod); got != 1 {
		t.Errorf("%s{reason=%q} = %v, want 1", failures, refuseAuthMethod, got)
	}
	if got := h.auth.calls("A"); got != 0 {
		t.Errorf("AuthDevice calls = %d, want none for a refused method", got)
	}
	if ack := dialRaw(t, h.addr, 5).connect("A", "A", "secret-A", 30, nil); ack.ReasonCode != packets.CodeSuccess.Code {
		t.Fatalf("the same CONNECT without the method: code %#x, want success", ack.ReasonCode)
	}
}
