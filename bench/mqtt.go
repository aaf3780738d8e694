package bench

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// Conn is a minimal MQTT 3.1.1 client for load generation: CONNECT,
// SUBSCRIBE, PUBLISH at QoS 0/1, PINGREQ, and a reader that acknowledges
// what arrives. One goroutine per connection (the reader) and no buffers
// beyond a small bufio.Reader keep 50,000 of them light, unlike paho's ~10
// goroutines and ~34 KB per client.
type Conn struct {
	ID string // client id (the device id)

	c         net.Conn
	wmu       sync.Mutex
	wbuf      []byte
	nextID    uint16
	lastWrite atomic.Int64 // unix nanos, for keep-alive

	inflight atomic.Int32 // QoS 1 publishes not yet acknowledged
	acked    atomic.Uint64
	closed   atomic.Bool
	done     chan struct{}
	readErr  error

	wmuWait  sync.Mutex
	waiters  map[uint16]chan struct{}
	nWaiters atomic.Int32

	// OnPublish, if set before Start, gets every PUBLISH the broker sends,
	// on the reader goroutine; QoS 1 is acknowledged after it returns.
	OnPublish func(c *Conn, topic string, payload []byte)
	// OnAck, if set, is called with each acknowledged QoS 1 publish.
	OnAck func()
}

// Packet types (high nibble of the fixed header).
const (
	pktConnect    = 1
	pktConnack    = 2
	pktPublish    = 3
	pktPuback     = 4
	pktSubscribe  = 8
	pktSuback     = 9
	pktPingreq    = 12
	pktPingresp   = 13
	pktDisconnect = 14
)

// ConnectOptions describe one CONNECT.
type ConnectOptions struct {
	Addr       string   // broker host:port
	LocalAddr  net.Addr // source address; nil: the system's choice
	ClientID   string
	User, Pass string
	KeepAlive  time.Duration
	WillTopic  string
	Will       []byte
	Timeout    time.Duration
}

// ErrRefused is a CONNACK with a non-zero return code.
var ErrRefused = errors.New("connection refused by broker")

// Dial connects and completes the MQTT handshake. Call Start to begin reading.
func Dial(ctx context.Context, o ConnectOptions) (*Conn, error) {
	if o.Timeout <= 0 {
		o.Timeout = 10 * time.Second
	}
	d := net.Dialer{Timeout: o.Timeout, LocalAddr: o.LocalAddr}
	nc, err := d.DialContext(ctx, "tcp", o.Addr)
	if err != nil {
		return nil, err
	}
	c := &Conn{ID: o.ClientID, c: nc, done: make(chan struct{}), waiters: map[uint16]chan struct{}{}}
	_ = nc.SetDeadline(time.Now().Add(o.Timeout))
	var flags byte = 0x02 // clean session
	body := appendString(nil, "MQTT")
	body = append(body, 4, 0)
	body = binary.BigEndian.AppendUint16(body, uint16(o.KeepAlive/time.Second))
	pl := appendString(nil, o.ClientID)
	if o.WillTopic != "" {
		flags |= 0x04 | 0x08 | 0x20 // will, QoS 1, retain
		pl = appendString(pl, o.WillTopic)
		pl = appendBytes(pl, o.Will)
	}
	if o.User != "" {
		flags |= 0x80
		pl = appendString(pl, o.User)
	}
	if o.Pass != "" {
		flags |= 0x40
		pl = appendString(pl, o.Pass)
	}
	body[7] = flags
	pkt := appendHeader(nil, pktConnect<<4, len(body)+len(pl))
	pkt = append(append(pkt, body...), pl...)
	if _, err := nc.Write(pkt); err != nil {
		nc.Close()
		return nil, err
	}
	var ack [4]byte
	if _, err := io.ReadFull(nc, ack[:]); err != nil {
		nc.Close()
		return nil, fmt.Errorf("read CONNACK: %w", err)
	}
	if ack[0]>>4 != pktConnack {
		nc.Close()
		return nil, fmt.Errorf("want CONNACK, got packet type %d", ack[0]>>4)
	}
	if ack[3] != 0 {
		nc.Close()
		return nil, fmt.Errorf("%w: return code %d", ErrRefused, ack[3])
	}
	_ = nc.SetDeadline(time.Time{})
	c.lastWrite.Store(time.Now().UnixNano())
	return c, nil
}

