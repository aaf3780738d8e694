package gateway_test

import (
	"context"
	"fmt"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/lockergate/lockergate/client"
	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/gateway"
	"github.com/lockergate/lockergate/pickup"
	"github.com/lockergate/lockergate/protocol"
	"github.com/lockergate/lockergate/webhook"
)

// TestDoorFaultRecoveredWhileGatewayDown: a door_fault alert open when the
// gateway stopped is cleared by the locker's first health without the fault
// after the restart (the gateway no longer remembers the fault list).
func TestDoorFaultRecoveredWhileGatewayDown(t *testing.T) {
	var opts gateway.Options
	tg := MustStart(t, func(o *gateway.Options) { opts = *o })
	claim := tg.MustSiteAndClaim(t, "s1", 1)
	id := MustProvision(t, tg, claim, "SN-AL-FAULT")
	health := func(tg *TestGateway, seq int, faults string) {
		t.Helper()
		dev := MustConnect(t, tg.MQTTAddr(), id.DeviceID, id.DeviceID, id.Password)
		MustPublish(t, dev, protocol.Topic(id.DeviceID, protocol.ChanHealth), false,
			fmt.Sprintf(`{"seq":%d,"ts":"%s","uptime_s":5%s}`, seq, protocol.FormatTime(time.Now()), faults))
		dev.Disconnect(250)
	}
	open := func(tg *TestGateway, want int) {
		t.Helper()
		Eventually(t, 10*time.Second, fmt.Sprintf("%d door_fault alerts open", want), func() error {
			if n := tg.Count(t, `SELECT count(*) FROM alerts WHERE device_id = $1 AND kind = 'door_fault' AND cleared_at IS NULL`, id.DeviceID); n != want {
				return fmt.Errorf("%d open", n)
			}
			return nil
		})
	}
	health(tg, 1, `,"door_faults":[4]`)
	open(tg, 1)
	tg.Stop(t)
	tg = MustRun(t, opts)
	health(tg, 1, `,"door_faults":[]`)
	open(tg, 0)
}

