package gateway_test

import (
	"context"
	"errors"
	"net/http"
	"net/url"
	"testing"

	"github.com/lockergate/lockergate/client"
)

// TestBadTextRefused: a NUL character or invalid UTF-8 anywhere a request
// carries text (path, query, JSON strings, Idempotency-Key) is a 400 that
// says so. PostgreSQL cannot store either in a text column, so each of
// these was a 500 ("internal error") before. A JSON string that merely
// spells \u0000 (an escaped backslash) is ordinary text.
func TestBadTextRefused(t *testing.T) {
	ctx := context.Background()
	tg := MustStart(t)
	tg.MustSiteAndClaim(t, "store-1", 1)
	_, store := tg.MustToken(t, "store", "store-1", "front-desk")
	nul, ff := "\x00", "\xff"
	for _, c := range []struct {
		name string
		as   *client.Client
		req  client.Request
	}{
		{"locker id NUL", tg.Admin, client.Request{Method: "GET", Path: "/v1/lockers/%00"}},
		{"locker id invalid UTF-8", tg.Admin, client.Request{Method: "GET", Path: "/v1/lockers/%FF"}},
		{"pickup id invalid UTF-8", tg.Admin, client.Request{Method: "GET", Path: "/v1/pickups/%FF"}},
		{"command id NUL", tg.Admin, client.Request{Method: "GET", Path: "/v1/lockers/lk-1/commands/%00"}},
		{"health of a NUL locker", store, client.Request{Method: "GET", Path: "/v1/lockers/a%00b/health"}},
		{"filter invalid UTF-8", tg.Admin, client.Request{Method: "GET", Path: "/v1/lockers", Query: url.Values{"model": {ff}}}},
		{"filter NUL", tg.Admin, client.Request{Method: "GET", Path: "/v1/pickups", Query: url.Values{"site": {nul}}}},
		{"audit actor NUL", tg.Admin, client.Request{Method: "GET", Path: "/v1/audit", Query: url.Values{"actor": {"x" + nul}}}},
		{"pickup site NUL", tg.Admin, client.Request{Method: "POST", Path: "/v1/pickups",
			Body: []byte(`{"site":"store-1\u0000","order_ref":"N-1","recipient":{"kind":"customer"}}`)}},
		{"recipient name NUL", store, client.Request{Method: "POST", Path: "/v1/pickups",
			Body: []byte(`{"site":"store-1","order_ref":"N-2","recipient":{"kind":"customer","name":"a\u0000b"}}`)}},
		{"claim site NUL", tg.Admin, client.Request{Method: "POST", Path: "/v1/claims", Body: []byte(`{"site":"\u0000"}`)}},
		{"token site NUL", tg.Admin, client.Request{Method: "POST", Path: "/v1/tokens",
			Body: []byte(`{"role":"store","site":"\u0000","name":"x"}`)}},
		{"site name NUL", tg.Admin, client.Request{Method: "POST", Path: "/v1/sites",
			Body: []byte(`{"id":"store-2","name":"Main\u0000Street","timezone":"UTC"}`)}},
		{"site name invalid UTF-8", tg.Admin, client.Request{Method: "POST", Path: "/v1/sites",
			Body: []byte("{\"id\":\"store-5\",\"name\":\"Main\xffStreet\",\"timezone\":\"UTC\"}")}},
		{"NUL as a key", tg.Admin, client.Request{Method: "POST", Path: "/v1/sites",
			Body: []byte(`{"id":"store-2","name":"Main","timezone":"UTC","\u0000":1}`)}},
		{"Idempotency-Key invalid UTF-8", tg.Admin, client.Request{Method: "POST", Path: "/v1/sites",
			Body: map[string]string{"id": "store-3", "name": "x", "timezone": "UTC"}, Header: http.Header{"Idempotency-Key": {"k" + ff}}}},
		{"command TTL past int64 nanoseconds", store, client.Request{Method: "POST", Path: "/v1/lockers/lk-1/commands",
			Body: []byte(`{"type":"unlock","compartment":1,"ttl_s":18446744104}`)}},
		{"claim lifetime past int64 nanoseconds", tg.Admin, client.Request{Method: "POST", Path: "/v1/claims",
			Body: []byte(`{"site":"store-1","expires_in_s":18446744134}`)}},
	} {
		status, err := c.as.Do(ctx, c.req, nil)
		var pe *client.Error
		if status != http.StatusBadRequest || !errors.As(err, &pe) {
			t.Errorf("%s: %d %v, want 400 with a problem detail", c.name, status, err)
		}
	}
	// Text that only looks like NUL is accepted.
	var site struct{ Name string }
	if err := tg.Admin.Post(ctx, "/v1/sites", []byte(`{"id":"store-4","name":"back\\u0000slash","timezone":"UTC"}`), &site); err != nil ||
		site.Name != `back\u0000slash` {
		t.Errorf("a name spelling \\u0000: %+v %v, want it stored as written", site, err)
	}
}
