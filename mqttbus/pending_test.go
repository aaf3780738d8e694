package mqttbus

import (
	"bytes"
	"log/slog"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
)

// fakeMsg is a paho.Message that counts its acknowledgements.
type fakeMsg struct {
	topic string
	acks  atomic.Int32
}

func (m *fakeMsg) Duplicate() bool   { return false }
func (m *fakeMsg) Qos() byte         { return 1 }
func (m *fakeMsg) Retained() bool    { return false }
func (m *fakeMsg) Topic() string     { return m.topic }
func (m *fakeMsg) MessageID() uint16 { return 1 }
func (m *fakeMsg) Payload() []byte   { return []byte("{}") }
func (m *fakeMsg) Ack()              { m.acks.Add(1) }

var _ paho.Message = (*fakeMsg)(nil)

// A message no subscription takes is held for a subscription made later,
// but not for ever: after pendingTTL it is acknowledged (so the broker stops
// redelivering it) and dropped with a warning, oldest first.
func TestPendingMessagesExpire(t *testing.T) {
	clock := time.Date(2026, 12, 3, 12, 0, 0, 0, time.UTC)
	var logs bytes.Buffer
	b := &Bus{o: Options{now: func() time.Time { return clock }}, log: slog.New(slog.NewTextHandler(&logs, nil)),
		subs: map[string]struct{}{}}
	var delivered []string
	b.routes = []route{{topic: "lockers/v1/+/events", h: func(m paho.Message, ack func()) {
		delivered = append(delivered, m.Topic())
		ack()
	}}}

	old := &fakeMsg{topic: "lockers/v1/lk-1/retired-channel"}
	b.receive(nil, old)
	clock = clock.Add(30 * time.Second)
	young := &fakeMsg{topic: "lockers/v1/lk-2/retired-channel"}
	b.receive(nil, young)
	if old.acks.Load() != 0 || len(b.pending) != 2 {
		t.Fatalf("within the TTL: acks %d, %d pending; want 0 and 2", old.acks.Load(), len(b.pending))
	}

	clock = clock.Add(pendingTTL - 29*time.Second) // old is past the TTL, young is not
	ev := &fakeMsg{topic: "lockers/v1/lk-3/events"}
	b.receive(nil, ev)
	if old.acks.Load() != 1 {
		t.Errorf("expired message acknowledged %d times, want 1", old.acks.Load())
	}
	if young.acks.Load() != 0 || len(b.pending) != 1 || b.pending[0].m != young {
		t.Errorf("young message: %d acks, pending %v; want it still held", young.acks.Load(), b.pending)
	}
	if len(delivered) != 1 || delivered[0] != ev.topic || ev.acks.Load() != 1 {
		t.Errorf("delivered %v (acks %d), want the event once", delivered, ev.acks.Load())
	}
	if b.unacked != 1 {
		t.Errorf("%d unacknowledged, want 1 (the young message)", b.unacked)
	}
	if !strings.Contains(logs.String(), "retired-channel") || !strings.Contains(logs.String(), "no subscription") {
		t.Errorf("no warning naming the dropped topic:\n%s", logs.String())
	}
}

// TestHeldMessagesExpireWithoutArrivals: held messages expire on a timer,
// not only when another message arrives (a broker whose in-flight window is
// full of held QoS 1 messages sends nothing more, so nothing else would
// come to expire them); the timer is armed for the oldest and again for
// what is left, and not while nothing is held.
func TestHeldMessagesExpireWithoutArrivals(t *testing.T) {
	clock := time.Date(2026, 12, 3, 12, 0, 0, 0, time.UTC)
	var armed []time.Duration
	var fire func()
	after := func(d time.Duration, f func()) *time.Timer {
		armed, fire = append(armed, d), f
		tm := time.NewTimer(time.Hour)
		tm.Stop()
		return tm
	}
	var logs bytes.Buffer
	b := &Bus{o: Options{now: func() time.Time { return clock }, afterFunc: after},
		log: slog.New(slog.NewTextHandler(&logs, nil)), subs: map[string]struct{}{}}
	old := &fakeMsg{topic: "lockers/v1/lk-1/retired-channel"}
	b.receive(nil, old)
	clock = clock.Add(30 * time.Second)
	young := &fakeMsg{topic: "lockers/v1/lk-2/retired-channel"}
	b.receive(nil, young)
	if len(armed) != 1 || armed[0] != pendingTTL+time.Millisecond {
		t.Fatalf("timers armed %v, want one for the oldest's TTL", armed)
	}

	clock = clock.Add(pendingTTL - 30*time.Second + time.Millisecond) // the oldest's time is up
	fire()
	if old.acks.Load() != 1 || young.acks.Load() != 0 || len(b.pending) != 1 {
		t.Fatalf("after the first timer: acks %d and %d, %d held; want the old one dropped", old.acks.Load(), young.acks.Load(), len(b.pending))
	}
	if len(armed) != 2 || armed[1] != 30*time.Second {
		t.Fatalf("timers armed %v, want a second for the young one's remaining 30s", armed)
	}
	clock = clock.Add(30 * time.Second)
	fire()
	if young.acks.Load() != 1 || len(b.pending) != 0 || len(armed) != 2 || b.pendingTimer != nil {
		t.Fatalf("after the second timer: young acked %d, %d held, timers %v; want it dropped and no timer", young.acks.Load(), len(b.pending), armed)
	}
	if b.unacked != 0 {
		t.Errorf("%d unacknowledged, want 0", b.unacked)
	}
	if got := strings.Count(logs.String(), "no subscription"); got != 2 {
		t.Errorf("%d warnings, want one per dropped message:\n%s", got, logs.String())
	}
}