// TestAlerts: events and health raise alerts once while the condition lasts,
// and clear them when it ends.
func TestAlerts(t *testing.T) {
	ctx := context.Background()
	tg := MustStart(t)
	claim := tg.MustSiteAndClaim(t, "s1", 1)
	id := MustProvision(t, tg, claim, "SN-AL-1")
	dev := MustConnect(t, tg.MQTTAddr(), id.DeviceID, id.DeviceID, id.Password)
	n := 0
	pub := func(ch protocol.Channel, payload string) {
		t.Helper()
		n++
		MustPublish(t, dev, protocol.Topic(id.DeviceID, ch), false, fmt.Sprintf(payload, n, protocol.FormatTime(time.Now())))
	}
	open := func(kind string) func() (int, error) {
		return func() (int, error) {
			var c int
			err := tg.DB().Pool().QueryRow(ctx, `SELECT count(*) FROM alerts WHERE device_id = $1 AND kind = $2 AND cleared_at IS NULL`, id.DeviceID, kind).Scan(&c)
			return c, err
		}
	}
	wait := func(what string, f func() (int, error), want int) {
		t.Helper()
		Eventually(t, 10*time.Second, what, func() error {
			got, err := f()
			if err == nil && got != want {
				err = fmt.Errorf("got %d, want %d", got, want)
			}
			return err
		})
	}
	// Door ajar twice on one compartment, once on another: two open alerts.
	pub(protocol.ChanEvents, `{"id":"e-%d","ts":"%s","type":"door_ajar","compartment":2,"open_s":130}`)
	pub(protocol.ChanEvents, `{"id":"e-%d","ts":"%s","type":"door_ajar","compartment":2,"open_s":190}`)
	pub(protocol.ChanEvents, `{"id":"e-%d","ts":"%s","type":"door_ajar","compartment":3,"open_s":130}`)
	wait("door_ajar open", open("door_ajar"), 2)
	// The one reported twice says so, with the latest report's detail.
	latest := func(kind string) (repeats int, detail string) {
		t.Helper()
		if err := tg.DB().Pool().QueryRow(ctx, `SELECT repeats, detail FROM alerts WHERE device_id = $1 AND kind = $2 AND cleared_at IS NULL
			ORDER BY coalesce(compartment, 0) LIMIT 1`, id.DeviceID, kind).Scan(&repeats, &detail); err != nil {
			t.Fatal(err)
		}
		return repeats, detail
	}
	if repeats, detail := latest("door_ajar"); repeats != 1 || detail != "open 190 s" {
		t.Fatalf("door_ajar reported twice: repeats %d, detail %q; want 1, the latest (open 190 s)", repeats, detail)
	}
	pub(protocol.ChanEvents, `{"id":"e-%d","ts":"%s","type":"door_closed","compartment":2,"occupied":false}`)
	wait("door_ajar 2 cleared", open("door_ajar"), 1)

	pub(protocol.ChanEvents, `{"id":"e-%d","ts":"%s","type":"power","source":"battery"}`)
	wait("on_battery", open("on_battery"), 1)
	pub(protocol.ChanEvents, `{"id":"e-%d","ts":"%s","type":"power","source":"mains"}`)
	wait("on_battery cleared", open("on_battery"), 0)

	pub(protocol.ChanHealth, `{"seq":%d,"ts":"%s","uptime_s":5,"door_faults":[1,4]}`)
	pub(protocol.ChanHealth, `{"seq":%d,"ts":"%s","uptime_s":6,"door_faults":[1,4]}`)
	wait("door faults", open("door_fault"), 2)
	pub(protocol.ChanHealth, `{"seq":%d,"ts":"%s","uptime_s":7,"door_faults":[4]}`)
	wait("door fault 1 cleared", open("door_fault"), 1)
	// Cleared by the gateway, their conditions ended: it says so.
	var cleared, byGateway int
	if err := tg.DB().Pool().QueryRow(ctx, `SELECT count(*), count(*) FILTER (WHERE cleared_by = 'gateway') FROM alerts
		WHERE device_id = $1 AND cleared_at IS NOT NULL`, id.DeviceID).Scan(&cleared, &byGateway); err != nil || cleared != 3 || byGateway != 3 {
		t.Fatalf("%d alerts cleared, %d by the gateway (%v); want door_ajar 2, on_battery, door_fault 1, all by the gateway", cleared, byGateway, err)
	}

	// A tamper reported again while its alert is open adds to it; once
	// staff cleared it, the next opens a new one.
	pub(protocol.ChanEvents, `{"id":"e-%d","ts":"%s","type":"tamper","detail":"lid"}`)
	pub(protocol.ChanEvents, `{"id":"e-%d","ts":"%s","type":"tamper","detail":"door forced"}`)
	Eventually(t, 10*time.Second, "the second tamper added to the first", func() error {
		if repeats, detail := latest("tamper"); repeats != 1 || detail != "door forced" {
			return fmt.Errorf("repeats %d, detail %q", repeats, detail)
		}
		return nil
	})
	var alertID string
	if err := tg.DB().Pool().QueryRow(ctx, `SELECT id::text FROM alerts WHERE device_id = $1 AND kind = 'tamper'`, id.DeviceID).Scan(&alertID); err != nil {
		t.Fatal(err)
	}
	if err := tg.Admin.Post(ctx, "/v1/alerts/"+alertID+"/clear", nil, nil); err != nil {
		t.Fatal(err)
	}
	pub(protocol.ChanEvents, `{"id":"e-%d","ts":"%s","type":"tamper","detail":"lid"}`)
	wait("a new tamper alert after the clear", open("tamper"), 1)
	if n := tg.Count(t, `SELECT count(*) FROM alerts WHERE device_id = $1 AND kind = 'tamper'`, id.DeviceID); n != 2 {
		t.Fatalf("%d tamper alerts, want 2 (the cleared one and the new one)", n)
	}
	// Counted after the alert's commit.
	tg.WaitMetric(t, 10*time.Second, `lockergate_alerts_raised_total{kind="tamper"}`, 2)

	if v, err := tg.Metric(`lockergate_alerts_raised_total{kind="door_fault"}`); err != nil || v != 2 {
		t.Fatalf("door_fault alerts raised: %v (%v), want 2", v, err)
	}
	if v, err := tg.Metric(`lockergate_alerts_raised_total{kind="door_ajar"}`); err != nil || v != 2 {
		t.Fatalf("door_ajar alerts raised: %v (%v), want 2", v, err)
	}

	// Too many rejected codes, from a locker that does not lock its keypad:
	// the gateway counts them by the lockout policy it sends (5 in 5 min).
	for range 4 {
		pub(protocol.ChanEvents, `{"id":"e-%d","ts":"%s","type":"code_rejected","reason":"unknown"}`)
	}
	wait("four rejected codes stored", func() (int, error) {
		var c int
		err := tg.DB().Pool().QueryRow(ctx, `SELECT count(*) FROM events WHERE device_id = $1 AND type = 'code_rejected'`, id.DeviceID).Scan(&c)
		return c, err
	}, 4)
	if c, err := open("code_lockout")(); err != nil || c != 0 {
		t.Fatalf("%d code_lockout alerts open after 4 rejected codes (%v), want none before the 5th", c, err)
	}
	pub(protocol.ChanEvents, `{"id":"e-%d","ts":"%s","type":"code_rejected","reason":"expired"}`)
	wait("code_lockout after the 5th rejected code", open("code_lockout"), 1)
	var lockouts struct {
		Items []struct{ Kind, Detail string }
	}
	if err := tg.Admin.Get(ctx, "/v1/alerts", url.Values{"locker": {id.DeviceID}, "kind": {"code_lockout"}}, &lockouts); err != nil {
		t.Fatal(err)
	}
	if len(lockouts.Items) != 1 || !strings.Contains(lockouts.Items[0].Detail, "5 or more codes rejected within 5m0s") {
		t.Fatalf("code_lockout alerts %+v, want one saying 5 codes rejected within 5 min", lockouts.Items)
	}
	// The keypad's own lockout report adds to it.
	pub(protocol.ChanEvents, `{"id":"e-%d","ts":"%s","type":"code_rejected","reason":"locked_out"}`)
	Eventually(t, 10*time.Second, "the locked_out report added to code_lockout", func() error {
		if repeats, detail := latest("code_lockout"); repeats != 1 || !strings.Contains(detail, "reported by the locker") {
			return fmt.Errorf("repeats %d, detail %q", repeats, detail)
		}
		return nil
	})
	if v, err := tg.Metric(`lockergate_alerts_raised_total{kind="code_lockout"}`); err != nil || v != 1 {
		t.Fatalf("code_lockout alerts raised: %v (%v), want 1", v, err)
	}
}

