package fleet

import (
	"fmt"
	"testing"
	"time"
)

// TestUptime: presence history split into the site's calendar days: a
// session open before the range, one across midnight, a takeover (a start
// while online), an end while offline, the day the locker was registered
// and today (observed until now), and a day 25 hours long.
func TestUptime(t *testing.T) {
	chicago, err := time.LoadLocation("America/Chicago")
	if err != nil {
		t.Fatal(err)
	}
	at := func(s string) time.Time {
		ts, err := time.ParseInLocation(time.DateTime, s, chicago)
		if err != nil {
			t.Fatal(err)
		}
		return ts
	}
	on := func(s string) PresenceChange { return PresenceChange{At: at(s), Online: true} }
	off := func(s string) PresenceChange { return PresenceChange{At: at(s), Reason: "connection_lost"} }
	show := func(days []DayUptime) string {
		var out string
		for _, d := range days {
			u := "-"
			if d.Uptime != nil {
				u = fmt.Sprint(*d.Uptime)
			}
			out += fmt.Sprintf("%s %gh/%gh %s +%d -%d; ", d.Date, d.OnlineS/3600, d.ObservedS/3600, u, d.Connects, d.Disconnects)
		}
		return out
	}
	for _, c := range []struct {
		name                         string
		before                       *PresenceChange
		changes                      []PresenceChange
		from, to, created, now, want string
	}{
		{"online all along", &PresenceChange{At: at("2026-11-01 08:00:00"), Online: true}, nil,
			"2026-12-01 00:00:00", "2026-12-03 00:00:00", "2026-10-01 00:00:00", "2026-12-05 00:00:00",
			"2026-12-01 24h/24h 1 +0 -0; 2026-12-02 24h/24h 1 +0 -0; "},
		{"across midnight, a takeover, an end while offline", nil,
			[]PresenceChange{on("2026-12-01 18:00:00"), on("2026-12-01 20:00:00"), off("2026-12-02 06:00:00"), off("2026-12-02 07:00:00")},
			"2026-12-01 00:00:00", "2026-12-03 00:00:00", "2026-10-01 00:00:00", "2026-12-05 00:00:00",
			"2026-12-01 6h/24h 0.25 +2 -0; 2026-12-02 6h/24h 0.25 +0 -1; "},
		{"registered in the afternoon, today until now", nil,
			[]PresenceChange{on("2026-12-04 12:00:00"), off("2026-12-04 18:00:00"), on("2026-12-05 00:00:00")},
			"2026-12-04 00:00:00", "2026-12-06 00:00:00", "2026-12-04 12:00:00", "2026-12-05 06:00:00",
			"2026-12-04 6h/12h 0.5 +1 -1; 2026-12-05 6h/6h 1 +1 -0; "},
		{"not yet registered", nil, nil,
			"2026-12-01 00:00:00", "2026-12-02 00:00:00", "2026-12-03 00:00:00", "2026-12-05 00:00:00",
			"2026-12-01 0h/0h - +0 -0; "},
		{"the day clocks go back", &PresenceChange{At: at("2026-10-01 00:00:00"), Online: true}, nil,
			"2026-11-01 00:00:00", "2026-11-02 00:00:00", "2026-10-01 00:00:00", "2026-12-05 00:00:00",
			"2026-11-01 25h/25h 1 +0 -0; "},
		{"the day clocks go forward", &PresenceChange{At: at("2026-03-01 00:00:00"), Online: true}, nil,
			"2026-03-08 00:00:00", "2026-03-09 00:00:00", "2026-01-01 00:00:00", "2026-12-05 00:00:00",
			"2026-03-08 23h/23h 1 +0 -0; "},
		{"a range that starts mid-day", &PresenceChange{At: at("2026-11-30 00:00:00"), Online: true},
			[]PresenceChange{off("2026-12-01 15:00:00")},
			"2026-12-01 12:00:00", "2026-12-01 18:00:00", "2026-10-01 00:00:00", "2026-12-05 00:00:00",
			"2026-12-01 3h/6h 0.5 +0 -1; "},
	} {
		got := show(Uptime(c.before, c.changes, at(c.from), at(c.to), at(c.created), at(c.now), chicago))
		if got != c.want {
			t.Errorf("%s:\n got %s\nwant %s", c.name, got, c.want)
		}
	}
	// Where the clocks skip midnight (Santiago, 6 September 2026: 00:00
	// becomes 01:00), that day starts at the change and lasts 23 hours;
	// days are reported in UTC.
	santiago, err := time.LoadLocation("America/Santiago")
	if err != nil {
		t.Fatal(err)
	}
	from := time.Date(2026, 9, 5, 0, 0, 0, 0, santiago)
	online := &PresenceChange{At: from.AddDate(0, 0, -1), Online: true}
	days := Uptime(online, nil, from, from.AddDate(0, 0, 3), from.AddDate(0, -1, 0), from.AddDate(0, 1, 0), santiago)
	if got, want := show(days), "2026-09-05 24h/24h 1 +0 -0; 2026-09-06 23h/23h 1 +0 -0; 2026-09-07 24h/24h 1 +0 -0; "; got != want {
		t.Errorf("a skipped midnight:\n got %s\nwant %s", got, want)
	}
	if days[1].Start.Location() != time.UTC || !days[1].Start.Equal(time.Date(2026, 9, 6, 1, 0, 0, 0, santiago)) {
		t.Errorf("the day with no midnight starts %v, want 01:00 local, in UTC", days[1].Start)
	}
	// The default range's start, six days back: that day's first hour, not
	// the day before's last (time.Date's answer for a skipped midnight).
	until := time.Date(2026, 9, 12, 15, 0, 0, 0, santiago)
	if got, want := DaysBack(until, 6, santiago), time.Date(2026, 9, 6, 1, 0, 0, 0, santiago); !got.Equal(want) {
		t.Errorf("six days back from %v: %v, want %v", until, got, want)
	}
	if got, want := DaysBack(until, 1, santiago), time.Date(2026, 9, 11, 0, 0, 0, 0, santiago); !got.Equal(want) {
		t.Errorf("one day back from %v: %v, want %v", until, got, want)
	}
}

