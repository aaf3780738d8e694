package fleet

import (
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"

	"github.com/lockergate/lockergate/protocol"
)

// TestDroppedMessagesLoggedOnceAMinute: a locker's dropped messages of one
// channel and reason are logged once a minute, the next line saying how
// many went unlogged; another locker, channel or reason has lines of its
// own; every drop is counted.
func TestDroppedMessagesLoggedOnceAMinute(t *testing.T) {
	var logs strings.Builder
	now := time.Date(2026, 12, 7, 9, 0, 0, 0, time.UTC)
	m, err := New(Options{Store: newFakeStore(), Bus: &fakeBus{}, Logger: slog.New(slog.NewTextHandler(&logs, nil)),
		Now: func() time.Time { return now }})
	if err != nil {
		t.Fatal(err)
	}
	bad := fmt.Errorf("%w: seq must not be negative", protocol.ErrInvalid)
	for range 1000 {
		m.dropInvalid(protocol.ChanEvents, "lk-1", bad)
	}
	m.dropInvalid(protocol.ChanEvents, "lk-2", bad)
	m.dropInvalid(protocol.ChanHealth, "lk-1", bad)
	m.dropInvalid(protocol.ChanEvents, "lk-1", fmt.Errorf("%w: not JSON", protocol.ErrMalformed))
	if got := strings.Count(logs.String(), "dropped device message"); got != 4 {
		t.Fatalf("%d lines for 4 kinds of drops, want 4:\n%s", got, logs.String())
	}
	now = now.Add(time.Minute)
	m.dropInvalid(protocol.ChanEvents, "lk-1", bad)
	if !strings.Contains(logs.String(), "dropped_unlogged=999") {
		t.Fatalf("the line a minute on does not count the 999 unlogged:\n%s", logs.String())
	}
	for range 5 {
		m.dropInvalid(protocol.ChanEvents, "lk-2", bad) // a line, then 4 within its minute: unlogged
	}
	now = now.Add(2 * time.Minute) // swept: a first line again, with nothing unlogged
	m.dropInvalid(protocol.ChanEvents, "lk-1", bad)
	if got := strings.Count(logs.String(), "msg=\"dropped device message\""); got != 7 {
		t.Fatalf("%d lines, want 7:\n%s", got, logs.String())
	}
	// lk-2 went quiet: the sweep that forgot it told its unlogged drops.
	if !strings.Contains(logs.String(), `msg="dropped device messages not logged since the last line" locker=lk-2 channel=events reason=invalid dropped_unlogged=4`) {
		t.Fatalf("lk-2's 4 unlogged drops not told when it was forgotten:\n%s", logs.String())
	}
	// Past the bound, drops of lockers it does not follow are counted and
	// told together at the next sweep.
	m.drops.max = 1
	for range 3 {
		m.dropInvalid(protocol.ChanEvents, "lk-3", bad)
	}
	if strings.Contains(logs.String(), "locker=lk-3") {
		t.Fatalf("a drop past the bound was logged on its own:\n%s", logs.String())
	}
	now = now.Add(2 * time.Minute)
	m.dropInvalid(protocol.ChanEvents, "lk-1", bad)
	if !strings.Contains(logs.String(), `more lockers sent bad messages than the log follows" dropped_unlogged=3`) {
		t.Fatalf("the 3 drops past the bound not told at the sweep:\n%s", logs.String())
	}
	var c dto.Metric
	if err := m.m.dropped.WithLabelValues("events", "invalid").Write(&c); err != nil {
		t.Fatal(err)
	}
	if n := c.GetCounter().GetValue(); n != 1012 {
		t.Fatalf("lockergate_ingest_messages_dropped_total{events,invalid} = %v, want 1012", n)
	}
}

// TestOversizeMessageLoggedAndCounted: a message over protocol v1's 16 KiB
// (which an external broker passes on) is acknowledged, counted as
// too_large and logged with its locker, as any bad message is.
func TestOversizeMessageLoggedAndCounted(t *testing.T) {
	var logs strings.Builder
	m, err := New(Options{Store: newFakeStore(), Bus: &fakeBus{}, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	acked := 0
	m.receive(Message{Topic: protocol.Topic("lk-1", protocol.ChanEvents), Payload: make([]byte, protocol.MaxPayload+1), QoS: 1,
		Ack: func() { acked++ }})
	if acked != 1 {
		t.Errorf("acknowledged %d times, want 1", acked)
	}
	var c dto.Metric
	if err := m.m.dropped.WithLabelValues("events", "too_large").Write(&c); err != nil || c.GetCounter().GetValue() != 1 {
		t.Errorf("dropped{events,too_large} = %v (%v), want 1", c.GetCounter().GetValue(), err)
	}
	if !strings.Contains(logs.String(), `msg="dropped device message" locker=lk-1 channel=events reason=too_large`) {
		t.Errorf("no line for the oversize message:\n%s", logs.String())
	}
}
