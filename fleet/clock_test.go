package fleet

import (
	"log/slog"
	"testing"
	"time"

	"github.com/lockergate/lockergate/protocol"
)

// TestJudgeClock: how a birth's ts against its arrival is judged, with the
// embedded broker (births arrive as sent) and an external one (a birth may
// arrive late, so a clock that reads behind is not judged).
func TestJudgeClock(t *testing.T) {
	at := time.Date(2026, 12, 5, 12, 0, 0, 0, time.UTC)
	birth := func(off time.Duration) *protocol.Presence {
		return &protocol.Presence{Online: true, TS: protocol.T(at.Add(off))}
	}
	for _, c := range []struct {
		name                   string
		external               bool
		max                    time.Duration
		p                      *protocol.Presence
		wantSkewed, wantJudged bool
	}{
		{"on time", false, 30 * time.Second, birth(2 * time.Second), false, true},
		{"at the bound", false, 30 * time.Second, birth(-30 * time.Second), false, true},
		{"behind", false, 30 * time.Second, birth(-31 * time.Second), true, true},
		{"ahead", false, 30 * time.Second, birth(time.Minute), true, true},
		{"no ts", false, 30 * time.Second, &protocol.Presence{Online: true}, false, false},
		{"check off: clears", false, -1, birth(time.Hour), false, true},
		{"external, ahead", true, 30 * time.Second, birth(time.Minute), true, true},
		{"external, behind: maybe late", true, 30 * time.Second, birth(-time.Hour), false, false},
		{"external, on time", true, 30 * time.Second, birth(-time.Second), false, true},
	} {
		m := &Manager{opts: Options{MaxClockSkew: c.max, PresenceFromWill: c.external}}
		if skewed, judged := m.judgeClock(c.p, at); skewed != c.wantSkewed || judged != c.wantJudged {
			t.Errorf("%s: skewed %v judged %v, want %v %v", c.name, skewed, judged, c.wantSkewed, c.wantJudged)
		}
	}
}

// TestSilentAfter: a locker is stale after three health intervals of the
// configuration given, or of the default one.
func TestSilentAfter(t *testing.T) {
	for _, c := range []struct {
		cfg  protocol.Config
		want time.Duration
	}{
		{protocol.Config{}, 3 * time.Minute},
		{protocol.Config{Version: 1, HealthIntervalS: 300, DoorAjarS: 120, Lockout: protocol.DefaultLockout}, 15 * time.Minute},
		{protocol.Config{Version: 1, HealthIntervalS: 1, DoorAjarS: 120, Lockout: protocol.DefaultLockout}, 3 * time.Second},
	} {
		m, err := New(Options{Store: newFakeStore(), Bus: &fakeBus{}, Config: c.cfg, Logger: slog.New(slog.DiscardHandler)})
		if err != nil {
			t.Fatal(err)
		}
		if got := m.SilentAfter(); got != c.want {
			t.Errorf("health interval %d s: %v, want %v", c.cfg.HealthIntervalS, got, c.want)
		}
	}
}
