package bench

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/lockergate/lockergate/devicesim"
	"github.com/lockergate/lockergate/protocol"
)

// BenchModel is the model every benchmark locker is provisioned as.
var BenchModel = devicesim.DefaultModels[0]

// SerialPrefix prefixes the serials of benchmark lockers (devicesim's
// scheme: PREFIX-000123), so identities map onto a devicesim fleet.
const SerialPrefix = "BENCH"

// Serial is the serial of benchmark locker i.
func Serial(i int) string { return fmt.Sprintf("%s-%06d", SerialPrefix, i) }

// Identity is a provisioned locker.
type Identity struct {
	Serial string `json:"serial"`
	devicesim.Identity
}

// Provision provisions n lockers through the gateway's MQTT claim flow
// (protocol v1: connect as prov-{serial} with the claim token, subscribe to
// the response topic, publish the request), conc at a time. Lockers that
// fail are retried a few times; any left over fail the call.
func Provision(ctx context.Context, addr, claim string, n, conc int) ([]Identity, error) {
	out := make([]Identity, n)
	var next atomic.Int64
	var wg sync.WaitGroup
	var mu sync.Mutex
	var firstErr error
	for range conc {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= n || ctx.Err() != nil {
					return
				}
				var err error
				for try := 0; try < 5; try++ {
					if out[i], err = provisionOne(ctx, addr, claim, Serial(i), localAddrFor(i, n)); err == nil {
						break
					}
					time.Sleep(time.Duration(try+1) * 200 * time.Millisecond)
				}
				if err != nil {
					mu.Lock()
					if firstErr == nil {
						firstErr = fmt.Errorf("provision %s: %w", Serial(i), err)
					}
					mu.Unlock()
					return
				}
			}
		}()
	}
	wg.Wait()
	if firstErr == nil {
		firstErr = ctx.Err()
	}
	return out, firstErr
}

func provisionOne(ctx context.Context, addr, claim, serial string, local net.Addr) (Identity, error) {
	c, err := Dial(ctx, ConnectOptions{Addr: addr, LocalAddr: local, ClientID: protocol.ProvisionClientPrefix + serial,
		User: protocol.ProvisionUsername, Pass: claim, KeepAlive: 60 * time.Second})
	if err != nil {
		return Identity{}, err
	}
	defer c.Close()
	answer := make(chan []byte, 1)
	resp := protocol.ProvisionResponseTopic(serial)
	c.OnPublish = func(_ *Conn, topic string, payload []byte) {
		if topic == resp {
			select {
			case answer <- payload:
			default:
			}
		}
	}
	c.Start(512)
	if err := c.Subscribe(ctx, resp); err != nil {
		return Identity{}, err
	}
	req := protocol.ProvisionRequest{Serial: serial, Model: BenchModel.Name, FW: devicesim.DefaultFW, Compartments: BenchModel.Compartments}
	if err := c.PublishWait(ctx, protocol.ProvisionRequestTopic(serial), protocol.Encode(req), false); err != nil {
		return Identity{}, err
	}
	var payload []byte
	select {
	case payload = <-answer:
	case <-c.Done():
		return Identity{}, fmt.Errorf("connection ended before the answer: %v", c.Err())
	case <-time.After(30 * time.Second):
		return Identity{}, errors.New("no answer within 30s")
	case <-ctx.Done():
		return Identity{}, ctx.Err()
	}
	r, err := protocol.Decode[protocol.ProvisionResponse](payload)
	if err != nil {
		return Identity{}, err
	}
	if r.Status != "ok" {
		return Identity{}, fmt.Errorf("provisioning refused: %s", r.Error)
	}
	key, err := base64.StdEncoding.DecodeString(r.CredKey)
	if err != nil {
		return Identity{}, fmt.Errorf("cred_key: %w", err)
	}
	return Identity{Serial: serial, Identity: devicesim.Identity{DeviceID: r.DeviceID, Password: r.Password, CredKey: key, Broker: r.Broker}}, nil
}

