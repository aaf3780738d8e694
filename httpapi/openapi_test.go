package httpapi

import (
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"reflect"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"

	"github.com/lockergate/lockergate/firmware"
	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/pickup"
	"github.com/lockergate/lockergate/provisioning"
	"github.com/lockergate/lockergate/webhook"
)

// oaDoc is the part of an OpenAPI 3 document the tests read.
type oaDoc struct {
	OpenAPI    string                            `json:"openapi"`
	Paths      map[string]map[string]oaOperation `json:"paths"`
	Security   []map[string][]string             `json:"security"`
	Components struct {
		SecuritySchemes map[string]struct {
			Type   string `json:"type"`
			Scheme string `json:"scheme"`
		} `json:"securitySchemes"`
		Schemas map[string]*oaSchema `json:"schemas"`
	} `json:"components"`
}

type oaOperation struct {
	OperationID string                 `json:"operationId"`
	Description string                 `json:"description"`
	Roles       []string               `json:"x-roles"`
	Security    *[]map[string][]string `json:"security"`
	Parameters  []oaParameter          `json:"parameters"`
	RequestBody *struct {
		Content map[string]struct {
			Schema *oaSchema `json:"schema"`
		} `json:"content"`
	} `json:"requestBody"`
	Responses map[string]json.RawMessage `json:"responses"`
}

type oaParameter struct {
	Ref      string    `json:"$ref"`
	Name     string    `json:"name"`
	In       string    `json:"in"`
	Required bool      `json:"required"`
	Schema   *oaSchema `json:"schema"`
}

type oaSchema struct {
	Ref        string               `json:"$ref"`
	Type       string               `json:"type"`
	Required   []string             `json:"required"`
	Properties map[string]*oaSchema `json:"properties"`
	AllOf      []*oaSchema          `json:"allOf"`
	Enum       []string             `json:"enum"`
	Items      *oaSchema            `json:"items"`
}

// withoutToken are the documented operations served without a token,
// outside table().
var withoutToken = map[string]bool{
	"GET /healthz": true, "GET /readyz": true, "GET /metrics": true, "GET /v1/openapi.json": true,
}

// outsideTable are the routes registered outside table() that take a
// token or do without one: the firmware image, which a locker downloads
// with a signed URL and an operator with a token.
var outsideTable = map[string][]string{
	"GET /v1/firmware/{id}/blob": fleetRoles,
}

// withoutBody are the POST routes that read no request body: actions on the
// resource their path names.
var withoutBody = map[string]bool{
	"POST /v1/pickups/{id}/cancel":       true,
	"POST /v1/lockers/{id}/rotate-codes": true,
	"POST /v1/alerts/{id}/clear":         true,
}

func mustDoc(tb testing.TB) (*oaDoc, map[string]any) {
	tb.Helper()
	b, err := os.ReadFile("openapi.json")
	if err != nil {
		tb.Fatal(err)
	}
	var d oaDoc
	if err := json.Unmarshal(b, &d); err != nil {
		tb.Fatalf("openapi.json is not valid JSON: %v", err)
	}
	var raw map[string]any
	if err := json.Unmarshal(b, &raw); err != nil {
		tb.Fatal(err)
	}
	return &d, raw
}

// docParams resolves an operation's parameters, following $refs.
func docParams(tb testing.TB, raw map[string]any, op oaOperation) []oaParameter {
	tb.Helper()
	var out []oaParameter
	for _, p := range op.Parameters {
		if p.Ref != "" {
			b, err := json.Marshal(resolve(raw, p.Ref))
			if err != nil {
				tb.Fatal(err)
			}
			p = oaParameter{}
			if err := json.Unmarshal(b, &p); err != nil {
				tb.Fatal(err)
			}
		}
		out = append(out, p)
	}
	return out
}

// resolve returns the value a local $ref points at, or nil.
func resolve(raw map[string]any, ref string) any {
	rest, ok := strings.CutPrefix(ref, "#/")
	if !ok {
		return nil
	}
	var cur any = raw
	for _, part := range strings.Split(rest, "/") {
		m, ok := cur.(map[string]any)
		if !ok {
			return nil
		}
		cur = m[strings.NewReplacer("~1", "/", "~0", "~").Replace(part)]
	}
	return cur
}

