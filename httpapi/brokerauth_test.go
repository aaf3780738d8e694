package httpapi

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/lockergate/lockergate/broker"
	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/protocol"
)

// fakeBrokerAuth answers with fixed verdicts and records what it was asked.
type fakeBrokerAuth struct {
	verdict broker.Verdict
	reason  string
	got     []string
}

func (f *fakeBrokerAuth) CheckExternal(clientID, username string, password []byte, remote string) (broker.Verdict, string) {
	f.got = append(f.got, clientID, username, string(password), remote)
	return f.verdict, f.reason
}

func (f *fakeBrokerAuth) CheckExternalACL(clientID, username, topic string, publish bool) broker.Verdict {
	action := "subscribe"
	if publish {
		action = "publish"
	}
	f.got = append(f.got, clientID, username, topic, action)
	return f.verdict
}

func hookCall(t *testing.T, s http.Handler, path, contentType, body, secret string) *httptest.ResponseRecorder {
	t.Helper()
	req := httptest.NewRequest("POST", path, strings.NewReader(body))
	req.Header.Set("Content-Type", contentType)
	if secret != "" {
		req.Header.Set("Authorization", "Bearer "+secret)
	}
	rec := httptest.NewRecorder()
	s.ServeHTTP(rec, req)
	return rec
}