// TestStateBefore: the state before a range is the last change kept before
// it; with none kept, the first change in it read backwards, else the
// locker's session if it began before the range, else offline.
func TestStateBefore(t *testing.T) {
	since := time.Date(2026, 12, 7, 0, 0, 0, 0, time.UTC)
	earlier, later := since.Add(-time.Hour), since.Add(time.Hour)
	kept := &PresenceChange{At: earlier, Reason: "keepalive"}
	for _, c := range []struct {
		name    string
		before  *PresenceChange
		changes []PresenceChange
		locker  Locker
		want    string // "nil", "online", "offline"
	}{
		{"kept", kept, []PresenceChange{{At: later, Online: true}}, Locker{Online: true, ConnectedAt: &earlier}, "offline"},
		{"first change an end", nil, []PresenceChange{{At: later}}, Locker{}, "online"},
		{"first change a start", nil, []PresenceChange{{At: later, Online: true}}, Locker{Online: true, ConnectedAt: &later}, "offline"},
		{"a session from before", nil, nil, Locker{Online: true, ConnectedAt: &earlier}, "online"},
		{"a session from within", nil, nil, Locker{Online: true, ConnectedAt: &later}, "nil"},
		{"offline", nil, nil, Locker{}, "nil"},
	} {
		got := "nil"
		if s := StateBefore(c.before, c.changes, &c.locker, since); s != nil {
			got = map[bool]string{true: "online", false: "offline"}[s.Online]
		}
		if got != c.want {
			t.Errorf("%s: %s, want %s", c.name, got, c.want)
		}
	}
}
