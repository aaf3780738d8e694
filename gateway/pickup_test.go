package gateway_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/lockergate/lockergate/client"
	"github.com/lockergate/lockergate/devicesim"
	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/gateway"
	"github.com/lockergate/lockergate/pickup"
	"github.com/lockergate/lockergate/protocol"
	"github.com/lockergate/lockergate/webhook"
)

// receiver is a delivery platform's webhook endpoint that fails its first
// failFirst requests and verifies every signature.
type receiver struct {
	t         testing.TB
	secret    string
	failFirst int

	mu     sync.Mutex
	calls  int
	events []map[string]any
	ids    map[string]bool
	bad    []string
}

func newReceiver(t testing.TB, failFirst int) (*receiver, *httptest.Server) {
	r := &receiver{t: t, failFirst: failFirst, ids: map[string]bool{}}
	srv := httptest.NewServer(r)
	t.Cleanup(srv.Close)
	return r, srv
}

func (rc *receiver) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	rc.mu.Lock()
	defer rc.mu.Unlock()
	rc.calls++
	if rc.calls <= rc.failFirst {
		w.WriteHeader(http.StatusServiceUnavailable)
		return
	}
	if err := webhook.Verify(rc.secret, r.Header.Get("Lockergate-Signature"), body, time.Now(), 5*time.Minute); err != nil {
		rc.bad = append(rc.bad, err.Error())
		w.WriteHeader(http.StatusUnauthorized)
		return
	}
	var ev map[string]any
	json.Unmarshal(body, &ev)
	if id, _ := ev["id"].(string); !rc.ids[id] { // receivers dedupe by id
		rc.ids[id] = true
		rc.events = append(rc.events, ev)
	}
	w.WriteHeader(http.StatusNoContent)
}

// types returns the event types received so far, in order.
func (rc *receiver) types() []string {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	var out []string
	for _, e := range rc.events {
		out = append(out, e["type"].(string))
	}
	return out
}

func (rc *receiver) event(typ string) map[string]any {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	for _, e := range rc.events {
		if e["type"] == typ {
			return e
		}
	}
	return nil
}

// MustToken creates an API token through the admin API.
func MustPickupToken(tb testing.TB, tg *TestGateway, role, site, name string) *client.Client {
	tb.Helper()
	var out struct {
		Token string `json:"token"`
	}
	if err := tg.Admin.Post(context.Background(), "/v1/tokens", map[string]string{"role": role, "site": site, "name": name}, &out); err != nil {
		tb.Fatalf("create %s token: %v", role, err)
	}
	return client.New("http://"+tg.HTTPAddr(), out.Token)
}

// pickupEnv is a gateway with one site, simulated lockers, a store token and
// a platform ("speedy") whose webhook receiver fails its first attempts.
type pickupEnv struct {
	tg       *TestGateway
	sim      *devicesim.Fleet
	store    *client.Client
	platform *client.Client
	rc       *receiver
}

func newPickupEnv(t *testing.T, lockers int, failFirst int, mod ...func(*devicesim.Options)) *pickupEnv {
	t.Helper()
	return newPickupEnvWith(t, nil, lockers, failFirst, mod...)
}

// newPickupEnvWith is newPickupEnv with gw applied to the gateway's options.
func newPickupEnvWith(t *testing.T, gw func(*gateway.Options), lockers int, failFirst int, mod ...func(*devicesim.Options)) *pickupEnv {
	t.Helper()
	ctx := context.Background()
	tg := MustStart(t, func(o *gateway.Options) {
		o.WebhookBackoff = 20 * time.Millisecond
		if gw != nil {
			gw(o)
		}
	})
	claim := tg.MustSiteAndClaim(t, "store-042", lockers)
	sim := MustFleet(t, tg, claim, lockers, mod...)
	tg.WaitOnline(t, lockers)
	e := &pickupEnv{tg: tg, sim: sim,
		store:    MustPickupToken(t, tg, "store", "store-042", "front-desk"),
		platform: MustPickupToken(t, tg, "platform", "", "speedy")}
	rc, srv := newReceiver(t, failFirst)
	var wh struct {
		ID     string `json:"id"`
		Secret string `json:"secret"`
	}
	if err := e.platform.Post(ctx, "/v1/webhooks", map[string]any{"url": srv.URL, "events": pickup.EventTypes}, &wh); err != nil {
		t.Fatal(err)
	}
	rc.secret = wh.Secret
	e.rc = rc
	return e
}

func (e *pickupEnv) create(t *testing.T, ref, size string, expires time.Duration) pickup.Pickup {
	t.Helper()
	var p pickup.Pickup
	err := e.store.Post(context.Background(), "/v1/pickups", map[string]any{
		"site": "store-042", "order_ref": ref, "size": size, "zone": "ambient",
		"recipient": map[string]string{"kind": "driver", "platform": "speedy"}, "expires_at": time.Now().Add(expires)}, &p)
	if err != nil {
		t.Fatalf("create pickup %s: %v", ref, err)
	}
	return p
}

func (e *pickupEnv) waitState(t *testing.T, id, state string) pickup.Pickup {
	t.Helper()
	var p pickup.Pickup
	Eventually(t, 15*time.Second, "pickup "+id+" "+state, func() error {
		p = pickup.Pickup{}
		if err := e.platform.Get(context.Background(), "/v1/pickups/"+id, nil, &p); err != nil {
			return err
		}
		if p.State != state {
			return fmt.Errorf("state %s", p.State)
		}
		return nil
	})
	return p
}

// stage plays the staff with doors that close only by hand: it waits for
// pickup p's compartment to be unlocked, puts the order in, closes the door,
// and returns the pickup's code once the locker holds it.
func (e *pickupEnv) stage(t *testing.T, l *devicesim.Locker, p pickup.Pickup) string {
	t.Helper()
	Eventually(t, 10*time.Second, "door open for staging", func() error {
		if !l.Compartment(p.Compartment).Open {
			return errors.New("closed")
		}
		return nil
	})
	l.SetOccupied(p.Compartment, true)
	l.CloseDoor(p.Compartment)
	code := e.waitState(t, p.ID, pickup.Ready).Credential.Code
	e.waitCreds(t, p.Locker)
	return code
}

// freshCode waits for ready pickup p to get a code other than old, and
// for its platform to be told it (pickup.credential_changed: its driver
// holds the spent one), and for its locker to hold it; it returns it.
func (e *pickupEnv) freshCode(t *testing.T, p pickup.Pickup, old string) string {
	t.Helper()
	var code string
	Eventually(t, 10*time.Second, "a fresh code", func() error {
		got := e.waitState(t, p.ID, pickup.Ready)
		if got.Credential == nil || got.Credential.Code == old {
			return errors.New("no new code yet")
		}
		code = got.Credential.Code
		return nil
	})
	Eventually(t, 10*time.Second, "pickup.credential_changed with the fresh code", func() error {
		e.rc.mu.Lock()
		defer e.rc.mu.Unlock()
		for _, ev := range e.rc.events {
			data, _ := ev["data"].(map[string]any)
			cred, _ := data["credential"].(map[string]any)
			if ev["type"] == pickup.EventCredentialChanged && data["pickup"] == p.ID && cred["code"] == code {
				return nil
			}
		}
		return errors.New("not received")
	})
	e.waitCreds(t, p.Locker)
	return code
}

// collectWith has a driver open pickup p's compartment at locker l with
// code, take the order and close the door, and waits for it to be picked
// up.
func (e *pickupEnv) collectWith(t *testing.T, l *devicesim.Locker, p pickup.Pickup, code string) {
	t.Helper()
	if r := l.EnterCode(code); !r.Accepted || !slices.Equal(r.Compartments, []int{p.Compartment}) {
		t.Fatalf("code %s: %+v, want compartment %d opened", code, r, p.Compartment)
	}
	l.SetOccupied(p.Compartment, false)
	l.CloseDoor(p.Compartment)
	e.waitState(t, p.ID, pickup.PickedUp)
}

// waitCreds waits until the locker applied the current credential set.
func (e *pickupEnv) waitCreds(t *testing.T, lockerID string) {
	t.Helper()
	Eventually(t, 10*time.Second, "locker has the current credential set", func() error {
		var l fleet.Locker
		if err := e.tg.Admin.Get(context.Background(), "/v1/lockers/"+lockerID, nil, &l); err != nil {
			return err
		}
		if !l.CredsCurrent || l.CredsVersion == 0 {
			return fmt.Errorf("version %d, acked %d", l.CredsVersion, l.CredsAcked)
		}
		return nil
	})
}

// TestPickupForAnUnknownPlatform: a pickup made for a platform no live
// platform token has the name of (a typo, or a token revoked) is made, and
// its answer says so (recipient_platform_unknown), so the store can cancel
// it before its order is stranded; one for a known platform says nothing.
func TestPickupForAnUnknownPlatform(t *testing.T) {
	ctx := context.Background()
	e := newPickupEnv(t, 1, 0)
	id, _ := e.tg.MustToken(t, "platform", "", "zoom")
	if _, err := e.tg.Admin.Do(ctx, client.Request{Method: "DELETE", Path: "/v1/tokens/" + id}, nil); err != nil {
		t.Fatal(err)
	}
	for i, c := range []struct {
		platform string
		unknown  bool
	}{{"speedy", false}, {"Speedy", true}, {"zoom", true}, {"nobody", true}} {
		var got map[string]any
		if err := e.store.Post(ctx, "/v1/pickups", map[string]any{"site": "store-042", "order_ref": fmt.Sprintf("PLAT-%d", i),
			"recipient": map[string]string{"platform": c.platform}}, &got); err != nil {
			t.Fatalf("%s: %v", c.platform, err)
		}
		if unknown, _ := got["recipient_platform_unknown"].(bool); unknown != c.unknown {
			t.Errorf("pickup for %s: recipient_platform_unknown %v, want %v", c.platform, got["recipient_platform_unknown"], c.unknown)
		}
		var cancelled pickup.Pickup
		if err := e.store.Post(ctx, "/v1/pickups/"+got["id"].(string)+"/cancel", nil, &cancelled); err != nil {
			t.Fatal(err)
		}
	}
}

// TestPickupAnswerAsStored: a create's answer says what a read right after
// it says, for a time given finer than PostgreSQL keeps too.
func TestPickupAnswerAsStored(t *testing.T) {
	e := newPickupEnv(t, 1, 3)
	expires := time.Now().UTC().Add(time.Hour).Truncate(time.Second).Add(123456789)
	var created, read map[string]any
	if err := e.store.Post(context.Background(), "/v1/pickups", map[string]any{
		"site": "store-042", "order_ref": "NS-1", "recipient": map[string]string{"platform": "speedy"},
		"expires_at": expires.Format(time.RFC3339Nano)}, &created); err != nil {
		t.Fatal(err)
	}
	if err := e.store.Get(context.Background(), "/v1/pickups/"+created["id"].(string), nil, &read); err != nil {
		t.Fatal(err)
	}
	want := expires.Truncate(time.Microsecond).Format(time.RFC3339Nano)
	for k, v := range read {
		if w, ok := created[k]; ok && k != "credential" && fmt.Sprint(w) != fmt.Sprint(v) {
			t.Errorf("%s: %v in the answer, %v when read", k, w, v)
		}
	}
	if created["expires_at"] != want {
		t.Errorf("expires_at %v, want %s", created["expires_at"], want)
	}
}

// TestPickupFlow walks one order from staging to picked up, with the
// platform's webhook receiver failing its first attempts.
func TestPickupFlow(t *testing.T) {
	e := newPickupEnv(t, 2, 3)
	p := e.create(t, "A-1001", "M", time.Hour)
	if p.State != pickup.Staging || p.Locker == "" || p.Compartment == 0 {
		t.Fatalf("created %+v", p)
	}
	l := e.sim.Locker(p.Locker)
	if sz := l.Model().Compartments[p.Compartment-1]; protocol.SizeRank(sz.Size) < protocol.SizeRank("M") || sz.Zone != "ambient" {
		t.Fatalf("allocated compartment %+v for size M ambient", sz)
	}
	// Staff load it (the simulator closes a staged compartment occupied).
	ready := e.waitState(t, p.ID, pickup.Ready)
	if ready.Credential == nil || len(ready.Credential.Code) != 8 || len(ready.Credential.QR) < 40 {
		t.Fatalf("platform sees credential %+v", ready.Credential)
	}
	e.waitCreds(t, p.Locker)
	// The locker names the pickup in its compartment, and null in the
	// others (the key is always there).
	var lk struct {
		Compartments []map[string]any `json:"compartments"`
	}
	if err := e.tg.Admin.Get(context.Background(), "/v1/lockers/"+p.Locker, nil, &lk); err != nil {
		t.Fatal(err)
	}
	for _, c := range lk.Compartments {
		want := any(nil)
		if c["n"] == float64(p.Compartment) {
			want = p.ID
		}
		if got, ok := c["pickup"]; !ok || got != want {
			t.Fatalf("compartment %v: pickup %v (present %v), want %v", c["n"], got, ok, want)
		}
	}

	// A wrong code is rejected; the right one opens the compartment.
	if r := l.EnterCode("00000000"); r.Accepted || r.Reason != protocol.RejectUnknown {
		t.Fatalf("wrong code: %+v", r)
	}
	if r := l.EnterCode(ready.Credential.Code); !r.Accepted || len(r.Compartments) != 1 || r.Compartments[0] != p.Compartment {
		t.Fatalf("right code: %+v", r)
	}
	done := e.waitState(t, p.ID, pickup.PickedUp)
	if done.Credential != nil {
		t.Fatal("a picked-up pickup still shows a credential")
	}
	var states []string
	for _, tr := range done.Transitions {
		states = append(states, tr.To)
		if tr.Actor == "" || tr.TS.IsZero() {
			t.Fatalf("transition without actor or time: %+v", tr)
		}
	}
	if fmt.Sprint(states) != "[staging ready picked_up]" {
		t.Fatalf("transitions %v", states)
	}
	// The code is single use.
	e.waitCreds(t, p.Locker)
	if r := l.EnterCode(ready.Credential.Code); r.Accepted {
		t.Fatalf("a used code opened again: %+v", r)
	}

	// Webhooks: delivered after the receiver's failures, in order, signed,
	// the ready event carrying the code.
	Eventually(t, 20*time.Second, "webhooks delivered", func() error {
		if got := fmt.Sprint(e.rc.types()); got != "[pickup.ready pickup.picked_up]" {
			return fmt.Errorf("received %s", got)
		}
		return nil
	})
	data := e.rc.event(pickup.EventReady)["data"].(map[string]any)
	cred, _ := data["credential"].(map[string]any)
	if cred == nil || cred["code"] != ready.Credential.Code || data["compartment"] != float64(p.Compartment) || data["locker"] != p.Locker {
		t.Fatalf("pickup.ready data %v", data)
	}
	// An event's time is its transition's, as the API shows it.
	if got, want := e.rc.event(pickup.EventPickedUp)["created_at"], done.Transitions[2].TS.UTC().Format(time.RFC3339Nano); got != want {
		t.Fatalf("pickup.picked_up created_at %v, the transition's ts %v", got, want)
	}
	if len(e.rc.bad) > 0 {
		t.Fatalf("bad signatures: %v", e.rc.bad)
	}
	var whs struct {
		Items []webhook.Webhook `json:"items"`
	}
	e.platform.Get(context.Background(), "/v1/webhooks", nil, &whs)
	var ds struct {
		Items []webhook.Delivery `json:"items"`
	}
	if err := e.platform.Get(context.Background(), "/v1/webhooks/"+whs.Items[0].ID+"/deliveries", nil, &ds); err != nil {
		t.Fatal(err)
	}
	if len(ds.Items) != 2 || ds.Items[0].Attempts != 4 || len(ds.Items[0].Log) != 4 || ds.Items[0].State != "delivered" {
		t.Fatalf("deliveries %+v", ds.Items)
	}
	// No code is stored anywhere in the database.
	var leaks int
	e.tg.DB().Pool().QueryRow(context.Background(), `SELECT count(*) FROM webhook_deliveries WHERE body::text LIKE '%' || $1 || '%'`, ready.Credential.Code).Scan(&leaks)
	if leaks != 0 {
		t.Fatal("the pickup code is stored in the webhook outbox")
	}
	for series, want := range map[string]float64{
		`lockergate_pickups_total{state="picked_up"}`:                 1,
		`lockergate_credential_rejections_total{reason="unknown"}`:    2, // the wrong code, then the used one (dropped from the set)
		`lockergate_pickup_wait_duration_seconds_count`:               1,
		`lockergate_webhook_deliveries_total{outcome="delivered"}`:    2,
		`lockergate_credential_rejections_total{reason="locked_out"}`: 0,
	} {
		Eventually(t, 5*time.Second, series, func() error {
			got, err := e.tg.Metric(series)
			if err == nil && got != want {
				err = fmt.Errorf("got %v, want %v", got, want)
			}
			return err
		})
	}
}

