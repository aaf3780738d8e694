package gateway_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"reflect"
	"sync"
	"testing"
	"time"

	"github.com/lockergate/lockergate/client"
	"github.com/lockergate/lockergate/devicesim"
	"github.com/lockergate/lockergate/fleet"
)

// MustFleet starts n simulated lockers that provision with claim; they stop in tb.Cleanup.
func MustFleet(tb testing.TB, tg *TestGateway, claim string, n int, mod ...func(*devicesim.Options)) *devicesim.Fleet {
	tb.Helper()
	o := devicesim.Options{
		Broker: "tcp://" + tg.MQTTAddr(), ClaimToken: claim, Lockers: n, Seed: 42,
		HealthInterval: 200 * time.Millisecond, DoorCloseDelay: 20 * time.Millisecond, ConnectRate: 1000,
		Logger: testLogger(tb),
	}
	for _, f := range mod {
		f(&o)
	}
	f, err := devicesim.NewFleet(o)
	if err != nil {
		tb.Fatalf("simulator: %v", err)
	}
	tb.Cleanup(f.Close)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := f.Start(ctx); err != nil {
		tb.Fatalf("start simulated fleet: %v", err)
	}
	return f
}

type lockerList struct {
	Items []fleet.Locker `json:"items"`
	Next  string         `json:"next"`
}