// Start runs the reader goroutine. bufSize bounds the read buffer (min 16).
func (c *Conn) Start(bufSize int) {
	go c.read(bufio.NewReaderSize(c.c, bufSize))
}

// Done is closed when the connection ended.
func (c *Conn) Done() <-chan struct{} { return c.done }

// Err is why the reader stopped (after Done).
func (c *Conn) Err() error { return c.readErr }

// Inflight is the number of unacknowledged QoS 1 publishes.
func (c *Conn) Inflight() int { return int(c.inflight.Load()) }

// Acked is the number of acknowledged QoS 1 publishes.
func (c *Conn) Acked() uint64 { return c.acked.Load() }

func (c *Conn) read(r *bufio.Reader) {
	defer close(c.done)
	for {
		h, err := r.ReadByte()
		if err != nil {
			c.readErr = err
			return
		}
		n, err := readLen(r)
		if err != nil {
			c.readErr = err
			return
		}
		switch h >> 4 {
		case pktPuback, pktSuback:
			var b [2]byte
			if _, err := io.ReadFull(r, b[:]); err != nil {
				c.readErr = err
				return
			}
			if _, err := r.Discard(n - 2); err != nil {
				c.readErr = err
				return
			}
			id := binary.BigEndian.Uint16(b[:])
			if h>>4 == pktPuback {
				c.inflight.Add(-1)
				c.acked.Add(1)
				if c.OnAck != nil {
					c.OnAck()
				}
			}
			if c.nWaiters.Load() > 0 {
				c.wmuWait.Lock()
				if ch, ok := c.waiters[id]; ok {
					delete(c.waiters, id)
					c.nWaiters.Add(-1)
					close(ch)
				}
				c.wmuWait.Unlock()
			}
		case pktPublish:
			b := make([]byte, n)
			if _, err := io.ReadFull(r, b); err != nil {
				c.readErr = err
				return
			}
			if len(b) < 2 {
				c.readErr = errors.New("short PUBLISH")
				return
			}
			tl := int(binary.BigEndian.Uint16(b))
			if 2+tl > len(b) {
				c.readErr = errors.New("bad PUBLISH topic length")
				return
			}
			topic := string(b[2 : 2+tl])
			rest := b[2+tl:]
			qos := (h >> 1) & 3
			var id uint16
			if qos > 0 {
				if len(rest) < 2 {
					c.readErr = errors.New("short PUBLISH")
					return
				}
				id = binary.BigEndian.Uint16(rest)
				rest = rest[2:]
			}
			if c.OnPublish != nil {
				c.OnPublish(c, topic, rest)
			}
			if qos > 0 {
				_ = c.write(func(b []byte) []byte {
					return append(b, pktPuback<<4, 2, byte(id>>8), byte(id))
				})
			}
		default: // PINGRESP and anything else
			if _, err := r.Discard(n); err != nil {
				c.readErr = err
				return
			}
		}
	}
}

func readLen(r *bufio.Reader) (int, error) {
	n, mul := 0, 1
	for i := 0; i < 4; i++ {
		b, err := r.ReadByte()
		if err != nil {
			return 0, err
		}
		n += int(b&0x7f) * mul
		if b&0x80 == 0 {
			return n, nil
		}
		mul *= 128
	}
	return 0, errors.New("malformed remaining length")
}

func (c *Conn) write(build func([]byte) []byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.wbuf = build(c.wbuf[:0])
	_, err := c.c.Write(c.wbuf)
	if cap(c.wbuf) > 4096 {
		c.wbuf = nil
	}
	if err == nil {
		c.lastWrite.Store(time.Now().UnixNano())
	}
	return err
}

