package httpapi

import (
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

// TestDecodeTruncatesTimes: every time a request gives, however deep, is
// cut to microseconds (what PostgreSQL keeps), and nothing else changes.
func TestDecodeTruncatesTimes(t *testing.T) {
	type inner struct {
		At time.Time `json:"at"`
	}
	type embedded struct {
		F time.Time `json:"f"`
	}
	var v struct {
		embedded
		A     time.Time  `json:"a"`
		B     *time.Time `json:"b"`
		C     []inner    `json:"c"`
		D     *inner     `json:"d"`
		E     any        `json:"e"`
		Name  string     `json:"name"`
		empty *time.Time
	}
	const ns = "2026-12-06T10:00:00.123456789Z"
	body := `{"a":"` + ns + `","b":"` + ns + `","c":[{"at":"` + ns + `"}],"d":{"at":"` + ns + `"},"e":"` + ns + `","name":"` + ns + `","f":"` + ns + `"}`
	if err := decode(httptest.NewRequest("POST", "/", strings.NewReader(body)), &v); err != nil {
		t.Fatal(err)
	}
	want := time.Date(2026, 12, 6, 10, 0, 0, 123456000, time.UTC)
	for name, got := range map[string]time.Time{"a": v.A, "b": *v.B, "c": v.C[0].At, "d": v.D.At, "f (embedded)": v.F} {
		if !got.Equal(want) {
			t.Errorf("%s = %v, want %v", name, got, want)
		}
	}
	if v.E != ns || v.Name != ns || v.empty != nil {
		t.Errorf("untimed fields changed: e %v, name %q", v.E, v.Name)
	}
}

// TestCanonicalJSON: one spelling per JSON value, except where sorting the
// keys would lose which of two keys equal but for case encoding/json takes
// (the last in the body): such a body is compared as written.
func TestCanonicalJSON(t *testing.T) {
	for _, c := range []struct{ a, b string }{
		{`{"b":1,"a":[{"y":"\u0041","x":2.0}]}`, ` { "a" : [ { "x" : 2.0 , "y" : "A" } ] , "b" : 1 } `},
	} {
		if ca, cb := canonicalJSON([]byte(c.a)), canonicalJSON([]byte(c.b)); string(ca) != string(cb) {
			t.Errorf("%s and %s: %s and %s, want one spelling", c.a, c.b, ca, cb)
		}
	}
	for _, c := range []struct{ a, b string }{
		{`{"type":"unlock","TYPE":"reboot"}`, `{"TYPE":"reboot","type":"unlock"}`},
		{`{"x":{"Id":1,"id":2}}`, `{"x":{"id":2,"Id":1}}`},
		{`{"n":1}`, `{"n":1.0}`},
	} {
		if ca, cb := canonicalJSON([]byte(c.a)), canonicalJSON([]byte(c.b)); string(ca) == string(cb) {
			t.Errorf("%s and %s: both %s, want them apart", c.a, c.b, ca)
		}
	}
}

// TestDecodeSaysWhatToSend: a form body (curl -d without the JSON content
// type) and a time given as a number are 400s that say what to send; a
// JSON body sent as a form is read all the same.
func TestDecodeSaysWhatToSend(t *testing.T) {
	var v struct {
		Type      string    `json:"type"`
		ExpiresAt time.Time `json:"expires_at"`
	}
	for _, c := range []struct{ body, contentType, want string }{
		{`type=unlock&compartment=2`, "application/x-www-form-urlencoded",
			`bad request: the body must be a JSON object, sent with Content-Type: application/json; this one reads as a form ("type=unlock&compartment=2")`},
		{`{"type":"unlock"}`, "application/x-www-form-urlencoded", ""},
		{`{"expires_at":12345}`, "application/json", `bad request: a time field holds something other than a string: times are RFC 3339 strings`},
	} {
		req := httptest.NewRequest("POST", "/", strings.NewReader(c.body))
		req.Header.Set("Content-Type", c.contentType)
		err := decode(req, &v)
		if c.want == "" && err != nil || c.want != "" && (err == nil || !strings.HasPrefix(err.Error(), c.want)) {
			t.Errorf("%s as %s: %v, want %q", c.body, c.contentType, err, c.want)
		}
	}
}