// TestPickupMultiOrder: a driver collects three orders with one code, at a
// locker that reports the code's use in the protocol's order, and at ones
// that report the doors' openings first or only those.
func TestPickupMultiOrder(t *testing.T) {
	for _, c := range []struct {
		name   string
		report devicesim.CodeReport
	}{{"code_accepted first", devicesim.CodeAcceptedFirst}, {"door_opened first", devicesim.DoorOpenedFirst},
		{"door_opened only", devicesim.DoorOpenedOnly}} {
		t.Run(c.name, func(t *testing.T) { pickupMultiOrder(t, c.report) })
	}
}

func pickupMultiOrder(t *testing.T, report devicesim.CodeReport) {
	ctx := context.Background()
	e := newPickupEnv(t, 1, 0, func(o *devicesim.Options) { o.CodeReport = report })
	var ids []string
	var comps = map[int]bool{}
	for i := 0; i < 3; i++ {
		p := e.create(t, fmt.Sprintf("M-%d", i), "S", time.Hour)
		ids = append(ids, p.ID)
		comps[p.Compartment] = true
	}
	var singles []string
	for _, id := range ids {
		singles = append(singles, e.waitState(t, id, pickup.Ready).Credential.Code)
	}
	var cred, replay pickup.CredentialView
	req := client.Request{Method: "POST", Path: "/v1/credentials", Body: map[string]any{"pickups": ids, "kind": "pin"},
		Header: map[string][]string{"Idempotency-Key": {"combine-1"}}}
	if _, err := e.platform.Do(ctx, req, &cred); err != nil {
		t.Fatal(err)
	}
	if len(cred.Code) != 8 || cred.QR != "" || len(cred.Compartments) != 3 {
		t.Fatalf("combined credential %+v", cred)
	}
	// An Idempotency-Key replay within a day repeats the first answer, its
	// code included (kept sealed, not in clear: below).
	if status, err := e.platform.Do(ctx, req, &replay); err != nil || status != http.StatusCreated || replay.ID != cred.ID || replay.Code != cred.Code {
		t.Fatalf("replay: %d %+v (%v), want 201, the same credential and code", status, replay, err)
	}
	if e.tg.Count(t, `SELECT count(*) FROM idempotency WHERE position($1 in convert_from(response, 'UTF8')) > 0
		OR position(convert_to($1, 'UTF8') in coalesce(sealed, '')) > 0`, cred.Code) != 0 {
		t.Fatal("a pickup code is stored in clear for idempotent replays")
	}
	e.waitCreds(t, e.sim.Lockers()[0].DeviceID())
	l := e.sim.Lockers()[0]
	if r := l.EnterCode(singles[0]); r.Accepted {
		t.Fatal("a retired single code still opens")
	}
	r := l.EnterCode(cred.Code)
	if !r.Accepted || len(r.Compartments) != 3 {
		t.Fatalf("combined code: %+v", r)
	}
	for _, n := range r.Compartments {
		if !comps[n] {
			t.Fatalf("opened compartment %d that holds none of the orders", n)
		}
	}
	for _, id := range ids {
		e.waitState(t, id, pickup.PickedUp)
	}
	// Its report (code_accepted after the openings, too) is one use of the
	// code, which was live.
	if n := e.tg.Count(t, `SELECT count(*) FROM audit WHERE action = 'credential.use' AND detail->>'credential' = $1`, cred.ID); n != 1 {
		t.Fatalf("%d credential.use audit entries, want 1", n)
	}
	if n := e.tg.Count(t, `SELECT count(*) FROM alerts WHERE device_id = $1 AND kind = $2`, l.DeviceID(), pickup.AlertCodeNotLive); n != 0 {
		t.Fatalf("%d code_not_live alerts, want none", n)
	}
}

// readyThenOffline makes a pickup ready, waits for its locker to hold the
// code, and takes the locker offline; it returns the pickup, its code and
// the locker.
func (e *pickupEnv) readyThenOffline(t *testing.T, ref string) (pickup.Pickup, string, *devicesim.Locker) {
	t.Helper()
	p := e.create(t, ref, "S", time.Hour)
	code := e.waitState(t, p.ID, pickup.Ready).Credential.Code
	e.waitCreds(t, p.Locker)
	l := e.sim.Locker(p.Locker)
	l.Disconnect()
	return p, code, l
}

// twoReadyThenRaw makes two pickups ready at the one locker (an S and an M
// compartment), waits for it to hold their codes, and puts a raw MQTT
// client in its place, with its identity: the test sends the locker's
// events itself. It returns the pickups, the client and the events topic.
func (e *pickupEnv) twoReadyThenRaw(t *testing.T, ref1, ref2 string) (pickup.Pickup, pickup.Pickup, paho.Client, string) {
	t.Helper()
	a, b := e.create(t, ref1, "S", time.Hour), e.create(t, ref2, "M", time.Hour)
	a, b = e.waitState(t, a.ID, pickup.Ready), e.waitState(t, b.ID, pickup.Ready)
	e.waitCreds(t, a.Locker)
	l := e.sim.Locker(a.Locker)
	id, _ := l.Identity()
	l.Disconnect()
	dev := MustConnect(t, e.tg.MQTTAddr(), id.DeviceID, id.DeviceID, id.Password)
	return a, b, dev, protocol.Topic(id.DeviceID, protocol.ChanEvents)
}

// rawApplied has raw locker client dev acknowledge its current credential
// set, and waits for the gateway to record it.
func (e *pickupEnv) rawApplied(t *testing.T, dev paho.Client, lockerID string) {
	t.Helper()
	v := e.tg.Count(t, `SELECT creds_version FROM devices WHERE id = $1`, lockerID)
	MustPublish(t, dev, protocol.Topic(lockerID, protocol.ChanCredsAck), false, fmt.Sprintf(`{"version":%d}`, v))
	e.waitCreds(t, lockerID)
}