// SaveIdentities and LoadIdentities keep provisioned lockers between runs.
func SaveIdentities(path string, ids []Identity) error {
	b, err := json.Marshal(ids)
	if err != nil {
		return err
	}
	return os.WriteFile(path, b, 0o600)
}

// FakeIdentities are identities for a broker without authentication.
func FakeIdentities(n int) []Identity {
	out := make([]Identity, n)
	for i := range out {
		out[i] = Identity{Serial: Serial(i), Identity: devicesim.Identity{DeviceID: fmt.Sprintf("lk-bench%06d", i), Password: "x"}}
	}
	return out
}

// perSourceAddr is how many connections one source address carries; the
// ephemeral port range (32768-60999) holds ~28,000 per address pair.
const perSourceAddr = 20000

// localAddrFor spreads connection i of n over 127.0.0.2, 127.0.0.3, ...
// once n exceeds what one source address carries.
func localAddrFor(i, n int) net.Addr {
	if n <= perSourceAddr {
		return nil
	}
	k := (n + perSourceAddr - 1) / perSourceAddr
	return &net.TCPAddr{IP: net.IPv4(127, 0, 0, byte(2+i%k))}
}

// SourceAddrs are the source addresses localAddrFor uses for n connections
// (for devicesim.Options.SourceAddrs).
func SourceAddrs(n int) []string {
	if n <= perSourceAddr {
		return nil
	}
	var out []string
	for i := range (n + perSourceAddr - 1) / perSourceAddr {
		out = append(out, fmt.Sprintf("127.0.0.%d", 2+i))
	}
	return out
}

// FleetOptions shape how raw lockers behave.
type FleetOptions struct {
	KeepAlive   time.Duration // default 60s
	Concurrency int           // connections being set up at once; default 128
	// Locker makes each connection behave like a locker at connect: Last
	// Will, subscribe to cmd, creds, config and fw/job, birth (retained,
	// QoS 1, acknowledged), creds/ack for each credential set received.
	Locker bool
	// Answer makes lockers answer every command with status ok at once.
	Answer bool
	// ReadBuf is each connection's read buffer. Default 512.
	ReadBuf int
}

// Fleet is a set of raw lockers connected to one broker.
type Fleet struct {
	Conns    []*Conn
	Connect  time.Duration // time to connect them all
	Retries  int64         // failed attempts that were retried
	Answered atomic.Uint64 // commands answered
	Acks     atomic.Uint64 // QoS 1 publishes acknowledged, all connections
	stop     chan struct{}
	wg       sync.WaitGroup
}

// ConnectFleet connects a raw locker per identity to addr and keeps them
// alive (PINGREQ) until Close.
func ConnectFleet(ctx context.Context, addr string, ids []Identity, o FleetOptions) (*Fleet, error) {
	if o.KeepAlive <= 0 {
		o.KeepAlive = 60 * time.Second
	}
	if o.Concurrency <= 0 {
		o.Concurrency = 128
	}
	if o.ReadBuf <= 0 {
		o.ReadBuf = 512
	}
	f := &Fleet{Conns: make([]*Conn, len(ids)), stop: make(chan struct{})}
	start := time.Now()
	var next atomic.Int64
	var retries atomic.Int64
	var wg sync.WaitGroup
	var mu sync.Mutex
	var firstErr error
	for range min(o.Concurrency, len(ids)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= len(ids) || ctx.Err() != nil {
					return
				}
				var err error
				for try := 0; try < 8; try++ {
					if f.Conns[i], err = f.connectOne(ctx, addr, ids[i], localAddrFor(i, len(ids)), o); err == nil {
						break
					}
					retries.Add(1)
					select {
					case <-time.After(time.Duration(100*(1<<try)) * time.Millisecond):
					case <-ctx.Done():
					}
				}
				if err != nil {
					mu.Lock()
					if firstErr == nil {
						firstErr = fmt.Errorf("connect %s: %w", ids[i].DeviceID, err)
					}
					mu.Unlock()
					return
				}
			}
		}()
	}
	wg.Wait()
	f.Connect = time.Since(start)
	f.Retries = retries.Load()
	f.wg.Add(1)
	go f.keepAlive(o.KeepAlive)
	if firstErr == nil {
		firstErr = ctx.Err()
	}
	if firstErr != nil {
		f.Close()
		return nil, firstErr
	}
	return f, nil
}