func TestOpenAPIDocument(t *testing.T) {
	d, raw := mustDoc(t)
	if !strings.HasPrefix(d.OpenAPI, "3.") {
		t.Fatalf("openapi = %q, want 3.x", d.OpenAPI)
	}
	if s, ok := d.Components.SecuritySchemes["bearer"]; !ok || s.Type != "http" || s.Scheme != "bearer" {
		t.Fatalf("securitySchemes.bearer = %+v, want http bearer", s)
	}
	if len(d.Security) != 1 || d.Security[0]["bearer"] == nil {
		t.Fatalf("top-level security = %v, want bearer", d.Security)
	}
	// Every $ref resolves.
	var walk func(v any)
	walk = func(v any) {
		switch x := v.(type) {
		case map[string]any:
			for k, c := range x {
				if s, ok := c.(string); ok && k == "$ref" && resolve(raw, s) == nil {
					t.Errorf("dangling $ref %s", s)
				}
				walk(c)
			}
		case []any:
			for _, c := range x {
				walk(c)
			}
		}
	}
	walk(raw)
}

func TestOpenAPIMatchesRoutes(t *testing.T) {
	d, raw := mustDoc(t)
	routes := map[string]route{}
	for _, rt := range (&Server{}).table() {
		routes[rt.method+" "+rt.pattern] = rt
	}
	documented := map[string]oaOperation{}
	for path, ops := range d.Paths {
		for method, op := range ops {
			documented[strings.ToUpper(method)+" "+path] = op
		}
	}

	for key, rt := range routes {
		t.Run(key, func(t *testing.T) {
			op, ok := documented[key]
			if !ok {
				t.Fatalf("route %s has no operation in openapi.json", key)
			}
			if op.Security != nil && len(*op.Security) == 0 {
				t.Errorf("operation declares no security, but the route needs a token")
			}
			for _, code := range []string{"401", "403"} {
				if _, ok := op.Responses[code]; !ok {
					t.Errorf("no %s response", code)
				}
			}
			if got, want := sortedCopy(op.Roles), sortedCopy(rt.roles); !slices.Equal(got, want) {
				t.Errorf("x-roles = %v, want %v", got, want)
			}
			for _, role := range rt.roles {
				if !strings.Contains(op.Description, "`"+role+"`") {
					t.Errorf("description does not name role %s", role)
				}
			}
			var pathParams []string
			idem := false
			for _, p := range docParams(t, raw, op) {
				switch {
				case p.In == "path":
					if !p.Required {
						t.Errorf("path parameter %s not required", p.Name)
					}
					pathParams = append(pathParams, p.Name)
				case p.In == "header" && p.Name == "Idempotency-Key":
					idem = true
				}
			}
			var want []string
			for _, m := range regexp.MustCompile(`\{([^}]+)\}`).FindAllStringSubmatch(rt.pattern, -1) {
				want = append(want, m[1])
			}
			if got := sortedCopy(pathParams); !slices.Equal(got, sortedCopy(want)) {
				t.Errorf("path parameters %v, want %v", got, want)
			}
			if idem != rt.idempotent {
				t.Errorf("Idempotency-Key parameter documented = %v, route honours it = %v", idem, rt.idempotent)
			}
			if rt.idempotent {
				if _, ok := op.Responses["409"]; !ok {
					t.Errorf("idempotent route without a 409 response")
				}
			}
			switch {
			case withoutBody[key]:
				if op.RequestBody != nil {
					t.Errorf("documents a request body, but the handler reads none")
				}
			case (rt.method == "POST" || rt.method == "PATCH") && op.RequestBody == nil:
				t.Errorf("no request body")
			}
			if _, ok := op.Responses["400"]; !ok && (op.RequestBody != nil || hasQuery(t, raw, op)) {
				t.Errorf("takes input but documents no 400")
			}
		})
	}

	for key, roles := range outsideTable {
		op, ok := documented[key]
		if !ok {
			t.Errorf("%s is not documented", key)
			continue
		}
		if got, want := sortedCopy(op.Roles), sortedCopy(roles); !slices.Equal(got, want) {
			t.Errorf("%s: x-roles = %v, want %v", key, got, want)
		}
	}
	for key, op := range documented {
		if _, ok := outsideTable[key]; ok {
			continue
		}
		if withoutToken[key] {
			if op.Security == nil || len(*op.Security) != 0 {
				t.Errorf("%s: served without a token, but does not declare security: []", key)
			}
			continue
		}
		if _, ok := routes[key]; !ok {
			t.Errorf("openapi.json documents %s, which is not a route in table()", key)
		}
	}
	for key := range withoutToken {
		if _, ok := documented[key]; !ok {
			t.Errorf("%s is not documented", key)
		}
	}
}

