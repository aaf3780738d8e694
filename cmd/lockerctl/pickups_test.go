package main

import (
	"bytes"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestPickupsAndWebhooks: the handoff commands send what the API expects
// (paths, bodies, filters) and print its answers; bad usage exits 2.
func TestPickupsAndWebhooks(t *testing.T) {
	var mu sync.Mutex
	bodies := map[string]map[string]any{}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		key := r.Method + " " + r.URL.Path
		if r.Body != nil {
			var b map[string]any
			if json.NewDecoder(r.Body).Decode(&b) == nil {
				mu.Lock()
				bodies[key] = b
				mu.Unlock()
			}
		}
		switch key {
		case "GET /v1/pickups":
			if q := r.URL.Query(); q.Get("site") != "store-042" || q.Get("state") != "ready" {
				http.Error(w, "bad query "+r.URL.RawQuery, http.StatusBadRequest)
				return
			}
			json.NewEncoder(w).Encode(map[string]any{"items": []map[string]any{{"id": "p-1", "order_ref": "A-1001", "state": "ready"}}, "next": ""})
		case "POST /v1/pickups":
			w.WriteHeader(http.StatusCreated)
			json.NewEncoder(w).Encode(map[string]any{"id": "p-2", "state": "staging", "locker": "lk-1", "compartment": 3})
		case "POST /v1/pickups/p-1/cancel":
			json.NewEncoder(w).Encode(map[string]any{"id": "p-1", "state": "cancelled"})
		case "POST /v1/credentials":
			w.WriteHeader(http.StatusCreated)
			json.NewEncoder(w).Encode(map[string]any{"id": "cr-1", "code": "12345678"})
		case "POST /v1/webhooks":
			w.WriteHeader(http.StatusCreated)
			json.NewEncoder(w).Encode(map[string]any{"id": "wh-1", "secret": "whsec_x"})
		case "GET /v1/webhooks/wh-1/deliveries":
			json.NewEncoder(w).Encode(map[string]any{"items": []map[string]any{{"seq": 7, "type": "pickup.ready", "state": "delivered"}}, "next": ""})
		case "DELETE /v1/webhooks/wh-1":
			w.WriteHeader(http.StatusNoContent)
		default:
			http.NotFound(w, r)
		}
	}))
	defer srv.Close()
	lockerctl := func(want int, args ...string) string {
		t.Helper()
		var out, errOut bytes.Buffer
		if code := run(append([]string{"--url", srv.URL, "--token", "tok"}, args...), &out, &errOut); code != want {
			t.Fatalf("lockerctl %v: exit %d, want %d; out %q, err %q", args, code, want, out.String(), errOut.String())
		}
		return out.String()
	}
	body := func(key string) map[string]any {
		mu.Lock()
		defer mu.Unlock()
		return bodies[key]
	}

	if out := lockerctl(0, "pickups", "list", "--site", "store-042", "--state", "ready"); !strings.Contains(out, "A-1001") {
		t.Fatalf("pickups list: %q", out)
	}
	before := time.Now()
	if out := lockerctl(0, "pickups", "create", "--site", "store-042", "--order", "A-1002", "--size", "M", "--platform", "speedy", "--expires-in", "1h"); !strings.Contains(out, "p-2") {
		t.Fatalf("pickups create: %q", out)
	}
	b := body("POST /v1/pickups")
	exp, _ := time.Parse(time.RFC3339Nano, b["expires_at"].(string))
	rc, _ := b["recipient"].(map[string]any)
	if b["site"] != "store-042" || b["order_ref"] != "A-1002" || b["size"] != "M" || b["zone"] != "ambient" ||
		rc["kind"] != "driver" || rc["platform"] != "speedy" || exp.Before(before.Add(time.Hour-time.Second)) || exp.After(time.Now().Add(time.Hour)) {
		t.Fatalf("pickups create sent %v", b)
	}
	lockerctl(0, "pickups", "create", "--site", "store-042", "--order", "A-1003", "--customer", "Ana")
	if rc, _ := body("POST /v1/pickups")["recipient"].(map[string]any); rc["kind"] != "customer" || rc["name"] != "Ana" {
		t.Fatalf("a customer's pickup sent recipient %v", rc)
	}
	// Neither: the recipient and the expiry are the gateway's to choose (a
	// platform token's pickup is its own driver's).
	lockerctl(0, "pickups", "create", "--site", "store-042", "--order", "A-1004")
	if b := body("POST /v1/pickups"); b["recipient"] != nil || b["expires_at"] != nil {
		t.Fatalf("a pickup without --platform, --customer or --expires-in sent %v", b)
	}
	if out := lockerctl(0, "pickups", "cancel", "p-1"); !strings.Contains(out, "cancelled") {
		t.Fatalf("pickups cancel: %q", out)
	}
	if out := lockerctl(0, "codes", "create", "p-1", "p-2", "--kind", "pin"); !strings.Contains(out, "12345678") {
		t.Fatalf("codes create: %q", out)
	}
	if b := body("POST /v1/credentials"); b["kind"] != "pin" || len(b["pickups"].([]any)) != 2 {
		t.Fatalf("codes create sent %v", b)
	}
	if out := lockerctl(0, "webhooks", "create", "--events", "pickup.ready,pickup.expired", "https://hooks.example/lg"); !strings.Contains(out, "whsec_x") {
		t.Fatalf("webhooks create: %q", out)
	}
	if b := body("POST /v1/webhooks"); b["url"] != "https://hooks.example/lg" || len(b["events"].([]any)) != 2 {
		t.Fatalf("webhooks create sent %v", b)
	}
	if out := lockerctl(0, "webhooks", "deliveries", "wh-1"); !strings.Contains(out, "delivered") {
		t.Fatalf("webhooks deliveries: %q", out)
	}
	lockerctl(0, "webhooks", "delete", "wh-1")

	lockerctl(2, "pickups", "create", "--site", "store-042")                                               // no order
	lockerctl(2, "pickups", "create", "--site", "s", "--order", "o", "--platform", "p", "--customer", "c") // both
	lockerctl(2, "codes", "create")                                                                        // no pickups
	lockerctl(2, "webhooks", "create", "--events", "pickup.ready")                                         // no URL
	lockerctl(2, "webhooks", "create", "https://a.example", "https://b.example")                           // two
	lockerctl(2, "pickups", "create", "--site", "s", "--order", "o", "M")                                  // a stray argument
	lockerctl(2, "pickups", "cancel", "")                                                                  // an empty id
	lockerctl(1, "pickups", "show", "p-404")                                                               // the API's 404
}