// TestClockSkewAlert: a birth whose ts is further from the gateway's clock
// than fleet.DefaultMaxClockSkew opens one clock_skew alert (the locker
// judges code and command expiry by that clock); the locker's offset shows
// in the API; a birth within the bound clears the alert, and one without a
// ts tells nothing.
func TestClockSkewAlert(t *testing.T) {
	ctx := context.Background()
	tg := MustStart(t)
	claim := tg.MustSiteAndClaim(t, "s1", 1)
	id := MustProvision(t, tg, claim, "SN-CLK-1")
	dev := MustConnect(t, tg.MQTTAddr(), id.DeviceID, id.DeviceID, id.Password)
	birth := func(payload string) {
		t.Helper()
		MustPublish(t, dev, protocol.Topic(id.DeviceID, protocol.ChanPresence), true, payload)
	}
	offset := func(want func(*int64) error) {
		t.Helper()
		Eventually(t, 10*time.Second, "the locker's clock offset", func() error {
			var l fleet.Locker
			if err := tg.Admin.Get(ctx, "/v1/lockers/"+id.DeviceID, nil, &l); err != nil {
				return err
			}
			return want(l.ClockOffsetMS)
		})
	}
	near := func(want time.Duration) func(*int64) error {
		return func(got *int64) error {
			if got == nil || (time.Duration(*got)*time.Millisecond-want).Abs() > 5*time.Second {
				return fmt.Errorf("clock_offset_ms %v, want about %d", got, want.Milliseconds())
			}
			return nil
		}
	}
	openAlerts := func() []string {
		t.Helper()
		rows, err := tg.DB().Pool().Query(ctx, `SELECT detail FROM alerts WHERE device_id = $1 AND kind = 'clock_skew' AND cleared_at IS NULL`, id.DeviceID)
		if err != nil {
			t.Fatal(err)
		}
		details, err := pgx.CollectRows(rows, pgx.RowTo[string])
		if err != nil {
			t.Fatal(err)
		}
		return details
	}
	// The alert is raised right after the offset is stored.
	waitOpen := func(saying string) {
		t.Helper()
		Eventually(t, 10*time.Second, "one open clock_skew alert saying "+saying, func() error {
			if d := openAlerts(); len(d) != 1 || !strings.Contains(d[0], saying) {
				return fmt.Errorf("open: %q", d)
			}
			return nil
		})
	}

	behind := -10 * time.Minute
	birth(fmt.Sprintf(`{"online":true,"ts":"%s","fw":"1.4.2"}`, protocol.FormatTime(time.Now().Add(behind))))
	offset(near(behind))
	waitOpen(" behind the gateway")
	// Still off at the next birth: the same alert stays open, counted once.
	birth(fmt.Sprintf(`{"online":true,"ts":"%s","fw":"1.4.2"}`, protocol.FormatTime(time.Now().Add(behind+time.Minute))))
	offset(near(behind + time.Minute))
	// A birth without ts: offset unknown, the alert left as it is. (One
	// locker's births are handled in order: once this one is stored, the
	// one before has raised whatever it would.)
	birth(`{"online":true,"fw":"1.4.2"}`)
	offset(func(got *int64) error {
		if got != nil {
			return fmt.Errorf("clock_offset_ms %d after a birth without ts, want none", *got)
		}
		return nil
	})
	if v, err := tg.Metric(`lockergate_alerts_raised_total{kind="clock_skew"}`); err != nil || v != 1 {
		t.Fatalf("clock_skew alerts raised: %v (%v), want 1", v, err)
	}
	// Checked only now: the second skewed birth's raise comes after its
	// offset is stored, and before this birth is.
	if d := openAlerts(); len(d) != 1 {
		t.Fatalf("%d open clock_skew alerts after a second skewed birth and one without ts, want 1", len(d))
	}
	// Set right: cleared.
	birth(fmt.Sprintf(`{"online":true,"ts":"%s","fw":"1.4.2"}`, protocol.FormatTime(time.Now())))
	offset(near(0))
	if d := openAlerts(); len(d) != 0 {
		t.Fatalf("open clock_skew alerts %q after a birth on time, want none", d)
	}
	if n := tg.Count(t, `SELECT count(*) FROM alerts WHERE device_id = $1 AND kind = 'clock_skew' AND cleared_by = 'gateway'`, id.DeviceID); n != 1 {
		t.Fatalf("%d clock_skew alerts cleared by the gateway at the birth on time, want 1", n)
	}
	// Ahead is as wrong as behind.
	birth(fmt.Sprintf(`{"online":true,"ts":"%s","fw":"1.4.2"}`, protocol.FormatTime(time.Now().Add(2*time.Minute))))
	offset(near(2 * time.Minute))
	waitOpen(" ahead of the gateway")
}