// TestEMQXHooks: each verdict becomes the answer EMQX 5 expects, from JSON
// and from form bodies; bad requests and tokens get problem details.
func TestEMQXHooks(t *testing.T) {
	const authn, authz = "/v1/broker-auth/emqx/authn", "/v1/broker-auth/emqx/authz"
	const jsonCT, formCT = "application/json", "application/x-www-form-urlencoded"
	f := &fakeBrokerAuth{}
	s := New(Options{Store: &fakeStore{}, BrokerAuth: f})

	t.Run("Allow", func(t *testing.T) {
		f.verdict, f.reason, f.got = broker.Allow, "", nil
		rec := hookCall(t, s, authn, jsonCT, `{"clientid":"lk-1","username":"lk-1","password":"pw","peerhost":"10.1.2.3","extra":"ignored"}`, "broker")
		if rec.Code != 200 || rec.Header().Get("Content-Type") != "application/json" {
			t.Fatalf("status %d, content type %q: %s", rec.Code, rec.Header().Get("Content-Type"), rec.Body)
		}
		var out emqxAuthnOut
		if err := json.Unmarshal(rec.Body.Bytes(), &out); err != nil {
			t.Fatal(err)
		}
		if out.Result != "allow" || out.IsSuperuser {
			t.Fatalf("answer %+v", out)
		}
		if strings.Join(f.got, ",") != "lk-1,lk-1,pw,10.1.2.3" {
			t.Errorf("asked %v", f.got)
		}
		// The locker's whole access: its 10 topics, filters under its own
		// root, then deny everything (TestEMQXACL).
		if len(out.ACL) != len(protocol.Channels)+2 {
			t.Fatalf("acl %+v", out.ACL)
		}
		for _, r := range out.ACL[:len(protocol.Channels)] {
			_, c, ok := protocol.ParseTopic(r.Topic)
			want := "subscribe"
			if ok && c.DeviceToGateway() {
				want = "publish"
			}
			if !ok || r.Permission != "allow" || r.Action != want || !strings.HasPrefix(r.Topic, "lockers/v1/lk-1/") {
				t.Errorf("rule %+v", r)
			}
		}
		if tail := out.ACL[len(protocol.Channels):]; tail[0] != (emqxRule{"allow", "subscribe", "lockers/v1/lk-1/#"}) || tail[1] != (emqxRule{"deny", "all", "#"}) {
			t.Errorf("last rules %+v, want allow subscribe lockers/v1/lk-1/# and deny all #", tail)
		}
	})
	t.Run("Form", func(t *testing.T) {
		f.verdict, f.got = broker.Allow, nil
		rec := hookCall(t, s, authn, formCT, "clientid=lk-1&username=lk-1&password=p%26w&peerhost=10.1.2.3", "broker")
		if rec.Code != 200 || strings.Join(f.got, ",") != "lk-1,lk-1,p&w,10.1.2.3" {
			t.Fatalf("status %d, asked %v", rec.Code, f.got)
		}
	})
	t.Run("JSONSentAsAForm", func(t *testing.T) {
		// curl -d sends the form content type: a 400 that says so, not an
		// ignore for a form of empty fields.
		for _, path := range []string{authn, authz} {
			f.verdict, f.got = broker.Allow, nil
			rec := hookCall(t, s, path, formCT, ` {"clientid":"lk-1","username":"lk-1","password":"pw"}`, "broker")
			if rec.Code != http.StatusBadRequest || !strings.Contains(rec.Body.String(), "send Content-Type: application/json") || f.got != nil {
				t.Fatalf("%s: status %d, asked %v: %s", path, rec.Code, f.got, rec.Body)
			}
		}
	})
	for _, c := range []struct {
		v      broker.Verdict
		reason string
		want   string
	}{{broker.Deny, "bad_credentials", "deny"}, {broker.Ignore, "", "ignore"}} {
		t.Run(c.want, func(t *testing.T) {
			f.verdict, f.reason = c.v, c.reason
			rec := hookCall(t, s, authn, jsonCT, `{"clientid":"lk-1","username":"lk-1","password":"x"}`, "broker")
			var out emqxAuthnOut
			json.Unmarshal(rec.Body.Bytes(), &out)
			if rec.Code != 200 || out.Result != c.want || out.Reason != c.reason || out.ACL != nil {
				t.Fatalf("status %d, answer %s", rec.Code, rec.Body)
			}
		})
	}
	t.Run("Retry", func(t *testing.T) {
		// EMQX reads a 5xx as "ignore": never a final deny for our trouble.
		f.verdict, f.reason = broker.Retry, "backend_error"
		rec := hookCall(t, s, authn, jsonCT, `{"clientid":"lk-1","username":"lk-1","password":"x"}`, "broker")
		if rec.Code != http.StatusServiceUnavailable || rec.Header().Get("Retry-After") == "" ||
			!strings.Contains(rec.Body.String(), "backend_error") {
			t.Fatalf("status %d, Retry-After %q: %s", rec.Code, rec.Header().Get("Retry-After"), rec.Body)
		}
	})
	t.Run("Authz", func(t *testing.T) {
		for _, v := range []broker.Verdict{broker.Allow, broker.Deny, broker.Ignore} {
			f.verdict, f.got = v, nil
			rec := hookCall(t, s, authz, jsonCT, `{"clientid":"lk-1","username":"lk-1","topic":"lockers/v1/lk-1/health","action":"publish"}`, "broker")
			if rec.Code != 200 || strings.TrimSpace(rec.Body.String()) != `{"result":"`+v.String()+`"}` {
				t.Fatalf("%v: status %d: %s", v, rec.Code, rec.Body)
			}
		}
		f.verdict, f.got = broker.Allow, nil
		rec := hookCall(t, s, authz, formCT, "clientid=lk-1&username=lk-1&topic=lockers%2Fv1%2Flk-1%2Fcmd&action=subscribe", "broker")
		if rec.Code != 200 || strings.Join(f.got, ",") != "lk-1,lk-1,lockers/v1/lk-1/cmd,subscribe" {
			t.Fatalf("form: status %d, asked %v", rec.Code, f.got)
		}
	})
	t.Run("BadRequests", func(t *testing.T) {
		f.got = nil
		for _, c := range []struct {
			path, ct, body string
			status         int
			detail         string
		}{
			{authn, jsonCT, `{"clientid":`, 400, "malformed JSON"},
			{authn, jsonCT, `["lk-1"]`, 400, "the body must be an object, not array"},
			{authn, jsonCT, `{"clientid":"lk-1","password":"` + strings.Repeat("x", maxBody) + `"}`, 413, "larger than"},
			{authn, formCT, "clientid=%zz", 400, "malformed form"},
			{authz, jsonCT, `{"clientid":"lk-1","username":"lk-1","topic":"t","action":"all"}`, 400, "action must be publish or subscribe"},
			{authz, jsonCT, `{"clientid":"lk-1","username":"lk-1","action":"publish"}`, 400, "topic is empty"},
		} {
			rec := hookCall(t, s, c.path, c.ct, c.body, "broker")
			if rec.Code != c.status || !strings.Contains(rec.Body.String(), c.detail) {
				t.Errorf("%s %.60s: status %d: %.200s, want %d with %q", c.path, c.body, rec.Code, rec.Body, c.status, c.detail)
			}
		}
		if len(f.got) != 0 {
			t.Errorf("bad requests reached the checks: %v", f.got)
		}
	})
	t.Run("Tokens", func(t *testing.T) {
		body := `{"clientid":"lk-1","username":"lk-1","password":"x"}`
		for secret, want := range map[string]int{"": 401, "nope": 401, "admin": 403, "store-a": 403} {
			if rec := hookCall(t, s, authn, jsonCT, body, secret); rec.Code != want {
				t.Errorf("token %q: status %d, want %d", secret, rec.Code, want)
			}
		}
		// A broker token can do nothing else.
		if a := call(t, s, "GET", "/v1/sites", "broker"); a.status != 403 {
			t.Errorf("broker token on GET /v1/sites: %d, want 403", a.status)
		}
	})
	t.Run("NotConfigured", func(t *testing.T) {
		s := New(Options{Store: &fakeStore{}})
		rec := hookCall(t, s, authn, jsonCT, `{"clientid":"lk-1","username":"lk-1","password":"x"}`, "broker")
		if rec.Code != 404 || !strings.Contains(rec.Body.String(), "no broker auth hook") {
			t.Fatalf("status %d: %s", rec.Code, rec.Body)
		}
	})
}