func hasQuery(tb testing.TB, raw map[string]any, op oaOperation) bool {
	for _, p := range docParams(tb, raw, op) {
		if p.In == "query" {
			return true
		}
	}
	return false
}

func sortedCopy(s []string) []string {
	s = slices.Clone(s)
	sort.Strings(s)
	return s
}

// flatten returns a schema's properties and required fields, following
// $ref and allOf.
func flatten(d *oaDoc, s *oaSchema) (props map[string]*oaSchema, required []string) {
	props = map[string]*oaSchema{}
	var add func(s *oaSchema)
	add = func(s *oaSchema) {
		if s.Ref != "" {
			add(d.Components.Schemas[strings.TrimPrefix(s.Ref, "#/components/schemas/")])
			return
		}
		for k, v := range s.Properties {
			props[k] = v
		}
		required = append(required, s.Required...)
		for _, a := range s.AllOf {
			add(a)
		}
	}
	add(s)
	return props, sortedCopy(required)
}

// jsonFields returns the JSON names of t's fields (embedded structs
// flattened) and whether each has omitempty.
func jsonFields(t reflect.Type) map[string]bool {
	out := map[string]bool{}
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	for i := range t.NumField() {
		f := t.Field(i)
		tag := f.Tag.Get("json")
		if tag == "-" {
			continue
		}
		name, opts, _ := strings.Cut(tag, ",")
		if f.Anonymous && name == "" {
			for k, v := range jsonFields(f.Type) {
				out[k] = v
			}
			continue
		}
		if !f.IsExported() {
			continue
		}
		if name == "" {
			name = f.Name
		}
		out[name] = strings.Contains(opts, "omitempty")
	}
	return out
}

