package broker

import (
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lockergate/lockergate/protocol"
)

// TestCheckExternal: an external broker's auth hook gets the verdicts of a
// CONNECT to this broker, with its cache, Kick and rate limits.
func TestCheckExternal(t *testing.T) {
	h := newHarness(t, nil, nil)
	b := h.b
	for _, c := range []struct {
		name, id, user, pass, remote string
		want                         Verdict
		reason                       string
	}{
		{"Locker", "A", "A", "secret-A", "10.0.0.1", Allow, ""},
		{"WrongSecret", "B", "B", "secret-A", "10.0.0.2:5000", Deny, refuseBadCredentials},
		{"EmptySecret", "B", "B", "", "10.0.0.2", Deny, refuseBadCredentials},
		{"UnknownLocker", "Z", "Z", "secret-Z", "", Deny, refuseUnknownDevice},
		{"Disabled", "D", "D", "secret-D", "10.0.0.3", Deny, refuseDisabled},
		{"GatewayUser", "gw-a", "lockergate", "its-password", "10.0.0.4", Ignore, ""},
		{"UsernameNotClientID", "A", "B", "secret-B", "10.0.0.5", Deny, refuseClientIDMismatch},
		{"LockersIDAsClientID", "A", "tool", "secret-A", "10.0.0.5", Deny, refuseClientIDMismatch},
		{"UnknownIDAsClientID", "tool-1", "tool", "pw", "10.0.0.5", Ignore, ""},
		{"NotAnID", "a/b", "a/b", "x", "10.0.0.5", Ignore, ""},
		{"ClaimSession", protocol.ProvisionClientPrefix + "SN1", protocol.ProvisionClientPrefix + "SN1", claimToken, "", Ignore, ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			v, reason := b.CheckExternal(c.id, c.user, []byte(c.pass), c.remote)
			if v != c.want || reason != c.reason {
				t.Fatalf("CheckExternal(%q, %q) = %v %q, want %v %q", c.id, c.user, v, reason, c.want, c.reason)
			}
		})
	}
	if got := h.metric(t, "lockergate_mqtt_auth_failures_total", "reason", refuseDisabled); got != 1 {
		t.Errorf("auth failures{disabled} = %v, want 1", got)
	}

	t.Run("CachedUntilKicked", func(t *testing.T) {
		before := h.auth.calls("A")
		if v, _ := b.CheckExternal("A", "A", []byte("secret-A"), "10.0.0.1"); v != Allow {
			t.Fatalf("second check = %v", v)
		}
		if n := h.auth.calls("A") - before; n != 0 {
			t.Fatalf("backend asked %d times for a cached secret", n)
		}
		h.auth.setDevice("A", fakeDevice{secret: "secret-A", disabled: true})
		b.Kick("A") // an operator disabled it
		if v, reason := b.CheckExternal("A", "A", []byte("secret-A"), "10.0.0.1"); v != Deny || reason != refuseDisabled {
			t.Fatalf("after Kick = %v %q, want deny disabled", v, reason)
		}
	})

	t.Run("BackendDown", func(t *testing.T) {
		h.auth.fail(errors.New("connection refused"))
		t.Cleanup(func() { h.auth.fail(nil) })
		if v, reason := b.CheckExternal("B", "B", []byte("secret-B"), "10.0.0.6"); v != Retry || reason != refuseBackendError {
			t.Fatalf("database down = %v %q, want retry backend_error", v, reason)
		}
		// A client with a locker-shaped id and its own username: cannot
		// tell whether a locker has that id. Not counted as a refusal: the
		// broker's next authenticator decides it.
		before := h.metric(t, "lockergate_mqtt_auth_failures_total", "reason", refuseBackendError)
		if v, reason := b.CheckExternal("gw-b", "lockergate", []byte("pw"), ""); v != Retry || reason != refuseBackendError {
			t.Fatalf("foreign client id, database down = %v %q, want retry", v, reason)
		}
		if got := h.metric(t, "lockergate_mqtt_auth_failures_total", "reason", refuseBackendError); got != before {
			t.Errorf("a foreign client id's retry counted as a refusal (%v -> %v)", before, got)
		}
	})

	t.Run("NoLockout", func(t *testing.T) {
		// Every refusal through a hook is final for the locker, so failed
		// attempts by others must not lock it out: wrong secrets for its id
		// from one address, and any ids from the same address.
		h.auth.setDevice("R", fakeDevice{secret: "secret-R"})
		for i := 0; i < 40; i++ {
			if v, _ := b.CheckExternal("R", "R", []byte(fmt.Sprint("guess-", i)), "10.0.0.9"); v != Deny {
				t.Fatalf("guess %d = %v", i, v)
			}
			b.CheckExternal(fmt.Sprint("X", i), fmt.Sprint("X", i), []byte("x"), "10.0.0.9")
		}
		if v, reason := b.CheckExternal("R", "R", []byte("secret-R"), "10.0.0.9"); v != Allow {
			t.Fatalf("the right secret after 40 failures = %v %q, want allow", v, reason)
		}
	})

	t.Run("KickDuringCheck", func(t *testing.T) {
		// The backend says yes, then the locker is disabled before the
		// answer is used: the check is made again, and refuses.
		h.auth.setDevice("K", fakeDevice{secret: "secret-K"})
		h.auth.mu.Lock()
		h.auth.after = func(id string) {
			h.auth.setDevice(id, fakeDevice{secret: "secret-K", disabled: true})
			b.Kick(id)
		}
		h.auth.mu.Unlock()
		if v, reason := b.CheckExternal("K", "K", []byte("secret-K"), ""); v != Deny || reason != refuseDisabled {
			t.Fatalf("disabled during its check = %v %q, want deny disabled", v, reason)
		}
	})
}