// TestWalkingSkeleton walks the thin end-to-end path of issue 2 with the real
// gateway, PostgreSQL and 50 simulated lockers over TCP.
func TestWalkingSkeleton(t *testing.T) {
	ctx := context.Background()
	tg := MustStart(t)

	// 1. Admin token written at first start, site and claim via the API.
	st, err := os.Stat(tg.AdminTokenPath())
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("admin token file: %v, mode %v", err, st.Mode())
	}
	claim := tg.MustSiteAndClaim(t, "store-042", 50)

	// 2. Lockers provision by claim and reconnect as themselves.
	sim := MustFleet(t, tg, claim, 50)
	var hashes int
	if err := tg.DB().Pool().QueryRow(ctx, `SELECT count(*) FROM devices WHERE length(secret_hash) = 32 AND site = 'store-042'`).Scan(&hashes); err != nil || hashes != 50 {
		t.Fatalf("devices with hashed secrets: %d, %v", hashes, err)
	}

	// 3. Presence: all online with last_seen.
	Eventually(t, 20*time.Second, "50 lockers online", func() error {
		var l lockerList
		if err := tg.Admin.Get(ctx, "/v1/lockers", url.Values{"site": {"store-042"}, "online": {"true"}}, &l); err != nil {
			return err
		}
		if len(l.Items) != 50 {
			return fmt.Errorf("%d online", len(l.Items))
		}
		for _, it := range l.Items {
			if it.LastSeen == nil {
				return fmt.Errorf("%s has no last_seen", it.ID)
			}
		}
		return nil
	})
	Eventually(t, 5*time.Second, "devices_online metric", func() error {
		v, err := tg.Metric("lockergate_devices_online")
		if err == nil && v != 50 {
			err = fmt.Errorf("lockergate_devices_online = %v", v)
		}
		return err
	})

	// 4. Health stored; the locker shows the latest.
	first := sim.Lockers()[0]
	id := first.DeviceID()
	Eventually(t, 10*time.Second, "latest health", func() error {
		var l fleet.Locker
		if err := tg.Admin.Get(ctx, "/v1/lockers/"+id, nil, &l); err != nil {
			return err
		}
		var h struct {
			Seq int64 `json:"seq"`
		}
		if len(l.Health) == 0 || json.Unmarshal(l.Health, &h) != nil || h.Seq < 2 {
			return fmt.Errorf("health %s", l.Health)
		}
		if len(l.Compartments) == 0 {
			return errors.New("no compartments")
		}
		return nil
	})
	var rows int
	if err := tg.DB().Pool().QueryRow(ctx, `SELECT count(*) FROM health WHERE device_id = $1`, id).Scan(&rows); err != nil || rows < 2 {
		t.Fatalf("health rows: %d, %v", rows, err)
	}

	// 5. Unlock with wait_s: the locker answers ok.
	var cmd fleet.Command
	if err := tg.Admin.Post(ctx, "/v1/lockers/"+id+"/commands",
		map[string]any{"type": "unlock", "compartment": 1, "reason": "remote", "ttl_s": 30, "wait_s": 10}, &cmd); err != nil {
		t.Fatal(err)
	}
	if cmd.Status != fleet.CmdOK {
		t.Fatalf("unlock status %q, want ok", cmd.Status)
	}
	if got := first.CommandsRun(cmd.ID); got != 1 {
		t.Fatalf("locker ran the unlock %d times, want 1", got)
	}
	var dbStatus string
	tg.DB().Pool().QueryRow(ctx, `SELECT status FROM commands WHERE id = $1`, cmd.ID).Scan(&dbStatus)
	if dbStatus != "ok" {
		t.Fatalf("command row status %q", dbStatus)
	}
	Eventually(t, 10*time.Second, "door events recorded", func() error {
		var evs struct {
			Items []fleet.EventRecord `json:"items"`
		}
		if err := tg.Admin.Get(ctx, "/v1/lockers/"+id+"/events", nil, &evs); err != nil {
			return err
		}
		seen := map[string]bool{}
		for _, e := range evs.Items {
			seen[e.Type] = true
		}
		if !seen["door_opened"] || !seen["door_closed"] {
			return fmt.Errorf("events %v", seen)
		}
		return nil
	})

	// 5b. An unlock to an offline locker is expired after its ttl and never runs.
	second := sim.Lockers()[1]
	sid := second.DeviceID()
	second.Disconnect()
	Eventually(t, 10*time.Second, "locker offline", func() error {
		var l fleet.Locker
		if err := tg.Admin.Get(ctx, "/v1/lockers/"+sid, nil, &l); err != nil {
			return err
		}
		if l.Online {
			return errors.New("still online")
		}
		return nil
	})
	var late fleet.Command
	if err := tg.Admin.Post(ctx, "/v1/lockers/"+sid+"/commands",
		map[string]any{"type": "unlock", "compartment": 1, "ttl_s": 1, "wait_s": 5}, &late); err != nil {
		t.Fatal(err)
	}
	if late.Status != fleet.CmdExpired || late.TimedOut || late.SentAt != nil {
		t.Fatalf("offline unlock status %q (timed out %v, sent %v), want expired, never sent", late.Status, late.TimedOut, late.SentAt)
	}
	rctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	if err := second.Reconnect(rctx); err != nil {
		t.Fatal(err)
	}
	// A command sent after the reconnect is answered, proving the locker is
	// listening; the expired one was never delivered.
	var after fleet.Command
	if err := tg.Admin.Post(ctx, "/v1/lockers/"+sid+"/commands",
		map[string]any{"type": "unlock", "compartment": 1, "wait_s": 10}, &after); err != nil || after.Status != fleet.CmdOK {
		t.Fatalf("unlock after reconnect: %+v, %v", after, err)
	}
	if got := second.CommandsRun(late.ID); got != 0 {
		t.Fatalf("expired unlock ran %d times on the locker", got)
	}

	// 6. Metrics. They follow the stored result: an API waiter woken by
	// PostgreSQL's NOTIFY can answer before the instance that took the
	// result has counted it.
	Eventually(t, 5*time.Second, "command metrics", func() error {
		for series, want := range map[string]float64{
			`lockergate_commands_total{status="ok",type="unlock"}`:      2,
			`lockergate_commands_total{status="expired",type="unlock"}`: 1,
			`lockergate_command_duration_seconds_count{type="unlock"}`:  2,
		} {
			if got, err := tg.Metric(series); err != nil || got != want {
				return fmt.Errorf("%s = %v (%v), want %v", series, got, err, want)
			}
		}
		return nil
	})
	if v, err := tg.Metric(`lockergate_mqtt_messages_received_total{channel="health"}`); err != nil || v < 50 {
		t.Errorf("health messages received = %v (%v)", v, err)
	}

	// The audit log has the provisioning and the unlocks.
	var audit struct {
		Items []fleet.AuditEntry `json:"items"`
	}
	if err := tg.Admin.Get(ctx, "/v1/audit", url.Values{"locker": {id}}, &audit); err != nil {
		t.Fatal(err)
	}
	actions := map[string]int{}
	for _, e := range audit.Items {
		actions[e.Action]++
	}
	if actions["provision"] != 1 || actions["unlock"] != 1 {
		t.Fatalf("audit of %s: %v", id, actions)
	}
}