// TestPickupOffline: the driver collects while the locker is offline; the
// pickup is reconciled when its events arrive.
func TestPickupOffline(t *testing.T) {
	e := newPickupEnv(t, 1, 0)
	p, code, l := e.readyThenOffline(t, "OFF-1")
	if r := l.EnterCode(code); !r.Accepted {
		t.Fatalf("offline code: %+v", r)
	}
	if got := e.waitState(t, p.ID, pickup.Ready); got.State != pickup.Ready {
		t.Fatal("unreachable")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := l.Reconnect(ctx); err != nil {
		t.Fatal(err)
	}
	e.waitState(t, p.ID, pickup.PickedUp)
}

// TestPINAndQROneUseOffline: a pickup's PIN and QR token are two forms of
// one single-use credential. Offline, the locker itself must refuse the QR
// once the PIN opened the compartment (the set's group extension), and the
// gateway, told later, raises no alert.
func TestPINAndQROneUseOffline(t *testing.T) {
	ctx := context.Background()
	e := newPickupEnv(t, 1, 0)
	p := e.create(t, "OFF-3", "S", time.Hour)
	cred := e.waitState(t, p.ID, pickup.Ready).Credential
	if cred == nil || cred.Code == "" || cred.QR == "" {
		t.Fatalf("credential %+v: want a PIN and a QR token", cred)
	}
	e.waitCreds(t, p.Locker)
	l := e.sim.Locker(p.Locker)
	l.Disconnect()
	if r := l.EnterCode(cred.Code); !r.Accepted {
		t.Fatalf("offline PIN: %+v", r)
	}
	if r := l.EnterCode(cred.QR); r.Accepted || r.Reason != protocol.RejectUsed {
		t.Fatalf("offline QR after its PIN: %+v, want rejected as used", r)
	}
	rctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	if err := l.Reconnect(rctx); err != nil {
		t.Fatal(err)
	}
	e.waitState(t, p.ID, pickup.PickedUp)
	if n := e.tg.Count(t, `SELECT count(*) FROM alerts WHERE kind = 'code_not_live' AND device_id = $1`, p.Locker); n != 0 {
		t.Fatalf("%d code_not_live alerts, want none", n)
	}
}

// TestCodeUseAppliedAfterItsClosing: a locker's events can be applied out
// of their order (through an external broker they are shared among the
// gateway instances, and those held for an instance that was down arrive
// late). A driver's code use that arrives after the door's closings it came
// before still ends the pickup as the events in order do. The driver's
// closing (the first after the code) decides: closed empty, picked up, and
// the pickup_removed alerts raised by that closing and by a staff check after
// it are withdrawn; closed with the order inside, not taken with a fresh
// code, and a staff closing empty after that keeps its pickup_removed.
func TestCodeUseAppliedAfterItsClosing(t *testing.T) {
	ctx := context.Background()
	e := newPickupEnv(t, 1, 0)
	taken, left, dev, topic := e.twoReadyThenRaw(t, "ORD-1", "ORD-2")
	used := time.Now().UTC()
	for _, p := range []struct {
		pickup.Pickup
		driverLeftIt bool
	}{{taken, false}, {left, true}} {
		// The closings first (the driver's, then a staff check closing
		// it empty), then the code use that came before them.
		MustPublish(t, dev, topic, false, fmt.Sprintf(`{"id":"e-%s-close","ts":"%s","type":"door_closed","compartment":%d,"occupied":%t}`,
			p.ID, protocol.FormatTime(used.Add(3*time.Second)), p.Compartment, p.driverLeftIt))
		MustPublish(t, dev, topic, false, fmt.Sprintf(`{"id":"e-%s-check","ts":"%s","type":"door_closed","compartment":%d,"occupied":false}`,
			p.ID, protocol.FormatTime(used.Add(5*time.Second)), p.Compartment))
		MustPublish(t, dev, topic, false, fmt.Sprintf(`{"id":"e-%s-code","ts":"%s","type":"code_accepted","credential":"%s","compartments":[%d]}`,
			p.ID, protocol.FormatTime(used), p.Credential.ID+".p", p.Compartment))
	}
	e.waitState(t, taken.ID, pickup.PickedUp)
	removed := func(p pickup.Pickup, clearedBy string) int {
		return e.tg.Count(t, `SELECT count(*) FROM alerts WHERE kind = 'pickup_removed' AND device_id = $1 AND compartment = $2
			AND coalesce(cleared_by, '') = $3`, p.Locker, p.Compartment, clearedBy)
	}
	// Both closings, judged without the code at first, alerted staff that
	// the order went without it; both alerts are withdrawn.
	Eventually(t, 10*time.Second, "the pickup_removed alerts withdrawn", func() error {
		if open, gone := removed(taken, ""), removed(taken, "gateway"); open != 0 || gone != 2 {
			return fmt.Errorf("%d open, %d withdrawn", open, gone)
		}
		return nil
	})
	Eventually(t, 10*time.Second, "the order left inside given a fresh code", func() error {
		var got pickup.Pickup
		if err := e.store.Get(ctx, "/v1/pickups/"+left.ID, nil, &got); err != nil {
			return err
		}
		if got.State != pickup.Ready || got.Credential == nil || got.Credential.ID == left.Credential.ID {
			return fmt.Errorf("state %s, credential %+v", got.State, got.Credential)
		}
		if n := e.tg.Count(t, `SELECT count(*) FROM alerts WHERE kind = 'pickup_not_taken' AND device_id = $1 AND compartment = $2`,
			left.Locker, left.Compartment); n != 1 {
			return fmt.Errorf("%d pickup_not_taken alerts", n)
		}
		return nil
	})
	// The staff check after the driver left the order: its alert stands.
	// (Checked once the left order's code use is applied, as is the audit:
	// a wrong withdrawal would come with it.)
	if open, gone := removed(left, ""), removed(left, "gateway"); open != 1 || gone != 0 {
		t.Fatalf("the order left inside: %d pickup_removed open, %d withdrawn; want 1, 0", open, gone)
	}
	if n := e.tg.Count(t, `SELECT count(*) FROM audit WHERE action = 'alert.clear' AND actor = 'gateway'`); n != 2 {
		t.Fatalf("%d alert.clear audit entries by the gateway, want 2", n)
	}
}

// TestPickupCollectedByDoorOpenings: a locker that reports a code's use
// with the door's opening (door_opened by the credential) instead of
// code_accepted, or before it, has its pickups picked up all the same: the
// opening spends the code, and a code_accepted after it reports the same
// use, not a code that was no longer live. Another code_accepted of the
// code is a second use, which staff are told of.
func TestPickupCollectedByDoorOpenings(t *testing.T) {
	e := newPickupEnv(t, 1, 0)
	doorOnly, doorFirst, dev, topic := e.twoReadyThenRaw(t, "ORD-1", "ORD-2")
	at := time.Now().UTC()
	send := func(id, typ string, p pickup.Pickup, fields string) {
		t.Helper()
		at = at.Add(time.Second)
		MustPublish(t, dev, topic, false, fmt.Sprintf(`{"id":"e-%s-%s","ts":"%s","type":"%s",%s}`,
			p.ID, id, protocol.FormatTime(at), typ, fields))
	}
	opened := func(p pickup.Pickup) {
		send("open", "door_opened", p, fmt.Sprintf(`"compartment":%d,"by":"credential","credential":"%s"`, p.Compartment, p.Credential.ID+".p"))
	}
	accepted := func(p pickup.Pickup, id string) {
		send(id, "code_accepted", p, fmt.Sprintf(`"credential":"%s","compartments":[%d]`, p.Credential.ID+".p", p.Compartment))
	}
	closedEmpty := func(p pickup.Pickup) {
		send("close", "door_closed", p, fmt.Sprintf(`"compartment":%d,"occupied":false`, p.Compartment))
	}
	opened(doorOnly)
	closedEmpty(doorOnly)
	e.waitState(t, doorOnly.ID, pickup.PickedUp)
	opened(doorFirst)
	accepted(doorFirst, "code")
	closedEmpty(doorFirst)
	e.waitState(t, doorFirst.ID, pickup.PickedUp)
	// The locker's events are applied in its order: its code_accepted
	// before the closing that ended the pickup.
	for _, p := range []pickup.Pickup{doorOnly, doorFirst} {
		if n := e.tg.Count(t, `SELECT count(*) FROM credentials WHERE id = $1 AND state = 'used' AND opened_ts IS NOT NULL`, p.Credential.ID); n != 1 {
			t.Fatalf("pickup %s: its credential is not spent by the door's opening", p.ID)
		}
		if n := e.tg.Count(t, `SELECT count(*) FROM audit WHERE action = 'credential.use' AND detail->>'credential' = $1 AND site = $2`,
			p.Credential.ID, p.Site); n != 1 {
			t.Fatalf("pickup %s: %d credential.use audit entries at site %s, want 1", p.ID, n, p.Site)
		}
	}
	if n := e.openAlerts(t, doorFirst, pickup.AlertCodeNotLive); n != 0 {
		t.Fatalf("%d code_not_live alerts for the code_accepted after the door's opening, want 0", n)
	}
	accepted(doorFirst, "again")
	Eventually(t, 10*time.Second, "a second use of the code alerted", func() error {
		if n := e.openAlerts(t, doorFirst, pickup.AlertCodeNotLive); n != 1 {
			return fmt.Errorf("%d code_not_live alerts", n)
		}
		return nil
	})
}

// TestCombinedCodeReportedAfterItsDoors: a locker that reports a combined
// code's use after its doors opened and closed (code_accepted last), with
// one of the two pickups expired at the gateway meanwhile: the first
// opening spends the code for the live one, and the code_accepted, dated
// later than the expiry by the locker's clock, judges the expired one as of
// the opening, before the expiry: collected in time, picked up.
func TestCombinedCodeReportedAfterItsDoors(t *testing.T) {
	ctx := context.Background()
	e := newPickupEnv(t, 1, 0)
	live, gone, dev, topic := e.twoReadyThenRaw(t, "DOOR-C1", "DOOR-C2")
	var cred pickup.CredentialView
	if err := e.platform.Post(ctx, "/v1/credentials", map[string]any{"pickups": []string{live.ID, gone.ID}, "kind": "pin"}, &cred); err != nil {
		t.Fatal(err)
	}
	expiry := time.Now().Add(2 * time.Second)
	e.expireOffline(t, gone, expiry)
	opened := expiry.Add(-time.Second)
	for i, ev := range []string{
		fmt.Sprintf(`"type":"door_opened","compartment":%d,"by":"credential","credential":"%s"`, live.Compartment, cred.ID+".p"),
		fmt.Sprintf(`"type":"door_opened","compartment":%d,"by":"credential","credential":"%s"`, gone.Compartment, cred.ID+".p"),
		fmt.Sprintf(`"type":"door_closed","compartment":%d,"occupied":false`, live.Compartment),
		fmt.Sprintf(`"type":"door_closed","compartment":%d,"occupied":false`, gone.Compartment),
		fmt.Sprintf(`"type":"code_accepted","credential":"%s","compartments":[%d,%d]`, cred.ID+".p", live.Compartment, gone.Compartment),
	} {
		MustPublish(t, dev, topic, false, fmt.Sprintf(`{"id":"e-door-c-%d","ts":"%s",%s}`, i,
			protocol.FormatTime(opened.Add(time.Duration(i)*time.Second)), ev))
	}
	e.bothCollected(t, live, gone)
}

// bothCollected waits for a combined code's live pickup and the one that
// expired before the locker reported its use to be picked up, and checks
// that the expired one's alert was withdrawn and no use alerted staff.
func (e *pickupEnv) bothCollected(t *testing.T, live, expired pickup.Pickup) {
	t.Helper()
	e.waitState(t, live.ID, pickup.PickedUp)
	e.waitState(t, expired.ID, pickup.PickedUp)
	if n := e.openAlerts(t, expired, fleet.AlertPickupExpired); n != 0 {
		t.Fatalf("%d pickup_expired alerts open, want none", n)
	}
	if n := e.tg.Count(t, `SELECT count(*) FROM alerts WHERE kind = 'code_not_live' AND device_id = $1`, live.Locker); n != 0 {
		t.Fatalf("%d code_not_live alerts, want none", n)
	}
}

// TestClosingFromBeforeThePickupLoadsNothing: a closing of the compartment
// with something inside that the locker dates well before the pickup was
// created (held back from the compartment's earlier use) does not make the
// staging pickup ready; the staff's closing after the staging unlock does.
func TestClosingFromBeforeThePickupLoadsNothing(t *testing.T) {
	ctx := context.Background()
	e := newPickupEnv(t, 1, 0, func(o *devicesim.Options) { o.DoorCloseDelay = -1 }) // staff never close it
	l := e.sim.Lockers()[0]
	p := e.create(t, "OLD-1", "S", time.Hour)
	Eventually(t, 10*time.Second, "door open for staging", func() error {
		if !l.Compartment(p.Compartment).Open {
			return errors.New("closed")
		}
		return nil
	})
	id, _ := l.Identity()
	l.Disconnect()
	dev := MustConnect(t, e.tg.MQTTAddr(), id.DeviceID, id.DeviceID, id.Password)
	topic := protocol.Topic(id.DeviceID, protocol.ChanEvents)
	closed := func(n string, ts time.Time, occupied bool) {
		MustPublish(t, dev, topic, false, fmt.Sprintf(`{"id":"e-old-%s","ts":"%s","type":"door_closed","compartment":%d,"occupied":%t}`,
			n, protocol.FormatTime(ts), p.Compartment, occupied))
	}
	closed("held-empty", p.CreatedAt.Add(-2*time.Hour), false)
	closed("held", p.CreatedAt.Add(-time.Hour), true)
	loaded := time.Now()
	closed("staff", time.Now(), true)
	ready := e.waitState(t, p.ID, pickup.Ready)
	if ready.ReadyAt == nil || ready.ReadyAt.Before(loaded) {
		t.Fatalf("ready at %v, before the staff's closing was sent (%v): the closing from before the pickup loaded it", ready.ReadyAt, loaded)
	}
	var got pickup.Pickup
	if err := e.store.Get(ctx, "/v1/pickups/"+p.ID, nil, &got); err != nil || len(got.Transitions) != 2 {
		t.Fatalf("transitions %+v (%v), want staging and ready", got.Transitions, err)
	}
	if n := e.openAlerts(t, p, fleet.AlertStagedEmpty); n != 0 {
		t.Fatalf("%d staged_empty alerts for an empty closing from before the pickup, want none", n)
	}
}

// TestCodeOfCancelledPickupUsedOffline: a pickup cancelled while its locker
// is offline still opens with its code there (the locker validates codes
// itself, from the set it holds). When the locker reports the use, staff
// are alerted: the order may have gone to someone it was no longer for.
func TestCodeOfCancelledPickupUsedOffline(t *testing.T) {
	ctx := context.Background()
	e := newPickupEnv(t, 1, 0)
	p, code, l := e.readyThenOffline(t, "OFF-2")
	var c pickup.Pickup
	if err := e.store.Post(ctx, "/v1/pickups/"+p.ID+"/cancel", nil, &c); err != nil || c.State != pickup.Cancelled {
		t.Fatalf("cancel: %+v %v", c, err)
	}
	if r := l.EnterCode(code); !r.Accepted {
		t.Fatalf("offline code, stale set: %+v", r)
	}
	rctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	if err := l.Reconnect(rctx); err != nil {
		t.Fatal(err)
	}
	var detail string
	Eventually(t, 10*time.Second, "a code_not_live alert", func() error {
		err := e.tg.DB().Pool().QueryRow(ctx, `SELECT detail FROM alerts WHERE kind = 'code_not_live' AND device_id = $1 AND compartment = $2`,
			p.Locker, p.Compartment).Scan(&detail)
		return err
	})
	if !strings.Contains(detail, "revoked") {
		t.Fatalf("alert detail %q, want the credential's state (revoked)", detail)
	}
	// Audited like every use of a code.
	if n := e.tg.Count(t, `SELECT count(*) FROM audit WHERE action = 'credential.use' AND locker = $1 AND detail->>'state' = 'revoked'`, p.Locker); n != 1 {
		t.Fatalf("%d credential.use audit entries for the revoked code, want 1", n)
	}
	if got := e.waitState(t, p.ID, pickup.Cancelled); got.State != pickup.Cancelled {
		t.Fatal("unreachable")
	}
}

// expireOffline has the gateway expire pickup p, whose locker is offline,
// with expires_at moved to at: the sweep ends it and alerts staff.
func (e *pickupEnv) expireOffline(t *testing.T, p pickup.Pickup, at time.Time) {
	t.Helper()
	if _, err := e.tg.DB().Pool().Exec(context.Background(), `UPDATE pickups SET expires_at = $2 WHERE id = $1`, p.ID, at); err != nil {
		t.Fatal(err)
	}
	e.waitState(t, p.ID, pickup.Expired)
	Eventually(t, 10*time.Second, "the pickup_expired alert", func() error {
		if n := e.openAlerts(t, p, fleet.AlertPickupExpired); n != 1 {
			return fmt.Errorf("%d open", n)
		}
		return nil
	})
}

// usedOfflineThenExpired makes a pickup ready (ref), has its driver collect
// it with the code while the locker is offline, has the gateway expire it
// with expires_at moved to expiresIn from the use (readyThenOffline,
// expireOffline), and brings the locker back with its report.
func (e *pickupEnv) usedOfflineThenExpired(t *testing.T, ref string, expiresIn time.Duration) pickup.Pickup {
	t.Helper()
	p, code, l := e.readyThenOffline(t, ref)
	if r := l.EnterCode(code); !r.Accepted {
		t.Fatalf("offline code: %+v", r)
	}
	e.expireOffline(t, p, time.Now().Add(expiresIn))
	reconnect(t, l)
	return p
}

// openAlerts counts the open alerts of kind on pickup p's compartment.
func (e *pickupEnv) openAlerts(t *testing.T, p pickup.Pickup, kind string) int {
	t.Helper()
	return e.tg.Count(t, `SELECT count(*) FROM alerts WHERE kind = $1 AND device_id = $2 AND compartment = $3 AND cleared_at IS NULL`,
		kind, p.Locker, p.Compartment)
}

// reconnect brings simulated locker l back online.
func reconnect(t *testing.T, l *devicesim.Locker) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := l.Reconnect(ctx); err != nil {
		t.Fatal(err)
	}
}

// closingsApplied is nil once pickup p's compartment has at least n door
// closings stored since the pickup was created and its locker has no event
// left to apply.
func (e *pickupEnv) closingsApplied(t *testing.T, p pickup.Pickup, n int) error {
	if got := e.tg.Count(t, `SELECT count(*) FROM events WHERE device_id = $1 AND type = 'door_closed' AND compartment = $2
		AND received_at > $3`, p.Locker, p.Compartment, p.CreatedAt.Add(time.Millisecond)); got < n {
		return fmt.Errorf("%d door closings stored, want %d", got, n)
	}
	if got := e.tg.Count(t, `SELECT count(*) FROM event_outbox WHERE device_id = $1`, p.Locker); got != 0 {
		return fmt.Errorf("%d events to apply", got)
	}
	return nil
}

// stillExpired checks that pickup p is expired with its pickup_expired
// alert open.
func (e *pickupEnv) stillExpired(t *testing.T, p pickup.Pickup) {
	t.Helper()
	e.waitState(t, p.ID, pickup.Expired) // fails the test unless it is
	if n := e.openAlerts(t, p, fleet.AlertPickupExpired); n != 1 {
		t.Fatalf("%d pickup_expired alerts open, want 1", n)
	}
}

// TestPickupCollectedOfflineBeforeExpiry: a driver collects with the code
// while the locker is offline, before expires_at, and the gateway, not yet
// told, expires the pickup and alerts staff. When the locker's events
// arrive the pickup is picked up after all: the pickup_expired alert is
// withdrawn, no code_not_live is raised, and the platform is told.
func TestPickupCollectedOfflineBeforeExpiry(t *testing.T) {
	e := newPickupEnv(t, 1, 0)
	p := e.usedOfflineThenExpired(t, "LATE-1", 3*time.Second) // after the use, by the locker's clock, with its offset's error
	e.waitState(t, p.ID, pickup.PickedUp)
	if n := e.tg.Count(t, `SELECT count(*) FROM alerts WHERE kind = 'pickup_expired' AND device_id = $1 AND cleared_by = 'gateway'`, p.Locker); n != 1 {
		t.Fatalf("%d pickup_expired alerts withdrawn by the gateway, want 1", n)
	}
	if n := e.openAlerts(t, p, fleet.AlertPickupExpired); n != 0 {
		t.Fatalf("%d pickup_expired alerts open, want none", n)
	}
	if n := e.tg.Count(t, `SELECT count(*) FROM alerts WHERE kind = 'code_not_live' AND device_id = $1`, p.Locker); n != 0 {
		t.Fatalf("%d code_not_live alerts, want none", n)
	}
	if n := e.tg.Count(t, `SELECT count(*) FROM pickup_transitions WHERE pickup_id = $1 AND from_state = 'expired'
		AND to_state = 'picked_up' AND actor = $2`, p.ID, "locker:"+p.Locker); n != 1 {
		t.Fatalf("%d expired → picked_up transitions by the locker, want 1", n)
	}
	if n := e.tg.Count(t, `SELECT count(*) FROM audit WHERE action = 'credential.use' AND locker = $1
		AND detail->>'before_expiry' = 'true' AND detail->'pickups' ? $2`, p.Locker, p.ID); n != 1 {
		t.Fatalf("%d credential.use audit entries before expiry, want 1", n)
	}
	if n := e.tg.Count(t, `SELECT count(*) FROM pickups WHERE id = $1 AND collected_at IS NOT NULL`, p.ID); n != 1 {
		t.Fatal("the use is not recorded on the pickup")
	}
	Eventually(t, 10*time.Second, "the picked_up webhook", func() error {
		if got := fmt.Sprint(e.rc.types()); got != "[pickup.ready pickup.expired pickup.picked_up]" {
			return fmt.Errorf("received %s", got)
		}
		return nil
	})
	// Counted after the transition's commit: the webhook can come first.
	for series, want := range map[string]float64{
		`lockergate_pickups_reported_late_total`:      1,
		`lockergate_pickups_total{state="expired"}`:   1,
		`lockergate_pickups_total{state="picked_up"}`: 1,
	} {
		e.tg.WaitMetric(t, 10*time.Second, series, want)
	}
}

// TestLateCodeUseAppliedAfterItsClosing: a locker's events can be applied
// out of their order (behind an external broker a reconnecting locker's
// burst is shared among the instances). A driver's closing applied before
// the code's use that came first, whether it found the pickup still ready
// (and raised pickup_removed) or expired already, is judged again by the
// use, made before the expiry: picked up, and the alerts withdrawn.
func TestLateCodeUseAppliedAfterItsClosing(t *testing.T) {
	e := newPickupEnv(t, 1, 0)
	ready, expired, dev, topic := e.twoReadyThenRaw(t, "LATE-4", "LATE-5")
	used := time.Now().UTC()
	closing := func(p pickup.Pickup) {
		MustPublish(t, dev, topic, false, fmt.Sprintf(`{"id":"e-%s-close","ts":"%s","type":"door_closed","compartment":%d,"occupied":false}`,
			p.ID, protocol.FormatTime(used.Add(3*time.Second)), p.Compartment))
	}
	closing(ready)
	Eventually(t, 10*time.Second, "pickup_removed for the closing without the code", func() error {
		if n := e.openAlerts(t, ready, pickup.AlertRemoved); n != 1 {
			return fmt.Errorf("%d open", n)
		}
		return nil
	})
	e.expireOffline(t, ready, used.Add(3*time.Second))
	e.expireOffline(t, expired, used.Add(3*time.Second))
	closing(expired)
	for _, p := range []pickup.Pickup{ready, expired} {
		MustPublish(t, dev, topic, false, fmt.Sprintf(`{"id":"e-%s-code","ts":"%s","type":"code_accepted","credential":"%s","compartments":[%d]}`,
			p.ID, protocol.FormatTime(used), p.Credential.ID+".p", p.Compartment))
	}
	for _, p := range []pickup.Pickup{ready, expired} {
		e.waitState(t, p.ID, pickup.PickedUp)
		if n := e.openAlerts(t, p, fleet.AlertPickupExpired); n != 0 {
			t.Fatalf("%s: %d pickup_expired alerts open, want none", p.OrderRef, n)
		}
	}
	Eventually(t, 10*time.Second, "pickup_removed withdrawn", func() error {
		if n := e.openAlerts(t, ready, pickup.AlertRemoved); n != 0 {
			return fmt.Errorf("%d open", n)
		}
		return nil
	})
}