// alertPage is a GET /v1/alerts answer.
type alertPage struct {
	Items []fleet.Alert `json:"items"`
	Next  string        `json:"next"`
}

// TestAlertsAPI: alerts raised by lockers at two sites are listed newest
// first with filters and pages; a store sees and clears its site's only;
// a clear is recorded with who did it and audited, and a second one is a
// 409; bad filters are 400s.
func TestAlertsAPI(t *testing.T) {
	ctx := context.Background()
	tg := MustStart(t)
	ajar := `{"id":"e-1","ts":"%s","type":"door_ajar","compartment":2,"open_s":130}`
	tamper := `{"id":"e-2","ts":"%s","type":"tamper","detail":"housing opened"}`
	lockerA := MustLockerEvents(t, tg, tg.MustSiteAndClaim(t, "site-a", 1), "SN-ALA-1", ajar, tamper)
	lockerB := MustLockerEvents(t, tg, tg.MustSiteAndClaim(t, "site-b", 1), "SN-ALB-1", tamper)
	Eventually(t, 10*time.Second, "three alerts", func() error {
		if n := tg.Count(t, `SELECT count(*) FROM alerts`); n != 3 {
			return fmt.Errorf("%d alerts", n)
		}
		return nil
	})
	list := func(c *client.Client, query string) alertPage {
		t.Helper()
		var p alertPage
		q, err := url.ParseQuery(query)
		if err != nil {
			t.Fatal(err)
		}
		if err := c.Get(ctx, "/v1/alerts", q, &p); err != nil {
			t.Fatalf("GET /v1/alerts?%s: %v", query, err)
		}
		return p
	}
	kinds := func(p alertPage) []string {
		var out []string
		for _, a := range p.Items {
			out = append(out, a.Site+"/"+a.Kind)
		}
		return out
	}

	all := list(tg.Admin, "")
	if got, want := kinds(all), []string{"site-b/tamper", "site-a/tamper", "site-a/door_ajar"}; !slices.Equal(got, want) {
		t.Fatalf("admin's list %v, want %v (newest first)", got, want)
	}
	if a := all.Items[2]; a.DeviceID != lockerA || a.Compartment != 2 || a.Detail != "open 130 s" || a.ClearedAt != nil {
		t.Fatalf("door_ajar alert %+v", a)
	}
	// Pages of one.
	first := list(tg.Admin, "limit=1")
	second := list(tg.Admin, "limit=1&after="+first.Next)
	if len(first.Items) != 1 || first.Next == "" || len(second.Items) != 1 || second.Items[0].ID != all.Items[1].ID {
		t.Fatalf("pages %+v then %+v, want the list one by one", first, second)
	}
	if got := kinds(list(tg.Admin, "locker="+lockerB)); !slices.Equal(got, []string{"site-b/tamper"}) {
		t.Fatalf("locker=%s: %v", lockerB, got)
	}
	if got := kinds(list(tg.Admin, "kind=door_ajar&site=site-a")); !slices.Equal(got, []string{"site-a/door_ajar"}) {
		t.Fatalf("kind=door_ajar&site=site-a: %v", got)
	}
	if got := list(tg.Admin, "since="+url.QueryEscape(protocol.FormatTime(time.Now().Add(time.Hour)))); len(got.Items) != 0 {
		t.Fatalf("since an hour from now: %v", kinds(got))
	}

	_, storeA := tg.MustToken(t, "store", "site-a", "front-desk-a")
	_, platform := tg.MustToken(t, "platform", "", "speedy")
	if got := kinds(list(storeA, "")); !slices.Equal(got, []string{"site-a/tamper", "site-a/door_ajar"}) {
		t.Fatalf("site-a store's list %v, want its site's only", got)
	}
	tamperA, tamperB := all.Items[1].ID, all.Items[0].ID
	clear := func(c *client.Client, id string) (int, fleet.Alert, error) {
		var a fleet.Alert
		status, err := c.Do(ctx, client.Request{Method: "POST", Path: "/v1/alerts/" + id + "/clear"}, &a)
		return status, a, err
	}
	for _, tc := range []struct {
		name   string
		c      *client.Client
		path   string
		status int
	}{
		{"another site's list", storeA, "/v1/alerts?site=site-b", 403},
		{"another site's locker", storeA, "/v1/alerts?locker=" + lockerB, 403},
		{"an unknown locker", storeA, "/v1/alerts?locker=lk-none", 200},
		{"a cursor past 2^31 (ids are bigint)", tg.Admin, "/v1/alerts?after=3000000000", 200},
		{"a platform", platform, "/v1/alerts", 403},
		{"an unknown kind", tg.Admin, "/v1/alerts?kind=fire", 400},
		{"open not a bool", tg.Admin, "/v1/alerts?open=maybe", 400},
		{"since not a time", tg.Admin, "/v1/alerts?since=yesterday", 400},
		{"a cursor not from an answer", tg.Admin, "/v1/alerts?after=x", 400},
		{"a limit out of range", tg.Admin, "/v1/alerts?limit=0", 400},
	} {
		if status, err := tc.c.Do(ctx, client.Request{Method: "GET", Path: tc.path}, nil); status != tc.status {
			t.Errorf("%s (%s): %d %v, want %d", tc.name, tc.path, status, err, tc.status)
		}
	}
	if status, _, err := clear(storeA, fmt.Sprint(tamperB)); status != 403 {
		t.Fatalf("site-a store clears site-b's alert: %d %v, want 403", status, err)
	}
	for _, id := range []string{"999999", "abc", "-1"} {
		if status, _, err := clear(tg.Admin, id); status != 404 {
			t.Errorf("clear alert %q: %d %v, want 404", id, status, err)
		}
	}

	status, cleared, err := clear(storeA, fmt.Sprint(tamperA))
	if status != 200 || cleared.ID != tamperA || cleared.ClearedAt == nil || cleared.ClearedBy != "store:front-desk-a" || cleared.Site != "site-a" {
		t.Fatalf("clear: %d %+v %v; want 200, cleared by store:front-desk-a", status, cleared, err)
	}
	if status, _, err := clear(tg.Admin, fmt.Sprint(tamperA)); status != 409 || !strings.Contains(err.Error(), "was cleared at") {
		t.Fatalf("clear again: %d %v, want 409 saying when", status, err)
	}
	if got := kinds(list(storeA, "open=true")); !slices.Equal(got, []string{"site-a/door_ajar"}) {
		t.Fatalf("open=true: %v", got)
	}
	if got := list(storeA, "open=false"); len(got.Items) != 1 || got.Items[0].ID != tamperA || got.Items[0].ClearedBy != "store:front-desk-a" {
		t.Fatalf("open=false: %+v", got.Items)
	}
	if n := tg.Count(t, `SELECT count(*) FROM audit WHERE action = 'alert.clear' AND actor = 'store:front-desk-a'
		AND locker = $1 AND site = 'site-a' AND detail->>'alert' = $2`, lockerA, fmt.Sprint(tamperA)); n != 1 {
		t.Fatalf("%d alert.clear audit entries, want 1", n)
	}
}