// outageStore fails token lookups with err when it is set.
type outageStore struct {
	fakeStore
	err error
}

func (s *outageStore) TokenByHash(ctx context.Context, hash []byte) (*fleet.Token, error) {
	if s.err != nil {
		return nil, s.err
	}
	return s.fakeStore.TokenByHash(ctx, hash)
}

// TestHookDuringDatabaseOutage: the broker's token keeps working while the
// database does not answer, for tokenStaleMax after it was last verified;
// a token the database no longer has is refused and not trusted again.
func TestHookDuringDatabaseOutage(t *testing.T) {
	now := time.Unix(1000, 0)
	st := &outageStore{}
	s := New(Options{Store: st, BrokerAuth: &fakeBrokerAuth{verdict: broker.Allow}})
	s.tokens = newTokenCache(TokenCacheTTL, func() time.Time { return now })
	ask := func() int {
		return hookCall(t, s, "/v1/broker-auth/emqx/authn", "application/json", `{"clientid":"lk-1","username":"lk-1","password":"x"}`, "broker").Code
	}
	if got := ask(); got != 200 {
		t.Fatalf("database up: %d", got)
	}
	if a := call(t, s, "GET", "/v1/sites", "admin"); a.status != 200 {
		t.Fatalf("admin, database up: %d", a.status)
	}
	st.err = errors.New("dial tcp: connection refused")
	now = now.Add(5 * time.Minute)
	if got := ask(); got != 200 {
		t.Fatalf("database down, token verified 5 min ago: %d, want 200", got)
	}
	// Other roles are never trusted without the database.
	if a := call(t, s, "GET", "/v1/sites", "admin"); a.status != 500 {
		t.Fatalf("admin token, database down: %d, want 500", a.status)
	}
	now = now.Add(6 * time.Minute)
	if got := ask(); got != 500 {
		t.Fatalf("database down, token verified 11 min ago: %d, want 500", got)
	}
	st.err = nil
	if got := ask(); got != 200 {
		t.Fatalf("database back: %d", got)
	}
	st.err = fleet.ErrNotFound // revoked through another instance
	now = now.Add(2 * time.Second)
	if got := ask(); got != 401 {
		t.Fatalf("revoked: %d, want 401", got)
	}
	st.err = errors.New("dial tcp: connection refused")
	if got := ask(); got != 500 {
		t.Fatalf("revoked, then database down: %d, want 500 (never trusted again)", got)
	}
}

// emqxDecide applies acl as EMQX 5.8 does to a locker's publish (publish
// true) or subscription (emqx_authz_rule): the first rule whose action and
// topic match decides; a rule's topic matches as in emqx_topic:match/2 on
// words, where a wildcard in the client's filter is matched by the same
// wildcard in the rule or a covering one, and "#" covers "$SYS/..." too. A
// shared subscription is checked by its real filter. No match is "".
func emqxDecide(acl []emqxRule, topic string, publish bool) string {
	if rest, ok := strings.CutPrefix(topic, "$share/"); ok && !publish {
		if _, real, ok := strings.Cut(rest, "/"); ok {
			topic = real
		}
	}
	action := "subscribe"
	if publish {
		action = "publish"
	}
	for _, r := range acl {
		if (r.Action == "all" || r.Action == action) && emqxMatch(strings.Split(topic, "/"), strings.Split(r.Topic, "/")) {
			return r.Permission
		}
	}
	return ""
}