// TestLateCodeUseAfterTheCompartmentIsTakenAgain: the driver's closing of
// an expired pickup's compartment, applied before the code's use (out of
// the locker's order), frees the compartment, and a new order takes it
// before the use arrives. The use still judges the closing against its
// own pickup (the last one created there by the closing's arrival, not by
// the use's): picked up, its alert withdrawn, the new order untouched.
func TestLateCodeUseAfterTheCompartmentIsTakenAgain(t *testing.T) {
	e := newPickupEnv(t, 1, 0)
	_, expired, dev, topic := e.twoReadyThenRaw(t, "LATE-6", "LATE-7")
	used := time.Now().UTC()
	e.expireOffline(t, expired, used.Add(3*time.Second))
	MustPublish(t, dev, topic, false, fmt.Sprintf(`{"id":"e-%s-close","ts":"%s","type":"door_closed","compartment":%d,"occupied":false}`,
		expired.ID, protocol.FormatTime(used.Add(3*time.Second)), expired.Compartment))
	Eventually(t, 10*time.Second, "the closing applied", func() error { return e.closingsApplied(t, expired, 2) })
	e.rawApplied(t, dev, expired.Locker) // the set without the expired order's code: its compartment may take the next
	next := e.create(t, "LATE-8", "M", time.Hour)
	if next.Compartment != expired.Compartment {
		t.Fatalf("the new order got compartment %d, want the freed %d", next.Compartment, expired.Compartment)
	}
	MustPublish(t, dev, topic, false, fmt.Sprintf(`{"id":"e-%s-code","ts":"%s","type":"code_accepted","credential":"%s","compartments":[%d]}`,
		expired.ID, protocol.FormatTime(used), expired.Credential.ID+".p", expired.Compartment))
	e.waitState(t, expired.ID, pickup.PickedUp)
	if n := e.openAlerts(t, expired, fleet.AlertPickupExpired); n != 0 {
		t.Fatalf("%d pickup_expired alerts open, want none", n)
	}
	if p := e.waitState(t, next.ID, pickup.Staging); p.Compartment != expired.Compartment {
		t.Fatalf("the new order: %+v", p)
	}
}

// TestCombinedCodeCollectedOfflineBeforeExpiry: one code for two orders
// (a driver collecting both); the locker, offline, opens both compartments
// with it, and the gateway, not yet told, expires one of the pickups
// meanwhile (narrowing the code to the other). When the locker reports,
// the live one is picked up as usual and the expired one after all, also
// from a locker that leaves code_accepted's optional compartments out, and
// from one that reports the doors' openings before code_accepted (the
// first opening spends the code for the live one; code_accepted then
// judges the expired one, as of that opening).
func TestCombinedCodeCollectedOfflineBeforeExpiry(t *testing.T) {
	for _, report := range []devicesim.CodeReport{devicesim.CodeAcceptedFirst, devicesim.DoorOpenedFirst} {
		for _, omit := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s, compartments omitted %v", report, omit), func(t *testing.T) {
				combinedCodeCollectedOffline(t, func(o *devicesim.Options) { o.OmitCodeCompartments, o.CodeReport = omit, report })
			})
		}
	}
}

func combinedCodeCollectedOffline(t *testing.T, opts func(*devicesim.Options)) {
	ctx := context.Background()
	e := newPickupEnv(t, 1, 0, opts)
	early, late := e.create(t, "LATE-C1", "S", time.Hour), e.create(t, "LATE-C2", "S", time.Hour)
	e.waitState(t, early.ID, pickup.Ready)
	e.waitState(t, late.ID, pickup.Ready)
	var cred pickup.CredentialView
	if err := e.platform.Post(ctx, "/v1/credentials", map[string]any{"pickups": []string{early.ID, late.ID}, "kind": "pin"}, &cred); err != nil {
		t.Fatal(err)
	}
	e.waitCreds(t, early.Locker)
	l := e.sim.Locker(early.Locker)
	l.Disconnect()
	if r := l.EnterCode(cred.Code); !r.Accepted || len(r.Compartments) != 2 {
		t.Fatalf("offline combined code: %+v", r)
	}
	e.expireOffline(t, early, time.Now().Add(3*time.Second))
	reconnect(t, l)
	e.bothCollected(t, late, early)
}

// TestPickupCollectedOfflineAfterExpiry: a code the locker accepted after
// the pickup's expires_at (here: the expiry was moved earlier after the
// locker got its set; docs/api.md) did not collect in time: the pickup
// stays expired, its alert stands, and staff are told of the use
// (code_not_live).
func TestPickupCollectedOfflineAfterExpiry(t *testing.T) {
	e := newPickupEnv(t, 1, 0)
	p := e.usedOfflineThenExpired(t, "LATE-2", -time.Minute) // before the use
	Eventually(t, 10*time.Second, "a code_not_live alert and the events applied", func() error {
		if n := e.openAlerts(t, p, pickup.AlertCodeNotLive); n != 1 {
			return fmt.Errorf("%d code_not_live alerts", n)
		}
		return e.closingsApplied(t, p, 2) // the staging's, the driver's
	})
	e.stillExpired(t, p)
}

// TestPickupLeftInsideOfflineStaysExpired: the driver opened the
// compartment with the code before expiry, offline, but left the order:
// the pickup stays expired and staff are still told to retrieve it. Staff
// emptying the compartment later is not the driver's collection either.
func TestPickupLeftInsideOfflineStaysExpired(t *testing.T) {
	ctx := context.Background()
	e := newPickupEnv(t, 1, 0, func(o *devicesim.Options) { o.DoorCloseDelay = -1 })
	l := e.sim.Lockers()[0]
	p := e.create(t, "LATE-3", "S", time.Hour)
	code := e.stage(t, l, p)
	l.Disconnect()
	if r := l.EnterCode(code); !r.Accepted {
		t.Fatalf("offline code: %+v", r)
	}
	l.SetOccupied(p.Compartment, true) // the driver left the order
	l.CloseDoor(p.Compartment)
	e.expireOffline(t, p, time.Now().Add(3*time.Second))
	reconnect(t, l)
	applied := func(closings int) {
		t.Helper()
		Eventually(t, 10*time.Second, "the locker's events applied", func() error {
			if n := e.tg.Count(t, `SELECT count(*) FROM pickups WHERE id = $1 AND collected_at IS NOT NULL`, p.ID); n != 1 {
				return errors.New("the use is not recorded")
			}
			return e.closingsApplied(t, p, closings)
		})
		e.stillExpired(t, p)
		if n := e.tg.Count(t, `SELECT count(*) FROM alerts WHERE kind = 'code_not_live' AND device_id = $1`, p.Locker); n != 0 {
			t.Fatalf("%d code_not_live alerts, want none", n)
		}
	}
	applied(2) // the staging's closing, the driver's
	// Staff retrieve the order: a remote unlock, and the door closed empty.
	var cmd fleet.Command
	if err := e.tg.Admin.Post(ctx, "/v1/lockers/"+p.Locker+"/commands",
		map[string]any{"type": "unlock", "compartment": p.Compartment, "reason": "service"}, &cmd); err != nil {
		t.Fatal(err)
	}
	Eventually(t, 10*time.Second, "door open for staff", func() error {
		if !l.Compartment(p.Compartment).Open {
			return errors.New("closed")
		}
		return nil
	})
	l.SetOccupied(p.Compartment, false)
	l.CloseDoor(p.Compartment)
	applied(3)
	if got, err := e.tg.Metric(`lockergate_pickups_reported_late_total`); err != nil || got != 0 {
		t.Errorf("lockergate_pickups_reported_late_total = %v (%v), want 0", got, err)
	}
}

// storedEvent is a device event as a run stored it.
type storedEvent struct {
	id, typ, body string
	comp          int
	at            time.Time
}

// collectedEvents are a driver's code use and the door closing empty after
// it, for ready pickup p, received at at; ids start with prefix.
func collectedEvents(prefix string, p pickup.Pickup, at time.Time) []storedEvent {
	return []storedEvent{
		{prefix + "-1", "code_accepted", fmt.Sprintf(`{"id":"%s-1","ts":"%s","type":"code_accepted","credential":"%s","compartments":[%d]}`,
			prefix, protocol.FormatTime(at), p.Credential.ID+".p", p.Compartment), 0, at},
		{prefix + "-2", "door_closed", fmt.Sprintf(`{"id":"%s-2","ts":"%s","type":"door_closed","compartment":%d,"occupied":false}`,
			prefix, protocol.FormatTime(at.Add(time.Second)), p.Compartment), p.Compartment, at.Add(time.Second)},
	}
}

// storeUnapplied writes events of locker as a run that stored them and
// stopped before applying their effects leaves them: recorded, deduplicated,
// and in the outbox.
func storeUnapplied(t *testing.T, pool execer, locker string, events []storedEvent) {
	t.Helper()
	storeEvents(t, pool, locker, events, true)
}

// execer runs a statement: a pool or a connection.
type execer interface {
	Exec(context.Context, string, ...any) (pgconn.CommandTag, error)
}

// storeEvents writes events of locker as stored: recorded (dated by
// their bodies' ts) and deduplicated, and, with outbox, their effects
// still to apply.
func storeEvents(t *testing.T, pool execer, locker string, events []storedEvent, outbox bool) {
	t.Helper()
	for _, ev := range events {
		var comp *int
		if ev.comp > 0 {
			comp = &ev.comp
		}
		body, err := protocol.Decode[protocol.Event]([]byte(ev.body))
		if err != nil {
			t.Fatalf("event %s: %v", ev.id, err)
		}
		qs := []string{
			`INSERT INTO event_ids (device_id, event_id, received_at) VALUES ($1, $2, $3)`,
			`INSERT INTO events (device_id, event_id, received_at, ts, type, compartment, body) VALUES ($1, $2, $3, $7, $4, $5, $6)`,
		}
		if outbox {
			qs = append(qs, `INSERT INTO event_outbox (device_id, event_id, received_at, ts, type, compartment, body) VALUES ($1, $2, $3, $7, $4, $5, $6)`)
		}
		for _, q := range qs {
			args := []any{locker, ev.id, ev.at, ev.typ, comp, ev.body, body.TS.Time}
			if strings.HasPrefix(q, "INSERT INTO event_ids") {
				args = args[:3]
			}
			if _, err := pool.Exec(context.Background(), q, args...); err != nil {
				t.Fatalf("%s: %v", q, err)
			}
		}
	}
}

// backdate makes pickup id two hours old, so that events stored as
// received before now are about it (a closing from before a pickup
// existed is ignored).
func backdate(t *testing.T, pool interface {
	Exec(context.Context, string, ...any) (pgconn.CommandTag, error)
}, id string) {
	t.Helper()
	if _, err := pool.Exec(context.Background(), `UPDATE pickups SET created_at = created_at - interval '2 hours' WHERE id = $1`, id); err != nil {
		t.Fatal(err)
	}
}

// newCensusEnv is a pickup environment whose census offers stored,
// unapplied events every 100 ms and whose doors close only by hand, with
// one pickup (order ref) staged and ready at its locker l.
func newCensusEnv(t *testing.T, ref string) (*pickupEnv, *devicesim.Locker, pickup.Pickup) {
	t.Helper()
	e := newPickupEnvWith(t, func(o *gateway.Options) { o.CensusInterval = 100 * time.Millisecond }, 1, 0,
		func(o *devicesim.Options) { o.DoorCloseDelay = -1 })
	l := e.sim.Lockers()[0]
	p := e.create(t, ref, "S", time.Hour)
	e.stage(t, l, p)
	return e, l, e.waitState(t, p.ID, pickup.Ready)
}

// lateReport sets up a late collection's report: pickup ready (staged at
// a census environment's locker l, which goes offline) made two hours old
// and expired an hour ago, seconds after the locker's report says its
// code was used (used, by the locker's clock). It returns the report,
// received seconds after it was made, an hour ago (a census offers it):
// the code's use, then the door's closing empty.
func (e *pickupEnv) lateReport(t *testing.T, l *devicesim.Locker, ready pickup.Pickup) (events []storedEvent, used time.Time) {
	t.Helper()
	l.Disconnect()
	if _, err := e.tg.DB().Pool().Exec(context.Background(), `UPDATE pickups SET created_at = created_at - interval '2 hours',
		ready_at = ready_at - interval '2 hours' WHERE id = $1`, ready.ID); err != nil {
		t.Fatal(err)
	}
	used = time.Now().Add(-time.Hour).UTC().Truncate(time.Millisecond)
	// Seconds to spare: the locker's clock offset, measured from its
	// birth's delivery, moves the use later by that delay.
	e.expireOffline(t, ready, used.Add(5*time.Second))
	events = collectedEvents("e-late", ready, used)
	for i := range events {
		events[i].at = events[i].at.Add(3 * time.Second)
	}
	return events, used
}

// TestLateCollectionAcrossRuns: the late collection's two events, applied
// by different runs, end the pickup either way.
//   - After a crash: a run judged the collection from the code's use (the
//     driver's closing applied before it, out of the locker's order),
//     recorded the use and stopped before ending the pickup; the use,
//     offered again from the outbox, finishes it.
//   - Behind an external broker the closing and the use before it go to
//     different instances: the closing's received it first but applies it
//     after the use's instance recorded the use (and found no closing
//     then); the closing still finds the use.
//   - As before, and a later closing of the door (staff's, by the
//     locker's clock) was applied before the expiry, with the pickup still
//     ready: its pickup_removed is withdrawn by the driver's closing.
func TestLateCollectionAcrossRuns(t *testing.T) {
	for _, tc := range []struct {
		name        string
		closingLast bool // the closing is the event left to apply
		removed     bool // a later closing raised pickup_removed before the expiry
	}{{"after a crash", false, false}, {"closing received before its use", true, false},
		{"later closing applied before the expiry", true, true}} {
		t.Run(tc.name, func(t *testing.T) {
			e, l, p := newCensusEnv(t, "LATE-6")
			events, used := e.lateReport(t, l, p)
			use, closing := events[0], events[1]
			applied, left := closing, use
			if tc.closingLast {
				// The use's instance received it after the closing's had
				// received the closing.
				use.at = closing.at.Add(time.Second)
				applied, left = use, closing
			}
			storeEvents(t, e.tg.DB().Pool(), p.Locker, []storedEvent{applied}, false)
			var removed fleet.Alert
			if tc.removed {
				// Dated after the driver's closing, received before it
				// (and before the use's arrival, and the expiry).
				later := storedEvent{"e-late-3", "door_closed", fmt.Sprintf(`{"id":"e-late-3","ts":"%s","type":"door_closed","compartment":%d,"occupied":false}`,
					protocol.FormatTime(used.Add(2*time.Second)), p.Compartment), p.Compartment, closing.at.Add(-500 * time.Millisecond)}
				storeEvents(t, e.tg.DB().Pool(), p.Locker, []storedEvent{later}, false)
				removed = fleet.Alert{DeviceID: p.Locker, Kind: pickup.AlertRemoved, Compartment: p.Compartment, RaisedAt: later.at}
				if ok, err := e.tg.DB().RaiseAlert(context.Background(), removed); err != nil || !ok {
					t.Fatalf("pickup_removed as the later closing raised it: %v %v", ok, err)
				}
			}
			if _, err := e.tg.DB().UseExpiredCredential(context.Background(), p.Locker, p.Credential.ID, used, use.at, []int{p.Compartment}); err != nil {
				t.Fatalf("the use as the other run recorded it: %v", err)
			}
			storeUnapplied(t, e.tg.DB().Pool(), p.Locker, []storedEvent{left})
			e.waitState(t, p.ID, pickup.PickedUp)
			if n := e.openAlerts(t, p, fleet.AlertPickupExpired); n != 0 {
				t.Fatalf("%d pickup_expired alerts open, want none", n)
			}
			// Picked up after the expiry, though the events were received
			// an hour before it.
			if n := e.tg.Count(t, `SELECT count(*) FROM pickup_transitions x JOIN pickup_transitions u USING (pickup_id)
				WHERE pickup_id = $1 AND x.to_state = 'expired' AND u.to_state = 'picked_up' AND u.ts >= x.ts`, p.ID); n != 1 {
				t.Fatal("picked up before its expiry")
			}
			if tc.removed {
				if n := e.tg.Count(t, `SELECT count(*) FROM alerts WHERE device_id = $1 AND kind = $2 AND raised_at = $3
					AND cleared_by = 'gateway'`, p.Locker, removed.Kind, removed.RaisedAt); n != 1 {
					t.Fatal("the later closing's pickup_removed is not withdrawn")
				}
			}
		})
	}
}