// TestAlertWebhooks: a webhook that asks for alert.raised gets each new
// alert in its scope, signed, once: an operator's every alert, a site-a
// store's site-a's only; a webhook that did not ask gets none, and a
// platform may not ask (403).
func TestAlertWebhooks(t *testing.T) {
	ctx := context.Background()
	tg := MustStart(t)
	claimA, claimB := tg.MustSiteAndClaim(t, "site-a", 1), tg.MustSiteAndClaim(t, "site-b", 1)
	_, storeA := tg.MustToken(t, "store", "site-a", "front-desk-a")
	_, operator := tg.MustToken(t, "operator", "", "ops")
	_, platform := tg.MustToken(t, "platform", "", "speedy")
	hook := func(c *client.Client, events ...string) *receiver {
		t.Helper()
		rc, srv := newReceiver(t, 0)
		var out struct {
			Secret string `json:"secret"`
		}
		if err := c.Post(ctx, "/v1/webhooks", map[string]any{"url": srv.URL, "events": events}, &out); err != nil {
			t.Fatalf("create webhook: %v", err)
		}
		rc.secret = out.Secret
		return rc
	}
	storeHook := hook(storeA, webhook.EventAlertRaised)
	opsHook := hook(operator, webhook.EventAlertRaised, pickup.EventReady)
	pickupsOnly := hook(operator) // the default: pickup events only
	if status, err := platform.Do(ctx, client.Request{Method: "POST", Path: "/v1/webhooks",
		Body: map[string]any{"url": "https://hooks.example/", "events": []string{webhook.EventAlertRaised}}}, nil); status != 403 {
		t.Fatalf("a platform's alert.raised webhook: %d %v, want 403", status, err)
	}

	lockerA := MustLockerEvents(t, tg, claimA, "SN-WHA-1", `{"id":"e-1","ts":"%s","type":"door_ajar","compartment":3,"open_s":130}`)
	lockerB := MustLockerEvents(t, tg, claimB, "SN-WHB-1", `{"id":"e-1","ts":"%s","type":"tamper","detail":"housing opened"}`)

	Eventually(t, 15*time.Second, "both alerts at the operator's webhook", func() error {
		if got := opsHook.types(); len(got) != 2 {
			return fmt.Errorf("got %v", got)
		}
		return nil
	})
	Eventually(t, 15*time.Second, "site-a's alert at the store's webhook", func() error {
		if got := storeHook.types(); len(got) != 1 {
			return fmt.Errorf("got %v", got)
		}
		return nil
	})
	ev := storeHook.event(webhook.EventAlertRaised)
	data, _ := ev["data"].(map[string]any)
	var alertID int64
	if err := tg.DB().Pool().QueryRow(ctx, `SELECT id FROM alerts WHERE device_id = $1`, lockerA).Scan(&alertID); err != nil {
		t.Fatal(err)
	}
	if data["locker"] != lockerA || data["site"] != "site-a" || data["kind"] != "door_ajar" || data["compartment"] != float64(3) ||
		data["detail"] != "open 130 s" || data["alert"] != strconv.FormatInt(alertID, 10) || ev["id"] != fmt.Sprintf("evt-alert-%d", alertID) {
		t.Fatalf("store's alert event %v", ev)
	}
	if _, err := time.Parse(time.RFC3339Nano, fmt.Sprint(data["raised_at"])); err != nil {
		t.Fatalf("raised_at %v: %v", data["raised_at"], err)
	}
	opsHook.mu.Lock()
	lockers := map[any]any{}
	for _, e := range opsHook.events {
		d, _ := e["data"].(map[string]any)
		lockers[d["locker"]] = d["kind"]
	}
	opsHook.mu.Unlock()
	if lockers[lockerA] != "door_ajar" || lockers[lockerB] != "tamper" {
		t.Fatalf("operator's alert events by locker: %v", lockers)
	}
	for _, rc := range []*receiver{storeHook, opsHook} {
		rc.mu.Lock()
		bad := rc.bad
		rc.mu.Unlock()
		if bad != nil {
			t.Fatalf("bad signatures: %v", bad)
		}
	}
	// Nothing queued for the webhook that did not ask (deliveries are
	// queued with the alert, so none can still be on its way).
	if n := tg.Count(t, `SELECT count(*) FROM webhook_deliveries WHERE type = 'alert.raised'`); n != 3 {
		t.Fatalf("%d alert.raised deliveries queued, want 3 (two to the operator, one to the store)", n)
	}
	if got := pickupsOnly.types(); len(got) != 0 {
		t.Fatalf("a pickup-events webhook got %v", got)
	}
}

