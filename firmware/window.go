package firmware

import (
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Window is a daily maintenance window in a site's local time, e.g.
// "02:00-05:00". An End at or before Start spans midnight ("22:00-02:00").
// Lockers download at any time and install only inside the window.
type Window struct {
	Start, End int // minutes after local midnight, 0..1439
}

// ParseWindow parses "HH:MM-HH:MM" (24-hour clock). The two ends must differ.
func ParseWindow(s string) (Window, error) {
	a, b, ok := strings.Cut(strings.TrimSpace(s), "-")
	if !ok {
		return Window{}, fmt.Errorf("window %q: want HH:MM-HH:MM", s)
	}
	start, err := parseClock(a)
	if err != nil {
		return Window{}, fmt.Errorf("window %q: %w", s, err)
	}
	end, err := parseClock(b)
	if err != nil {
		return Window{}, fmt.Errorf("window %q: %w", s, err)
	}
	if start == end {
		return Window{}, fmt.Errorf("window %q: start and end are the same time", s)
	}
	return Window{Start: start, End: end}, nil
}

func parseClock(s string) (int, error) {
	h, m, ok := strings.Cut(strings.TrimSpace(s), ":")
	if !ok || len(h) < 1 || len(h) > 2 || len(m) != 2 || !isNumeric(h) || !isNumeric(m) {
		return 0, fmt.Errorf("%q: want HH:MM", s)
	}
	hh, _ := strconv.Atoi(h)
	mm, _ := strconv.Atoi(m)
	if hh > 23 || mm > 59 {
		return 0, fmt.Errorf("%q: not a time of day", s)
	}
	return hh*60 + mm, nil
}

// String renders the window as HH:MM-HH:MM.
func (w Window) String() string {
	return fmt.Sprintf("%02d:%02d-%02d:%02d", w.Start/60, w.Start%60, w.End/60, w.End%60)
}

// occurrence returns the window that opens on the local calendar day of
// day (in loc).
func (w Window) occurrence(day time.Time, loc *time.Location) (open, close time.Time) {
	y, mo, d := day.In(loc).Date()
	open = localClock(y, mo, d, w.Start, loc)
	endDay := d
	if w.End <= w.Start {
		endDay++
	}
	close = localClock(y, mo, endDay, w.End, loc)
	return open, close
}

// localClock is the instant the wall clock in loc shows min minutes after
// midnight of the day. A time a DST change skips (02:30 on a spring-forward
// night) becomes the first instant after the gap, never one before it.
func localClock(y int, mo time.Month, d, min int, loc *time.Location) time.Time {
	t := time.Date(y, mo, d, min/60, min%60, 0, 0, loc)
	if got := t.Hour()*60 + t.Minute(); got != min {
		t = t.Add(time.Duration((min-got+1440)%1440) * time.Minute)
	}
	return t
}

// Next returns the occurrence of the window that contains t, or else the
// next one to open after t.
func (w Window) Next(t time.Time, loc *time.Location) (open, close time.Time) {
	// Yesterday's occurrence may still be open when the window spans midnight.
	for _, days := range []int{-1, 0, 1, 2} {
		y, mo, d := t.In(loc).Date()
		o, c := w.occurrence(time.Date(y, mo, d+days, 12, 0, 0, 0, loc), loc)
		if c.After(t) {
			return o, c
		}
	}
	panic("firmware: no window occurrence within two days") // unreachable: windows repeat daily
}

// Contains reports whether t is inside the window.
func (w Window) Contains(t time.Time, loc *time.Location) bool {
	open, _ := w.Next(t, loc)
	return !open.After(t)
}

// WaitStart returns when a job that became ready at t may start installing:
// t itself inside the window, else the next opening.
func (w Window) WaitStart(t time.Time, loc *time.Location) time.Time {
	open, _ := w.Next(t, loc)
	if open.After(t) {
		return open
	}
	return t
}