// TestEventEffectsReplayedAtStart: what a stopped run stored and did not
// apply is applied by the next start before any new event, however recent
// (a census offers only what is older than 5 minutes).
func TestEventEffectsReplayedAtStart(t *testing.T) {
	ctx := context.Background()
	var opts gateway.Options
	e := newPickupEnvWith(t, func(o *gateway.Options) { opts = *o }, 1, 0, func(o *devicesim.Options) { o.DoorCloseDelay = -1 })
	l := e.sim.Lockers()[0]
	p := e.create(t, "ST-1", "S", time.Hour)
	e.stage(t, l, p)
	ready := e.waitState(t, p.ID, pickup.Ready)
	e.sim.Close()
	e.tg.Stop(t)
	conn, err := pgx.Connect(ctx, opts.DatabaseURL)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	backdate(t, conn, p.ID)
	storeUnapplied(t, conn, p.Locker, collectedEvents("e-start", ready, time.Now().Add(-10*time.Second).UTC().Truncate(time.Microsecond)))

	tg2 := MustRun(t, opts)
	tg2.Admin.Token = e.tg.Admin.Token
	Eventually(t, 15*time.Second, "the pickup picked up by the replay", func() error {
		var got pickup.Pickup
		if err := tg2.Admin.Get(ctx, "/v1/pickups/"+p.ID, nil, &got); err != nil {
			return err
		}
		if got.State != pickup.PickedUp {
			return fmt.Errorf("state %s", got.State)
		}
		return nil
	})
	if n := tg2.Count(t, `SELECT count(*) FROM event_outbox`); n != 0 {
		t.Fatalf("%d events left in the outbox", n)
	}
}

// TestEventEffectsAppliedAfterACrash: a gateway that stored a locker's
// events and stopped before applying them (killed) left them in the
// outbox; the locker's resend is a duplicate by then. They are applied
// later all the same: the code used, the pickup picked up. A replay of an
// event applied already changes nothing.
func TestEventEffectsAppliedAfterACrash(t *testing.T) {
	ctx := context.Background()
	e, l, ready := newCensusEnv(t, "CR-1")
	p := ready
	// What the killed run stored: the driver's code and the door closing
	// empty, received an hour ago, their effects not applied.
	at := time.Now().Add(-time.Hour).UTC().Truncate(time.Microsecond)
	events := collectedEvents("e-crash", ready, at)
	pool := e.tg.DB().Pool()
	backdate(t, pool, p.ID)
	storeUnapplied(t, pool, p.Locker, events)
	e.waitState(t, p.ID, pickup.PickedUp)
	Eventually(t, 10*time.Second, "the outbox emptied", func() error {
		if n := e.tg.Count(t, `SELECT count(*) FROM event_outbox`); n != 0 {
			return fmt.Errorf("%d events left", n)
		}
		return nil
	})
	if n, err := e.tg.Metric("lockergate_events_replayed_total"); err != nil || n < 2 {
		t.Fatalf("lockergate_events_replayed_total = %v (%v), want 2 or more", n, err)
	}

	// The code_accepted offered again (a crash after its effect, before
	// the outbox row went): applied already, so no alert.
	body := events[0].body
	if _, err := pool.Exec(ctx, `INSERT INTO event_outbox (device_id, event_id, received_at, ts, type, body) VALUES ($1, 'e-crash-1', $2, $2, 'code_accepted', $3)`,
		p.Locker, at, body); err != nil {
		t.Fatal(err)
	}
	Eventually(t, 10*time.Second, "the replayed event done with", func() error {
		if n := e.tg.Count(t, `SELECT count(*) FROM event_outbox`); n != 0 {
			return fmt.Errorf("%d events left", n)
		}
		return nil
	})
	if n := e.tg.Count(t, `SELECT count(*) FROM alerts WHERE kind = 'code_not_live'`); n != 0 {
		t.Fatalf("%d code_not_live alerts for a replay of an applied use", n)
	}
	// A closing stored from before a pickup existed (the compartment's last
	// order) does not make the new one ready.
	p2 := e.create(t, "CR-2", "S", time.Hour)
	Eventually(t, 10*time.Second, "door open for staging", func() error {
		if !l.Compartment(p2.Compartment).Open {
			return errors.New("closed")
		}
		return nil
	})
	old := at.Add(time.Minute)
	storeUnapplied(t, pool, p2.Locker, []storedEvent{{"e-old-close", "door_closed",
		fmt.Sprintf(`{"id":"e-old-close","ts":"%s","type":"door_closed","compartment":%d,"occupied":true}`, protocol.FormatTime(old), p2.Compartment),
		p2.Compartment, old}})
	Eventually(t, 10*time.Second, "the old closing done with", func() error {
		if n := e.tg.Count(t, `SELECT count(*) FROM event_outbox`); n != 0 {
			return fmt.Errorf("%d events left", n)
		}
		return nil
	})
	if got := e.waitState(t, p2.ID, pickup.Staging); got.State != pickup.Staging {
		t.Fatal("unreachable")
	}
	// Events applied as they come leave nothing in the outbox either.
	if got := e.tg.Count(t, `SELECT count(*) FROM events WHERE device_id = $1 AND type IN ('code_accepted', 'door_closed')`, p.Locker); got < 3 {
		t.Fatalf("%d door and code events stored, want the staging's and the two above", got)
	}
}

// TestPickupExpiry: an uncollected pickup expires, its code stops working
// on the locker, staff are alerted and the platform told.
func TestPickupExpiry(t *testing.T) {
	e := newPickupEnv(t, 1, 0)
	// Ready first, however long a loaded machine takes to stage it; then
	// its expiry is brought to now.
	p := e.create(t, "EXP-1", "S", time.Hour)
	code := e.waitState(t, p.ID, pickup.Ready).Credential.Code
	if _, err := e.tg.DB().Pool().Exec(context.Background(), `UPDATE pickups SET expires_at = now() WHERE id = $1`, p.ID); err != nil {
		t.Fatal(err)
	}
	e.waitState(t, p.ID, pickup.Expired)
	e.waitCreds(t, p.Locker)
	if r := e.sim.Locker(p.Locker).EnterCode(code); r.Accepted {
		t.Fatalf("expired code opened: %+v", r)
	}
	// The expiry raised its alert in its own transaction.
	if n := e.tg.Count(t, `SELECT count(*) FROM alerts WHERE kind = 'pickup_expired' AND device_id = $1`, p.Locker); n != 1 {
		t.Fatalf("pickup_expired alerts: %d, want 1", n)
	}
	Eventually(t, 10*time.Second, "expired webhook", func() error {
		if got := fmt.Sprint(e.rc.types()); got != "[pickup.ready pickup.expired]" {
			return fmt.Errorf("received %s", got)
		}
		return nil
	})
}

// TestWebhookOfRevokedTokenGetsNothing: events queued for a platform's
// webhook before its token was revoked (a pickup.ready carries the code)
// are not delivered after the revocation, and not tried again.
func TestWebhookOfRevokedTokenGetsNothing(t *testing.T) {
	ctx := context.Background()
	e := newPickupEnv(t, 1, 1<<30) // the receiver fails every attempt until told otherwise
	p := e.create(t, "RV-1", "S", time.Hour)
	e.waitState(t, p.ID, pickup.Ready)
	Eventually(t, 10*time.Second, "a failed attempt at pickup.ready", func() error {
		e.rc.mu.Lock()
		defer e.rc.mu.Unlock()
		if e.rc.calls == 0 {
			return errors.New("no attempt yet")
		}
		return nil
	})
	var tokenID string
	if err := e.tg.DB().Pool().QueryRow(ctx, `SELECT id FROM tokens WHERE role = 'platform' AND name = 'speedy'`).Scan(&tokenID); err != nil {
		t.Fatal(err)
	}
	if _, err := e.tg.Admin.Do(ctx, client.Request{Method: "DELETE", Path: "/v1/tokens/" + tokenID}, nil); err != nil {
		t.Fatal(err)
	}
	e.rc.mu.Lock()
	e.rc.failFirst = 0 // the receiver would take it now
	e.rc.mu.Unlock()
	Eventually(t, 10*time.Second, "the queued deliveries given up", func() error {
		var pending, failed int
		if err := e.tg.DB().Pool().QueryRow(ctx, `SELECT count(*) FILTER (WHERE d.state = 'pending'),
				count(*) FILTER (WHERE d.state = 'failed' AND d.last_error LIKE '%token revoked%')
			FROM webhook_deliveries d JOIN webhooks w ON w.id = d.webhook_id WHERE w.token_id = $1`, tokenID).Scan(&pending, &failed); err != nil {
			return err
		}
		if pending != 0 || failed == 0 {
			return fmt.Errorf("%d pending, %d given up", pending, failed)
		}
		return nil
	})
	if got := e.rc.types(); len(got) != 0 {
		t.Fatalf("delivered after the revocation: %v", got)
	}
	// Gone for the admin too: listed, it could be neither read nor deleted.
	var list struct{ Items []webhook.Webhook }
	if err := e.tg.Admin.Get(ctx, "/v1/webhooks", nil, &list); err != nil {
		t.Fatal(err)
	}
	for _, w := range list.Items {
		if w.TokenID == tokenID {
			t.Errorf("the revoked token's webhook %s is still listed", w.ID)
		}
	}
}

// TestWebhooksPerTokenBounded: a token may have webhook.MaxPerToken
// webhooks; one more is a 422 until one is deleted.
func TestWebhooksPerTokenBounded(t *testing.T) {
	ctx := context.Background()
	tg := MustStart(t)
	c := MustPickupToken(t, tg, "platform", "", "speedy")
	var last struct{ ID string }
	for i := range webhook.MaxPerToken {
		if err := c.Post(ctx, "/v1/webhooks", map[string]any{"url": fmt.Sprintf("https://hooks.example/%d", i)}, &last); err != nil {
			t.Fatalf("webhook %d: %v", i+1, err)
		}
	}
	more := client.Request{Method: "POST", Path: "/v1/webhooks", Body: map[string]any{"url": "https://hooks.example/more"}}
	if status, err := c.Do(ctx, more, nil); status != 422 || !strings.Contains(err.Error(), "at most") {
		t.Fatalf("one webhook too many: %d %v, want 422", status, err)
	}
	if _, err := c.Do(ctx, client.Request{Method: "DELETE", Path: "/v1/webhooks/" + last.ID}, nil); err != nil {
		t.Fatal(err)
	}
	if status, err := c.Do(ctx, more, nil); status != 201 {
		t.Fatalf("after a delete: %d %v, want 201", status, err)
	}

	// Listed in pages, as every list (api-v1: limit, default 100, max
	// 1000, and after).
	seen := map[string]bool{}
	after := ""
	for pages := 0; ; pages++ {
		var page struct {
			Items []webhook.Webhook
			Next  string
		}
		if err := c.Get(ctx, "/v1/webhooks", url.Values{"limit": {"3"}, "after": {after}}, &page); err != nil {
			t.Fatal(err)
		}
		if len(page.Items) > 3 || pages > webhook.MaxPerToken {
			t.Fatalf("page %d: %d webhooks with limit 3", pages, len(page.Items))
		}
		for _, w := range page.Items {
			if seen[w.ID] {
				t.Fatalf("webhook %s listed twice", w.ID)
			}
			seen[w.ID] = true
		}
		if page.Next == "" {
			break
		}
		after = page.Next
	}
	if len(seen) != webhook.MaxPerToken {
		t.Fatalf("%d webhooks listed over the pages, want %d", len(seen), webhook.MaxPerToken)
	}
	if status, err := c.Do(ctx, client.Request{Method: "GET", Path: "/v1/webhooks", Query: url.Values{"limit": {"1001"}}}, nil); status != 400 {
		t.Fatalf("limit 1001: %d %v, want 400", status, err)
	}
}

// TestWebhookToPrivateAddressRefused: a gateway that delivers webhooks to
// public addresses only (the default outside demo) refuses one for a
// loopback receiver when it is created, with a 422 that names the flag,
// instead of storing it and failing every delivery.
func TestWebhookToPrivateAddressRefused(t *testing.T) {
	ctx := context.Background()
	tg := MustStart(t, func(o *gateway.Options) { o.WebhookAllowPrivate = false })
	req := client.Request{Method: "POST", Path: "/v1/webhooks",
		Body: map[string]any{"url": "http://127.0.0.1:9/hook", "events": []string{"pickup.ready"}}}
	status, err := tg.Admin.Do(ctx, req, nil)
	if status != 422 || err == nil || !strings.Contains(err.Error(), "--webhook-allow-private") {
		t.Fatalf("loopback webhook: %d %v, want 422 naming the flag", status, err)
	}
	if n := tg.Count(t, `SELECT count(*) FROM webhooks`); n != 0 {
		t.Fatalf("%d webhooks stored, want none", n)
	}
}

// TestPickupCollectedAcrossExpiry: a driver who opens the compartment with
// the code a moment before the pickup expires and closes it after has
// picked the order up. The expiry sweep must not end it as expired (and
// tell the platform and staff so) while its door is open.
func TestPickupCollectedAcrossExpiry(t *testing.T) {
	e := newPickupEnv(t, 1, 0, func(o *devicesim.Options) { o.DoorCloseDelay = -1 })
	l := e.sim.Lockers()[0]
	p := e.create(t, "X-1", "S", time.Hour)
	e.collect(t, l, p)
	// The scenario: the door is still open when the pickup expires, and
	// sweeps (every second) run past it. Its expiry is brought to just
	// after the code's use (staging and collecting take what a loaded
	// machine takes), then waited past.
	expiresAt := time.Now().Add(time.Second)
	if _, err := e.tg.DB().Pool().Exec(context.Background(), `UPDATE pickups SET expires_at = $2 WHERE id = $1`, p.ID, expiresAt); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Until(expiresAt.Add(3 * time.Second))) // the scenario's time passing, not a synchronisation
	var now pickup.Pickup
	if err := e.store.Get(context.Background(), "/v1/pickups/"+p.ID, nil, &now); err != nil || now.State != pickup.Ready {
		t.Fatalf("3 s past expires_at with its door open: %s (%v), want still ready", now.State, err)
	}
	l.SetOccupied(p.Compartment, false)
	l.CloseDoor(p.Compartment)
	e.waitState(t, p.ID, pickup.PickedUp)
	var alerts int
	if err := e.tg.DB().Pool().QueryRow(context.Background(), `SELECT count(*) FROM alerts WHERE kind = 'pickup_expired' AND device_id = $1`,
		p.Locker).Scan(&alerts); err != nil || alerts != 0 {
		t.Fatalf("pickup_expired alerts: %d (%v), want none", alerts, err)
	}
}