// TestSimulatedPowerCut: a simulated locker whose mains is cut reports it
// as the protocol says (a power event, health on the battery); the gateway
// raises on_battery and clears it when the mains is back.
func TestSimulatedPowerCut(t *testing.T) {
	ctx := context.Background()
	tg := MustStart(t)
	sim := MustFleet(t, tg, tg.MustSiteAndClaim(t, "s1", 1), 1)
	l := sim.Lockers()[0]
	onBattery := func() (int, error) {
		var n int
		err := tg.DB().Pool().QueryRow(ctx, `SELECT count(*) FROM alerts WHERE device_id = $1 AND kind = 'on_battery' AND cleared_at IS NULL`,
			l.DeviceID()).Scan(&n)
		return n, err
	}
	l.LosePower()
	Eventually(t, 15*time.Second, "on_battery raised, health on the battery", func() error {
		if n, err := onBattery(); err != nil || n != 1 {
			return fmt.Errorf("%d open on_battery alerts (%v)", n, err)
		}
		var lk struct {
			Health struct {
				Power string `json:"power"`
			} `json:"health"`
		}
		if err := tg.Admin.Get(ctx, "/v1/lockers/"+l.DeviceID(), nil, &lk); err != nil {
			return err
		}
		if lk.Health.Power != protocol.PowerBattery {
			return fmt.Errorf("latest health power %q", lk.Health.Power)
		}
		return nil
	})
	l.RestorePower()
	Eventually(t, 15*time.Second, "on_battery cleared", func() error {
		if n, err := onBattery(); err != nil || n != 0 {
			return fmt.Errorf("%d open on_battery alerts (%v)", n, err)
		}
		return nil
	})
}