// TestOpenAPISchemas holds the documented schemas to the Go types the
// handlers encode and decode.
func TestOpenAPISchemas(t *testing.T) {
	d, _ := mustDoc(t)
	// Answers: exactly the struct's fields; required = the fields always sent.
	answers := map[string]any{
		"Problem":      Problem{},
		"Site":         fleet.Site{},
		"Claim":        provisioning.Claim{},
		"ClaimCreated": claimOut{},
		"Compartment":  fleet.Compartment{},
		"Locker":       fleet.Locker{},
		"HealthRecord": fleet.HealthRecord{},
		"EventRecord":  fleet.EventRecord{},
		"Command":      fleet.Command{},
		"Token":        fleet.Token{},
		"TokenCreated": tokenOut{},
		"AuditEntry":   fleet.AuditEntry{},
		"SiteList":     List[fleet.Site]{},
		"ClaimList":    List[provisioning.Claim]{},
		"LockerList":   List[fleet.Locker]{},
		"HealthList":   List[fleet.HealthRecord]{},
		"EventList":    List[fleet.EventRecord]{},
		"AuditList":    List[fleet.AuditEntry]{},

		"Pickup":          pickup.Pickup{},
		"Recipient":       pickup.Recipient{},
		"Transition":      pickup.Transition{},
		"CredentialView":  pickup.CredentialView{},
		"PickupList":      List[pickup.Pickup]{},
		"Webhook":         webhook.Webhook{},
		"WebhookCreated":  webhookOut{},
		"WebhookList":     List[webhook.Webhook]{},
		"Delivery":        webhook.Delivery{},
		"DeliveryAttempt": webhook.Attempt{},
		"DeliveryList":    List[webhook.Delivery]{},
		"WebhookEvent":    pickup.Event{},

		"Artifact":       firmware.Artifact{},
		"ArtifactList":   List[firmware.Artifact]{},
		"Rollout":        firmware.Status{},
		"RolloutList":    List[firmware.Status]{},
		"WaveStatus":     firmware.WaveStatus{},
		"RolloutJob":     firmware.Job{},
		"RolloutJobList": List[firmware.Job]{},

		"EMQXAuthnAnswer": emqxAuthnOut{},
		"EMQXRule":        emqxRule{},
		"EMQXAuthzAnswer": emqxAuthzOut{},
	}
	// alwaysSet are omitempty fields the handler never leaves empty.
	alwaysSet := map[string][]string{
		"ClaimCreated":   {"token"},
		"CredentialView": {"locker", "compartments", "pickups"}, // set by POST /v1/credentials
		"Webhook":        {"token"},
		"WebhookCreated": {"token"},
	}
	for name, v := range answers {
		t.Run(name, func(t *testing.T) {
			s, ok := d.Components.Schemas[name]
			if !ok {
				t.Fatalf("no schema %s", name)
			}
			props, required := flatten(d, s)
			fields := jsonFields(reflect.TypeOf(v))
			var wantRequired []string
			for f, omit := range fields {
				if !omit || slices.Contains(alwaysSet[name], f) {
					wantRequired = append(wantRequired, f)
				}
				if _, ok := props[f]; !ok {
					t.Errorf("field %s is sent but not documented", f)
				}
			}
			for p := range props {
				if _, ok := fields[p]; !ok {
					t.Errorf("property %s is documented but never sent", p)
				}
			}
			if got, want := required, sortedCopy(wantRequired); !slices.Equal(got, want) {
				t.Errorf("required = %v, want the fields without omitempty %v", got, want)
			}
		})
	}
	// Request bodies: exactly the fields the handler reads.
	requests := map[string]struct {
		v      any
		ignore []string // decoded but overwritten by the server
	}{
		"SiteCreate":    {fleet.Site{}, []string{"created_at"}},
		"ClaimCreate":   {claimIn{}, nil},
		"LockerPatch":   {lockerPatch{}, nil},
		"CommandCreate": {commandIn{}, nil},
		"TokenCreate":   {tokenIn{}, nil},

		"EMQXAuthnRequest": {emqxAuthnIn{}, nil},
		"EMQXAuthzRequest": {emqxAuthzIn{}, nil},

		"PickupCreate":     {pickupIn{}, nil},
		"CredentialCreate": {credentialIn{}, nil},
		"WebhookCreate":    {webhookIn{}, nil},
		"RolloutCreate":    {firmware.Spec{}, nil},
		"RolloutSelector":  {firmware.Selector{}, nil},
		"RecipientCreate":  {pickup.Recipient{}, nil},
	}
	for name, r := range requests {
		t.Run(name, func(t *testing.T) {
			s, ok := d.Components.Schemas[name]
			if !ok {
				t.Fatalf("no schema %s", name)
			}
			props, _ := flatten(d, s)
			var got, want []string
			for p := range props {
				got = append(got, p)
			}
			for f := range jsonFields(reflect.TypeOf(r.v)) {
				if !slices.Contains(r.ignore, f) {
					want = append(want, f)
				}
			}
			if got, want := sortedCopy(got), sortedCopy(want); !slices.Equal(got, want) {
				t.Errorf("properties %v, want %v", got, want)
			}
		})
	}
	t.Run("AlertKinds", func(t *testing.T) {
		props, _ := flatten(d, d.Components.Schemas["Alert"])
		if got, want := sortedCopy(props["kind"].Enum), sortedCopy(alertKinds); !slices.Equal(got, want) {
			t.Errorf("Alert.kind enum %v, want %v", got, want)
		}
		var listKinds []string
		for _, p := range d.Paths["/v1/alerts"]["get"].Parameters {
			if p.Name == "kind" && p.Schema != nil {
				listKinds = p.Schema.Enum
			}
		}
		if got, want := sortedCopy(listKinds), sortedCopy(alertKinds); !slices.Equal(got, want) {
			t.Errorf("GET /v1/alerts kind enum %v, want %v", got, want)
		}
	})
	t.Run("CommandStatus", func(t *testing.T) {
		// The API shows timed_out as expired (fleet.Command.MarshalJSON).
		props, _ := flatten(d, d.Components.Schemas["Command"])
		shown := slices.DeleteFunc(slices.Clone(fleet.CommandStatuses), func(s string) bool { return s == fleet.CmdTimedOut })
		if got, want := sortedCopy(props["status"].Enum), sortedCopy(shown); !slices.Equal(got, want) {
			t.Errorf("status enum %v, want %v", got, want)
		}
		if _, ok := props["timed_out"]; !ok {
			t.Error("Command has no timed_out property")
		}
	})
	t.Run("PickupEnums", func(t *testing.T) {
		for _, c := range []struct {
			schema, prop string
			items        bool // the enum is on the array's items
			want         []string
		}{
			{"Pickup", "state", false, pickup.States},
			{"Transition", "to", false, pickup.States},
			{"WebhookEvent", "type", false, webhookEvents},
			{"Delivery", "type", false, webhookEvents},
			{"Webhook", "events", true, webhookEvents},
			{"WebhookCreate", "events", true, webhookEvents},
		} {
			props, _ := flatten(d, d.Components.Schemas[c.schema])
			p := props[c.prop]
			if p != nil && c.items {
				p = p.Items
			}
			if p == nil {
				t.Errorf("%s.%s: not documented", c.schema, c.prop)
				continue
			}
			if got, want := sortedCopy(p.Enum), sortedCopy(c.want); !slices.Equal(got, want) {
				t.Errorf("%s.%s enum %v, want %v", c.schema, c.prop, got, want)
			}
		}
	})
	t.Run("Roles", func(t *testing.T) {
		props, _ := flatten(d, d.Components.Schemas["TokenCreate"])
		for _, r := range props["role"].Enum {
			if !fleet.ValidRole(r) {
				t.Errorf("documented role %q is not a role", r)
			}
		}
		// Every role can be created, broker included (an external
		// broker's auth hook token: docs/deployment.md).
		all := []string{fleet.RoleAdmin, fleet.RoleOperator, fleet.RoleStore, fleet.RolePlatform, fleet.RoleBroker}
		if got := sortedCopy(props["role"].Enum); !slices.Equal(got, sortedCopy(all)) {
			t.Errorf("role enum %v, want %v", got, all)
		}
	})
}

