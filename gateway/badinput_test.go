package gateway_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"testing"

	"github.com/lockergate/lockergate/client"
)

// TestAPIInputEdges: requests a black-box run of the API found taken or
// refused wrongly, or refused in Go's words ("want fleet.Site"). A site id that is a path segment (".", "..") could be
// created but not read back; the time zone "Local" (the host's zone)
// passed as IANA; a body over 1 MiB was a 400, not a 413; and a bearer
// token after two spaces (RFC 9110 allows 1*SP) was a 401.
func TestAPIInputEdges(t *testing.T) {
	ctx := context.Background()
	tg := MustStart(t)
	big := `{"id":"store-9","name":"` + strings.Repeat("x", 1<<20) + `"}`
	for _, c := range []struct {
		name   string
		req    client.Request
		status int
		detail string
	}{
		{"site id .", client.Request{Method: "POST", Path: "/v1/sites", Body: map[string]string{"id": "."}}, 400, "not . or .."},
		{"site id ..", client.Request{Method: "POST", Path: "/v1/sites", Body: map[string]string{"id": ".."}}, 400, "not . or .."},
		{"time zone Local", client.Request{Method: "POST", Path: "/v1/sites", Body: map[string]string{"id": "tz", "timezone": "Local"}}, 400,
			`timezone "Local" is not an IANA time zone`},
		{"body an array", client.Request{Method: "POST", Path: "/v1/sites", Body: []byte(`[]`)}, 400, "the body must be an object, not array"},
		{"recipient a string", client.Request{Method: "POST", Path: "/v1/pickups", Body: []byte(`{"site":"s","order_ref":"r","recipient":"speedy"}`)}, 400,
			`field "recipient" must be an object, not string`},
		{"expiry not a time", client.Request{Method: "POST", Path: "/v1/pickups", Body: []byte(`{"site":"s","order_ref":"r","expires_at":"tomorrow"}`)}, 400,
			`"tomorrow" is not an RFC 3339 time`},
		{"body over 1 MiB", client.Request{Method: "POST", Path: "/v1/pickups", Body: []byte(big)}, 413, "request body larger than 1048576 bytes"},
		{"body over 1 MiB with Idempotency-Key", client.Request{Method: "POST", Path: "/v1/sites", Body: []byte(big),
			Header: http.Header{"Idempotency-Key": {"big-1"}}}, 413, "request body larger than 1048576 bytes"},
		{"webhook port out of range", client.Request{Method: "POST", Path: "/v1/webhooks", Body: map[string]string{"url": "https://hooks.example:99999/x"}}, 400,
			`url's port "99999": want 1 to 65535`},
		{"webhook with a password", client.Request{Method: "POST", Path: "/v1/webhooks", Body: map[string]string{"url": "https://u:p@hooks.example/x"}}, 400,
			"must not hold a user name or password"},
		{"webhook to a numeric host", client.Request{Method: "POST", Path: "/v1/webhooks", Body: map[string]string{"url": "http://2130706433/x"}}, 400,
			"write it as four decimal numbers"},
	} {
		status, err := tg.Admin.Do(ctx, c.req, nil)
		var pe *client.Error
		if status != c.status || !errors.As(err, &pe) || !strings.Contains(pe.Detail, c.detail) {
			t.Errorf("%s: %d %v, want %d with a problem detail saying %q", c.name, status, err, c.status, c.detail)
		}
	}
	// Site ids with dots inside are still ids.
	if err := tg.Admin.Post(ctx, "/v1/sites", map[string]string{"id": "..a.", "timezone": "Europe/Berlin"}, nil); err != nil {
		t.Errorf("site ..a.: %v", err)
	}

	req, err := http.NewRequest("GET", "http://"+tg.HTTPAddr()+"/v1/sites", bytes.NewReader(nil))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer  "+tg.Admin.Token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("Bearer, two spaces, token: %d, want 200", resp.StatusCode)
	}
	// Two credentials: which to take would be a guess.
	req.Header.Set("Authorization", "Bearer "+tg.Admin.Token)
	req.Header.Add("Authorization", "Bearer "+tg.Admin.Token)
	if resp, err = http.DefaultClient.Do(req); err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest {
		t.Errorf("two Authorization headers: %d, want 400", resp.StatusCode)
	}
}

// TestUncleanPathsAndRanges: a path with //, /./ or /../ is a 404 problem
// naming the clean path, not the mux's HTML redirect (which a client
// follows with its method and body: the POST below would have created a
// site), and a firmware Range the image cannot serve is a 416 problem.
func TestUncleanPathsAndRanges(t *testing.T) {
	tg := MustStart(t)
	raw := func(method, path string, body string, header ...string) (*http.Response, map[string]any) {
		t.Helper()
		req, err := http.NewRequest(method, "http://"+tg.HTTPAddr()+path, strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Authorization", "Bearer "+tg.Admin.Token)
		for i := 0; i+1 < len(header); i += 2 {
			req.Header.Set(header[i], header[i+1])
		}
		c := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var p map[string]any
		json.NewDecoder(resp.Body).Decode(&p)
		return resp, p
	}
	for _, c := range []struct{ method, path, clean string }{
		{"GET", "//v1/sites", "/v1/sites"},
		{"GET", "/v1//sites", "/v1/sites"},
		{"GET", "/v1/sites/.", "/v1/sites"},
		{"POST", "/v1/pickups/../sites", "/v1/sites"},
	} {
		resp, p := raw(c.method, c.path, `{"id":"from-a-redirect"}`)
		if resp.StatusCode != http.StatusNotFound || resp.Header.Get("Content-Type") != "application/problem+json" ||
			!strings.Contains(fmt.Sprint(p["detail"]), "did you mean "+c.clean+"?") {
			t.Errorf("%s %s: %d %s %v, want a 404 problem naming %s", c.method, c.path, resp.StatusCode, resp.Header.Get("Content-Type"), p, c.clean)
		}
	}
	if err := tg.Admin.Get(context.Background(), "/v1/sites/from-a-redirect", nil, nil); err == nil {
		t.Error("the POST to an unclean path created a site")
	}

	a := fwUpload(t, tg, "LX-24", "9.9.9", fwImage("9.9.9"))
	for _, rng := range []string{"bytes=99999999-", "bytes=abc"} {
		resp, p := raw("GET", "/v1/firmware/"+a.ID+"/blob", "", "Range", rng)
		if resp.StatusCode != http.StatusRequestedRangeNotSatisfiable || resp.Header.Get("Content-Type") != "application/problem+json" ||
			p["status"] != float64(416) || !strings.Contains(fmt.Sprint(p["detail"]), "cannot be served") ||
			resp.Header.Get("Content-Range") != fmt.Sprintf("bytes */%d", a.Size) {
			t.Errorf("Range %s: %d %s %v (Content-Range %q), want a 416 problem with the size", rng, resp.StatusCode, resp.Header.Get("Content-Type"), p, resp.Header.Get("Content-Range"))
		}
	}
	if resp, _ := raw("GET", "/v1/firmware/"+a.ID+"/blob", "", "Range", "bytes=0-9"); resp.StatusCode != http.StatusPartialContent {
		t.Errorf("Range bytes=0-9: %d, want 206", resp.StatusCode)
	}
}