// TestLongDescriptiveTextKept: a tamper whose detail, and an answer whose
// error, run past 256 bytes are taken with the text cut to 256 (the alert
// is raised, the command ends failed), not dropped as invalid; the event
// is stored as sent.
func TestLongDescriptiveTextKept(t *testing.T) {
	ctx := context.Background()
	tg := MustStart(t)
	r, c, _, cmd := rawLockerUnlocked(t, tg, "SN-LONGTEXT-1", 60)
	long := strings.Repeat("x", 300)
	MustPublish(t, c, protocol.Topic(r.DeviceID, protocol.ChanEvents), false,
		fmt.Sprintf(`{"id":"e-long-1","ts":"%s","type":"tamper","detail":"%s"}`, protocol.FormatTime(time.Now()), long))
	MustPublish(t, c, protocol.Topic(r.DeviceID, protocol.ChanCmdResult), false,
		fmt.Sprintf(`{"id":"%s","status":"failed","error":"%s","ts":"%s"}`, cmd.ID, long, protocol.FormatTime(time.Now())))
	Eventually(t, 10*time.Second, "the tamper alert with its detail cut", func() error {
		var detail string
		err := tg.DB().Pool().QueryRow(ctx, `SELECT detail FROM alerts WHERE device_id = $1 AND kind = 'tamper'`, r.DeviceID).Scan(&detail)
		if err == nil && detail != long[:256] {
			err = fmt.Errorf("detail of %d bytes, want 256", len(detail))
		}
		return err
	})
	if n := tg.Count(t, `SELECT count(*) FROM events WHERE device_id = $1 AND event_id = 'e-long-1' AND body->>'detail' = $2`, r.DeviceID, long); n != 1 {
		t.Fatalf("%d events stored with the whole detail, want 1", n)
	}
	waitCommandStatus(t, tg, r.DeviceID, cmd.ID, fleet.CmdFailed, "the unlock failed")
	var got fleet.Command
	if err := tg.Admin.Get(ctx, "/v1/lockers/"+r.DeviceID+"/commands/"+cmd.ID, nil, &got); err != nil || got.Error != long[:256] {
		t.Fatalf("the command's error: %d bytes, %v; want 256", len(got.Error), err)
	}
	if v, err := tg.Metric(`lockergate_ingest_messages_dropped_total{channel="events",reason="invalid"}`); err == nil && v != 0 {
		t.Fatalf("%v events dropped as invalid", v)
	}
}