// TestOpenAPIServed fetches the document from the real mux.
func TestOpenAPIServed(t *testing.T) {
	srv := httptest.NewServer(New(Options{}))
	defer srv.Close()
	want, err := os.ReadFile("openapi.json")
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.Get(srv.URL + "/v1/openapi.json")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	got, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d, want 200", resp.StatusCode)
	}
	if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("Content-Type %q, want application/json", ct)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("served document (%d bytes) differs from openapi.json (%d bytes)", len(got), len(want))
	}

	t.Run("OtherRoutesNeedAToken", func(t *testing.T) {
		resp, err := http.Get(srv.URL + "/v1/sites")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusUnauthorized || resp.Header.Get("Content-Type") != "application/problem+json" {
			t.Fatalf("GET /v1/sites without a token: %d %s, want 401 problem+json", resp.StatusCode, resp.Header.Get("Content-Type"))
		}
	})
}

// TestAPIDocListsRoutes holds the roles table of docs/api.md to the routes:
// each row "| `METHOD pattern` |" is a route, and each route has a row.
func TestAPIDocListsRoutes(t *testing.T) {
	b, err := os.ReadFile("../docs/api.md")
	if err != nil {
		t.Fatal(err)
	}
	rows := map[string]bool{}
	row := regexp.MustCompile("^\\| `((?:GET|POST|PUT|PATCH|DELETE) /[^`]*)` \\|")
	for _, line := range strings.Split(string(b), "\n") {
		if m := row.FindStringSubmatch(line); m != nil {
			rows[m[1]] = true
		}
	}
	routes := map[string]bool{}
	for _, rt := range (&Server{}).table() {
		key := rt.method + " " + rt.pattern
		routes[key] = true
		if !rows[key] {
			t.Errorf("docs/api.md has no row for %s", key)
		}
	}
	for key := range rows {
		if !routes[key] && !withoutToken[key] {
			t.Errorf("docs/api.md has a row for %s, which is not a route", key)
		}
	}
}