// collect stages p and has its driver open the compartment with its code,
// recorded used; the door stays open.
func (e *pickupEnv) collect(t *testing.T, l *devicesim.Locker, p pickup.Pickup) {
	t.Helper()
	code := e.stage(t, l, p)
	if r := l.EnterCode(code); !r.Accepted {
		t.Fatalf("code: %+v", r)
	}
	Eventually(t, 10*time.Second, "the code recorded used", func() error {
		var n int
		if err := e.tg.DB().Pool().QueryRow(context.Background(), `SELECT count(*) FROM credentials c JOIN pickups p ON p.credential_id = c.id
			WHERE p.id = $1 AND c.state = 'used'`, p.ID).Scan(&n); err != nil || n != 1 {
			return fmt.Errorf("%d used (%v)", n, err)
		}
		return nil
	})
}

// TestPickupChangedWhileCollected: while a driver has the compartment open
// with the pickup's code, the pickup can be neither cancelled nor given a
// new (combined) code: 409, and the door's closing decides. Before, the
// cancel recorded a collected order as cancelled, and the new code made
// the closing look like an order removed without its code.
func TestPickupChangedWhileCollected(t *testing.T) {
	ctx := context.Background()
	e := newPickupEnv(t, 1, 0, func(o *devicesim.Options) { o.DoorCloseDelay = -1 })
	l := e.sim.Lockers()[0]
	p := e.create(t, "W-1", "S", time.Hour)
	e.collect(t, l, p)
	for _, req := range []client.Request{
		{Method: "POST", Path: "/v1/credentials", Body: map[string]any{"pickups": []string{p.ID}}},
		{Method: "POST", Path: "/v1/pickups/" + p.ID + "/cancel"},
	} {
		if status, err := e.store.Do(ctx, req, nil); status != 409 || !strings.Contains(err.Error(), "being collected") {
			t.Errorf("%s %s while collected: %d %v, want 409 being collected", req.Method, req.Path, status, err)
		}
	}
	l.SetOccupied(p.Compartment, false)
	l.CloseDoor(p.Compartment)
	e.waitState(t, p.ID, pickup.PickedUp)
}

// TestPickupEdges: closed empty after staging, the driver leaving the
// order, cancel, and the platform boundary.
func TestPickupEdges(t *testing.T) {
	ctx := context.Background()
	e := newPickupEnv(t, 1, 0, func(o *devicesim.Options) { o.DoorCloseDelay = -1 })
	l := e.sim.Lockers()[0]

	t.Run("StagedEmpty", func(t *testing.T) {
		p := e.create(t, "E-1", "S", time.Hour)
		Eventually(t, 10*time.Second, "door open", func() error {
			if !l.Compartment(p.Compartment).Open {
				return errors.New("closed")
			}
			return nil
		})
		l.SetOccupied(p.Compartment, false) // nothing was put in
		l.CloseDoor(p.Compartment)
		Eventually(t, 10*time.Second, "staged_empty alert", func() error {
			var n int
			e.tg.DB().Pool().QueryRow(ctx, `SELECT count(*) FROM alerts WHERE kind = 'staged_empty' AND device_id = $1 AND compartment = $2`, p.Locker, p.Compartment).Scan(&n)
			if n != 1 {
				return fmt.Errorf("%d alerts", n)
			}
			return nil
		})
		if got := e.waitState(t, p.ID, pickup.Staging); got.State != pickup.Staging {
			t.Fatal("unreachable")
		}
		// Cancel frees the compartment.
		var c pickup.Pickup
		if err := e.store.Post(ctx, "/v1/pickups/"+p.ID+"/cancel", nil, &c); err != nil || c.State != pickup.Cancelled {
			t.Fatalf("cancel: %+v %v", c, err)
		}
		if err := e.store.Post(ctx, "/v1/pickups/"+p.ID+"/cancel", nil, nil); err == nil {
			t.Fatal("a cancelled pickup was cancelled again")
		}
	})

	t.Run("DriverLeavesOrder", func(t *testing.T) {
		p := e.create(t, "E-2", "S", time.Hour)
		first := e.stage(t, l, p)
		if r := l.EnterCode(first); !r.Accepted {
			t.Fatalf("code: %+v", r)
		}
		l.SetOccupied(p.Compartment, true) // the order is still inside
		l.CloseDoor(p.Compartment)
		e.collectWith(t, l, p, e.freshCode(t, p, first))
	})

	t.Run("DoorJammed", func(t *testing.T) {
		// The code is accepted but the door does not open: the locker
		// reports code_accepted with no compartment opened.
		p := e.create(t, "E-JAM", "S", time.Hour)
		first := e.stage(t, l, p)
		l.SetDoorFault(p.Compartment, true)
		if r := l.EnterCode(first); !r.Accepted || len(r.Compartments) != 0 {
			t.Fatalf("code at a jammed door: %+v, want accepted, nothing opened", r)
		}
		second := e.freshCode(t, p, first)
		Eventually(t, 10*time.Second, "pickup_not_opened", func() error {
			if n := e.openAlerts(t, p, pickup.AlertNotOpened); n != 1 {
				return fmt.Errorf("%d open", n)
			}
			return nil
		})
		l.SetDoorFault(p.Compartment, false) // repaired
		e.collectWith(t, l, p, second)
	})

	t.Run("OtherPlatformSeesNothing", func(t *testing.T) {
		p := e.create(t, "E-3", "S", time.Hour)
		other := MustPickupToken(t, e.tg, "platform", "", "rival")
		var got pickup.Pickup
		err := other.Get(ctx, "/v1/pickups/"+p.ID, nil, &got)
		var ae *client.Error
		if !errors.As(err, &ae) || ae.Status != 403 {
			t.Fatalf("rival platform reading the pickup: %v, want 403", err)
		}
		var list struct{ Items []pickup.Pickup }
		if err := other.Get(ctx, "/v1/pickups", nil, &list); err != nil || len(list.Items) != 0 {
			t.Fatalf("rival platform lists %d pickups (%v)", len(list.Items), err)
		}
		if err := other.Post(ctx, "/v1/credentials", map[string]any{"pickups": []string{p.ID}}, nil); !errors.As(err, &ae) || ae.Status != 403 {
			t.Fatalf("rival platform minting a code: %v", err)
		}
		var op pickup.Pickup
		operator := MustPickupToken(t, e.tg, "operator", "", "ops")
		if err := operator.Get(ctx, "/v1/pickups/"+p.ID, nil, &op); err != nil || op.Credential != nil {
			t.Fatalf("operator sees %+v (%v)", op.Credential, err)
		}
	})

	t.Run("PlatformNamedInWords", func(t *testing.T) {
		// A token's name is text: a platform may be called "Speedy Eats".
		words := MustPickupToken(t, e.tg, "platform", "", "Speedy Eats")
		var p pickup.Pickup
		if err := e.store.Post(ctx, "/v1/pickups", map[string]any{"site": "store-042", "order_ref": "W-1", "size": "S",
			"recipient": map[string]string{"kind": "driver", "platform": "Speedy Eats"}}, &p); err != nil {
			t.Fatalf("create for \"Speedy Eats\": %v", err)
		}
		var got pickup.Pickup
		if err := words.Get(ctx, "/v1/pickups/"+p.ID, nil, &got); err != nil || got.Platform != "Speedy Eats" {
			t.Fatalf("the platform reading its pickup: %+v %v", got, err)
		}
		for _, name := range []string{"", " padded", "tab\tin", strings.Repeat("n", fleet.MaxNameLen+1)} {
			status, err := e.tg.Admin.Do(ctx, client.Request{Method: "POST", Path: "/v1/tokens",
				Body: map[string]string{"role": "platform", "name": name}}, nil)
			if status != 400 {
				t.Errorf("token name %q: got %d (%v), want 400", name, status, err)
			}
		}
	})

	t.Run("RecipientLeftOut", func(t *testing.T) {
		// Without a kind, a platform named is its driver; without a
		// recipient at all, the pickup is the store's customer's, or, from
		// a platform token, its own driver's.
		for ref, tc := range map[string]struct {
			by        *client.Client
			recipient any
			want      pickup.Recipient
		}{
			"D-1": {e.store, nil, pickup.Recipient{Kind: "customer"}},
			"D-2": {e.store, map[string]string{"platform": "speedy"}, pickup.Recipient{Kind: "driver", Platform: "speedy"}},
			"D-3": {e.store, map[string]string{"name": "Ana"}, pickup.Recipient{Kind: "customer", Name: "Ana"}},
			"D-4": {e.platform, nil, pickup.Recipient{Kind: "driver", Platform: "speedy"}},
		} {
			body := map[string]any{"site": "store-042", "order_ref": ref, "size": "S"}
			if tc.recipient != nil {
				body["recipient"] = tc.recipient
			}
			var p pickup.Pickup
			if err := tc.by.Post(ctx, "/v1/pickups", body, &p); err != nil {
				t.Fatalf("%s: %v", ref, err)
			}
			if p.Recipient != tc.want {
				t.Errorf("%s: recipient %+v, want %+v", ref, p.Recipient, tc.want)
			}
			if err := e.store.Post(ctx, "/v1/pickups/"+p.ID+"/cancel", nil, nil); err != nil {
				t.Fatal(err)
			}
		}
	})

	t.Run("BadRequests", func(t *testing.T) {
		for name, body := range map[string]map[string]any{
			"UnknownSize":     {"site": "store-042", "order_ref": "B-1", "size": "XXL", "recipient": map[string]string{"kind": "customer"}},
			"NoPlatform":      {"site": "store-042", "order_ref": "B-2", "recipient": map[string]string{"kind": "driver"}},
			"PastExpiry":      {"site": "store-042", "order_ref": "B-3", "recipient": map[string]string{"kind": "customer"}, "expires_at": time.Now().Add(-time.Minute)},
			"NoOrderRef":      {"site": "store-042", "recipient": map[string]string{"kind": "customer"}},
			"OtherSite":       {"site": "elsewhere", "order_ref": "B-4", "recipient": map[string]string{"kind": "customer"}},
			"DuplicateRef":    {"site": "store-042", "order_ref": "E-3", "size": "S", "recipient": map[string]string{"kind": "driver", "platform": "speedy"}},
			"NothingFitsSize": {"site": "store-042", "order_ref": "B-5", "size": "XL", "zone": "heated", "recipient": map[string]string{"kind": "customer"}},
			// A platform no token can have: nobody could see or collect it.
			"BadPlatform": {"site": "store-042", "order_ref": "B-6", "recipient": map[string]string{"kind": "driver", "platform": "speedy\x07"}},
			"LongName":    {"site": "store-042", "order_ref": "B-7", "recipient": map[string]string{"kind": "customer", "name": strings.Repeat("n", pickup.MaxRecipientName+1)}},
			"UnknownKind": {"site": "store-042", "order_ref": "B-9", "recipient": map[string]string{"kind": "robot"}},
		} {
			want := map[string]int{"OtherSite": 403, "DuplicateRef": 409, "NothingFitsSize": 422}[name]
			if want == 0 {
				want = 400
			}
			status, err := e.store.Do(ctx, client.Request{Method: "POST", Path: "/v1/pickups", Body: body}, nil)
			if status != want {
				t.Errorf("%s: got %d (%v), want %d", name, status, err, want)
			}
		}
		// An order whose pickup ended may be staged again; while one is
		// live its reference is taken.
		first := e.create(t, "R-1", "S", time.Hour)
		again := map[string]any{"site": "store-042", "order_ref": "R-1", "size": "S", "zone": "ambient",
			"recipient": map[string]string{"kind": "driver", "platform": "speedy"}}
		if status, err := e.store.Do(ctx, client.Request{Method: "POST", Path: "/v1/pickups", Body: again}, nil); status != 409 {
			t.Errorf("R-1 again while live: got %d (%v), want 409", status, err)
		}
		if err := e.store.Post(ctx, "/v1/pickups/"+first.ID+"/cancel", nil, nil); err != nil {
			t.Fatal(err)
		}
		if second := e.create(t, "R-1", "S", time.Hour); second.ID == first.ID {
			t.Errorf("R-1 after its pickup was cancelled: the same pickup %s", second.ID)
		}
		// No site, from a token not bound to one: malformed, not a 404.
		status, err := e.tg.Admin.Do(ctx, client.Request{Method: "POST", Path: "/v1/pickups",
			Body: map[string]any{"order_ref": "B-8", "recipient": map[string]string{"kind": "customer"}}}, nil)
		if status != 400 {
			t.Errorf("NoSite: got %d (%v), want 400", status, err)
		}
	})
}

// TestOutOfServiceNotAllocated: a set_service the locker carried out takes
// the compartment out of allocation (and back in): the contract's "false
// takes it out of allocation and locks it". Before, the command was
// recorded and the compartment still handed to the next order.
func TestOutOfServiceNotAllocated(t *testing.T) {
	ctx := context.Background()
	e := newPickupEnv(t, 1, 0, func(o *devicesim.Options) {
		o.Models = []devicesim.Model{{Name: "LX-2", Compartments: []protocol.CompartmentSpec{
			{N: 1, Size: "S", Zone: "ambient"}, {N: 2, Size: "S", Zone: "ambient"}}}}
	})
	lockerID := e.sim.Lockers()[0].DeviceID()
	setService := func(in bool) {
		t.Helper()
		var c fleet.Command
		if err := e.tg.Admin.Post(ctx, "/v1/lockers/"+lockerID+"/commands",
			map[string]any{"type": "set_service", "compartment": 1, "in_service": in, "wait_s": 10}, &c); err != nil || c.Status != fleet.CmdOK {
			t.Fatalf("set_service %v: %+v %v", in, c, err)
		}
		var l fleet.Locker
		if err := e.tg.Admin.Get(ctx, "/v1/lockers/"+lockerID, nil, &l); err != nil || l.Compartments[0].InService != in {
			t.Fatalf("compartment 1 after set_service %v: %+v %v", in, l.Compartments, err)
		}
	}
	setService(false)
	if p := e.create(t, "OOS-1", "S", time.Hour); p.Compartment != 2 {
		t.Fatalf("allocated compartment %d, want 2 (1 is out of service)", p.Compartment)
	}
	status, err := e.store.Do(ctx, client.Request{Method: "POST", Path: "/v1/pickups",
		Body: map[string]any{"site": "store-042", "order_ref": "OOS-2", "size": "S", "recipient": map[string]string{"kind": "customer"}}}, nil)
	if status != 422 {
		t.Fatalf("a second order with compartment 1 out of service: %d %v, want 422", status, err)
	}
	setService(true)
	if p := e.create(t, "OOS-3", "S", time.Hour); p.Compartment != 1 {
		t.Fatalf("allocated compartment %d, want 1 (back in service)", p.Compartment)
	}
}

// TestPickupAllocationRace: 100 concurrent requests at a site with 20 free
// compartments get 20 distinct compartments and 80 clear refusals. They are
// the admin's: a store token may have 16 in flight at once.
func TestPickupAllocationRace(t *testing.T) {
	ctx := context.Background()
	var layout []protocol.CompartmentSpec
	for n := 1; n <= 10; n++ {
		layout = append(layout, protocol.CompartmentSpec{N: n, Size: "S", Zone: "ambient"})
	}
	e := newPickupEnv(t, 2, 0, func(o *devicesim.Options) {
		o.Models = []devicesim.Model{{Name: "LX-10", Compartments: layout}}
	})
	type result struct {
		status int
		p      pickup.Pickup
	}
	results := make(chan result, 100)
	var wg sync.WaitGroup
	for i := 0; i < 100; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var p pickup.Pickup
			status, _ := e.tg.Admin.Do(ctx, client.Request{Method: "POST", Path: "/v1/pickups", Body: map[string]any{
				"site": "store-042", "order_ref": fmt.Sprintf("R-%03d", i), "size": "S",
				"recipient": map[string]string{"kind": "customer"}}}, &p)
			results <- result{status, p}
		}()
	}
	wg.Wait()
	close(results)
	taken := map[string]bool{}
	counts := map[int]int{}
	for r := range results {
		counts[r.status]++
		if r.status == 201 {
			k := fmt.Sprintf("%s/%d", r.p.Locker, r.p.Compartment)
			if taken[k] {
				t.Fatalf("compartment %s allocated twice", k)
			}
			taken[k] = true
		}
	}
	if counts[201] != 20 || counts[422] != 80 {
		t.Fatalf("answers %v, want 20×201 and 80×422", counts)
	}
}