// emqxMatch is emqx_topic:match/2 on words.
func emqxMatch(name, filter []string) bool {
	switch {
	case len(filter) == 1 && filter[0] == "#":
		return true
	case len(name) == 0 || len(filter) == 0:
		return len(name) == 0 && len(filter) == 0
	case name[0] == filter[0], filter[0] == "+":
		return emqxMatch(name[1:], filter[1:])
	}
	return false
}

// TestEMQXACL: the acl of an EMQX authn answer allows what
// protocol.DeviceMayPublish and DeviceMaySubscribe allow, over the
// protocol's ACL table (protocol.TestDeviceACL) and every filter of up to
// four levels under the locker's root made of its topics' level names,
// wildcards, an unknown name and an empty level. Publishing agrees exactly;
// a subscription may also be allowed where DeviceMaySubscribe refuses it
// only under the locker's own root and matching none of its topics:
// nothing is published there.
func TestEMQXACL(t *testing.T) {
	const me = "lk-1"
	acl := emqxACL(me)
	topics := []string{
		"lockers/v1/lk-1/debug", "lockers/v1/lk-1/cmd/x", "lockers/v1/lk-1/#", "lockers/v1/lk-1/+",
		"lockers/v1/lk-1/fw/+", "lockers/v1/lk-1/+/result", "lockers/v1/lk-1/+/+", "lockers/v1/lk-1/+/+/+",
		"lockers/v1/lk-1/debug/#", "lockers/v1/lk-1//#", "lockers/v1/+/cmd", "lockers/v1/+/health",
		"lockers/v1/#", "lockers/#", "#", "+", "+/v1/lk-1/cmd", "+/+/+/cmd", "$SYS/#", "$SYS/broker/clients/connected",
		"lockers/v1/lk-10/health", "lockers/v1/lk/health", "provision/v1/lk-1/request",
		"provision/v1/lk-1/response", "provision/v1/+/request", "lockers/v2/lk-1/health", "lockers/v1/lk-1",
		"$share/g/lockers/v1/lk-2/cmd", "$share/g/lockers/v1/#",
	}
	alphabet := []string{"+", "#", "", "nope"}
	var own []string // the locker's topics
	for _, c := range protocol.Channels {
		own = append(own, protocol.Topic(me, c))
		topics = append(topics, protocol.Topic(me, c), protocol.Topic("lk-2", c))
		for _, w := range strings.Split(string(c), "/") {
			if !slices.Contains(alphabet, w) {
				alphabet = append(alphabet, w)
			}
		}
	}
	var walk func(prefix string, depth int)
	walk = func(prefix string, depth int) {
		for _, w := range alphabet {
			topics = append(topics, prefix+w)
			if depth < 3 && w != "#" { // "#" only last: EMQX refuses others before any ACL
				walk(prefix+w+"/", depth+1)
			}
		}
	}
	walk("lockers/v1/"+me+"/", 0)

	verdict := func(ok bool) string {
		if ok {
			return "allow"
		}
		return "deny"
	}
	for _, topic := range topics {
		if !strings.ContainsAny(topic, "+#") { // a PUBLISH's topic name has no wildcards
			if got, want := emqxDecide(acl, topic, true), verdict(protocol.DeviceMayPublish(me, topic)); got != want {
				t.Errorf("publish %q: EMQX %q, DeviceMayPublish %s", topic, got, want)
			}
		}
		got, want := emqxDecide(acl, topic, false), verdict(protocol.DeviceMaySubscribe(me, topic))
		if got == want {
			continue
		}
		matchesOwn := slices.ContainsFunc(own, func(o string) bool { return protocol.TopicMatches(topic, o) })
		underRoot := strings.HasPrefix(topic, "lockers/v1/"+me+"/") || topic == "lockers/v1/"+me
		if got != "allow" || matchesOwn || !underRoot {
			t.Errorf("subscribe %q: EMQX %q, DeviceMaySubscribe %s", topic, got, want)
		}
	}
	// EMQX checks a shared subscription by its real filter, so a locker may
	// share-subscribe to its own topics there (the embedded broker refuses
	// shared subscriptions); never to another locker's.
	if got := emqxDecide(acl, "$share/g/lockers/v1/lk-1/cmd", false); got != "allow" {
		t.Errorf("shared subscription to its own cmd: EMQX %q", got)
	}
}
