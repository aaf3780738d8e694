package protocol_test

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/lockergate/lockergate/protocol"
)

func TestFormatTime(t *testing.T) {
	cet := time.FixedZone("CET", 3600)
	for _, tt := range []struct {
		in   time.Time
		want string
	}{
		{time.Date(2026, 11, 24, 21, 30, 0, 123_000_000, time.UTC), "2026-11-24T21:30:00.123Z"},
		{time.Date(2026, 11, 24, 22, 30, 0, 123_999_999, cet), "2026-11-24T21:30:00.123Z"},
		{time.Date(2026, 11, 24, 21, 30, 0, 0, time.UTC), "2026-11-24T21:30:00.000Z"},
		{time.Date(2026, 1, 1, 0, 30, 5, 7_000_000, cet), "2025-12-31T23:30:05.007Z"},
	} {
		if got := protocol.FormatTime(tt.in); got != tt.want {
			t.Errorf("FormatTime(%v): got %s, want %s", tt.in, got, tt.want)
		}
	}
}

func TestParseTime(t *testing.T) {
	want := time.Date(2026, 11, 24, 21, 30, 0, 123_000_000, time.UTC)
	// parse checks that each of ss parses as want, or as want's second
	// when it has no fraction.
	parse := func(t *testing.T, ss ...string) {
		t.Helper()
		for _, s := range ss {
			w := want
			if !strings.Contains(s, ".") {
				w = want.Truncate(time.Second)
			}
			got, err := protocol.ParseTime(s)
			if err != nil {
				t.Fatalf("%s: %v", s, err)
			}
			if !got.Equal(w) || got.Location() != time.UTC {
				t.Fatalf("%s: got %v, want %v", s, got, w)
			}
		}
	}
	t.Run("OK", func(t *testing.T) {
		parse(t,
			"2026-11-24T21:30:00.123Z",
			"2026-11-24T22:30:00.123+01:00",
			"2026-11-24T16:00:00.123-05:30",
			"2026-11-24T21:30:00.123456789Z", // truncated to the wire's milliseconds
			"2026-11-24T21:30:00.1239Z",
			"2026-11-24T21:30:00Z", // seconds without a fraction are RFC 3339 too
		)
	})
	// Near misses of RFC 3339 that common libraries write for a UTC time
	// are taken, no offset as UTC.
	t.Run("NearMiss", func(t *testing.T) {
		parse(t,
			"2026-11-24T21:30:00.123",         // Python: datetime.utcnow().isoformat(), milliseconds
			"2026-11-24T21:30:00.123456",      // ... microseconds
			"2026-11-24T21:30:00",             // ... none
			"2026-11-24 21:30:00.123",         // str(datetime)
			"2026-11-24 21:30:00.123Z",        // a space for the T
			"2026-11-24t21:30:00.123z",        // lower case
			"2026-11-24T21:30:00.123+0000",    // strftime's %z
			"2026-11-24T22:30:00.123+0100",    // ... another offset
			"2026-11-24T16:00:00.123456-0530", // ... with microseconds
			"2026-11-24 21:30:00.123+00:00",   // str() of an aware datetime
		)
	})
	t.Run("Error", func(t *testing.T) {
		for _, s := range []string{
			"",
			"yesterday",
			"1732483800",
			"2026-11-24",
			"2026-11-24T21:30:00,123Z",  // comma fraction
			"2026-11-24T21:30:00.Z",     // empty fraction
			"2026-11-24T24:00:00Z",      // hour 24
			"2026-02-30T00:00:00Z",      // no such day
			"2026-11-24T21:30:00+24:00", // offset out of range
			"Tue, 24 Nov 2026 21:30:00 GMT",
			"0000-01-01T00:30:00+01:00", // year -1 in UTC
			"9999-12-31T23:30:00-01:00", // year 10000 in UTC
			" 2026-11-24T21:30:00.123Z",
			"2026-11-24T21:30:00.123 ",    // trailing space
			"2026-11-24T21:30",            // no seconds
			"2026-11-24T21:30:00+01",      // offset of hours only
			"2026-11-24T21:30:00.123+010", // three offset digits
			"2026-11-24T21:30:00+01:0x",
			"2026-11-24T21:30:00.123 Z",
			"2026-11-24  21:30:00",
			"2026-11-24T24:00:00",          // hour 24, no offset
			"2026-11-24T21:30:00.123+2400", // offset out of range
			"2026-11-24X21:30:00Z",
		} {
			if got, err := protocol.ParseTime(s); err == nil {
				t.Errorf("%q: got %v, want error", s, got)
			}
		}
	})
}

func TestTime_JSON(t *testing.T) {
	t.Run("RoundTrip", func(t *testing.T) {
		in := protocol.T(time.Date(2026, 11, 24, 22, 30, 0, 123_000_000, time.FixedZone("CET", 3600)))
		b, err := json.Marshal(in)
		if err != nil {
			t.Fatal(err)
		}
		if got, want := string(b), `"2026-11-24T21:30:00.123Z"`; got != want {
			t.Fatalf("marshal: got %s, want %s", got, want)
		}
		var out protocol.Time
		if err := json.Unmarshal(b, &out); err != nil {
			t.Fatal(err)
		}
		if !out.Equal(in.Time) || out.Location() != time.UTC {
			t.Fatalf("unmarshal: got %v, want %v", out, in)
		}
	})
	t.Run("SubMillisecondsDropped", func(t *testing.T) {
		var out protocol.Time
		if err := json.Unmarshal([]byte(`"2026-11-24T21:30:00.123999Z"`), &out); err != nil {
			t.Fatal(err)
		}
		b, _ := json.Marshal(out)
		var again protocol.Time
		if err := json.Unmarshal(b, &again); err != nil {
			t.Fatal(err)
		}
		if out != again {
			t.Fatalf("got %v then %v", out, again)
		}
	})
	t.Run("Null", func(t *testing.T) {
		b, err := json.Marshal(protocol.Time{})
		if err != nil || string(b) != "null" {
			t.Fatalf("marshal zero: got %s, %v; want null", b, err)
		}
		out := protocol.Now()
		if err := json.Unmarshal([]byte(`null`), &out); err != nil || !out.IsZero() {
			t.Fatalf("unmarshal null: got %v, %v; want zero", out, err)
		}
	})
	t.Run("Error", func(t *testing.T) {
		for _, s := range []string{`5`, `true`, `{}`, `[]`, `"2026-11-24"`, `"2026-11-24T21:30"`, `""`} {
			var out protocol.Time
			if err := json.Unmarshal([]byte(s), &out); err == nil {
				t.Errorf("%s: got %v, want error", s, out)
			}
		}
	})
}

func TestNow(t *testing.T) {
	before := time.Now().Add(-time.Millisecond)
	got := protocol.Now()
	if got.Location() != time.UTC {
		t.Fatalf("location: got %v, want UTC", got.Location())
	}
	if got.Nanosecond()%int(time.Millisecond) != 0 {
		t.Fatalf("got %v, want whole milliseconds", got)
	}
	if got.Before(before) || got.After(time.Now()) {
		t.Fatalf("got %v, not now", got)
	}
}
