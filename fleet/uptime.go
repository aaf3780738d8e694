package fleet

import (
	"math"
	"time"
)

// PresenceChange is one entry of a locker's presence history: a session
// that started (Online) or ended (with its Reason) at At.
type PresenceChange struct {
	At     time.Time
	Online bool
	Reason string
}

// Presence is a locker's online time over the time observed, in seconds;
// Uptime is their ratio (4 decimals), nil when nothing was observed.
type Presence struct {
	ObservedS float64  `json:"observed_s"`
	OnlineS   float64  `json:"online_s"`
	Uptime    *float64 `json:"uptime"`
}

// setUptime sets Uptime from the times.
func (p *Presence) setUptime() {
	p.Uptime = nil
	if p.ObservedS > 0 {
		u := math.Round(p.OnlineS/p.ObservedS*1e4) / 1e4
		p.Uptime = &u
	}
}

// DayUptime is a locker's presence over one calendar day of its site.
type DayUptime struct {
	// Date is the day in the site's time zone (YYYY-MM-DD); Start and End
	// bound it (23 or 25 hours on the days clocks change).
	Date  string    `json:"date"`
	Start time.Time `json:"start"`
	End   time.Time `json:"end"`
	Presence
	Connects    int `json:"connects"`
	Disconnects int `json:"disconnects"`
}

// TotalUptime sums days.
func TotalUptime(days []DayUptime) Presence {
	var p Presence
	for _, d := range days {
		p.ObservedS += d.ObservedS
		p.OnlineS += d.OnlineS
	}
	p.setUptime()
	return p
}

// StateBefore returns what stands for locker l's presence just before
// since: before, the last change kept before it; when none was kept
// (pruned past the history's retention, or none ever), the first change
// after it read backwards (a session's end: online before), else the
// locker's current session when it started before since; else nil
// (offline).
func StateBefore(before *PresenceChange, changes []PresenceChange, l *Locker, since time.Time) *PresenceChange {
	switch {
	case before != nil:
		return before
	case len(changes) > 0:
		return &PresenceChange{At: since, Online: !changes[0].Online}
	case l.Online && l.ConnectedAt != nil && l.ConnectedAt.Before(since):
		return &PresenceChange{At: *l.ConnectedAt, Online: true}
	}
	return nil
}

// Uptime splits a locker's presence history into the calendar days of loc
// that overlap [from, to). before is the last change before from (nil:
// none kept, so offline), changes those in [from, to), oldest first. Only
// time from created (the locker's registration) until now is observed: a
// day's uptime is its online time over its observed time (nil when it has
// none). A session start while one is open (a takeover) continues it; an
// end while none is open changes nothing.
func Uptime(before *PresenceChange, changes []PresenceChange, from, to, created, now time.Time, loc *time.Location) []DayUptime {
	lo, hi := later(from, created), earlier(to, now)
	var onSince time.Time // zero: offline
	if before != nil && before.Online {
		onSince = lo
	}
	i := 0
	var days []DayUptime
	for start := dayStart(from, loc); start.Before(to) && len(days) <= maxDays; {
		y, m, d := start.Date()
		end := dayStart(time.Date(y, m, d+1, 12, 0, 0, 0, loc), loc) // the next day's noon exists
		day := DayUptime{Date: start.Format(time.DateOnly), Start: start.UTC(), End: end.UTC()}
		a, b := later(start, lo), earlier(end, hi)
		if b.After(a) {
			day.ObservedS = seconds(b.Sub(a))
		}
		var online time.Duration // counted within [a, b) only (clip)
		for ; i < len(changes) && changes[i].At.Before(end); i++ {
			c := changes[i]
			switch {
			case c.Online && onSince.IsZero():
				onSince = c.At
				day.Connects++
			case c.Online:
				day.Connects++ // a takeover: the session goes on
			case !onSince.IsZero():
				online += clip(onSince, c.At, a, b)
				onSince = time.Time{}
				day.Disconnects++
			}
		}
		if !onSince.IsZero() {
			online += clip(onSince, end, a, b)
		}
		day.OnlineS = seconds(online)
		day.setUptime()
		days = append(days, day)
		start = end
	}
	return days
}

// maxDays bounds the days Uptime splits a range into (the API asks for 93
// at most).
const maxDays = 400

// SiteLocation is site time zone name's location; UTC, the schema's
// default, should it not load (sites are validated on creation).
func SiteLocation(name string) *time.Location {
	loc, err := time.LoadLocation(name)
	if err != nil {
		return time.UTC
	}
	return loc
}

// DaysBack is the start, in loc, of the day n days before the one that
// holds t (dayStart: where that day's midnight is skipped, its first
// hour): the default start of an uptime range.
func DaysBack(t time.Time, n int, loc *time.Location) time.Time {
	y, m, d := t.In(loc).Date()
	return dayStart(time.Date(y, m, d-n, 12, 0, 0, 0, loc), loc) // that day's noon exists
}

// dayStart is the start, in loc, of the day that holds t: its midnight,
// or, where the clocks skip midnight (America/Santiago in September), the
// clock change.
func dayStart(t time.Time, loc *time.Location) time.Time {
	y, m, d := t.In(loc).Date()
	s := time.Date(y, m, d, 0, 0, 0, 0, loc)
	if s.Day() != d { // a midnight that does not exist: time.Date gave the day before's last hour
		if _, next := s.ZoneBounds(); !next.IsZero() {
			s = next
		}
	}
	return s
}

// clip is how much of [s, e) lies within [a, b).
func clip(s, e, a, b time.Time) time.Duration {
	s, e = later(s, a), earlier(e, b)
	if !e.After(s) {
		return 0
	}
	return e.Sub(s)
}

func seconds(d time.Duration) float64 { return math.Round(d.Seconds()*1e3) / 1e3 }

func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

func earlier(a, b time.Time) time.Time {
	if a.Before(b) {
		return a
	}
	return b
}