func (c *Conn) packetID() uint16 {
	c.nextID++
	if c.nextID == 0 {
		c.nextID = 1
	}
	return c.nextID
}

// Publish sends a PUBLISH without waiting for its acknowledgement.
func (c *Conn) Publish(topic string, payload []byte, qos byte, retain bool) error {
	_, err := c.publish(topic, payload, qos, retain, false)
	return err
}

func (c *Conn) publish(topic string, payload []byte, qos byte, retain, wait bool) (chan struct{}, error) {
	var ch chan struct{}
	err := c.write(func(b []byte) []byte {
		h := byte(pktPublish<<4) | qos<<1
		if retain {
			h |= 1
		}
		n := 2 + len(topic) + len(payload)
		if qos > 0 {
			n += 2
		}
		b = appendHeader(b, h, n)
		b = appendString(b, topic)
		if qos > 0 {
			id := c.packetID()
			b = binary.BigEndian.AppendUint16(b, id)
			c.inflight.Add(1)
			if wait {
				ch = make(chan struct{})
				c.wmuWait.Lock()
				c.waiters[id] = ch
				c.nWaiters.Add(1)
				c.wmuWait.Unlock()
			}
		}
		return append(b, payload...)
	})
	return ch, err
}

// PublishWait publishes at QoS 1 and waits for the PUBACK.
func (c *Conn) PublishWait(ctx context.Context, topic string, payload []byte, retain bool) error {
	ch, err := c.publish(topic, payload, 1, retain, true)
	if err != nil {
		return err
	}
	return c.wait(ctx, ch)
}

// Subscribe subscribes at QoS 1 to filters and waits for the SUBACK. The
// reader must be running.
func (c *Conn) Subscribe(ctx context.Context, filters ...string) error {
	ch := make(chan struct{})
	err := c.write(func(b []byte) []byte {
		n := 2
		for _, f := range filters {
			n += 2 + len(f) + 1
		}
		b = appendHeader(b, pktSubscribe<<4|2, n)
		id := c.packetID()
		b = binary.BigEndian.AppendUint16(b, id)
		c.wmuWait.Lock()
		c.waiters[id] = ch
		c.nWaiters.Add(1)
		c.wmuWait.Unlock()
		for _, f := range filters {
			b = appendString(b, f)
			b = append(b, 1)
		}
		return b
	})
	if err != nil {
		return err
	}
	return c.wait(ctx, ch)
}

func (c *Conn) wait(ctx context.Context, ch chan struct{}) error {
	t := time.NewTimer(30 * time.Second)
	defer t.Stop()
	select {
	case <-ch:
		return nil
	case <-c.done:
		return fmt.Errorf("connection ended: %v", c.readErr)
	case <-t.C:
		return errors.New("no acknowledgement within 30s")
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Ping sends PINGREQ.
func (c *Conn) Ping() error {
	return c.write(func(b []byte) []byte { return append(b, pktPingreq<<4, 0) })
}

// IdleFor is how long nothing was written.
func (c *Conn) IdleFor(now time.Time) time.Duration {
	return now.Sub(time.Unix(0, c.lastWrite.Load()))
}

// Close sends DISCONNECT (no Last Will) and closes the socket.
func (c *Conn) Close() {
	if c.closed.Swap(true) {
		return
	}
	_ = c.c.SetWriteDeadline(time.Now().Add(time.Second))
	_ = c.write(func(b []byte) []byte { return append(b, pktDisconnect<<4, 0) })
	_ = c.c.Close()
}

func appendHeader(b []byte, h byte, n int) []byte {
	b = append(b, h)
	for {
		d := byte(n % 128)
		n /= 128
		if n > 0 {
			d |= 0x80
		}
		b = append(b, d)
		if n == 0 {
			return b
		}
	}
}

func appendString(b []byte, s string) []byte {
	b = binary.BigEndian.AppendUint16(b, uint16(len(s)))
	return append(b, s...)
}

func appendBytes(b []byte, s []byte) []byte {
	b = binary.BigEndian.AppendUint16(b, uint16(len(s)))
	return append(b, s...)
}
