package gateway_test

import (
	"context"
	"errors"
	"math"
	"net/http"
	"net/url"
	"testing"
	"time"

	"github.com/lockergate/lockergate/client"
	"github.com/lockergate/lockergate/fleet"
)

// uptime is GET /v1/lockers/{id}/uptime's answer.
type uptime struct {
	Timezone    string
	Until       time.Time
	ObservedS   float64 `json:"observed_s"`
	OnlineS     float64 `json:"online_s"`
	Uptime      *float64
	Connects    int
	Disconnects int
	Days        []fleet.DayUptime
}

// TestUptimePerDay: a locker's sessions, as the gateway recorded them over
// real MQTT connections, read back as its online time per day of its
// site; the range's bounds are checked.
func TestUptimePerDay(t *testing.T) {
	ctx := context.Background()
	tg := MustStart(t)
	claim := tg.MustSiteAndClaim(t, "s1", 1)
	id := MustProvision(t, tg, claim, "SN-UP-1")
	for range 2 {
		dev := MustConnect(t, tg.MQTTAddr(), id.DeviceID, id.DeviceID, id.Password)
		waitOnline(t, tg, id.DeviceID, true)
		dev.Disconnect(250)
		waitOnline(t, tg, id.DeviceID, false)
	}
	MustConnect(t, tg.MQTTAddr(), id.DeviceID, id.DeviceID, id.Password)
	waitOnline(t, tg, id.DeviceID, true)

	var u uptime
	if err := tg.Admin.Get(ctx, "/v1/lockers/"+id.DeviceID+"/uptime", nil, &u); err != nil {
		t.Fatal(err)
	}
	loc, err := time.LoadLocation("America/Chicago") // the site's (MustSiteAndClaim)
	if err != nil {
		t.Fatal(err)
	}
	if len(u.Days) != 7 || u.Timezone != loc.String() || u.Days[6].Date != u.Until.In(loc).Format(time.DateOnly) {
		t.Fatalf("%d days in %s, the last %+v; want 7 (six and today, until %v) in the site's %s", len(u.Days), u.Timezone, u.Days[len(u.Days)-1], u.Until, loc)
	}
	// Summed over the days: the sessions may straddle the site's midnight.
	var connects, disconnects int
	var online float64
	for i, d := range u.Days {
		connects, disconnects, online = connects+d.Connects, disconnects+d.Disconnects, online+d.OnlineS
		if i < 5 && (d.ObservedS != 0 || d.Uptime != nil) {
			t.Fatalf("%s, before the locker existed: %+v", d.Date, d)
		}
	}
	if connects != 3 || disconnects != 2 || u.Connects != connects || u.Disconnects != disconnects {
		t.Fatalf("%d sessions started and %d ended (the days), %d and %d (the total); want 3 and 2", connects, disconnects, u.Connects, u.Disconnects)
	}
	// The days' sum and the total are computed apart: equal to rounding.
	if online <= 0 || math.Abs(online-u.OnlineS) > 1e-6 || u.OnlineS > u.ObservedS || u.Uptime == nil || *u.Uptime <= 0 || *u.Uptime > 1 {
		t.Fatalf("online %v (days) %v (total) of %v s observed, uptime %v", online, u.OnlineS, u.ObservedS, u.Uptime)
	}

	// History pruned past its retention (an hour-long session whose start
	// is gone): the locker's session tells the state before the range.
	if _, err := tg.DB().Pool().Exec(ctx, `DELETE FROM presence_log WHERE device_id = $1`, id.DeviceID); err != nil {
		t.Fatal(err)
	}
	if _, err := tg.DB().Pool().Exec(ctx, `UPDATE devices SET connected_at = now() - interval '1 hour', created_at = now() - interval '2 hours' WHERE id = $1`, id.DeviceID); err != nil {
		t.Fatal(err)
	}
	q := url.Values{"since": {time.Now().Add(-30 * time.Minute).UTC().Format(time.RFC3339)}}
	if err := tg.Admin.Get(ctx, "/v1/lockers/"+id.DeviceID+"/uptime", q, &u); err != nil {
		t.Fatal(err)
	}
	if u.Uptime == nil || *u.Uptime != 1 || u.ObservedS < 1799 {
		t.Fatalf("the last 30 min of a session whose start was pruned: %v of %v s, uptime %v; want all online", u.OnlineS, u.ObservedS, u.Uptime)
	}

	now := time.Now().UTC()
	for _, c := range []struct{ since, until string }{
		{now.Format(time.RFC3339), now.Add(-time.Hour).Format(time.RFC3339)},
		{now.Add(-94 * 24 * time.Hour).Format(time.RFC3339), ""},
		{"yesterday", ""},
	} {
		q := url.Values{"since": {c.since}}
		if c.until != "" {
			q.Set("until", c.until)
		}
		if _, err := tg.Admin.Do(ctx, client.Request{Method: "GET", Path: "/v1/lockers/" + id.DeviceID + "/uptime", Query: q}, nil); !isStatus(err, http.StatusBadRequest) {
			t.Errorf("since %s until %s: %v, want 400", c.since, c.until, err)
		}
	}
	if _, err := tg.Admin.Do(ctx, client.Request{Method: "GET", Path: "/v1/lockers/lk-none/uptime"}, nil); !isStatus(err, http.StatusNotFound) {
		t.Errorf("unknown locker: %v, want 404", err)
	}
}

func isStatus(err error, status int) bool {
	var ce *client.Error
	return errors.As(err, &ce) && ce.Status == status
}
