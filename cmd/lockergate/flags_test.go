package main

import (
	"bytes"
	"context"
	"go/parser"
	"go/token"
	"strings"
	"testing"

	"github.com/lockergate/lockergate/protocol"
)

// TestBadFlags: a flag value that cannot work stops the gateway before it
// starts anything, with exit code 2 and a message that says what to give.
func TestBadFlags(t *testing.T) {
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--auth-stale-window", "soon"}, "want a positive duration such as 5m, or never"},
		{[]string{"--auth-stale-window", "0s"}, "want a positive duration such as 5m, or never"},
		{[]string{"--auth-stale-window", "-5m"}, "want a positive duration such as 5m, or never"},
		{[]string{"--max-clock-skew", "0"}, "want a positive duration such as 30s, or never"},
		{[]string{"--max-clock-skew", "a while"}, "want a positive duration such as 30s, or never"},
		{[]string{"--history-retention-days", "-3"}, "want a number of days, 0 for forever"},
		{[]string{"--history-retention-days", "a year"}, "want a number of days, 0 for forever"},
		{[]string{"--health-interval", "1s"}, "want whole seconds from 5s to 1h0m0s"},
		{[]string{"--health-interval", "90.5s"}, "want whole seconds from 5s to 1h0m0s"},
		{[]string{"--door-ajar", "2d"}, "want whole seconds from 10s to 24h0m0s"},
		{[]string{"--lockout", "5/5m"}, "want FAILURES/WINDOW/LOCK such as 5/5m/5m"},
		{[]string{"--lockout", "0/5m/5m"}, "want FAILURES/WINDOW/LOCK such as 5/5m/5m"},
		{[]string{"--lockout", "5/0s/5m"}, "want FAILURES/WINDOW/LOCK such as 5/5m/5m"},
		{[]string{"--no-such-flag"}, "flag provided but not defined"},
	} {
		var stderr bytes.Buffer
		if code := run(context.Background(), append([]string{"serve"}, c.args...), &bytes.Buffer{}, &stderr); code != 2 {
			t.Errorf("%v: exit code %d, want 2", c.args, code)
		}
		if !strings.Contains(stderr.String(), c.want) {
			t.Errorf("%v: stderr %q, want %q", c.args, stderr.String(), c.want)
		}
	}
}

// TestHelpNamesTheCommands: lockergate -h (serve's flags) and demo -h say
// which commands there are, then the flags.
func TestHelpNamesTheCommands(t *testing.T) {
	for _, args := range [][]string{{"-h"}, {"demo", "-h"}} {
		var stderr bytes.Buffer
		if code := run(context.Background(), args, &bytes.Buffer{}, &stderr); code != 0 {
			t.Errorf("%v: exit code %d, want 0", args, code)
		}
		if out := stderr.String(); !strings.Contains(out, "demo    run the gateway with a simulated fleet") || !strings.Contains(out, "-http-addr") {
			t.Errorf("%v: %q, want the commands and the flags", args, out)
		}
	}
}

// TestRetentionFlags: --history-retention-days 0 keeps history for ever
// (the gateway's negative setting), a number keeps that many days, and
// without the flag the gateway's default applies (its zero value).
func TestRetentionFlags(t *testing.T) {
	for _, c := range []struct {
		args []string
		want int
	}{
		{nil, 0},
		{[]string{"--history-retention-days", "0"}, -1},
		{[]string{"--history-retention-days", "90"}, 90},
	} {
		st, code := parseSettings("serve", c.args, &bytes.Buffer{})
		if st == nil {
			t.Fatalf("%v: exit %d", c.args, code)
		}
		if st.o.HistoryRetentionDays != c.want {
			t.Errorf("%v: HistoryRetentionDays %d, want %d", c.args, st.o.HistoryRetentionDays, c.want)
		}
	}
}

// TestLockerConfigFlags: the flags set the lockers' configuration, in
// seconds, and leave its version to the database; without them the
// gateway's defaults apply (zero fields).
func TestLockerConfigFlags(t *testing.T) {
	st, code := parseSettings("serve", []string{"--health-interval", "30s", "--door-ajar", "3m", "--lockout", "3/2m/0s"}, &bytes.Buffer{})
	if st == nil {
		t.Fatalf("exit %d", code)
	}
	want := protocol.Config{HealthIntervalS: 30, DoorAjarS: 180, Lockout: protocol.Lockout{MaxFailures: 3, WindowS: 120, LockS: 0}}
	if st.o.Config != want {
		t.Fatalf("config %+v, want %+v", st.o.Config, want)
	}
	if st, _ = parseSettings("serve", nil, &bytes.Buffer{}); st.o.Config != (protocol.Config{}) {
		t.Fatalf("config without the flags %+v, want zero (the defaults)", st.o.Config)
	}
}

// TestTimeZonesEmbedded: the binary carries the time zone database, so a
// site's timezone (America/Chicago in the API contract) is accepted on a
// host without /usr/share/zoneinfo. Go looks in the system's database
// first, so the test checks the import rather than a lookup.
func TestTimeZonesEmbedded(t *testing.T) {
	f, err := parser.ParseFile(token.NewFileSet(), "main.go", nil, parser.ImportsOnly)
	if err != nil {
		t.Fatal(err)
	}
	for _, im := range f.Imports {
		if im.Path.Value == `"time/tzdata"` {
			return
		}
	}
	t.Fatal("main.go does not import time/tzdata")
}