func TestCheckExternalACL(t *testing.T) {
	h := newHarness(t, nil, nil)
	for _, c := range []struct {
		id, user, topic string
		publish         bool
		want            Verdict
	}{
		{"A", "A", protocol.Topic("A", protocol.ChanHealth), true, Allow},
		{"A", "A", protocol.Topic("A", protocol.ChanCmdResult), true, Allow},
		{"A", "A", protocol.Topic("A", protocol.ChanCmd), false, Allow},
		{"A", "A", protocol.Topic("A", protocol.ChanCmd), true, Deny},      // gateway to device only
		{"A", "A", protocol.Topic("A", protocol.ChanHealth), false, Allow}, // its own topics, either direction
		{"A", "A", "lockers/v1/A/#", false, Allow},
		{"A", "A", "lockers/v1/A/nope/#", false, Deny},
		{"A", "A", protocol.Topic("B", protocol.ChanEvents), true, Deny},
		{"A", "A", protocol.Topic("B", protocol.ChanCmd), false, Deny},
		{"A", "A", "lockers/v1/+/cmd", false, Deny},
		{"A", "A", "#", false, Deny},
		{"A", "A", "$SYS/broker/clients", false, Deny},
		{"gw-a", "lockergate", "$share/lockergate/lockers/v1/+/health", false, Ignore},
	} {
		if got := h.b.CheckExternalACL(c.id, c.user, c.topic, c.publish); got != c.want {
			t.Errorf("CheckExternalACL(%q, %q, %q, publish %v) = %v, want %v", c.id, c.user, c.topic, c.publish, got, c.want)
		}
	}
	if got := h.metric(t, "lockergate_mqtt_acl_denied_total", "action", "publish"); got != 2 {
		t.Errorf("acl denied{publish} = %v, want 2", got)
	}
	if !strings.Contains(h.logs.String(), "mqtt access denied") {
		t.Error("no denial logged")
	}
}

// TestProvisionOnly: with the fleet on an external broker, this broker
// refuses lockers with an identity, even with the right secret, and still
// serves claim sessions.
func TestProvisionOnly(t *testing.T) {
	h := newHarness(t, func(o *Options) { o.ProvisionOnly = true }, nil)
	if _, err := h.dial(t, "A", "A", "secret-A"); err == nil {
		t.Fatal("a locker identity connected to a provisioning-only broker")
	}
	for i := 0; i < 5; i++ {
		h.dial(t, "A", "A", "secret-A")
	}
	if h.auth.calls("A") != 0 {
		t.Error("the backend was asked about a locker a provisioning-only broker refuses anyway")
	}
	if h.b.limiter.blocked(idKey("A"), time.Now()) {
		t.Error("refusals at a provisioning-only broker count against the locker's id")
	}
	h.mustDial(t, protocol.ProvisionClientPrefix+"SN1", protocol.ProvisionUsername, claimToken)
	// The hook still checks lockers.
	if v, _ := h.b.CheckExternal("A", "A", []byte("secret-A"), ""); v != Allow {
		t.Fatalf("hook check on a provisioning-only broker = %v", v)
	}
}

// TestCheckExternalStaleSecret: when the database cannot answer, the hook
// admits the secret it last verified for a locker (a broker cannot pass on
// "not now"), and nothing else; a Kick forgets the secret.
func TestCheckExternalStaleSecret(t *testing.T) {
	h := newHarness(t, func(o *Options) { o.AuthCacheTTL = time.Nanosecond }, nil) // every check asks
	b := h.b
	if v, _ := b.CheckExternal("A", "A", []byte("secret-A"), ""); v != Allow {
		t.Fatalf("first check = %v", v)
	}
	h.auth.fail(errors.New("connection refused"))
	if v, reason := b.CheckExternal("A", "A", []byte("secret-A"), ""); v != Allow || reason != "" {
		t.Fatalf("last verified secret, database down = %v %q, want allow", v, reason)
	}
	if got := h.metric(t, "lockergate_mqtt_auth_cache_total", "result", "stale"); got != 1 {
		t.Errorf("auth cache{stale} = %v, want 1", got)
	}
	if v, reason := b.CheckExternal("A", "A", []byte("another"), ""); v != Retry || reason != refuseBackendError {
		t.Fatalf("another secret, database down = %v %q, want retry", v, reason)
	}
	if v, _ := b.CheckExternal("B", "B", []byte("secret-B"), ""); v != Retry {
		t.Fatalf("a locker never verified here, database down = %v, want retry", v)
	}
	b.Kick("A")
	if v, _ := b.CheckExternal("A", "A", []byte("secret-A"), ""); v != Retry {
		t.Fatalf("after Kick, database down = %v, want retry", v)
	}
}

// TestCheckExternalStaleNeedsKicks: while kicks from other instances are
// not heard, a secret the database cannot confirm is not admitted.
func TestCheckExternalStaleNeedsKicks(t *testing.T) {
	var heard atomic.Bool
	h := newHarness(t, func(o *Options) { o.AuthCacheTTL = time.Nanosecond; o.KicksHeard = heard.Load }, nil)
	heard.Store(true)
	if v, _ := h.b.CheckExternal("A", "A", []byte("secret-A"), ""); v != Allow {
		t.Fatalf("first check = %v", v)
	}
	h.auth.fail(errors.New("connection refused"))
	heard.Store(false)
	if v, reason := h.b.CheckExternal("A", "A", []byte("secret-A"), ""); v != Retry || reason != refuseBackendError {
		t.Fatalf("kicks not heard, database down = %v %q, want retry", v, reason)
	}
	heard.Store(true)
	if v, _ := h.b.CheckExternal("A", "A", []byte("secret-A"), ""); v != Allow {
		t.Fatalf("kicks heard again, database down = %v, want allow", v)
	}
}