// TestAPIBadInput checks that bad API requests get problem details.
func TestAPIBadInput(t *testing.T) {
	ctx := context.Background()
	tg := MustStart(t)
	claim := tg.MustSiteAndClaim(t, "s1", 1)
	sim := MustFleet(t, tg, claim, 1)
	id := sim.Lockers()[0].DeviceID()
	anon := client.New("http://"+tg.HTTPAddr(), "")
	bogus := client.New("http://"+tg.HTTPAddr(), "lgt_not-a-token")
	cases := []struct {
		name   string
		c      *client.Client
		req    client.Request
		status int
	}{
		{"NoToken", anon, client.Request{Method: "GET", Path: "/v1/lockers"}, 401},
		{"UnknownToken", bogus, client.Request{Method: "GET", Path: "/v1/lockers"}, 401},
		{"UnknownLocker", tg.Admin, client.Request{Method: "GET", Path: "/v1/lockers/lk-nope"}, 404},
		{"CommandUnknownLocker", tg.Admin, client.Request{Method: "POST", Path: "/v1/lockers/lk-nope/commands", Body: map[string]any{"type": "unlock", "compartment": 1}}, 404},
		{"NoSuchCompartment", tg.Admin, client.Request{Method: "POST", Path: "/v1/lockers/" + id + "/commands", Body: map[string]any{"type": "unlock", "compartment": 99}}, 422},
		{"UnlockWithoutCompartment", tg.Admin, client.Request{Method: "POST", Path: "/v1/lockers/" + id + "/commands", Body: map[string]any{"type": "unlock"}}, 400},
		{"UnknownCommandType", tg.Admin, client.Request{Method: "POST", Path: "/v1/lockers/" + id + "/commands", Body: map[string]any{"type": "self_destruct"}}, 400},
		{"WrongFieldType", tg.Admin, client.Request{Method: "POST", Path: "/v1/lockers/" + id + "/commands", Body: map[string]any{"type": "unlock", "compartment": "one"}}, 400},
		{"TTLTooLong", tg.Admin, client.Request{Method: "POST", Path: "/v1/lockers/" + id + "/commands", Body: map[string]any{"type": "unlock", "compartment": 1, "ttl_s": 100000}}, 400},
		{"BadLimit", tg.Admin, client.Request{Method: "GET", Path: "/v1/lockers", Query: url.Values{"limit": {"5000"}}}, 400},
		{"DuplicateSite", tg.Admin, client.Request{Method: "POST", Path: "/v1/sites", Body: map[string]any{"id": "s1"}}, 409},
		{"BadTimezone", tg.Admin, client.Request{Method: "POST", Path: "/v1/sites", Body: map[string]any{"id": "s2", "timezone": "Mars/Olympus"}}, 400},
		{"ClaimUnknownSite", tg.Admin, client.Request{Method: "POST", Path: "/v1/claims", Body: map[string]any{"site": "nope", "uses": 1}}, 404},
		{"ClaimNegativeLifetime", tg.Admin, client.Request{Method: "POST", Path: "/v1/claims", Body: map[string]any{"site": "s1", "uses": 1, "expires_in_s": -1}}, 400},
		{"ClaimLifetimeTooLong", tg.Admin, client.Request{Method: "POST", Path: "/v1/claims", Body: map[string]any{"site": "s1", "uses": 1, "expires_in_s": 31536001}}, 400},
		{"UnknownRoute", tg.Admin, client.Request{Method: "GET", Path: "/v1/nothing"}, 404},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			status, err := tc.c.Do(ctx, tc.req, nil)
			var pe *client.Error
			if !errors.As(err, &pe) {
				t.Fatalf("got %v, want a problem detail", err)
			}
			if status != tc.status || pe.Status != tc.status || pe.Title == "" {
				t.Fatalf("got %d %+v, want %d", status, pe, tc.status)
			}
		})
	}
	t.Run("MalformedJSON", func(t *testing.T) {
		_, err := tg.Admin.Do(ctx, client.Request{Method: "POST", Path: "/v1/sites", Body: []byte(`{"id":`)}, nil)
		var pe *client.Error
		if !errors.As(err, &pe) || pe.Status != 400 {
			t.Fatalf("got %v, want 400", err)
		}
	})
	t.Run("IdempotentReplayRepeatsSecrets", func(t *testing.T) {
		// A replay repeats the whole first answer, a webhook's secret
		// included, for fleet.ReplaySecretsFor (a client that lost the
		// answer to a timeout gets it); the secret is stored sealed, never
		// in clear, and later replays leave it out. A token (API or claim)
		// is shown once (api-v1): never in a replay.
		inClear := func(secret any) int {
			return tg.Count(t, `SELECT count(*) FROM idempotency WHERE position($1 in convert_from(response, 'UTF8')) > 0
				OR position(convert_to($1, 'UTF8') in coalesce(sealed, '')) > 0`, secret)
		}
		age := func(key string) {
			t.Helper()
			if _, err := tg.DB().Pool().Exec(ctx, `UPDATE idempotency SET created_at = created_at - make_interval(secs => $1) WHERE key = $2`,
				fleet.ReplaySecretsFor.Seconds(), key); err != nil {
				t.Fatal(err)
			}
		}
		for _, tc := range []struct {
			key, path, secret string
			body              map[string]any
			shownOnce         bool
		}{
			{"tok-1", "/v1/tokens", "token", map[string]any{"role": "operator", "name": "ops"}, true},
			// A webhook's "token" is the owner's token id, not a secret:
			// every replay keeps it.
			{"wh-1", "/v1/webhooks", "secret", map[string]any{"url": "http://127.0.0.1:9/hook", "events": []string{"pickup.ready"}}, false},
			{"cl-1", "/v1/claims", "token", map[string]any{"site": "s1", "uses": 1}, true},
		} {
			req := client.Request{Method: "POST", Path: tc.path, Body: tc.body, Header: map[string][]string{"Idempotency-Key": {tc.key}}}
			var first, again, late map[string]any
			if _, err := tg.Admin.Do(ctx, req, &first); err != nil {
				t.Fatalf("%s: %v", tc.path, err)
			}
			if _, err := tg.Admin.Do(ctx, req, &again); err != nil {
				t.Fatal(err)
			}
			if inClear(first[tc.secret]) != 0 {
				t.Fatalf("%s: the %s is stored in clear for idempotent replays", tc.path, tc.secret)
			}
			secret := first[tc.secret]
			if tc.shownOnce {
				delete(first, tc.secret)
			}
			if secret == nil || !reflect.DeepEqual(first, again) {
				t.Fatalf("%s: first %v, replay %v: the replay must repeat the whole answer (a token shown once left out)", tc.path, first, again)
			}
			age(tc.key)
			if _, err := tg.Admin.Do(ctx, req, &late); err != nil {
				t.Fatal(err)
			}
			delete(first, tc.secret)
			if !reflect.DeepEqual(first, late) {
				t.Fatalf("%s: replay after %v: %v, want the first answer without its %s %v", tc.path, fleet.ReplaySecretsFor, late, tc.secret, first)
			}
		}
	})
	t.Run("IdempotencyKey", func(t *testing.T) {
		req := client.Request{Method: "POST", Path: "/v1/lockers/" + id + "/commands",
			Body: map[string]any{"type": "unlock", "compartment": 1, "wait_s": 5}, Header: map[string][]string{"Idempotency-Key": {"k1"}}}
		var a, b fleet.Command
		if _, err := tg.Admin.Do(ctx, req, &a); err != nil {
			t.Fatal(err)
		}
		if _, err := tg.Admin.Do(ctx, req, &b); err != nil {
			t.Fatal(err)
		}
		if a.ID != b.ID {
			t.Fatalf("repeat created a second command: %s and %s", a.ID, b.ID)
		}
		// The same JSON written another way (key order, spaces, an escape)
		// is the same body.
		req.Body = []byte(` { "wait_s" : 5, "compartment" : 1, "type" : "unl\u006fck" } `)
		var c fleet.Command
		if _, err := tg.Admin.Do(ctx, req, &c); err != nil || c.ID != a.ID {
			t.Fatalf("repeat written another way: %v, command %q, want the first answer %q", err, c.ID, a.ID)
		}
		req.Body = map[string]any{"type": "unlock", "compartment": 2}
		if _, err := tg.Admin.Do(ctx, req, nil); err == nil {
			t.Fatal("same key with another body was accepted")
		}
		n := tg.Count(t, `SELECT count(*) FROM commands`)
		if n != 1 {
			t.Fatalf("%d commands stored, want 1", n)
		}
	})
	t.Run("IdempotencyKeyConcurrent", func(t *testing.T) {
		// Eight first requests with one key at once: exactly one runs; the
		// others are told it is in progress (409) or get its answer replayed.
		req := client.Request{Method: "POST", Path: "/v1/lockers/" + id + "/commands",
			Body: map[string]any{"type": "unlock", "compartment": 2, "wait_s": 5}, Header: map[string][]string{"Idempotency-Key": {"k-race"}}}
		before := tg.Count(t, `SELECT count(*) FROM commands`)
		type answer struct {
			status int
			id     string
		}
		answers := make(chan answer, 8)
		var wg sync.WaitGroup
		for range 8 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				var c fleet.Command
				status, _ := tg.Admin.Do(ctx, req, &c)
				answers <- answer{status, c.ID}
			}()
		}
		wg.Wait()
		close(answers)
		ids := map[string]bool{}
		for a := range answers {
			switch a.status {
			case http.StatusCreated:
				ids[a.id] = true
			case http.StatusConflict:
			default:
				t.Errorf("status %d, want 201 or 409", a.status)
			}
		}
		after := tg.Count(t, `SELECT count(*) FROM commands`)
		if after-before != 1 || len(ids) != 1 {
			t.Fatalf("%d commands created, %d distinct ids answered; want 1 and 1", after-before, len(ids))
		}
	})
}
