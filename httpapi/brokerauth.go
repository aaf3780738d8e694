package httpapi

import (
	"bytes"
	"fmt"
	"mime"
	"net/http"
	"net/url"
	"strconv"

	"github.com/lockergate/lockergate/broker"
	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/protocol"
)

// BrokerAuth decides for an external broker's auth hooks (broker.Broker).
type BrokerAuth interface {
	CheckExternal(clientID, username string, password []byte, remote string) (broker.Verdict, string)
	CheckExternalACL(clientID, username, topic string, publish bool) broker.Verdict
}

var brokerRoles = []string{fleet.RoleBroker}

// brokerAuthRetryAfter is what a Retry verdict asks the broker to wait.
const brokerAuthRetryAfter = 5

func (s *Server) brokerAuthTable() []route {
	return []route{
		{"POST", "/v1/broker-auth/emqx/authn", brokerRoles, false, s.withBrokerAuth(emqxAuthn)},
		{"POST", "/v1/broker-auth/emqx/authz", brokerRoles, false, s.withBrokerAuth(emqxAuthz)},
	}
}

// emqxAuthnIn is what an EMQX 5 HTTP authenticator sends, with the body
// template of docs/deployment.md.
type emqxAuthnIn struct {
	ClientID string `json:"clientid"`
	Username string `json:"username"`
	Password string `json:"password"`
	PeerHost string `json:"peerhost"`
}

// emqxRule is one entry of the acl an EMQX (5.8+) authenticator may return.
type emqxRule struct {
	Permission string `json:"permission"`
	Action     string `json:"action"`
	Topic      string `json:"topic"`
}

type emqxAuthnOut struct {
	Result      string     `json:"result"`
	IsSuperuser bool       `json:"is_superuser"`
	Reason      string     `json:"reason,omitempty"`
	ACL         []emqxRule `json:"acl,omitempty"`
}

// emqxAuthn answers EMQX's HTTP authenticator: allow (with the locker's
// topic rules), deny, or ignore for a client that is no locker. A check
// that cannot be made now is a 503, which EMQX counts as ignore: it cannot
// answer "server unavailable" from an HTTP authenticator.
func emqxAuthn(ba BrokerAuth, w http.ResponseWriter, r *http.Request) error {
	var in emqxAuthnIn
	if err := decodeHook(r, &in); err != nil {
		return err
	}
	v, reason := ba.CheckExternal(in.ClientID, in.Username, []byte(in.Password), in.PeerHost)
	out := emqxAuthnOut{Result: v.String(), Reason: reason}
	switch v {
	case broker.Allow:
		out.ACL = emqxACL(in.ClientID)
	case broker.Retry:
		w.Header().Set("Retry-After", strconv.Itoa(brokerAuthRetryAfter))
		writeProblem(w, http.StatusServiceUnavailable, "cannot check the locker's credentials now ("+reason+"); the broker should refuse it as unavailable")
		return nil
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

// emqxACL is a locker's whole access, in EMQX rules checked in order:
// publish on its own device-to-gateway topics, subscribe on its own
// gateway-to-device topics, subscribe on any filter under its own root
// (protocol.DeviceMaySubscribe allows its device-to-gateway topics too, and
// wildcard filters there: lockers/v1/{id}/#, .../+, .../fw/+), then deny
// everything. The subscribe rule also admits filters under the root that
// match none of its topics (lockers/v1/{id}/nope), which DeviceMaySubscribe
// refuses: nothing is ever published there, and no filter it admits reaches
// another locker (the id level is literal). EMQX checks a rule's topic
// against a topic or filter word by word, where "#" covers "$SYS/..." too,
// so the last rule denies $SYS (the "$" exception of MQTT is one of
// subscription matching, not of EMQX's authorization).
func emqxACL(id string) []emqxRule {
	rules := make([]emqxRule, 0, len(protocol.Channels)+2)
	for _, c := range protocol.Channels {
		action := "subscribe"
		if c.DeviceToGateway() {
			action = "publish"
		}
		rules = append(rules, emqxRule{Permission: "allow", Action: action, Topic: protocol.Topic(id, c)})
	}
	return append(rules, emqxRule{Permission: "allow", Action: "subscribe", Topic: protocol.Root + id + "/#"},
		emqxRule{Permission: "deny", Action: "all", Topic: "#"})
}

type emqxAuthzIn struct {
	ClientID string `json:"clientid"`
	Username string `json:"username"`
	Topic    string `json:"topic"`
	Action   string `json:"action"`
}

type emqxAuthzOut struct {
	Result string `json:"result"`
}

// emqxAuthz answers EMQX's HTTP authorizer for one publish or subscribe.
func emqxAuthz(ba BrokerAuth, w http.ResponseWriter, r *http.Request) error {
	var in emqxAuthzIn
	if err := decodeHook(r, &in); err != nil {
		return err
	}
	if in.Action != "publish" && in.Action != "subscribe" {
		return badRequest("action must be publish or subscribe, not %q", in.Action)
	}
	if in.Topic == "" {
		return badRequest("topic is empty")
	}
	v := ba.CheckExternalACL(in.ClientID, in.Username, in.Topic, in.Action == "publish")
	writeJSON(w, http.StatusOK, emqxAuthzOut{Result: v.String()})
	return nil
}

var errNoBrokerAuth = fmt.Errorf("%w: no broker auth hook on this gateway", fleet.ErrNotFound)

// withBrokerAuth makes h an endpoint; without Options.BrokerAuth it is a 404.
func (s *Server) withBrokerAuth(h func(BrokerAuth, http.ResponseWriter, *http.Request) error) handler {
	return func(w http.ResponseWriter, r *http.Request) error {
		if s.opts.BrokerAuth == nil {
			return errNoBrokerAuth
		}
		return h(s.opts.BrokerAuth, w, r)
	}
}

// decodeHook reads a hook request: a JSON object, or a form
// (application/x-www-form-urlencoded), as EMQX can send either.
func decodeHook(r *http.Request, in any) error {
	ct, _, _ := mime.ParseMediaType(r.Header.Get("Content-Type"))
	if ct != "application/x-www-form-urlencoded" {
		return decode(r, in)
	}
	body, err := readAllLimited(r)
	if err != nil {
		return err
	}
	if bytes.HasPrefix(bytes.TrimSpace(body), []byte("{")) {
		// No form starts so (EMQX's keys are plain words), but the JSON
		// `curl -d` sends does: it would read as a form of empty fields,
		// and get ignore (authn) or an unrelated 400 (authz).
		return badRequest("the body is JSON, but Content-Type says a form (%s; curl -d sends that): send Content-Type: application/json", ct)
	}
	form, err := url.ParseQuery(string(body))
	if err != nil {
		return badRequest("malformed form: %v", err)
	}
	switch in := in.(type) {
	case *emqxAuthnIn:
		*in = emqxAuthnIn{ClientID: form.Get("clientid"), Username: form.Get("username"),
			Password: form.Get("password"), PeerHost: form.Get("peerhost")}
	case *emqxAuthzIn:
		*in = emqxAuthzIn{ClientID: form.Get("clientid"), Username: form.Get("username"),
			Topic: form.Get("topic"), Action: form.Get("action")}
	}
	return nil
}
