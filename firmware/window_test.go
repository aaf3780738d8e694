package firmware

import (
	"testing"
	"time"
)

func TestParseWindow(t *testing.T) {
	for s, want := range map[string]Window{
		"02:00-05:00":  {120, 300},
		"2:00-5:30":    {120, 330},
		"22:00-02:00":  {1320, 120},
		" 00:00-23:59": {0, 1439},
	} {
		got, err := ParseWindow(s)
		if err != nil || got != want {
			t.Errorf("ParseWindow(%q) = %v, %v; want %v", s, got, err, want)
		}
	}
	if w, _ := ParseWindow("2:00-5:30"); w.String() != "02:00-05:30" {
		t.Errorf("String() = %q", w.String())
	}
	for _, s := range []string{"", "02:00", "02:00-02:00", "24:00-01:00", "02:60-03:00", "2-5", "02:00-05:00-06:00", "ab:cd-01:00", "002:00-03:00"} {
		if _, err := ParseWindow(s); err == nil {
			t.Errorf("ParseWindow(%q) accepted", s)
		}
	}
}

func TestWindowNext(t *testing.T) {
	chicago, err := time.LoadLocation("America/Chicago")
	if err != nil {
		t.Fatal(err)
	}
	at := func(s string) time.Time {
		v, err := time.ParseInLocation("2006-01-02 15:04", s, chicago)
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	night, _ := ParseWindow("02:00-05:00")
	span, _ := ParseWindow("22:00-02:00")
	for _, tc := range []struct {
		name      string
		w         Window
		now       string
		open, end string
		inside    bool
	}{
		{"BeforeToday", night, "2026-11-24 01:00", "2026-11-24 02:00", "2026-11-24 05:00", false},
		{"Inside", night, "2026-11-24 03:00", "2026-11-24 02:00", "2026-11-24 05:00", true},
		{"AtOpen", night, "2026-11-24 02:00", "2026-11-24 02:00", "2026-11-24 05:00", true},
		{"AtClose", night, "2026-11-24 05:00", "2026-11-25 02:00", "2026-11-25 05:00", false},
		{"AfterToday", night, "2026-11-24 14:00", "2026-11-25 02:00", "2026-11-25 05:00", false},
		{"SpanBeforeMidnight", span, "2026-11-24 23:00", "2026-11-24 22:00", "2026-11-25 02:00", true},
		{"SpanAfterMidnight", span, "2026-11-25 01:00", "2026-11-24 22:00", "2026-11-25 02:00", true},
		{"SpanOutside", span, "2026-11-25 12:00", "2026-11-25 22:00", "2026-11-26 02:00", false},
		// 2026-03-08: clocks go from 02:00 to 03:00 in Chicago; the window
		// opens when the day's 02:00 would have been, i.e. 03:00 CDT.
		{"SpringForward", night, "2026-03-08 00:30", "2026-03-08 03:00", "2026-03-08 05:00", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			now := at(tc.now)
			open, end := tc.w.Next(now, chicago)
			if !open.Equal(at(tc.open)) || !end.Equal(at(tc.end)) {
				t.Fatalf("Next(%s) = %s - %s, want %s - %s", tc.now, open.In(chicago), end.In(chicago), tc.open, tc.end)
			}
			if got := tc.w.Contains(now, chicago); got != tc.inside {
				t.Fatalf("Contains(%s) = %v, want %v", tc.now, got, tc.inside)
			}
			wantStart := now
			if !tc.inside {
				wantStart = open
			}
			if got := tc.w.WaitStart(now, chicago); !got.Equal(wantStart) {
				t.Fatalf("WaitStart(%s) = %s, want %s", tc.now, got, wantStart)
			}
		})
	}
}
