package bench

import (
	"context"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/lockergate/lockergate/devicesim"
	"github.com/lockergate/lockergate/protocol"
)

// Publisher sends health messages from a fleet's lockers at an aggregate
// rate: a few workers, each pacing its share of the lockers round robin,
// so the rate is exact whatever the fleet size (devicesim's lockers follow
// the gateway's config, 60 s, as real lockers do).
type Publisher struct {
	f       *Fleet
	qos     byte
	seq     []int64
	topics  []string
	boot    time.Time
	Sent    atomic.Uint64
	Skipped atomic.Uint64 // not sent: the locker had too much unacknowledged, or the generator fell behind
	// Exclude, if set, keeps locker i out of the round robin.
	Exclude func(i int) bool
}

// maxInflightPerLocker bounds unacknowledged QoS 1 messages per locker
// before the generator skips it (a real locker would stall too).
const maxInflightPerLocker = 100

// NewPublisher prepares a publisher over f's lockers.
func NewPublisher(f *Fleet, qos byte) *Publisher {
	p := &Publisher{f: f, qos: qos, seq: make([]int64, len(f.Conns)), topics: make([]string, len(f.Conns)), boot: time.Now()}
	for i, c := range f.Conns {
		p.topics[i] = protocol.Topic(c.ID, protocol.ChanHealth)
	}
	return p
}

// Run publishes at rate messages/s until d passed or ctx ended.
func (p *Publisher) Run(ctx context.Context, rate float64, d time.Duration) {
	const workers = 4
	if rate <= 0 {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	var wg sync.WaitGroup
	start := time.Now()
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var mine []int
			for i := w; i < len(p.f.Conns); i += workers {
				if p.Exclude == nil || !p.Exclude(i) {
					mine = append(mine, i)
				}
			}
			if len(mine) == 0 {
				return
			}
			share := rate / workers
			var sent, pos int
			buf := make([]byte, 0, 512)
			t := time.NewTicker(2 * time.Millisecond)
			defer t.Stop()
			for {
				select {
				case <-ctx.Done():
					return
				case now := <-t.C:
					due := int(share*now.Sub(start).Seconds()) - sent
					if limit := int(share / 10); due > limit && limit > 0 { // over 100 ms behind: give up on those
						p.Skipped.Add(uint64(due - limit))
						sent += due - limit
						due = limit
					}
					for ; due > 0; due-- {
						sent++
						i := mine[pos]
						if pos++; pos == len(mine) {
							pos = 0
						}
						c := p.f.Conns[i]
						if p.qos > 0 && c.Inflight() >= maxInflightPerLocker {
							p.Skipped.Add(1)
							continue
						}
						p.seq[i]++
						buf = p.health(buf[:0], now, p.seq[i])
						if c.Publish(p.topics[i], buf, p.qos, false) == nil {
							p.Sent.Add(1)
						}
					}
				}
			}
		}()
	}
	wg.Wait()
}

// health appends a health message as protocol.Encode(protocol.Health{...})
// would, without reflection (a test holds the two equal): the generator
// shares two cores with the system under test.
func (p *Publisher) health(b []byte, now time.Time, seq int64) []byte {
	return AppendHealth(b, now, seq, int64(now.Sub(p.boot)/time.Second))
}

// AppendHealth appends a health message body.
func AppendHealth(b []byte, now time.Time, seq, uptime int64) []byte {
	b = append(b, `{"ts":"`...)
	b = now.UTC().AppendFormat(b, protocol.TimeLayout)
	b = append(b, `","seq":`...)
	b = strconv.AppendInt(b, seq, 10)
	b = append(b, `,"fw":"`+devicesim.DefaultFW+`","uptime_s":`...)
	b = strconv.AppendInt(b, uptime, 10)
	b = append(b, `,"temp_c":21.4,"power":"mains","battery_pct":100,"rssi_dbm":-61,"free_compartments":24}`...)
	return b
}