func (f *Fleet) connectOne(ctx context.Context, addr string, id Identity, local net.Addr, o FleetOptions) (*Conn, error) {
	co := ConnectOptions{Addr: addr, LocalAddr: local, ClientID: id.DeviceID, User: id.DeviceID, Pass: id.Password, KeepAlive: o.KeepAlive}
	if o.Locker {
		co.WillTopic = protocol.Topic(id.DeviceID, protocol.ChanPresence)
		co.Will = protocol.Encode(protocol.Presence{Online: false})
	}
	c, err := Dial(ctx, co)
	if err != nil {
		return nil, err
	}
	c.OnAck = func() { f.Acks.Add(1) }
	if o.Locker {
		c.OnPublish = f.handler(o.Answer)
	}
	c.Start(o.ReadBuf)
	if !o.Locker {
		return c, nil
	}
	err = c.Subscribe(ctx, protocol.Topic(id.DeviceID, protocol.ChanCmd), protocol.Topic(id.DeviceID, protocol.ChanCreds),
		protocol.Topic(id.DeviceID, protocol.ChanConfig), protocol.Topic(id.DeviceID, protocol.ChanFwJob))
	if err == nil {
		birth := protocol.Presence{Online: true, TS: protocol.Now(), FW: devicesim.DefaultFW, Model: BenchModel.Name, BootID: "bench"}
		err = c.PublishWait(ctx, protocol.Topic(id.DeviceID, protocol.ChanPresence), protocol.Encode(birth), true)
	}
	if err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// handler is a locker's reaction to what the gateway sends: creds are
// acknowledged, commands answered (when answer is set).
func (f *Fleet) handler(answer bool) func(c *Conn, topic string, payload []byte) {
	return func(c *Conn, topic string, payload []byte) {
		_, ch, ok := protocol.ParseTopic(topic)
		if !ok {
			return
		}
		switch ch {
		case protocol.ChanCreds:
			s, err := protocol.Decode[protocol.CredSet](payload)
			if err == nil {
				_ = c.Publish(protocol.Topic(c.ID, protocol.ChanCredsAck), protocol.Encode(protocol.CredsAck{Version: s.Version}), 1, false)
			}
		case protocol.ChanCmd:
			if !answer {
				return
			}
			cmd, err := protocol.Decode[protocol.Command](payload)
			if err != nil {
				return
			}
			r := protocol.CommandResult{ID: cmd.ID, Status: protocol.StatusOK, TS: protocol.Now()}
			if c.Publish(protocol.Topic(c.ID, protocol.ChanCmdResult), protocol.Encode(r), 1, false) == nil {
				f.Answered.Add(1)
			}
		}
	}
}

// keepAlive sends PINGREQ on connections idle for 3/4 of the keep-alive.
func (f *Fleet) keepAlive(ka time.Duration) {
	defer f.wg.Done()
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-f.stop:
			return
		case now := <-t.C:
			for _, c := range f.Conns {
				if c != nil && c.IdleFor(now) > ka*3/4 {
					_ = c.Ping()
				}
			}
		}
	}
}

// Alive counts connections whose reader is still running.
func (f *Fleet) Alive() int {
	n := 0
	for _, c := range f.Conns {
		if c == nil {
			continue
		}
		select {
		case <-c.Done():
		default:
			n++
		}
	}
	return n
}

// Inflight sums unacknowledged QoS 1 publishes.
func (f *Fleet) Inflight() int {
	n := 0
	for _, c := range f.Conns {
		if c != nil {
			n += c.Inflight()
		}
	}
	return n
}

// Close disconnects every locker.
func (f *Fleet) Close() {
	select {
	case <-f.stop:
		return
	default:
		close(f.stop)
	}
	f.wg.Wait()
	var wg sync.WaitGroup
	sem := make(chan struct{}, 64)
	for _, c := range f.Conns {
		if c == nil {
			continue
		}
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			c.Close()
			<-sem
		}()
	}
	wg.Wait()
}