// TestPickupBoardSwap: a locker's controller board is swapped while it
// holds a ready order. The new board gets a new cred_key at provisioning;
// the order's code, already with the driver, must still open it.
func TestPickupBoardSwap(t *testing.T) {
	e := newPickupEnv(t, 1, 0)
	p := e.create(t, "A-3001", "M", time.Hour)
	ready := e.waitState(t, p.ID, pickup.Ready)
	e.waitCreds(t, p.Locker)
	old := e.sim.Locker(p.Locker)
	oldID, _ := old.Identity()

	// The old board goes; an operator marks the locker for replacement and
	// the new board provisions with a fresh claim of the site.
	e.sim.Close()
	patchLocker(t, e.tg, p.Locker, map[string]bool{"replaceable": true})
	_, claim := newClaim(t, e.tg, map[string]any{"site": "store-042", "uses": 1, "expires_in_s": 600})
	sim := MustFleet(t, e.tg, claim, 1)
	l := sim.Lockers()[0]
	newID, _ := l.Identity()
	if l.DeviceID() != p.Locker || string(newID.CredKey) == string(oldID.CredKey) {
		t.Fatalf("new board: locker %s (want %s), cred_key changed %v", l.DeviceID(), p.Locker, string(newID.CredKey) != string(oldID.CredKey))
	}
	e.waitCreds(t, p.Locker)
	if r := l.EnterCode(ready.Credential.Code); !r.Accepted || len(r.Compartments) != 1 || r.Compartments[0] != p.Compartment {
		t.Fatalf("the driver's code on the new board: %+v", r)
	}
	e.waitState(t, p.ID, pickup.PickedUp)
}

// TestPickupRotateCodes: rotating a locker's codes gives every ready order a
// new credential of the same kind; the old codes stop opening, the new ones
// open, and the platform's webhook, which asked for
// pickup.credential_changed, is told each new code; a webhook that asked
// only for pickup.ready is not sent that event (api-v1: a webhook gets the
// events it lists). One code never spans two platforms' orders.
func TestPickupRotateCodes(t *testing.T) {
	ctx := context.Background()
	e := newPickupEnv(t, 1, 0)
	storeRC, srv := newReceiver(t, 0)
	var wh struct {
		Secret string `json:"secret"`
	}
	if err := e.store.Post(ctx, "/v1/webhooks", map[string]any{"url": srv.URL, "events": []string{pickup.EventReady}}, &wh); err != nil {
		t.Fatal(err)
	}
	storeRC.secret = wh.Secret
	single := e.create(t, "R-1", "M", time.Hour)
	b, c := e.create(t, "R-2", "S", time.Hour), e.create(t, "R-3", "S", time.Hour)
	old := e.waitState(t, single.ID, pickup.Ready).Credential
	e.waitState(t, b.ID, pickup.Ready)
	e.waitState(t, c.ID, pickup.Ready)
	var combined pickup.CredentialView
	if err := e.platform.Post(ctx, "/v1/credentials", map[string]any{"pickups": []string{b.ID, c.ID}, "kind": "pin"}, &combined); err != nil {
		t.Fatal(err)
	}
	// The combined code replaced b's and c's own: the platform is told.
	var sinceCombine int
	Eventually(t, 20*time.Second, "pickup.credential_changed for the combined orders", func() error {
		e.rc.mu.Lock()
		defer e.rc.mu.Unlock()
		got := map[string]string{}
		for _, ev := range e.rc.events {
			if ev["type"] == pickup.EventCredentialChanged {
				data := ev["data"].(map[string]any)
				cred, _ := data["credential"].(map[string]any)
				code, _ := cred["code"].(string)
				got[data["pickup"].(string)] = code
			}
		}
		if got[b.ID] != combined.Code || got[c.ID] != combined.Code || len(got) != 2 {
			return fmt.Errorf("codes announced %v, want %s for %s and %s", got, combined.Code, b.ID, c.ID)
		}
		sinceCombine = len(e.rc.events)
		return nil
	})
	var other pickup.Pickup
	if err := e.store.Post(ctx, "/v1/pickups", map[string]any{"site": "store-042", "order_ref": "R-9", "size": "S", "zone": "ambient",
		"recipient": map[string]string{"kind": "driver", "platform": "rapid"}, "expires_at": time.Now().Add(time.Hour)}, &other); err != nil {
		t.Fatal(err)
	}
	Eventually(t, 15*time.Second, "rapid's pickup ready", func() error {
		if err := e.store.Get(ctx, "/v1/pickups/"+other.ID, nil, &other); err != nil || other.State != pickup.Ready {
			return fmt.Errorf("state %s (%v)", other.State, err)
		}
		return nil
	})
	status, err := e.store.Do(ctx, client.Request{Method: "POST", Path: "/v1/credentials",
		Body: map[string]any{"pickups": []string{b.ID, other.ID}}}, nil)
	if status != http.StatusUnprocessableEntity {
		t.Fatalf("one code for two platforms' orders: status %d (%v), want 422", status, err)
	}
	locker := single.Locker
	var out struct {
		Locker  string `json:"locker"`
		Rotated int    `json:"rotated"`
	}
	if err := e.store.Post(ctx, "/v1/lockers/"+locker+"/rotate-codes", nil, &out); err != nil || out.Locker != locker || out.Rotated != 3 {
		t.Fatalf("rotate: %+v, %v; want 3 credentials (two single, one combined)", out, err)
	}
	e.waitCreds(t, locker)
	l := e.sim.Lockers()[0]
	for _, code := range []string{old.Code, old.QR, combined.Code} {
		if r := l.EnterCode(code); r.Accepted {
			t.Fatalf("an old code still opens after the rotation: %+v", r)
		}
	}

	// The new codes: through the API and the webhook, the same.
	fresh := e.waitState(t, single.ID, pickup.Ready).Credential
	if fresh == nil || fresh.Code == "" || fresh.QR == "" || fresh.Code == old.Code || fresh.QR == old.QR || !fresh.NotAfter.Equal(old.NotAfter) {
		t.Fatalf("credential after the rotation %+v, before %+v; want new codes of both kinds, same expiry", fresh, old)
	}
	var changed map[string]map[string]any // pickup → credential
	Eventually(t, 20*time.Second, "pickup.credential_changed for speedy's three orders", func() error {
		changed = map[string]map[string]any{}
		e.rc.mu.Lock()
		defer e.rc.mu.Unlock()
		for _, ev := range e.rc.events[sinceCombine:] {
			if ev["type"] == pickup.EventCredentialChanged {
				data := ev["data"].(map[string]any)
				cred, _ := data["credential"].(map[string]any)
				changed[data["pickup"].(string)] = cred
			}
		}
		if len(changed) != 3 {
			return fmt.Errorf("events for %d pickups", len(changed)) // rapid's goes to rapid only
		}
		return nil
	})
	if got := changed[single.ID]; got["code"] != fresh.Code || got["qr"] != fresh.QR {
		t.Fatalf("webhook credential %v, API %+v", got, fresh)
	}
	// Queued for every webhook in the statement that queued the platform's.
	if n := e.tg.Count(t, `SELECT count(*) FROM webhook_deliveries d JOIN webhooks w ON w.id = d.webhook_id
		WHERE w.url = $1 AND d.type = $2`, srv.URL, pickup.EventCredentialChanged); n != 0 || storeRC.event(pickup.EventCredentialChanged) != nil {
		t.Fatalf("the store's pickup.ready webhook got %d pickup.credential_changed events, want none", n)
	}
	pin, _ := changed[b.ID]["code"].(string)
	if _, hasQR := changed[b.ID]["qr"]; pin == "" || pin == combined.Code || hasQR || changed[c.ID]["code"] != pin {
		t.Fatalf("combined credential after the rotation: %v and %v; want one new PIN, no QR token", changed[b.ID], changed[c.ID])
	}
	if r := l.EnterCode(pin); !r.Accepted || len(r.Compartments) != 2 {
		t.Fatalf("the new combined PIN: %+v", r)
	}
	if r := l.EnterCode(fresh.Code); !r.Accepted || len(r.Compartments) != 1 || r.Compartments[0] != single.Compartment {
		t.Fatalf("the new PIN: %+v", r)
	}
	for _, id := range []string{single.ID, b.ID, c.ID} {
		e.waitState(t, id, pickup.PickedUp)
	}
	if err := e.store.Post(ctx, "/v1/pickups/"+other.ID+"/cancel", nil, nil); err != nil {
		t.Fatal(err)
	}

	// Audited; nothing left to rotate is 0; no such locker is a 404.
	var audit struct {
		Items []fleet.AuditEntry `json:"items"`
	}
	if err := e.tg.Admin.Get(ctx, "/v1/audit", url.Values{"locker": {locker}}, &audit); err != nil {
		t.Fatal(err)
	}
	if !slices.ContainsFunc(audit.Items, func(a fleet.AuditEntry) bool {
		return a.Action == "locker.rotate_codes" && a.Actor == "store:front-desk"
	}) {
		t.Fatalf("no locker.rotate_codes audit entry by the store in %+v", audit.Items)
	}
	if err := e.store.Post(ctx, "/v1/lockers/"+locker+"/rotate-codes", nil, &out); err != nil || out.Rotated != 0 {
		t.Fatalf("rotate with no live codes: %+v, %v; want 0", out, err)
	}
	status, err = e.store.Do(ctx, client.Request{Method: "POST", Path: "/v1/lockers/lk-none/rotate-codes"}, nil)
	if status != http.StatusNotFound {
		t.Fatalf("rotate codes of no locker: status %d (%v), want 404", status, err)
	}
}

// TestSilentLockerIsTheLastChoice: a locker whose session looks alive but
// that has not been heard from for longer than the silence bound (it shows
// stale: its firmware may be hung) gets new pickups only when no locker
// heard from since has room: the contract asks only that the locker be
// online, and a 422 with an online locker free would break it. Any message
// from the locker counts as hearing from it, not health only: a command
// result makes the silent locker fresh again, and moves its last_seen.
func TestSilentLockerIsTheLastChoice(t *testing.T) {
	ctx := context.Background()
	// The lockers send nothing after their connect and one result: silent
	// after 3 health intervals, which must outlast the test's steps.
	tg := MustStart(t, func(o *gateway.Options) { o.Config.HealthIntervalS = 30 })
	claim := tg.MustSiteAndClaim(t, "store-042", 2)
	var ids []string
	devs := map[string]paho.Client{}
	for _, serial := range []string{"SN-SILENT-1", "SN-SILENT-2"} {
		id := MustProvision(t, tg, claim, serial)
		devs[id.DeviceID] = MustConnect(t, tg.MQTTAddr(), id.DeviceID, id.DeviceID, id.Password)
		waitOnline(t, tg, id.DeviceID, true)
		ids = append(ids, id.DeviceID)
	}
	// Without a preference the lower id (in the database's order) wins a
	// tie: that one goes silent.
	if err := tg.DB().Pool().QueryRow(ctx, `SELECT array_agg(id ORDER BY id) FROM devices WHERE id = ANY($1)`, ids).Scan(&ids); err != nil {
		t.Fatal(err)
	}
	silent, heard := ids[0], ids[1]
	silence := func(id string) {
		t.Helper()
		// Silent for an hour, as far as the gateway knows.
		if _, err := tg.DB().Pool().Exec(ctx, `UPDATE devices SET last_seen = now() - interval '1 hour' WHERE id = $1`, id); err != nil {
			t.Fatal(err)
		}
	}
	silence(silent)
	store := MustPickupToken(t, tg, "store", "store-042", "front-desk")
	// order returns the answer's status and locker, and whether the answer
	// says the locker is silent.
	order := func(ref string) (status int, locker string, quiet bool, err error) {
		var p struct {
			Locker       string
			LockerSilent bool `json:"locker_silent"`
		}
		status, err = store.Do(ctx, client.Request{Method: "POST", Path: "/v1/pickups", Body: map[string]any{
			"site": "store-042", "order_ref": ref, "size": "S", "recipient": map[string]string{"kind": "customer"}}}, &p)
		return status, p.Locker, p.LockerSilent, err
	}
	if status, locker, quiet, err := order("SILENT-1"); status != http.StatusCreated || locker != heard || quiet {
		t.Fatalf("order with a silent and a heard locker: %d at %q, locker_silent %t (%v), want 201 at %s, not silent", status, locker, quiet, err, heard)
	}
	silence(heard)
	if status, locker, quiet, err := order("SILENT-2"); status != http.StatusCreated || locker != silent || !quiet {
		t.Fatalf("order with only silent lockers online: %d at %q, locker_silent %t (%v), want 201 at %s (the lower id), silent",
			status, locker, quiet, err, silent)
	}

	// Both silent: the tie went to the lower id. A command result (of no
	// command: dropped, but the locker spoke) makes the other fresh again.
	MustPublish(t, devs[heard], protocol.Topic(heard, protocol.ChanCmdResult), false, `{"id":"c-none","status":"ok"}`)
	Eventually(t, 10*time.Second, "the locker heard from again", func() error {
		var l fleet.Locker
		if err := tg.Admin.Get(ctx, "/v1/lockers/"+heard, nil, &l); err != nil {
			return err
		}
		if l.Stale || l.LastSeen == nil || time.Since(*l.LastSeen) > time.Minute {
			return fmt.Errorf("stale %v, last_seen %v", l.Stale, l.LastSeen)
		}
		return nil
	})
	if status, locker, quiet, err := order("SILENT-3"); status != http.StatusCreated || locker != heard || quiet {
		t.Fatalf("order once a locker spoke again: %d at %q, locker_silent %t (%v), want 201 at %s, not silent", status, locker, quiet, err, heard)
	}
}

// TestCancelledStagingUnlockWithdrawn: a pickup cancelled before its
// locker answered the staging unlock takes the unlock back. It is not sent
// again (by the resend, or at the locker's next connect), and the
// compartment goes to no other order while the unlock could still fire on
// a locker that held a copy, until it expires: else another platform's
// order, staged there meanwhile, could be opened by the cancelled order's
// unlock, with no code used.
func TestCancelledStagingUnlockWithdrawn(t *testing.T) {
	ctx := context.Background()
	// Long enough for the steps that need the withdrawn unlock valid on a
	// slow machine; the test waits it out at the end.
	const ttl = 20 * time.Second
	tg := MustStart(t, func(o *gateway.Options) {
		o.CommandResend = 100 * time.Millisecond
		o.StagingTTL = ttl
	})
	r, c := rawLocker(t, tg, "SN-STAGE-1")
	got := subscribeCommands(t, c, r.DeviceID)
	publishBirth(t, tg, c, r.DeviceID)
	store := MustPickupToken(t, tg, "store", "s1", "front-desk")
	create := func(ref string) (pickup.Pickup, int) {
		t.Helper()
		var p pickup.Pickup
		status, err := store.Do(ctx, client.Request{Method: "POST", Path: "/v1/pickups", Body: map[string]any{
			"site": "s1", "order_ref": ref, "size": "S", "zone": "ambient", "recipient": map[string]string{"kind": "customer"}}}, &p)
		if status != http.StatusCreated && status != http.StatusUnprocessableEntity {
			t.Fatalf("create %s: %d %v", ref, status, err)
		}
		return p, status
	}
	// The checks below can only fail while the withdrawn unlock is valid.
	valid := func(until time.Time, what string) {
		t.Helper()
		if !time.Now().Before(until) {
			t.Fatalf("%s came after the withdrawn unlock expired (the machine is too slow for this test's %v)", what, ttl)
		}
	}

	// The staging unlock reaches the locker, which does not answer it.
	first, _ := create("RACE-1")
	wantCommand(t, got, first.CommandID, "the staging unlock")
	if err := store.Post(ctx, "/v1/pickups/"+first.ID+"/cancel", nil, nil); err != nil {
		t.Fatal(err)
	}
	waitCommandStatus(t, tg, r.DeviceID, first.CommandID, fleet.CmdTimedOut, "the staging unlock withdrawn")
	var cmd fleet.Command
	if err := tg.Admin.Get(ctx, "/v1/lockers/"+r.DeviceID+"/commands/"+first.CommandID, nil, &cmd); err != nil || cmd.Error != "withdrawn: pickup cancelled" {
		t.Fatalf("the withdrawn unlock reads %+v (%v), want error %q", cmd, err, "withdrawn: pickup cancelled")
	}
	if cmd.DoneAt == nil || !cmd.DoneAt.Before(cmd.ExpiresAt) {
		t.Fatalf("the unlock ended at %v, not before it expired at %v: not withdrawn", cmd.DoneAt, cmd.ExpiresAt)
	}
	// Counted as it ended, by the cancel (the fleet manager ended nothing).
	if n, err := tg.Metric(`lockergate_commands_total{status="timed_out",type="unlock"}`); err != nil || n != 1 {
		t.Fatalf("unlocks counted as timed_out: %v (%v), want 1", n, err)
	}

	// At the next connect the open commands are sent, then a command made
	// after that: the withdrawn unlock would come first. (Repeats of it
	// sent before the cancel stay with the old connection's channel.)
	c.Disconnect(50)
	waitOnline(t, tg, r.DeviceID, false)
	c = MustConnect(t, tg.MQTTAddr(), r.DeviceID, r.DeviceID, r.Password)
	got = subscribeCommands(t, c, r.DeviceID)
	publishBirthHandled(t, tg, c, r.DeviceID)
	var marker fleet.Command
	if err := tg.Admin.Post(ctx, "/v1/lockers/"+r.DeviceID+"/commands", map[string]any{"type": "unlock", "compartment": 4}, &marker); err != nil {
		t.Fatal(err)
	}
	wantCommand(t, got, marker.ID, "the command after the connect")
	valid(cmd.ExpiresAt, "the connect")

	// Its compartment (1, the one small ambient one) is not allocated while
	// the unlock is valid: the next order gets 2 (M), and one more none.
	second, _ := create("RACE-2")
	if second.Compartment == first.Compartment {
		t.Fatalf("RACE-2 got compartment %d, whose withdrawn unlock has not expired", second.Compartment)
	}
	if _, status := create("RACE-3"); status != http.StatusUnprocessableEntity {
		t.Fatalf("RACE-3: %d, want 422 (no compartment free of an unlock in flight)", status)
	}
	valid(cmd.ExpiresAt, "the allocations")
	// The marker, unanswered, is resent every second from 100 ms on.
	wantCommand(t, got, second.CommandID, "RACE-2's staging unlock", marker.ID)
	publishResult(t, c, r.DeviceID, second.CommandID)
	waitCommandStatus(t, tg, r.DeviceID, second.CommandID, fleet.CmdOK, "RACE-2's unlock answered")

	// Once the withdrawn unlock has expired, its compartment is free again.
	Eventually(t, ttl+10*time.Second, "compartment 1 allocated after the unlock expired", func() error {
		p, status := create("RACE-4")
		if status != http.StatusCreated {
			return fmt.Errorf("%d", status)
		}
		if p.Compartment != first.Compartment {
			t.Fatalf("RACE-4 got compartment %d, want %d", p.Compartment, first.Compartment)
		}
		return nil
	})

	// A late answer to the withdrawn unlock is taken (the door may have
	// opened), and counted apart: the unlock was counted when withdrawn.
	publishResult(t, c, r.DeviceID, first.CommandID)
	waitCommandStatus(t, tg, r.DeviceID, first.CommandID, fleet.CmdOK, "the withdrawn unlock answered late")
	// Counted after the answer's commit, which the status shows.
	for series, want := range map[string]float64{
		`lockergate_commands_total{status="ok",type="unlock"}`:             1, // RACE-2's
		`lockergate_command_late_answers_total{status="ok",type="unlock"}`: 1,
	} {
		tg.WaitMetric(t, 10*time.Second, series, want)
	}
}

// TestCombinedCodeOpensOneDoor: a combined code whose use the locker
// reports with only one of its two compartments opened (the other's door
// jammed). The code is spent, so the other pickup's driver could not open
// it again: it stays ready with a fresh code (what its platform reads, and
// is sent as pickup.credential_changed) and staff get pickup_not_opened.
// The opened one is collected as usual. A locker that reports the door's
// opening first is judged the same by its code_accepted.
func TestCombinedCodeOpensOneDoor(t *testing.T) {
	for _, doorFirst := range []bool{false, true} {
		t.Run(fmt.Sprintf("doorFirst=%v", doorFirst), func(t *testing.T) {
			ctx := context.Background()
			e := newPickupEnv(t, 1, 0)
			opened, jammed, dev, topic := e.twoReadyThenRaw(t, "JAM-1", "JAM-2")
			var cred pickup.CredentialView
			if err := e.platform.Post(ctx, "/v1/credentials", map[string]any{"pickups": []string{opened.ID, jammed.ID}}, &cred); err != nil {
				t.Fatal(err)
			}
			at := time.Now()
			send := func(id, body string) {
				t.Helper()
				at = at.Add(time.Second)
				MustPublish(t, dev, topic, false, fmt.Sprintf(`{"id":"%s","ts":"%s",%s}`, id, protocol.FormatTime(at), body))
			}
			if doorFirst {
				send("e-jam-open", fmt.Sprintf(`"type":"door_opened","compartment":%d,"by":"credential","credential":"%s"`, opened.Compartment, cred.ID+".p"))
			}
			send("e-jam-code", fmt.Sprintf(`"type":"code_accepted","credential":"%s","compartments":[%d]`, cred.ID+".p", opened.Compartment))
			var got pickup.Pickup
			Eventually(t, 10*time.Second, "a fresh code for the pickup whose door did not open", func() error {
				if err := e.platform.Get(ctx, "/v1/pickups/"+jammed.ID, nil, &got); err != nil {
					return err
				}
				if got.State != pickup.Ready || got.Credential == nil || got.Credential.ID == cred.ID || got.Credential.Code == "" {
					return fmt.Errorf("pickup %s with credential %+v, want ready with a fresh code (not %s)", got.State, got.Credential, cred.ID)
				}
				return nil
			})
			if n := e.openAlerts(t, jammed, pickup.AlertNotOpened); n != 1 {
				t.Fatalf("%d pickup_not_opened alerts, want 1", n)
			}
			if s := e.tg.Count(t, `SELECT count(*) FROM credentials WHERE id = $1 AND state = 'active' AND compartments = ARRAY[$2::int]`,
				got.Credential.ID, jammed.Compartment); s != 1 {
				t.Fatalf("fresh credential %s not active for compartment %d alone", got.Credential.ID, jammed.Compartment)
			}
			if n := e.openAlerts(t, opened, pickup.AlertNotOpened); n != 0 {
				t.Fatalf("%d pickup_not_opened alerts for the compartment that opened", n)
			}
			var detail string
			if err := e.tg.DB().Pool().QueryRow(ctx, `SELECT detail FROM alerts WHERE kind = 'pickup_not_opened'`).Scan(&detail); err != nil ||
				!strings.Contains(detail, jammed.ID) || !strings.Contains(detail, fmt.Sprintf("compartment %d", jammed.Compartment)) {
				t.Fatalf("alert detail %q (%v), want the pickup and its compartment named", detail, err)
			}
			send("e-jam-close", fmt.Sprintf(`"type":"door_closed","compartment":%d,"occupied":false`, opened.Compartment))
			e.waitState(t, opened.ID, pickup.PickedUp)
			if err := e.platform.Get(ctx, "/v1/pickups/"+jammed.ID, nil, &got); err != nil || got.State != pickup.Ready {
				t.Fatalf("jammed pickup %s (%v) after the other's collection, want ready", got.State, err)
			}
			if n, err := e.tg.Metric(`lockergate_pickup_alerts_total{kind="pickup_not_opened"}`); err != nil || n != 1 {
				t.Fatalf(`lockergate_pickup_alerts_total{kind="pickup_not_opened"} = %v (%v), want 1`, n, err)
			}
		})
	}
}

// TestStoreRequestEdges: a store's pickup without a site is made at its
// site; a command of no known type is a 400 for a store as for anyone (the
// request is wrong, not the role); a webhook's repeated event types are
// kept once.
func TestStoreRequestEdges(t *testing.T) {
	ctx := context.Background()
	e := newPickupEnv(t, 1, 0)
	var p pickup.Pickup
	if err := e.store.Post(ctx, "/v1/pickups", map[string]any{"order_ref": "NOSITE-1", "size": "S", "zone": "ambient",
		"recipient": map[string]string{"kind": "driver", "platform": "speedy"}, "expires_at": time.Now().Add(time.Hour)}, &p); err != nil || p.Site != "store-042" {
		t.Fatalf("a store's pickup without a site: %+v, %v; want it at store-042", p, err)
	}
	status, err := e.store.Do(ctx, client.Request{Method: "POST", Path: "/v1/lockers/" + p.Locker + "/commands",
		Body: map[string]any{"type": "bogus", "compartment": 1}}, nil)
	var pe *client.Error
	if status != http.StatusBadRequest || !errors.As(err, &pe) || !strings.Contains(pe.Detail, `type "bogus": want unlock, set_service or reboot`) {
		t.Fatalf("a store's command of no known type: %d %v, want 400 naming the types", status, err)
	}
	var wh struct {
		Events []string `json:"events"`
	}
	if err := e.store.Post(ctx, "/v1/webhooks", map[string]any{"url": "http://127.0.0.1:9/hooks", "events": []string{"pickup.ready", "pickup.ready", "pickup.expired"}}, &wh); err != nil ||
		!slices.Equal(wh.Events, []string{"pickup.ready", "pickup.expired"}) {
		t.Fatalf("a webhook with a repeated event type: %v, %v; want each once, in order", wh.Events, err)
	}
}

// TestOneCodeOneCustomer: one code for several pickups goes to one person.
// A store may give one customer's orders one code, not two customers'
// (Alice's code would open Bob's compartment), nor an unnamed customer's
// with another's.
func TestOneCodeOneCustomer(t *testing.T) {
	ctx := context.Background()
	e := newPickupEnv(t, 1, 0)
	customer := func(ref, name string) pickup.Pickup {
		t.Helper()
		var p pickup.Pickup
		if err := e.store.Post(ctx, "/v1/pickups", map[string]any{"site": "store-042", "order_ref": ref, "size": "S", "zone": "ambient",
			"recipient": map[string]string{"kind": "customer", "name": name}, "expires_at": time.Now().Add(time.Hour)}, &p); err != nil {
			t.Fatalf("create %s: %v", ref, err)
		}
		return p
	}
	ready := func(p pickup.Pickup) pickup.Pickup { // read by the store: no platform sees a customer's pickup
		t.Helper()
		Eventually(t, 15*time.Second, "pickup "+p.OrderRef+" ready", func() error {
			if err := e.store.Get(ctx, "/v1/pickups/"+p.ID, nil, &p); err != nil || p.State != pickup.Ready {
				return fmt.Errorf("state %s (%v)", p.State, err)
			}
			return nil
		})
		return p
	}
	a1, a2, bob, anon := customer("CU-1", "Alice"), customer("CU-2", "Alice"), customer("CU-3", "Bob"), customer("CU-4", "")
	for _, p := range []pickup.Pickup{a1, a2, bob, anon} {
		ready(p)
	}
	for _, c := range []struct {
		what string
		ids  []string
	}{{"Alice's and Bob's", []string{a1.ID, bob.ID}}, {"Alice's and an unnamed customer's", []string{a2.ID, anon.ID}}} {
		status, err := e.store.Do(ctx, client.Request{Method: "POST", Path: "/v1/credentials", Body: map[string]any{"pickups": c.ids}}, nil)
		if status != http.StatusUnprocessableEntity || err == nil || !strings.Contains(err.Error(), "one code goes to one person") {
			t.Fatalf("one code for %s orders: %d %v, want 422 saying one code goes to one person", c.what, status, err)
		}
	}
	var cred pickup.CredentialView
	if err := e.store.Post(ctx, "/v1/credentials", map[string]any{"pickups": []string{a1.ID, a2.ID}}, &cred); err != nil || len(cred.Compartments) != 2 {
		t.Fatalf("one code for Alice's two orders: %+v %v", cred, err)
	}
	for _, p := range []pickup.Pickup{bob, anon} {
		if got := ready(p); got.Credential == nil || got.Credential.Code == cred.Code {
			t.Fatalf("%s's credential %+v after the refused combinations, want its own", p.OrderRef, got.Credential)
		}
	}
}

// TestCodeOpeningBeyondItsCompartments: a combined code narrowed to one
// pickup (the other cancelled) while the locker had not applied the set
// opens both compartments there. The live pickup is picked up, the other
// compartment raises code_not_live (the code was not live for it: another
// order could be inside), and the use's audit entry lists both.
func TestCodeOpeningBeyondItsCompartments(t *testing.T) {
	ctx := context.Background()
	e := newPickupEnv(t, 1, 0)
	l := e.sim.Lockers()[0]
	a, b := e.create(t, "NB-1", "S", time.Hour), e.create(t, "NB-2", "S", time.Hour)
	a, b = e.waitState(t, a.ID, pickup.Ready), e.waitState(t, b.ID, pickup.Ready)
	var cred pickup.CredentialView
	if err := e.platform.Post(ctx, "/v1/credentials", map[string]any{"pickups": []string{a.ID, b.ID}, "kind": "pin"}, &cred); err != nil {
		t.Fatal(err)
	}
	e.waitCreds(t, a.Locker)
	l.HoldCreds() // the set narrowing the code to NB-1 does not reach the locker
	if err := e.platform.Post(ctx, "/v1/pickups/"+b.ID+"/cancel", nil, nil); err != nil {
		t.Fatalf("cancel: %v", err)
	}
	r := l.EnterCode(cred.Code)
	if !r.Accepted || len(r.Compartments) != 2 {
		t.Fatalf("the combined code at the locker holding the older set: %+v, want both compartments opened", r)
	}
	e.waitState(t, a.ID, pickup.PickedUp)
	Eventually(t, 10*time.Second, "code_not_live at the cancelled order's compartment", func() error {
		if n := e.tg.Count(t, `SELECT count(*) FROM alerts WHERE device_id = $1 AND kind = 'code_not_live' AND compartment = $2
			AND cleared_at IS NULL`, b.Locker, b.Compartment); n != 1 {
			return fmt.Errorf("%d open", n)
		}
		return nil
	})
	if n := e.tg.Count(t, `SELECT count(*) FROM alerts WHERE device_id = $1 AND kind = 'code_not_live' AND compartment = $2`,
		a.Locker, a.Compartment); n != 0 {
		t.Fatalf("code_not_live at the live pickup's compartment %d", a.Compartment)
	}
	if n := e.tg.Count(t, `SELECT count(*) FROM audit WHERE action = 'credential.use' AND locker = $1
		AND detail->>'credential' = $2 AND detail->'compartments' @> $3::jsonb AND jsonb_array_length(detail->'compartments') = 2`,
		a.Locker, cred.ID, fmt.Sprintf("[%d,%d]", a.Compartment, b.Compartment)); n != 1 {
		t.Fatalf("audit entries of the use listing both compartments: %d, want 1", n)
	}
}
