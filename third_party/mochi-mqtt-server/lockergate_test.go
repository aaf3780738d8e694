// Lockergate's tests of its patches to this package (PATCHES.md); run by
// ./upstream-test with upstream's own.

package mqtt

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"

	"github.com/mochi-mqtt/server/v2/packets"
)

// TestSubscriptionsHoldCopies: patch 9 keeps subscriptions by pointer; no
// caller may share one with the map or with another caller.
func TestSubscriptionsHoldCopies(t *testing.T) {
	s := NewSubscriptions()
	if s.Len() != 0 || len(s.GetAll()) != 0 {
		t.Fatal("a new Subscriptions is not empty")
	}
	if _, ok := s.Get("a"); ok {
		t.Fatal("Get found a subscription in an empty map")
	}
	s.Delete("a") // on the map not yet made (patch 8)

	sub := packets.Subscription{Filter: "a/b", Qos: 1}
	s.Add("a", sub)
	sub.Qos = 2 // the caller's value is not the stored one
	got, ok := s.Get("a")
	if !ok || got.Filter != "a/b" || got.Qos != 1 {
		t.Fatalf("Get = %+v, %v; want a/b at QoS 1", got, ok)
	}
	got.Qos = 0 // nor is the one Get returned
	all := s.GetAll()
	all["a"] = packets.Subscription{Filter: "changed"} // nor GetAll's
	if again, _ := s.Get("a"); again.Filter != "a/b" || again.Qos != 1 {
		t.Errorf("stored subscription changed through a copy: %+v", again)
	}
	s.Add("a", packets.Subscription{Filter: "a/b", Qos: 0})
	if again, _ := s.Get("a"); again.Qos != 0 || s.Len() != 1 {
		t.Errorf("Add did not replace: %+v, len %d", again, s.Len())
	}
	s.Delete("a")
	if s.Len() != 0 {
		t.Errorf("Len after Delete = %d", s.Len())
	}
}

// TestLazyMaps: patch 8 makes maps on their first write; reads and deletes
// before it see an empty collection, and the first write works.
func TestLazyMaps(t *testing.T) {
	sh := NewSharedSubscriptions()
	sh.Delete("g", "c")
	if _, ok := sh.Get("g", "c"); ok || sh.Len() != 0 || sh.GroupLen() != 0 || len(sh.GetAll()) != 0 {
		t.Error("new SharedSubscriptions not empty")
	}
	sh.Add("g", "c", packets.Subscription{Filter: "x"})
	if got, ok := sh.Get("g", "c"); !ok || got.Filter != "x" {
		t.Errorf("SharedSubscriptions.Get = %+v, %v", got, ok)
	}

	in := NewInlineSubscriptions()
	in.Delete(1)
	if _, ok := in.Get(1); ok || in.Len() != 0 || len(in.GetAll()) != 0 {
		t.Error("new InlineSubscriptions not empty")
	}
	in.Add(InlineSubscription{Subscription: packets.Subscription{Identifier: 1, Filter: "x"}})
	if got, ok := in.Get(1); !ok || got.Filter != "x" {
		t.Errorf("InlineSubscriptions.Get = %+v, %v", got, ok)
	}

	ps := newParticles()
	if ps.get("x") != nil || ps.len() != 0 || len(ps.getAll()) != 0 {
		t.Error("new particles not empty")
	}
	ps.delete("x")
	ps.add(newParticle("x", nil))
	if ps.get("x") == nil || ps.len() != 1 {
		t.Error("particles.add did not add")
	}

	ia := NewInboundTopicAliases(5)
	if got := ia.Set(1, "a/b"); got != "a/b" {
		t.Errorf("inbound Set = %q", got)
	}
	if got := ia.Set(1, ""); got != "a/b" {
		t.Errorf("inbound alias lookup = %q, want a/b", got)
	}
	oa := NewOutboundTopicAliases(5)
	if id, existed := oa.Set("a/b"); id != 1 || existed {
		t.Errorf("outbound Set = %d, %v", id, existed)
	}
	if id, existed := oa.Set("a/b"); id != 1 || !existed {
		t.Errorf("outbound Set again = %d, %v", id, existed)
	}

	fl := NewInflights()
	if fl.Delete(1) || fl.Len() != 0 || fl.Clone().Len() != 0 {
		t.Error("new Inflight not empty")
	}
	if !fl.Set(packets.Packet{PacketID: 1}) || fl.Clone().Len() != 1 {
		t.Error("Inflight.Set or Clone lost the packet")
	}
}

// stopOnPublish admits everyone and stops each client at the end of the
// handling of its QoS 0 PUBLISH, after which nothing more is written to
// it: as an operator's kick can land between two packets of the client.
type stopOnPublish struct{ HookBase }

func (h *stopOnPublish) ID() string { return "stop-on-publish" }

func (h *stopOnPublish) Provides(b byte) bool {
	return b == OnConnectAuthenticate || b == OnACLCheck || b == OnPublished
}

func (h *stopOnPublish) OnConnectAuthenticate(*Client, packets.Packet) bool { return true }

func (h *stopOnPublish) OnACLCheck(*Client, string, bool) bool { return true }

func (h *stopOnPublish) OnPublished(cl *Client, _ packets.Packet) {
	if !cl.Net.Inline {
		cl.Stop(packets.ErrAdministrativeAction)
	}
}

// TestWillOfClientStoppedBetweenPackets: patch 10. A client the server
// stops while its reader is between packets (not blocked in a read) must
// still have its Last Will published; before, Read returned nil there and
// the will was dropped as after a DISCONNECT.
func TestWillOfClientStoppedBetweenPackets(t *testing.T) {
	s := New(&Options{InlineClient: true})
	if err := s.AddHook(new(stopOnPublish), nil); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	wills := make(chan packets.Packet, 1)
	if err := s.Subscribe("will/A", 1, func(_ *Client, _ packets.Subscription, pk packets.Packet) {
		wills <- pk
	}); err != nil {
		t.Fatal(err)
	}

	srv, cli := net.Pipe()
	t.Cleanup(func() { _ = cli.Close() })
	done := make(chan error, 1)
	go func() { done <- s.EstablishConnection("t", srv) }()
	go func() { _, _ = io.Copy(io.Discard, cli) }() // CONNACK

	var buf bytes.Buffer
	connect := packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: 4,
		Connect: packets.ConnectParams{
			ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 30, ClientIdentifier: "A",
			WillFlag: true, WillTopic: "will/A", WillPayload: []byte(`{"online":false}`), WillQos: 1,
		},
	}
	publish := packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Publish}, ProtocolVersion: 4,
		TopicName: "a", Payload: []byte("x"),
	}
	if err := connect.ConnectEncode(&buf); err != nil {
		t.Fatal(err)
	}
	if err := publish.PublishEncode(&buf); err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Write(buf.Bytes()); err != nil {
		t.Fatal(err)
	}
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("the stopped client's connection did not end")
	}
	select {
	case pk := <-wills:
		if string(pk.Payload) != `{"online":false}` {
			t.Errorf("will payload %q", pk.Payload)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the will of a client stopped between packets was not published")
	}
}

// allowAll admits every client to every topic.
type allowAll struct{ HookBase }

func (h *allowAll) ID() string { return "allow-all" }

func (h *allowAll) Provides(b byte) bool {
	return b == OnConnectAuthenticate || b == OnACLCheck
}

func (h *allowAll) OnConnectAuthenticate(*Client, packets.Packet) bool { return true }

func (h *allowAll) OnACLCheck(*Client, string, bool) bool { return true }

// waitUntil polls done every millisecond until it holds, and fails the
// test with fail's message if it does not within 10 s.
func waitUntil(t *testing.T, done func() bool, fail func() string) {
	t.Helper()
	if !pollUntil(done) {
		t.Fatal(fail())
	}
}

// pollUntil polls done every millisecond until it holds, for 10 s at most,
// and reports whether it did: waitUntil for code off the test's goroutine,
// which must not call t.Fatal.
func pollUntil(done func() bool) bool {
	deadline := time.Now().Add(10 * time.Second)
	for !done() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(time.Millisecond)
	}
	return true
}

// readPacket reads one MQTT packet: its type nibble and its body.
func readPacket(r *bufio.Reader) (byte, []byte, error) {
	h, err := r.ReadByte()
	if err != nil {
		return 0, nil, err
	}
	n, shift := 0, 0
	for {
		b, err := r.ReadByte()
		if err != nil {
			return 0, nil, err
		}
		n |= int(b&0x7f) << shift
		if b&0x80 == 0 {
			break
		}
		shift += 7
	}
	body := make([]byte, n)
	_, err = io.ReadFull(r, body)
	return h >> 4, body, err
}

// TestWriterOnDemand: patch 12. No writer goroutine waits on an idle
// client's queue; one is started when a packet is queued and ends when the
// queue is empty. Every packet must still arrive, in the order queued,
// including one queued just as a writer finds the queue empty (the writer
// looks again after clearing its flag, or the packet waits for the next one).
func TestWriterOnDemand(t *testing.T) {
	s := New(&Options{InlineClient: true})
	if err := s.AddHook(new(allowAll), nil); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })

	srv, cli := net.Pipe()
	t.Cleanup(func() { _ = cli.Close() })
	go func() { _ = s.EstablishConnection("t", srv) }()
	var buf bytes.Buffer
	connect := packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: 4,
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 30, ClientIdentifier: "A"},
	}
	subscribe := packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1}, ProtocolVersion: 4, PacketID: 1,
		Filters: packets.Subscriptions{{Filter: "t"}},
	}
	if err := connect.ConnectEncode(&buf); err != nil {
		t.Fatal(err)
	}
	if err := subscribe.SubscribeEncode(&buf); err != nil {
		t.Fatal(err)
	}
	go func() { _, _ = cli.Write(buf.Bytes()) }()

	// One reader for the whole test; publishes arrive on received.
	received := make(chan string, 4096)
	acks := make(chan byte, 2)
	go func() {
		defer close(received)
		r := bufio.NewReader(cli)
		for {
			typ, body, err := readPacket(r)
			if err != nil {
				return
			}
			switch typ {
			case packets.Connack, packets.Suback:
				acks <- typ
			case packets.Publish:
				n := int(body[0])<<8 | int(body[1])
				received <- string(body[2+n:])
			}
		}
	}()
	for _, want := range []byte{packets.Connack, packets.Suback} {
		select {
		case got := <-acks:
			if got != want {
				t.Fatalf("got packet type %d, want %d", got, want)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("no packet of type %d", want)
		}
	}
	cl, ok := s.Clients.Get("A")
	if !ok {
		t.Fatal("client A not registered")
	}
	idle := func(when string) {
		t.Helper()
		waitUntil(t, func() bool { return !cl.State.writing.Load() },
			func() string { return when + ": a writer still runs with an empty queue" })
		cl.State.queueMu.Lock() // patch 24: an emptied queue lets its array go
		q := cl.State.queue
		cl.State.queueMu.Unlock()
		if q != nil {
			t.Fatalf("%s: the empty queue keeps an array of %d", when, cap(q))
		}
	}
	idle("after connecting")

	next := func() string {
		t.Helper()
		select {
		case p, ok := <-received:
			if !ok {
				t.Fatal("connection closed")
			}
			return p
		case <-time.After(10 * time.Second):
			t.Fatal("a queued packet was never written")
		}
		return ""
	}
	// One at a time: every packet is queued when the last writer has just
	// ended or is ending, the window a lost wake-up would fall in.
	for i := 0; i < 3000; i++ {
		want := fmt.Sprint(i)
		if err := s.Publish("t", []byte(want), false, 0); err != nil {
			t.Fatal(err)
		}
		if got := next(); got != want {
			t.Fatalf("received %q, want %q", got, want)
		}
	}
	idle("after single publishes")

	// Several publishers at once: each one's packets arrive in its order.
	const publishers, each = 4, 500
	var wg sync.WaitGroup
	for p := 0; p < publishers; p++ {
		wg.Add(1)
		go func(p int) { // go 1.21: p is one variable for the whole loop
			defer wg.Done()
			for i := 0; i < each; i++ {
				if err := s.Publish("t", []byte(fmt.Sprintf("%d/%d", p, i)), false, 0); err != nil {
					t.Error(err)
					return
				}
			}
		}(p)
	}
	last := make([]int, publishers)
	for p := range last {
		last[p] = -1
	}
	for n := 0; n < publishers*each; n++ {
		var p, i int
		if _, err := fmt.Sscanf(next(), "%d/%d", &p, &i); err != nil {
			t.Fatal(err)
		}
		if i != last[p]+1 {
			t.Fatalf("publisher %d: packet %d after %d", p, i, last[p])
		}
		last[p] = i
	}
	wg.Wait()
	idle("after concurrent publishes")

	// Deterministically, the window itself: a packet queued (by a publisher
	// that sees the flag still set, so starts no writer) after the writer
	// found the queue empty and before it cleared the flag.
	var once sync.Once
	testHookQueueEmpty = func(*Client) {
		once.Do(func() {
			if err := s.Publish("t", []byte("in the window"), false, 0); err != nil {
				t.Error(err)
			}
		})
	}
	t.Cleanup(func() { testHookQueueEmpty = nil })
	if err := s.Publish("t", []byte("before"), false, 0); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"before", "in the window"} {
		if got := next(); got != want {
			t.Fatalf("received %q, want %q", got, want)
		}
	}
	idle("after the window")
}

// TestOutboundQueue: patch 24. The outbound queue takes at most
// MaximumClientWritesPending packets, gives them back in order, keeps no
// array once empty, and wakes a WriteLoop parked on it.
func TestOutboundQueue(t *testing.T) {
	caps := NewDefaultServerCapabilities()
	caps.MaximumClientWritesPending = 2
	s := New(&Options{Capabilities: caps})
	t.Cleanup(func() { _ = s.Close() })
	srv, cli := net.Pipe()
	t.Cleanup(func() { _, _ = srv.Close(), cli.Close() })
	cl := s.NewClient(srv, "t", "q", false)
	cl.State.ownWriter.Store(true) // no writer starts: the test takes the packets

	pk := func(topic string) *packets.Packet {
		return &packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish}, TopicName: topic}
	}
	if !cl.queueOutbound(pk("a")) || !cl.queueOutbound(pk("b")) {
		t.Fatal("the queue refused a packet below its bound")
	}
	if cl.queueOutbound(pk("c")) {
		t.Fatal("the queue took a third packet over a bound of 2")
	}
	if n := cl.queued(); n != 2 {
		t.Fatalf("queued() = %d, want 2", n)
	}
	for _, want := range []string{"a", "b"} {
		if got := cl.nextOutbound(); got == nil || got.TopicName != want {
			t.Fatalf("nextOutbound = %+v, want %s", got, want)
		}
	}
	if got := cl.nextOutbound(); got != nil || cl.State.queue != nil {
		t.Fatalf("after the last: %+v, queue %v; want nil, nil", got, cl.State.queue)
	}
	if !cl.queueOutbound(pk("d")) {
		t.Fatal("the emptied queue refused a packet")
	}
	cl.nextOutbound()

	// A WriteLoop parked on the empty queue writes what is queued next.
	go cl.WriteLoop()
	t.Cleanup(func() { cl.Stop(io.EOF) })
	waitUntil(t, func() bool {
		cl.State.queueMu.Lock()
		defer cl.State.queueMu.Unlock()
		return cl.State.queueWake != nil
	}, func() string { return "WriteLoop never made its wake-up channel" })
	read := make(chan string, 1)
	go func() {
		typ, body, err := readPacket(bufio.NewReader(cli))
		if err != nil || typ != packets.Publish {
			read <- fmt.Sprintf("type %d, %v", typ, err)
			return
		}
		n := int(body[0])<<8 | int(body[1])
		read <- string(body[2 : 2+n])
	}()
	if !cl.queueOutbound(pk("e")) {
		t.Fatal("queue refused a packet for WriteLoop")
	}
	select {
	case got := <-read:
		if got != "e" {
			t.Fatalf("WriteLoop wrote %s, want topic e", got)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("WriteLoop was not woken by a queued packet")
	}
}

// TestInflightLetGoWhenEmpty: patch 25. The in-flight map is let go when
// its last message is deleted and made again by the next Set.
func TestInflightLetGoWhenEmpty(t *testing.T) {
	i := NewInflights()
	i.Set(packets.Packet{PacketID: 1})
	i.Set(packets.Packet{PacketID: 2})
	if !i.Delete(1) || i.internal == nil || i.Len() != 1 {
		t.Fatalf("one of two deleted: map %v, Len %d", i.internal, i.Len())
	}
	if !i.Delete(2) || i.internal != nil || i.Len() != 0 {
		t.Fatalf("last deleted: map %v, Len %d; want nil, 0", i.internal, i.Len())
	}
	if i.Delete(2) {
		t.Fatal("Delete on the let-go map found a message")
	}
	if !i.Set(packets.Packet{PacketID: 3}) {
		t.Fatal("Set after the map was let go reported an existing message")
	}
	if pk, ok := i.Get(3); !ok || pk.PacketID != 3 {
		t.Fatalf("Get(3) = %+v, %v", pk, ok)
	}
}

// TestServeConnectionRests: patch 13. A reader idle for restAfter moves to
// a new goroutine; the connection goes on being served (a PINGREQ is
// answered, a message is delivered), rest after rest, and done is called
// once, when the connection ends.
func TestServeConnectionRests(t *testing.T) {
	s := New(&Options{InlineClient: true})
	if err := s.AddHook(new(allowAll), nil); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })

	srv, cli := net.Pipe()
	t.Cleanup(func() { _ = cli.Close() })
	ended := make(chan error, 2)
	go s.ServeConnection("t", srv, 5*time.Millisecond, func(err error) { ended <- err })

	var buf bytes.Buffer
	connect := packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: 4,
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 30, ClientIdentifier: "A"},
	}
	subscribe := packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1}, ProtocolVersion: 4, PacketID: 1,
		Filters: packets.Subscriptions{{Filter: "t"}},
	}
	if err := connect.ConnectEncode(&buf); err != nil {
		t.Fatal(err)
	}
	if err := subscribe.SubscribeEncode(&buf); err != nil {
		t.Fatal(err)
	}
	go func() { _, _ = cli.Write(buf.Bytes()) }()

	got := make(chan byte, 16)
	go func() {
		r := bufio.NewReader(cli)
		for {
			typ, _, err := readPacket(r)
			if err != nil {
				return
			}
			got <- typ
		}
	}()
	expect := func(want byte) {
		t.Helper()
		select {
		case typ := <-got:
			if typ != want {
				t.Fatalf("got packet type %d, want %d", typ, want)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("no packet of type %d", want)
		}
	}
	// Counted from the start, not from the call: the rest may come before
	// the test gets to look, and a resumed reader rests again only after
	// it has handled a packet.
	var want int64
	rested := func() {
		t.Helper()
		want++
		waitUntil(t, func() bool { return s.ReadersRested() >= want },
			func() string { return fmt.Sprintf("%d rests, want %d", s.ReadersRested(), want) })
	}
	expect(packets.Connack)
	expect(packets.Suback)
	rested() // the first reader, after CONNECT and SUBSCRIBE
	for i := 0; i < 3; i++ {
		// A resumed reader rests again only after it has handled a packet.
		go func() { _, _ = cli.Write([]byte{packets.Pingreq << 4, 0}) }()
		expect(packets.Pingresp)
		rested()
		if err := s.Publish("t", []byte("x"), false, 0); err != nil {
			t.Fatal(err)
		}
		expect(packets.Publish)
	}
	if _, ok := s.Clients.Get("A"); !ok {
		t.Fatal("client A not registered after its reader rested")
	}

	_ = cli.Close()
	select {
	case err := <-ended:
		if err == nil {
			t.Error("done called with nil for a connection closed by the client")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("done not called after the connection closed")
	}
	select {
	case err := <-ended:
		t.Fatalf("done called a second time (%v)", err)
	default:
	}
}

// TestServeConnectionNoRest: restAfter 0 is EstablishConnection: done is
// called before ServeConnection returns, and no reader rests.
func TestServeConnectionNoRest(t *testing.T) {
	s := New(&Options{InlineClient: true})
	if err := s.AddHook(new(allowAll), nil); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	srv, cli := net.Pipe()
	returned := make(chan bool, 1)
	var doneErr error
	called := false
	go func() {
		s.ServeConnection("t", srv, 0, func(err error) { doneErr, called = err, true })
		returned <- called
	}()
	var buf bytes.Buffer
	connect := packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: 4,
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 30, ClientIdentifier: "A"},
	}
	if err := connect.ConnectEncode(&buf); err != nil {
		t.Fatal(err)
	}
	go func() { _, _ = cli.Write(buf.Bytes()) }()
	if typ, _, err := readPacket(bufio.NewReader(cli)); err != nil || typ != packets.Connack {
		t.Fatalf("CONNACK: type %d, %v", typ, err)
	}
	_ = cli.Close()
	select {
	case ok := <-returned:
		if !ok {
			t.Fatal("ServeConnection returned before calling done")
		}
		if doneErr == nil {
			t.Error("done called with nil for a connection closed by the client")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("ServeConnection did not return after the connection closed")
	}
	if n := s.ReadersRested(); n != 0 {
		t.Fatalf("%d rests with restAfter 0", n)
	}
}

// TestPacketBuffered: patch 13's check that the next packet is wholly in
// the read buffer (so it is read without the connection's deadline).
func TestPacketBuffered(t *testing.T) {
	long := append([]byte{0x30, 0x81, 0x01}, make([]byte, 129)...) // remaining length 129
	cases := []struct {
		name string
		in   []byte
		want bool
	}{
		{"PINGREQ", []byte{0xc0, 0x00}, true},
		{"whole", []byte{0x30, 0x02, 'a', 'b'}, true},
		{"whole and more", []byte{0x30, 0x02, 'a', 'b', 0xc0}, true},
		{"one byte short", []byte{0x30, 0x03, 'a', 'b'}, false},
		{"header byte only", []byte{0x30}, false},
		{"length unfinished", []byte{0x30, 0x81}, false},
		{"two-byte length, whole", long, true},
		{"two-byte length, short", long[:len(long)-1], false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			cl := &Client{Net: ClientConnection{bconn: bufio.NewReader(bytes.NewReader(c.in))}}
			if _, err := cl.Net.bconn.Peek(1); err != nil {
				t.Fatal(err)
			}
			if got := cl.packetBuffered(); got != c.want {
				t.Errorf("packetBuffered(% x) = %v, want %v", c.in, got, c.want)
			}
		})
	}
}

// TestLazySubscriptionHolders: patch 14. A topic-tree node makes its
// subscription holders on their first Add: the nodes of a locker's topics
// that hold no subscription have none, and matching goes on as before.
func TestLazySubscriptionHolders(t *testing.T) {
	x := NewTopicsIndex()
	x.Subscribe("lk-1", packets.Subscription{Filter: "lockers/v1/lk-1/cmd", Qos: 1})
	x.Subscribe("gw", packets.Subscription{Filter: "$share/g/lockers/v1/+/health"})
	x.InlineSubscribe(InlineSubscription{Subscription: packets.Subscription{Filter: "lockers/v1/+/events", Identifier: 7}})
	x.RetainMessage(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Retain: true},
		TopicName: "lockers/v1/lk-1/config", Payload: []byte("{}")})

	made := func(p *particle) (n int) {
		if p.subscriptions.p.Load() != nil {
			n++
		}
		if p.shared.p.Load() != nil {
			n++
		}
		if p.inlineSubscriptions.p.Load() != nil {
			n++
		}
		return n
	}
	lk := x.root.particles.get("lockers").particles.get("v1").particles.get("lk-1")
	for _, p := range []*particle{x.root, x.root.particles.get("lockers"), lk, lk.particles.get("config")} {
		if n := made(p); n != 0 {
			t.Errorf("node %q: %d subscription holders made, want none", p.key, n)
		}
	}
	if n := made(lk.particles.get("cmd")); n != 1 {
		t.Errorf("node cmd: %d holders, want 1", n)
	}

	if subs := x.Subscribers("lockers/v1/lk-1/cmd"); len(subs.Subscriptions) != 1 || len(subs.Shared) != 0 {
		t.Errorf("cmd subscribers %+v", subs)
	}
	if subs := x.Subscribers("lockers/v1/lk-1/health"); len(subs.Shared) != 1 || len(subs.Subscriptions) != 0 {
		t.Errorf("health subscribers %+v", subs)
	}
	if subs := x.Subscribers("lockers/v1/lk-1/events"); len(subs.InlineSubscriptions) != 1 {
		t.Errorf("events subscribers %+v", subs)
	}
	if !x.Unsubscribe("lockers/v1/lk-1/cmd", "lk-1") || len(x.Subscribers("lockers/v1/lk-1/cmd").Subscriptions) != 0 {
		t.Error("unsubscribe left the subscription")
	}

	// Holders made while publishes are matched (go test -race: the
	// pointers are read without the index lock).
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		for i := 0; i < 200; i++ {
			x.Subscribe(fmt.Sprint("c", i), packets.Subscription{Filter: fmt.Sprintf("a/%d", i)})
		}
	}()
	go func() {
		defer wg.Done()
		for i := 0; i < 200; i++ {
			x.Subscribers(fmt.Sprintf("a/%d", i))
		}
	}()
	wg.Wait()
	for i := 0; i < 200; i++ {
		if got := len(x.Subscribers(fmt.Sprintf("a/%d", i)).Subscriptions); got != 1 {
			t.Fatalf("a/%d: %d subscribers, want 1", i, got)
		}
	}
}

// TestSingleEntryHolders: patch 23. A subscription holder with one
// subscription, and a node with one child, keep it without a map; a second
// id makes the map, and every method reads both forms alike.
func TestSingleEntryHolders(t *testing.T) {
	s := NewSubscriptions()
	s.Add("a", packets.Subscription{Filter: "f", Qos: 1})
	s.Add("a", packets.Subscription{Filter: "f", Qos: 2}) // replaces, still one
	if s.internal != nil {
		t.Fatal("one subscription made a map")
	}
	if got, ok := s.Get("a"); !ok || got.Qos != 2 || s.Len() != 1 {
		t.Fatalf("Get(a) = %+v, %v, Len %d; want QoS 2, true, 1", got, ok, s.Len())
	}
	if _, ok := s.Get("b"); ok {
		t.Fatal("Get(b) found the other id's subscription")
	}
	if all := s.GetAll(); len(all) != 1 || all["a"].Qos != 2 {
		t.Fatalf("GetAll = %+v", all)
	}
	s.Delete("b") // not held: nothing changes
	if s.Len() != 1 {
		t.Fatalf("Delete(b) removed a's subscription")
	}
	s.Add("b", packets.Subscription{Filter: "f", Qos: 0})
	if s.internal == nil || s.one != nil || s.Len() != 2 {
		t.Fatalf("second id: map %v, one %v, Len %d; want the map with both", s.internal, s.one, s.Len())
	}
	if got, ok := s.Get("a"); !ok || got.Qos != 2 {
		t.Fatalf("a lost when the map was made: %+v, %v", got, ok)
	}
	s.Delete("a")
	s.Delete("b")
	if s.Len() != 0 || len(s.GetAll()) != 0 {
		t.Fatalf("not empty after deleting both: %+v", s.GetAll())
	}
	one := NewSubscriptions()
	one.Add("a", packets.Subscription{})
	one.Delete("a")
	if _, ok := one.Get("a"); ok || one.Len() != 0 || len(one.GetAll()) != 0 {
		t.Fatal("the only subscription survived its Delete")
	}
	one.Add("c", packets.Subscription{}) // and the holder takes a new one
	if _, ok := one.Get("c"); !ok || one.internal != nil {
		t.Fatal("a holder emptied by Delete did not take a new only subscription")
	}

	var p particles
	p.add(&particle{key: "a"})
	p.add(&particle{key: "a", retainPath: "x"}) // replaces, still one
	if p.internal != nil || p.len() != 1 || p.get("a").retainPath != "x" || p.get("b") != nil {
		t.Fatalf("one child: map %v, len %d", p.internal, p.len())
	}
	p.delete("b")
	if all := p.getAll(); len(all) != 1 || all["a"] == nil {
		t.Fatalf("getAll = %v", all)
	}
	p.add(&particle{key: "b"})
	if p.internal == nil || p.one != nil || p.len() != 2 || p.get("a") == nil || p.get("b") == nil {
		t.Fatalf("second child: map %v, one %v", p.internal, p.one)
	}
	var q particles
	q.add(&particle{key: "a"})
	q.delete("a")
	if q.get("a") != nil || q.len() != 0 || len(q.getAll()) != 0 {
		t.Fatal("the only child survived its delete")
	}

	// A locker's topics in the index: the nodes with one child or one
	// subscriber hold no map, and matching and unsubscribing work through them.
	x := NewTopicsIndex()
	for _, f := range []string{"cmd", "creds", "config", "fw/job"} {
		x.Subscribe("lk-1", packets.Subscription{Filter: "lockers/v1/lk-1/" + f, Qos: 1})
	}
	lk := x.root.particles.get("lockers").particles.get("v1").particles.get("lk-1")
	fw := lk.particles.get("fw")
	job := fw.particles.get("job")
	if fw.particles.internal != nil || job.subscriptions.p.Load().internal != nil {
		t.Error("a node with one child or one subscriber made a map")
	}
	if subs := x.Subscribers("lockers/v1/lk-1/fw/job"); len(subs.Subscriptions) != 1 || subs.Subscriptions["lk-1"].Qos != 1 {
		t.Errorf("fw/job subscribers %+v", subs)
	}
	x.Subscribe("lk-2", packets.Subscription{Filter: "lockers/v1/+/fw/job"})
	if subs := x.Subscribers("lockers/v1/lk-1/fw/job"); len(subs.Subscriptions) != 2 {
		t.Errorf("fw/job subscribers with a wildcard beside: %+v", subs)
	}
	if !x.Unsubscribe("lockers/v1/lk-1/fw/job", "lk-1") {
		t.Fatal("unsubscribe fw/job: not found")
	}
	if lk.particles.get("fw") != nil {
		t.Error("the emptied fw node was not trimmed from the tree")
	}
	if subs := x.Subscribers("lockers/v1/lk-1/fw/job"); len(subs.Subscriptions) != 1 || subs.Subscriptions["lk-2"].Filter != "lockers/v1/+/fw/job" {
		t.Errorf("fw/job subscribers after the unsubscribe: %+v", subs)
	}
}

// TestSubscriptionCopySharedWithTheTree: patch 23. A SUBSCRIBE, and a
// session taken over with its subscriptions, give the client's holder and
// the topic's one copy of each subscription, each its own (the takeover's
// loop once gave every inherited filter the same one); an UNSUBSCRIBE or a
// new SUBSCRIBE of the same filter replaces it in both.
func TestSubscriptionCopySharedWithTheTree(t *testing.T) {
	e := newTakeoverEnv(t, 4)
	want := map[string]byte{"lk/cmd": 1, "lk/creds": 0, "lk/config": 2, "lk/fw/job": 1}
	sub := func(cl *Client, typ byte, filter string, qos byte) {
		pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: typ}, PacketID: 1,
			Filters: packets.Subscriptions{{Filter: filter, Qos: qos}}}
		if typ == packets.Subscribe {
			_ = e.s.processSubscribe(cl, pk)
		} else {
			_ = e.s.processUnsubscribe(cl, pk)
		}
	}
	same := func(cl *Client) {
		t.Helper()
		if n := cl.State.Subscriptions.Len(); n != len(want) {
			t.Fatalf("client holds %d subscriptions, want %d", n, len(want))
		}
		for filter, qos := range want {
			node := e.s.Topics.seek(filter, 0)
			if node == nil || node.subscriptions.p.Load() == nil {
				t.Fatalf("no node with subscriptions for %s", filter)
			}
			inTree := node.subscriptions.p.Load().one
			cl.State.Subscriptions.RLock()
			inClient := cl.State.Subscriptions.internal[filter]
			cl.State.Subscriptions.RUnlock()
			if inTree == nil || inTree != inClient {
				t.Fatalf("%s: tree holds %p, client %p: want one shared copy", filter, inTree, inClient)
			}
			if inTree.Filter != filter || inTree.Qos != qos {
				t.Fatalf("%s: holds %s at QoS %d, want QoS %d", filter, inTree.Filter, inTree.Qos, qos)
			}
		}
	}

	cl := e.client("x", nil)
	e.attach(cl)
	for filter := range want {
		sub(cl, packets.Subscribe, filter, 2)
	}
	for filter, qos := range want { // the same filters again: replaced in both
		sub(cl, packets.Subscribe, filter, qos)
	}
	same(cl)

	// A session kept (not clean) and taken over, twice: each new client
	// inherits every subscription, and again the two holders share each.
	for round := 0; round < 2; round++ {
		cl.Properties.Clean = false
		next := e.client("x", nil)
		e.s.attachSession(next, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: 4,
			Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: false, ClientIdentifier: "x"}})
		same(next)
		cl = next
	}

	sub(cl, packets.Unsubscribe, "lk/cmd", 0)
	if got := len(e.s.Topics.Subscribers("lk/cmd").Subscriptions); got != 0 {
		t.Fatalf("after UNSUBSCRIBE: %d in the tree", got)
	}
	if _, ok := cl.State.Subscriptions.Get("lk/cmd"); ok || cl.State.Subscriptions.Len() != len(want)-1 {
		t.Fatalf("after UNSUBSCRIBE: client holds %d", cl.State.Subscriptions.Len())
	}
	e.s.UnsubscribeClient(cl)
	for filter := range want {
		if got := len(e.s.Topics.Subscribers(filter).Subscriptions); got != 0 {
			t.Errorf("%s: %d subscribers left after the client's subscriptions were taken away", filter, got)
		}
	}
}

// TestRestingReaderReleasesBuffer: patch 15. Over TCP, a resting reader
// gives its read buffer back and the next one waits for input without one;
// what arrives then (two packets in one write) is read whole, and a
// connection closed while no buffer is held ends as any other.
func TestRestingReaderReleasesBuffer(t *testing.T) {
	var released int64
	testHookBufferReleased = func() { atomic.AddInt64(&released, 1) }
	t.Cleanup(func() { testHookBufferReleased = nil })

	s := New(&Options{InlineClient: true})
	if err := s.AddHook(new(allowAll), nil); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ln.Close() })
	ended := make(chan error, 2)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		s.ServeConnection("t", c, 5*time.Millisecond, func(err error) { ended <- err })
	}()
	cli, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cli.Close() })

	var buf bytes.Buffer
	connect := packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: 4,
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 30, ClientIdentifier: "A"},
	}
	if err := connect.ConnectEncode(&buf); err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Write(buf.Bytes()); err != nil {
		t.Fatal(err)
	}
	r := bufio.NewReader(cli)
	expect := func(want byte) {
		t.Helper()
		_ = cli.SetReadDeadline(time.Now().Add(10 * time.Second))
		typ, _, err := readPacket(r)
		if err != nil || typ != want {
			t.Fatalf("got packet type %d (%v), want %d", typ, err, want)
		}
	}
	// Counted from the start, not from the call: the release may come
	// before the test gets to look.
	var want int64
	releasedMore := func() {
		t.Helper()
		want++
		waitUntil(t, func() bool { return atomic.LoadInt64(&released) >= want },
			func() string { return "the resting reader kept its buffer" })
	}
	expect(packets.Connack)
	for i := 0; i < 3; i++ {
		releasedMore()
		publish := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1},
			ProtocolVersion: 4, TopicName: "a", Payload: []byte("x"), PacketID: uint16(i + 1)}
		buf.Reset()
		if err := publish.PublishEncode(&buf); err != nil {
			t.Fatal(err)
		}
		buf.Write([]byte{packets.Pingreq << 4, 0})
		if _, err := cli.Write(buf.Bytes()); err != nil {
			t.Fatal(err)
		}
		expect(packets.Puback)
		expect(packets.Pingresp)
	}
	releasedMore()
	_ = cli.Close()
	select {
	case err := <-ended:
		if err == nil {
			t.Error("done called with nil for a connection closed by the client")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("a connection closed while its reader held no buffer did not end")
	}
}

// causeAtClose records the client's stop cause when its connection closes.
type causeAtClose struct {
	net.Conn
	cl    *Client
	cause error
}

func (c *causeAtClose) Close() error {
	c.cause = c.cl.StopCause()
	return c.Conn.Close()
}

// TestStopCauseBeforeClose: patch 16. A reader that wakes on the closed
// connection must find why the client was stopped: its session's end, and
// whether its will is published (a session taken over), depend on it.
func TestStopCauseBeforeClose(t *testing.T) {
	s := New(nil)
	srv, cli := net.Pipe()
	t.Cleanup(func() { _ = cli.Close() })
	conn := &causeAtClose{Conn: srv}
	cl := s.NewClient(conn, "t", "A", false)
	conn.cl = cl
	cl.Stop(packets.ErrSessionTakenOver)
	if conn.cause != packets.ErrSessionTakenOver {
		t.Errorf("stop cause when the connection closed: %v, want %v", conn.cause, packets.ErrSessionTakenOver)
	}
	if got := cl.StopCause(); got != packets.ErrSessionTakenOver {
		t.Errorf("StopCause() = %v", got)
	}
}

// takeoverEnv is a server for the tests of patch 18, and its clients:
// clean sessions of one protocol version, on pipes.
type takeoverEnv struct {
	t *testing.T
	s *Server
	v byte
}

func newTakeoverEnv(t *testing.T, version byte) *takeoverEnv {
	s := New(&Options{})
	if err := s.AddHook(new(allowAll), nil); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return &takeoverEnv{t: t, s: s, v: version}
}

// pipe returns the server's end of a connection whose peer reads all.
func (e *takeoverEnv) pipe() net.Conn {
	srv, cli := net.Pipe()
	e.t.Cleanup(func() { _, _ = srv.Close(), cli.Close() })
	go func() { _, _ = io.Copy(io.Discard, cli) }()
	return srv
}

// client returns a client with id on conn, or on a new pipe if conn is nil.
func (e *takeoverEnv) client(id string, conn net.Conn) *Client {
	if conn == nil {
		conn = e.pipe()
	}
	cl := e.s.NewClient(conn, "t", id, false)
	cl.Properties.ProtocolVersion, cl.Properties.Clean = e.v, true
	return cl
}

// attach takes cl's session as its CONNECT does.
func (e *takeoverEnv) attach(cl *Client) {
	e.s.attachSession(cl, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: e.v,
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, ClientIdentifier: cl.ID}})
}

// forget ends a round: the clients' subscriptions, entry and connections.
func (e *takeoverEnv) forget(old, cl *Client) {
	e.s.UnsubscribeClient(cl)
	e.s.Clients.Delete(cl.ID)
	_ = old.Net.Conn.Close()
	_ = cl.Net.Conn.Close()
}

// sameStripe returns another client id whose session lock is id's.
func (e *takeoverEnv) sameStripe(id string) string { return sameStripe(e.s, id) }

// sameStripe returns another client id whose session lock on s is id's.
func sameStripe(s *Server, id string) string {
	for i := 0; ; i++ {
		if o := fmt.Sprintf("y%d", i); o != id && s.sessionLock(o) == s.sessionLock(id) {
			return o
		}
	}
}

// connectAndEnd connects a client with id and ends its session, in the
// background; the channel closes once both are done.
func (e *takeoverEnv) connectAndEnd(id string) <-chan struct{} {
	done := make(chan struct{})
	go func() {
		defer close(done)
		cl := e.client(id, nil)
		e.attach(cl)
		_ = e.s.endSession(cl, "t", io.EOF)
	}()
	return done
}

// awaitClosed fails the test unless ch closes within 20 s.
func awaitClosed(t *testing.T, ch <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(20 * time.Second):
		t.Fatal(what)
	}
}

// TestTakeoverRacesTeardown: patch 18. A client reconnecting with the
// client id of a connection that is ending at that moment (a locker back
// before its old TCP connection was torn down) must keep its session: the
// old connection's teardown looked at whether it was taken over, then
// removed the client id's subscriptions and its entry in Clients, so a
// takeover in between lost the new client its entry (the broker then
// routed nothing to it) and, once it subscribed, its subscriptions.
func TestTakeoverRacesTeardown(t *testing.T) {
	e := newTakeoverEnv(t, 4)
	sub := packets.Subscription{Filter: "cmd/x", Qos: 1}
	for i := 0; i < 5000; i++ {
		old := e.client("x", nil)
		e.attach(old)
		e.s.Topics.Subscribe(old.ID, sub)
		old.State.Subscriptions.Add(sub.Filter, sub)

		cl := e.client("x", nil)
		start := make(chan struct{})
		var wg sync.WaitGroup
		wg.Add(2)
		go func() { // the old connection ends
			defer wg.Done()
			<-start
			_ = e.s.endSession(old, "t", io.EOF)
		}()
		go func() { // the new one connects, then subscribes
			defer wg.Done()
			<-start
			e.attach(cl)
			e.s.Topics.Subscribe(cl.ID, sub)
			cl.State.Subscriptions.Add(sub.Filter, sub)
		}()
		close(start)
		wg.Wait()
		if got, ok := e.s.Clients.Get("x"); !ok || got != cl {
			t.Fatalf("round %d: the new client is not in Clients (found %v)", i, ok)
		}
		if _, ok := e.s.Topics.Subscribers(sub.Filter).Subscriptions["x"]; !ok {
			t.Fatalf("round %d: the new client's subscription is gone", i)
		}
		e.forget(old, cl)
	}
}

// TestTakeoverDoesNotHoldTheLock: patch 18. Taking over a session writes a
// DISCONNECT to its connection, which blocks while the peer does not read;
// that must not hold the session lock that other client ids share.
func TestTakeoverDoesNotHoldTheLock(t *testing.T) {
	e := newTakeoverEnv(t, 5)
	other := e.sameStripe("x")
	stuck := newStuckConn(e.pipe())
	e.attach(e.client("x", stuck))
	taken := make(chan struct{})
	go func() {
		defer close(taken)
		e.attach(e.client("x", nil))
	}()
	awaitClosed(t, stuck.writing, "the takeover wrote nothing to the old connection")
	ended := e.connectAndEnd(other)
	select {
	case <-ended:
	case <-time.After(20 * time.Second):
		t.Error("while a takeover's DISCONNECT was blocked, a client on the same lock stripe could not connect and end")
	}
	close(stuck.release)
	awaitClosed(t, taken, "the takeover never finished")
	awaitClosed(t, ended, "the session on the same stripe never finished")
}

// stuckConn is a connection whose writes block (a peer that does not read)
// until release is closed; writing is closed at the first.
type stuckConn struct {
	net.Conn
	once             sync.Once
	writing, release chan struct{}
}

func newStuckConn(conn net.Conn) *stuckConn {
	return &stuckConn{Conn: conn, writing: make(chan struct{}), release: make(chan struct{})}
}

func (c *stuckConn) Write(b []byte) (int, error) {
	c.once.Do(func() { close(c.writing) })
	<-c.release
	return len(b), nil
}

// TestTakeoverRacesSubscribe: patch 18. A SUBSCRIBE or UNSUBSCRIBE that the
// old connection is still handling as a newer one takes its client id over
// must not change the newer one's subscriptions: the topic tree keys them
// by client id, so the old one's SUBSCRIBE subscribed the newer one to a
// filter it never asked for (kept in neither's list, so no teardown
// removed it), and its UNSUBSCRIBE took one away.
func TestTakeoverRacesSubscribe(t *testing.T) {
	e := newTakeoverEnv(t, 4)
	kept := packets.Subscription{Filter: "cmd/x", Qos: 1}
	stray := packets.Subscription{Filter: "other/x", Qos: 1}
	subscribe := func(cl *Client, typ byte, sub packets.Subscription) {
		pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: typ}, PacketID: 1, Filters: packets.Subscriptions{sub}}
		if typ == packets.Subscribe {
			_ = e.s.processSubscribe(cl, pk)
		} else {
			_ = e.s.processUnsubscribe(cl, pk)
		}
	}
	for i := 0; i < 5000; i++ {
		old := e.client("x", nil)
		e.attach(old)
		cl := e.client("x", nil)
		start := make(chan struct{})
		var wg sync.WaitGroup
		wg.Add(2)
		go func() { // the old connection's last packets
			defer wg.Done()
			<-start
			subscribe(old, packets.Subscribe, stray)
			subscribe(old, packets.Unsubscribe, kept)
		}()
		go func() { // the new one connects, then subscribes
			defer wg.Done()
			<-start
			e.attach(cl)
			subscribe(cl, packets.Subscribe, kept)
		}()
		close(start)
		wg.Wait()
		if _, ok := e.s.Topics.Subscribers(kept.Filter).Subscriptions["x"]; !ok {
			t.Fatalf("round %d: the new client's subscription was taken away", i)
		}
		if _, ok := e.s.Topics.Subscribers(stray.Filter).Subscriptions["x"]; ok {
			t.Fatalf("round %d: the new client got the old one's subscription", i)
		}
		e.forget(old, cl)
	}
}

// TestTakeoversRaceOutsideTheLock: patch 18. Two connections taking over
// the same client id at once: the one that comes second finds the first
// in Clients only once it holds the lock, and must disconnect it (a write
// that blocks while the peer does not read) outside the lock, as the first
// disconnected the session before it.
func TestTakeoversRaceOutsideTheLock(t *testing.T) {
	e := newTakeoverEnv(t, 5)
	other := e.sameStripe("x")
	e.attach(e.client("x", nil))
	// Both newcomers' peers read nothing: the one taken over blocks its
	// taker's DISCONNECT.
	stuck := []*stuckConn{newStuckConn(e.pipe()), newStuckConn(e.pipe())}
	// Both newcomers disconnect the session they find, then reach for the
	// lock, which the test holds until both have got there.
	reached := make(chan struct{}, 2)
	e.s.beforeSessionLock = func(id string) {
		if id == "x" {
			reached <- struct{}{}
		}
	}
	mu := e.s.sessionLock("x")
	mu.Lock()
	var wg sync.WaitGroup
	for _, c := range stuck {
		wg.Add(1)
		go func(c *stuckConn) { // the module's go version shares loop variables
			defer wg.Done()
			e.attach(e.client("x", c))
		}(c)
	}
	for range stuck {
		select {
		case <-reached:
		case <-time.After(10 * time.Second):
			t.Fatal("a newcomer never reached the session lock")
		}
	}
	mu.Unlock()
	select {
	case <-stuck[0].writing:
	case <-stuck[1].writing:
	case <-time.After(10 * time.Second):
		t.Fatal("neither newcomer was disconnected by the other")
	}
	ended := e.connectAndEnd(other)
	select {
	case <-ended:
	case <-time.After(20 * time.Second):
		t.Error("while one takeover's DISCONNECT to the other was blocked, a client on the same lock stripe could not connect and end")
	}
	for _, c := range stuck {
		close(c.release)
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	awaitClosed(t, done, "the takeovers never finished")
}

// TestExpiredSessionTakesItsSubscriptions: patch 19. A persistent session
// that expires leaves nothing in the topic tree. Upstream deleted the
// client but kept its filters, keyed by its id: they stayed for good, and a
// client connecting later with that id, with no session present, was sent
// what matched filters it never subscribed to.
func TestExpiredSessionTakesItsSubscriptions(t *testing.T) {
	e := newTakeoverEnv(t, 5)
	s := e.s
	n := time.Now().Unix()
	cl := e.client("gone", nil)
	cl.Properties.Props.SessionExpiryInterval, cl.Properties.Props.SessionExpiryIntervalFlag = 5, true
	const filter = "lockers/v1/gone/cmd"
	sub := packets.Subscription{Filter: filter, Qos: 1}
	if _, ok := s.subscribeClient(cl, sub); !ok {
		t.Fatal("the client did not subscribe")
	}
	if cl.State.Inflight.Set(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, PacketID: 7, TopicName: filter}) {
		atomic.AddInt64(&s.Info.Inflight, 1) // as the server counts a message it holds for a client
	}
	s.Clients.Add(cl)
	cl.Stop(packets.ErrServerShuttingDown)
	cl.State.disconnected = n - 10 // disconnected 10 s ago, past its 5 s expiry

	s.clearExpiredClients(n)
	if _, ok := s.Clients.Get("gone"); ok {
		t.Fatal("the expired session's client is still held")
	}
	if subs := s.Topics.Subscribers(filter); len(subs.Subscriptions) != 0 {
		t.Fatalf("the expired session's filter still routes to %v", subs.Subscriptions)
	}
	if v := atomic.LoadInt64(&s.Info.Subscriptions); v != 0 {
		t.Fatalf("Info.Subscriptions = %d after the expiry, want 0", v)
	}
	if v := atomic.LoadInt64(&s.Info.Inflight); v != 0 {
		t.Fatalf("Info.Inflight = %d after the expiry, want 0", v)
	}
	if cl.State.Subscriptions.Len() != 0 || cl.State.Inflight.Len() != 0 {
		t.Fatalf("the expired client keeps %d subscriptions and %d inflight messages", cl.State.Subscriptions.Len(), cl.State.Inflight.Len())
	}
	// A SUBSCRIBE its reader was still handling puts nothing back.
	if _, ok := s.subscribeClient(cl, sub); ok {
		t.Fatal("the swept client subscribed again")
	}
	if subs := s.Topics.Subscribers(filter); len(subs.Subscriptions) != 0 || atomic.LoadInt64(&s.Info.Subscriptions) != 0 {
		t.Fatalf("a SUBSCRIBE after the sweep routes the filter to %v", subs.Subscriptions)
	}
}

// TestServerPacketIDsAreNotTheClients: patch 21. The client and the server
// assign packet ids independently, and the inflight map holds both. A
// SUBSCRIBE or UNSUBSCRIBE that uses the id of a message the server sent
// and the client has not yet acknowledged is done, and a QoS 1 PUBLISH with
// it leaves that message inflight; only the client's own id in use (its
// QoS 2 message waiting for its PUBREL) is refused, with a code MQTT 3
// has.
func TestServerPacketIDsAreNotTheClients(t *testing.T) {
	for _, v := range []byte{4, 5} {
		t.Run(fmt.Sprintf("v%d", v), func(t *testing.T) {
			e := newTakeoverEnv(t, v)
			srv, cli := net.Pipe()
			t.Cleanup(func() { _, _ = srv.Close(), cli.Close() })
			cl := e.client("x", srv)
			e.attach(cl)
			cl.State.Inflight.ResetReceiveQuota(10) // as its CONNECT would
			r := bufio.NewReader(cli)
			// process runs pk through the server and returns its answer.
			process := func(pk packets.Packet) packets.Packet {
				t.Helper()
				pk.ProtocolVersion = v
				done := make(chan error, 1)
				go func() { done <- e.s.processPacket(cl, pk) }()
				typ, body, err := readPacket(r)
				if err != nil {
					t.Fatalf("reading the answer to %s: %v", packets.PacketNames[pk.FixedHeader.Type], err)
				}
				if err := <-done; err != nil {
					t.Fatalf("%s: %v", packets.PacketNames[pk.FixedHeader.Type], err)
				}
				ans := packets.Packet{FixedHeader: packets.FixedHeader{Type: typ, Remaining: len(body)}, ProtocolVersion: v}
				switch typ {
				case packets.Suback:
					err = ans.SubackDecode(body)
				case packets.Unsuback:
					err = ans.UnsubackDecode(body)
				case packets.Puback:
					err = ans.PubackDecode(body)
				case packets.Pubcomp:
					err = ans.PubcompDecode(body)
				default:
					t.Fatalf("%s answered with packet type %d", packets.PacketNames[pk.FixedHeader.Type], typ)
				}
				if err != nil {
					t.Fatal(err)
				}
				return ans
			}
			subscribe := func(id uint16) []byte {
				t.Helper()
				ans := process(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1}, PacketID: id,
					Filters: packets.Subscriptions{{Filter: "a/b", Qos: 1}}})
				if ans.FixedHeader.Type != packets.Suback || ans.PacketID != id {
					t.Fatalf("SUBSCRIBE %d answered with %s %d", id, packets.PacketNames[ans.FixedHeader.Type], ans.PacketID)
				}
				return ans.ReasonCodes
			}

			// The server's QoS 1 message 7, not yet acknowledged.
			sent := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, PacketID: 7, TopicName: "c/d"}
			cl.State.Inflight.Set(sent)
			if got := subscribe(7); len(got) != 1 || got[0] != 1 {
				t.Fatalf("SUBSCRIBE 7: reason codes %#x, want granted QoS 1", got)
			}
			ans := process(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Unsubscribe, Qos: 1}, PacketID: 7,
				Filters: packets.Subscriptions{{Filter: "a/b"}}})
			if ans.FixedHeader.Type != packets.Unsuback || ans.PacketID != 7 || v == 5 && (len(ans.ReasonCodes) != 1 || ans.ReasonCodes[0] != 0) {
				t.Fatalf("UNSUBSCRIBE 7 answered with %s %d %#x, want done", packets.PacketNames[ans.FixedHeader.Type], ans.PacketID, ans.ReasonCodes)
			}
			ans = process(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, PacketID: 7,
				TopicName: "e/f", Payload: []byte("x")})
			if ans.FixedHeader.Type != packets.Puback || ans.PacketID != 7 || ans.ReasonCode != 0 {
				t.Fatalf("PUBLISH 7 answered with %s %d %#x, want a PUBACK", packets.PacketNames[ans.FixedHeader.Type], ans.PacketID, ans.ReasonCode)
			}
			// A PUBREL 7 of the client's (no QoS 2 flow of its own there):
			// not found, and the server's message stays.
			ans = process(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pubrel, Qos: 1}, PacketID: 7})
			if ans.FixedHeader.Type != packets.Pubcomp || ans.PacketID != 7 || v == 5 && ans.ReasonCode != packets.ErrPacketIdentifierNotFound.Code {
				t.Fatalf("PUBREL 7 answered with %s %d %#x, want PUBCOMP not found", packets.PacketNames[ans.FixedHeader.Type], ans.PacketID, ans.ReasonCode)
			}
			if pk, ok := cl.State.Inflight.Get(7); !ok || pk.FixedHeader.Type != packets.Publish || pk.TopicName != "c/d" {
				t.Fatalf("the server's message 7 is no longer inflight (found %v: %s %q): it would not be sent again", ok, packets.PacketNames[pk.FixedHeader.Type], pk.TopicName)
			}

			// The client's own QoS 2 message 9, waiting for its PUBREL.
			cl.State.Inflight.Set(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pubrec}, PacketID: 9})
			want := packets.ErrPacketIdentifierInUse.Code
			if v < 5 {
				want = packets.ErrUnspecifiedError.Code
			}
			if got := subscribe(9); len(got) != 1 || got[0] != want {
				t.Fatalf("SUBSCRIBE 9: reason codes %#x, want %#x", got, want)
			}
		})
	}
}

// ackLater takes every QoS 1 PUBLISH to handle itself (patch 22); one with
// the id ackNow it acknowledges before it returns, as a fast handler may.
type ackLater struct {
	HookBase
	s      *Server
	taken  chan uint16
	ackNow uint16
}

func (h *ackLater) ID() string { return "ack-later" }

func (h *ackLater) Provides(b byte) bool { return b == OnPublish }

func (h *ackLater) OnPublish(cl *Client, pk packets.Packet) (packets.Packet, error) {
	if pk.FixedHeader.Qos != 1 {
		return pk, nil
	}
	cl.HoldAck(pk.PacketID)
	if pk.PacketID == h.ackNow {
		if err := h.s.AckPublish(cl, pk.PacketID); err != nil {
			return pk, err
		}
	}
	h.taken <- pk.PacketID
	return pk, ErrAckLater
}

// TestAckLater: a QoS 1 PUBLISH an OnPublish hook takes with ErrAckLater is
// not acknowledged (a PINGREQ after it is answered first) and holds one of
// the client's receive quota until AckPublish, which sends its PUBACK and
// gives the quota back, once. A resend of a held message is dropped. Over
// its quota an MQTT 5 client is disconnected, as before; an MQTT 3.1.1
// client's publish waits for an ack. AckPublish on a closed connection
// says so.
func TestAckLater(t *testing.T) {
	for _, v := range []byte{4, 5} {
		t.Run(fmt.Sprintf("v%d", v), func(t *testing.T) {
			e := newTakeoverEnv(t, v)
			h := &ackLater{s: e.s, taken: make(chan uint16, 4), ackNow: 9}
			if err := e.s.AddHook(h, nil); err != nil {
				t.Fatal(err)
			}
			srv, cli := net.Pipe()
			t.Cleanup(func() { _, _ = srv.Close(), cli.Close() })
			cl := e.client("x", srv)
			e.attach(cl)
			cl.State.Inflight.ResetReceiveQuota(2)
			r := bufio.NewReader(cli)
			// next reads the client's next packet while process runs.
			next := func(process func() error) (byte, []byte) {
				t.Helper()
				done := make(chan error, 1)
				go func() { done <- process() }()
				typ, body, err := readPacket(r)
				if err != nil {
					t.Fatal(err)
				}
				if err := <-done; err != nil {
					t.Fatal(err)
				}
				return typ, body
			}
			// process processes a PUBLISH; an answer written (nobody
			// reads the pipe here) fails it at the deadline.
			process := func(id uint16) error {
				_ = srv.SetWriteDeadline(time.Now().Add(2 * time.Second))
				defer func() { _ = srv.SetWriteDeadline(time.Time{}) }()
				return e.s.processPacket(cl, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1},
					ProtocolVersion: v, PacketID: id, TopicName: "a/b", Payload: []byte("x")})
			}
			// publish is process, failing the test if it does not return.
			publish := func(id uint16) error {
				t.Helper()
				done := make(chan error, 1)
				go func() { done <- process(id) }()
				select {
				case err := <-done:
					return err
				case <-time.After(10 * time.Second):
					t.Fatalf("PUBLISH %d: not processed in 10 s (waiting for receive quota?)", id)
					return nil
				}
			}
			for _, id := range []uint16{3, 4} {
				if err := publish(id); err != nil {
					t.Fatal(err)
				}
				if got := <-h.taken; got != id {
					t.Fatalf("the hook took %d, want %d", got, id)
				}
			}
			typ, _ := next(func() error {
				return e.s.processPacket(cl, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pingreq}, ProtocolVersion: v})
			})
			if typ != packets.Pingresp {
				t.Fatalf("the first packet after two held publishes is %s, want PINGRESP (nothing acknowledged yet)", packets.PacketNames[typ])
			}
			if q := atomic.LoadInt32(&cl.State.Inflight.receiveQuota); q != 0 {
				t.Fatalf("receive quota %d with two publishes held, want 0", q)
			}
			typ, body := next(func() error { return e.s.AckPublish(cl, 4) })
			ack := packets.Packet{FixedHeader: packets.FixedHeader{Type: typ, Remaining: len(body)}, ProtocolVersion: v}
			if err := ack.PubackDecode(body); err != nil || typ != packets.Puback || ack.PacketID != 4 || ack.ReasonCode != 0 {
				t.Fatalf("AckPublish(4) sent %s %d %#x (%v), want PUBACK 4 success", packets.PacketNames[typ], ack.PacketID, ack.ReasonCode, err)
			}
			if q := atomic.LoadInt32(&cl.State.Inflight.receiveQuota); q != 1 {
				t.Fatalf("receive quota %d after one ack, want 1", q)
			}
			if err := publish(5); err != nil {
				t.Fatal(err)
			}
			<-h.taken
			// A resend of held 5 (its PUBACK not yet out) is dropped: not
			// taken again, and no quota spent on it.
			if err := publish(5); err != nil {
				t.Fatal(err)
			}
			select {
			case id := <-h.taken:
				t.Fatalf("the resend of held 5 was taken again (%d)", id)
			default:
			}
			// Over the quota: 3 and 5 are held.
			if v == 5 {
				// An MQTT 5 client was told its Receive Maximum.
				go func() { _, _ = io.Copy(io.Discard, r) }()
				if err := publish(6); err == nil {
					t.Fatal("a publish over the receive quota was taken")
				}
				_ = srv.Close()
				if err := e.s.AckPublish(cl, 3); err != ErrConnectionClosed {
					t.Fatalf("AckPublish on a closed connection: %v, want ErrConnectionClosed", err)
				}
				return
			}
			// An MQTT 3.1.1 client never was: its reader waits for an ack.
			acks := make(chan uint16, 8)
			go func() {
				defer close(acks)
				for {
					typ, body, err := readPacket(r)
					if err != nil {
						return
					}
					ack := packets.Packet{FixedHeader: packets.FixedHeader{Type: typ, Remaining: len(body)}, ProtocolVersion: v}
					if typ == packets.Puback && ack.PubackDecode(body) == nil {
						acks <- ack.PacketID
					}
				}
			}()
			waiting := make(chan struct{})
			testHookAwaitingQuota = func(*Client) { close(waiting) }
			t.Cleanup(func() { testHookAwaitingQuota = nil })
			nextAck := func() uint16 {
				t.Helper()
				select {
				case id := <-acks:
					return id
				case <-time.After(10 * time.Second):
					t.Fatal("no PUBACK in 10 s")
					return 0
				}
			}
			done := make(chan error, 1)
			go func() { done <- process(6) }()
			select {
			case <-waiting:
			case err := <-done:
				t.Fatalf("the publish over the quota did not wait for it: %v", err)
			}
			if err := e.s.AckPublish(cl, 3); err != nil {
				t.Fatal(err)
			}
			if got := nextAck(); got != 3 {
				t.Fatalf("PUBACK %d, want 3", got)
			}
			if got := <-h.taken; got != 6 {
				t.Fatalf("the hook took %d, want 6 once 3 was acknowledged", got)
			}
			if err := <-done; err != nil {
				t.Fatalf("the publish over the quota: %v, want it taken once quota was given back", err)
			}
			// A second ack of 3 does nothing; 5's comes next.
			if err := e.s.AckPublish(cl, 3); err != nil {
				t.Fatal(err)
			}
			if err := e.s.AckPublish(cl, 5); err != nil {
				t.Fatal(err)
			}
			if got := nextAck(); got != 5 {
				t.Fatalf("PUBACK %d after acknowledging 3 twice and then 5, want 5", got)
			}
			// Acknowledged before its hook returned: the PUBACK goes out
			// once, the quota is given back, and the id is free.
			if err := publish(9); err != nil {
				t.Fatal(err)
			}
			<-h.taken
			if got := nextAck(); got != 9 {
				t.Fatalf("PUBACK %d, want 9 (acknowledged within its hook)", got)
			}
			if cl.ackHeld(9) {
				t.Fatal("9 is still held after its PUBACK: a new message 9 would be dropped")
			}
			cl.Stop(nil)
			if err := e.s.AckPublish(cl, 6); err != ErrConnectionClosed {
				t.Fatalf("AckPublish on a closed connection: %v, want ErrConnectionClosed", err)
			}
		})
	}
}

// TestAckLaterMany: a batch that acknowledges more of one client's held
// messages than its outbound queue holds sends every PUBACK and keeps the
// connection (patch 22).
func TestAckLaterMany(t *testing.T) {
	const n = 40
	e := newTakeoverEnv(t, 4)
	e.s.Options.Capabilities.MaximumClientWritesPending = 4
	h := &ackLater{s: e.s, taken: make(chan uint16, n)}
	if err := e.s.AddHook(h, nil); err != nil {
		t.Fatal(err)
	}
	srv, cli := net.Pipe()
	t.Cleanup(func() { _, _ = srv.Close(), cli.Close() })
	cl := e.client("x", srv)
	e.attach(cl)
	cl.State.Inflight.ResetReceiveQuota(n)
	for id := uint16(1); id <= n; id++ {
		if err := e.s.processPacket(cl, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1},
			ProtocolVersion: 4, PacketID: id, TopicName: "a/b", Payload: []byte("x")}); err != nil {
			t.Fatal(err)
		}
		<-h.taken
	}
	for id := uint16(1); id <= n; id++ {
		if err := e.s.AckPublish(cl, id); err != nil {
			t.Fatalf("AckPublish(%d): %v", id, err)
		}
	}
	r := bufio.NewReader(cli)
	_ = cli.SetReadDeadline(time.Now().Add(10 * time.Second))
	for want := uint16(1); want <= n; want++ {
		typ, body, err := readPacket(r)
		if err != nil {
			t.Fatalf("reading PUBACK %d of %d: %v", want, n, err)
		}
		ack := packets.Packet{FixedHeader: packets.FixedHeader{Type: typ, Remaining: len(body)}, ProtocolVersion: 4}
		if err := ack.PubackDecode(body); err != nil || typ != packets.Puback || ack.PacketID != want {
			t.Fatalf("got %s %d (%v), want PUBACK %d", packets.PacketNames[typ], ack.PacketID, err, want)
		}
	}
	if cl.Closed() {
		t.Fatal("the client was disconnected")
	}
}

// packetHooks provides the hooks on a reader's path that the gateway's own
// hook provides (OnPacketRead, OnPacketEncode, OnPacketSent), and
// OnPacketProcessed, which it does not, and passes every packet through.
type packetHooks struct {
	allowAll
}

func (h *packetHooks) ID() string { return "packet-hooks" }

func (h *packetHooks) Provides(b byte) bool {
	switch b {
	case OnPacketRead, OnPacketEncode, OnPacketSent, OnPacketProcessed:
		return true
	}
	return h.allowAll.Provides(b)
}

func (h *packetHooks) OnPacketRead(_ *Client, pk packets.Packet) (packets.Packet, error) {
	return pk, nil
}

func (h *packetHooks) OnPacketEncode(_ *Client, pk packets.Packet) packets.Packet { return pk }

func (h *packetHooks) OnPacketSent(*Client, packets.Packet, []byte) {}

func (h *packetHooks) OnPacketProcessed(*Client, packets.Packet, error) {}

// The stack is grown to a size by a frame that fits in it and not in half
// of it, with the guard the runtime keeps free at its end (928 bytes on
// linux/amd64, 1,728 in a -race build). Each frame's array is written through fill,
// which the compiler cannot see through, so the frame keeps its size.
//
//go:noinline
func fill(b []byte) { b[len(b)-1] = 1 }

//go:noinline
func growStack4K() { var b [1400]byte; fill(b[:]) }

//go:noinline
func growStack8K() { var b [4500]byte; fill(b[:]) }

//go:noinline
func growStack16K() { var b [10000]byte; fill(b[:]) }

//go:noinline
func growStack32K() { var b [20000]byte; fill(b[:]) }

// stackNeeded reports the smallest goroutine stack, 4 to 32 KiB (64 for
// more), on which run ran without the runtime growing it. run is called
// once per size tried, each time in a new goroutine whose stack is grown
// to that size first; it must do the same work each time. The runtime
// moves a stack to grow it, so a local's address changes when it grew.
// Collections, which may shrink stacks, are off meanwhile. New goroutines
// must start on 4 KiB at most: run it in freshProcess, where they start on
// 2.
func stackNeeded(t *testing.T, run func()) int {
	t.Helper()
	defer debug.SetGCPercent(debug.SetGCPercent(-1))
	sample := []metrics.Sample{{Name: "/gc/stack/starting-size:bytes"}}
	metrics.Read(sample)
	if start := sample[0].Value.Uint64(); start > 4096 {
		t.Fatalf("goroutines start on %d-byte stacks; the test needs 4 KiB at most (run it in freshProcess)", start)
	}
	for _, size := range []struct {
		kib  int
		grow func()
	}{{4, growStack4K}, {8, growStack8K}, {16, growStack16K}, {32, growStack32K}} {
		moved := make(chan bool)
		go func() {
			size.grow()
			var mark byte
			before := uintptr(unsafe.Pointer(&mark))
			run()
			moved <- uintptr(unsafe.Pointer(&mark)) != before
		}()
		if !<-moved {
			return size.kib
		}
	}
	return 64
}

// freshProcess runs the calling test again in a process of its own, with
// the runtime's adaptive starting stack off, and reports whether this is
// that process, where the test goes on; the caller returns otherwise. By
// default the runtime starts goroutines on the average stack the last
// collection scanned, which the goroutines other tests left behind could
// raise to 8 KiB or more.
func freshProcess(t *testing.T) bool {
	t.Helper()
	const env = "MOCHI_LOCKERGATE_FRESH_PROCESS"
	if os.Getenv(env) == t.Name() {
		return true
	}
	cmd := exec.Command(os.Args[0], "-test.run=^"+t.Name()+"$", "-test.v")
	godebug := "adaptivestackstart=0"
	if g := os.Getenv("GODEBUG"); g != "" {
		godebug = g + "," + godebug
	}
	cmd.Env = append(os.Environ(), env+"="+t.Name(), "GODEBUG="+godebug)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s in its own process: %v\n%s", t.Name(), err, out)
	}
	if !bytes.Contains(out, []byte("--- PASS: "+t.Name())) {
		t.Fatalf("%s in its own process did not pass:\n%s", t.Name(), out)
	}
	t.Logf("in its own process:\n%s", out)
	return false
}

// TestStackNeeded checks that stackNeeded can tell the sizes apart.
func TestStackNeeded(t *testing.T) {
	if !freshProcess(t) {
		return
	}
	for _, c := range []struct {
		run  func()
		want int
	}{{func() {}, 4}, {growStack8K, 8}, {growStack16K, 16}, {growStack32K, 32}} {
		if got := stackNeeded(t, c.run); got != c.want {
			t.Errorf("stackNeeded = %d KiB, want %d", got, c.want)
		}
	}
}

// TestPingreqStack: patch 26. A locker's PINGREQ is handled on its reader's
// stack; a fleet's pings come in waves, and every reader a wave wakes grows
// its stack to what the packet's path needs. The path passes the packet by
// pointer, so it fits in 8 KiB; by value (mochi passes 800-byte packets
// down five calls and back) it took 16. Under -race it takes 16 either way,
// so .ci/run runs this test without -race too.
func TestPingreqStack(t *testing.T) {
	if !freshProcess(t) {
		return
	}
	limit := 8
	if raceBuild {
		limit = 16
	}
	s := New(&Options{InlineClient: true})
	if err := s.AddHook(new(packetHooks), nil); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })

	// pings has a client send n PINGREQs, one at a time, to a reader that
	// may rest (as the broker's do), and checks that each is answered and
	// that the reader then ends with the connection. It may run on a
	// goroutine other than the test's, so it returns what went wrong.
	pings := func(n int) error {
		srv, cli := net.Pipe()
		defer cli.Close()
		cl := s.NewClient(srv, "t", "A", false)
		cl.Properties.ProtocolVersion = 4
		cl.State.restAfter = time.Minute // longer than the test: it never rests
		sent := atomic.LoadInt64(&s.Info.PacketsSent)
		answered := make(chan error, 1)
		go func() {
			defer cli.Close() // ends the reader
			r := bufio.NewReader(cli)
			for i := 0; i < n; i++ {
				if _, err := cli.Write([]byte{packets.Pingreq << 4, 0}); err != nil {
					answered <- err
					return
				}
				typ, _, err := readPacket(r)
				if err == nil && typ != packets.Pingresp {
					err = fmt.Errorf("packet type %d", typ)
				}
				if err != nil {
					answered <- fmt.Errorf("no PINGRESP: %w", err)
					return
				}
			}
			answered <- nil
		}()
		err := cl.read(receiver{s: s}, true)
		if aerr := <-answered; aerr != nil {
			return aerr
		}
		if !errors.Is(err, io.EOF) {
			return fmt.Errorf("the reader ended with %v, want EOF", err)
		}
		if got := atomic.LoadInt64(&s.Info.PacketsSent) - sent; got != int64(n) {
			return fmt.Errorf("%d packets sent, want %d PINGRESPs", got, n)
		}
		return nil
	}
	var pingErr error
	got := stackNeeded(t, func() {
		if err := pings(1); err != nil && pingErr == nil {
			pingErr = err // each run's goroutine ends before the next starts
		}
	})
	if pingErr != nil {
		t.Fatal(pingErr)
	}
	if got > limit {
		t.Errorf("a PINGREQ needs a %d KiB stack, want %d at most", got, limit)
	}

	// By pointer, not on the heap instead: the packet moved there would be
	// 800 bytes per PINGREQ, the PINGRESP as many again.
	const n = 1000
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	if err := pings(n); err != nil {
		t.Fatal(err)
	}
	runtime.ReadMemStats(&after)
	if per := (after.TotalAlloc - before.TotalAlloc) / n; per > 700 {
		t.Errorf("%d bytes allocated per PINGREQ, want well under the 800 of a packet", per)
	}
}

// sessionEnv is a server with a TCP listener for the tests of patch 27:
// kept sessions resumed and taken over by raw MQTT clients.
type sessionEnv struct {
	t  *testing.T
	s  *Server
	ln net.Listener
	v  byte
}

func newSessionEnv(t *testing.T, version byte) *sessionEnv {
	s := New(&Options{InlineClient: true})
	if err := s.AddHook(new(allowAll), nil); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var served sync.WaitGroup
	t.Cleanup(func() {
		_ = ln.Close()
		_ = s.Close()
		served.Wait()
	})
	served.Add(1)
	go func() {
		defer served.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			served.Add(1)
			go func() {
				defer served.Done()
				s.ServeConnection("t", c, 0, func(error) {})
			}()
		}
	}()
	return &sessionEnv{t: t, s: s, ln: ln, v: version}
}

// rawClient is an MQTT client written packet by packet.
type rawClient struct {
	t    *testing.T
	conn net.Conn
	r    *bufio.Reader
	v    byte
}

// dial connects a client with id, a kept session unless clean, and returns
// it with its CONNACK's session present flag; the CONNACK must be the
// server's first packet.
func (e *sessionEnv) dial(id string, clean bool) (*rawClient, bool) {
	e.t.Helper()
	conn, err := net.Dial("tcp", e.ln.Addr().String())
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { _ = conn.Close() })
	c := &rawClient{t: e.t, conn: conn, r: bufio.NewReader(conn), v: e.v}
	c.send(connectPacket(e.v, id, clean))
	ack := c.next()
	if ack.FixedHeader.Type != packets.Connack {
		e.t.Fatalf("the server's first packet is %s (%q), want CONNACK [MQTT-3.2.0-1]",
			packets.PacketNames[ack.FixedHeader.Type], ack.Payload)
	}
	if ack.ReasonCode != 0 {
		e.t.Fatalf("CONNACK reason %#x", ack.ReasonCode)
	}
	return c, ack.SessionPresent
}

// connectPacket is the CONNECT of client id, a kept session (300 s with
// MQTT 5) unless clean.
func connectPacket(v byte, id string, clean bool) packets.Packet {
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: v,
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: clean, Keepalive: 60, ClientIdentifier: id}}
	if v == 5 && !clean {
		pk.Properties.SessionExpiryInterval, pk.Properties.SessionExpiryIntervalFlag = 300, true
	}
	return pk
}

// send writes pk.
func (c *rawClient) send(pk packets.Packet) {
	c.t.Helper()
	var buf bytes.Buffer
	pk.ProtocolVersion = c.v
	var err error
	switch pk.FixedHeader.Type {
	case packets.Connect:
		err = pk.ConnectEncode(&buf)
	case packets.Subscribe:
		err = pk.SubscribeEncode(&buf)
	case packets.Pingreq:
		err = pk.PingreqEncode(&buf)
	default:
		c.t.Fatalf("send: packet type %d", pk.FixedHeader.Type)
	}
	if err != nil {
		c.t.Fatal(err)
	}
	if _, err := c.conn.Write(buf.Bytes()); err != nil {
		c.t.Fatal(err)
	}
}

// next reads and decodes the next packet (CONNACK, SUBACK, PUBLISH or
// PINGRESP).
func (c *rawClient) next() packets.Packet {
	c.t.Helper()
	_ = c.conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	h, err := c.r.ReadByte()
	if err != nil {
		c.t.Fatal(err)
	}
	var pk packets.Packet
	if err := pk.FixedHeader.Decode(h); err != nil {
		c.t.Fatal(err)
	}
	_ = c.r.UnreadByte()
	_, body, err := readPacket(c.r)
	if err != nil {
		c.t.Fatal(err)
	}
	pk.FixedHeader.Remaining, pk.ProtocolVersion = len(body), c.v
	switch pk.FixedHeader.Type {
	case packets.Connack:
		err = pk.ConnackDecode(body)
	case packets.Suback:
		err = pk.SubackDecode(body)
	case packets.Publish:
		err = pk.PublishDecode(body)
	case packets.Pingresp:
	default:
		c.t.Fatalf("unexpected packet type %d", pk.FixedHeader.Type)
	}
	if err != nil {
		c.t.Fatal(err)
	}
	return pk
}

// subscribe subscribes to filter at QoS 1.
func (c *rawClient) subscribe(filter string) {
	c.t.Helper()
	c.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1}, PacketID: 1,
		Filters: packets.Subscriptions{{Filter: filter, Qos: 1}}})
	if pk := c.next(); pk.FixedHeader.Type != packets.Suback || len(pk.ReasonCodes) != 1 || pk.ReasonCodes[0] != 1 {
		c.t.Fatalf("SUBSCRIBE answered with %s %#x", packets.PacketNames[pk.FixedHeader.Type], pk.ReasonCodes)
	}
}

// published returns what the server has sent the client (and it has not
// read) by the time the server's client with its id has written its
// outbound queue: the PUBLISHes read before the PINGRESP to a PINGREQ.
func (c *rawClient) published(s *Server, id string) []packets.Packet {
	c.t.Helper()
	waitUntil(c.t, func() bool {
		cl, ok := s.Clients.Get(id)
		return ok && cl.queued() == 0 && atomic.LoadInt32(&cl.State.outboundQty) == 0
	}, func() string { return "the client's outbound queue was never written" })
	c.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pingreq}})
	var out []packets.Packet
	for {
		pk := c.next()
		if pk.FixedHeader.Type == packets.Pingresp {
			return out
		}
		if pk.FixedHeader.Type != packets.Publish {
			c.t.Fatalf("got %s, want PUBLISH or PINGRESP", packets.PacketNames[pk.FixedHeader.Type])
		}
		out = append(out, pk)
	}
}

// describe lists pks' payloads and DUP flags.
func describe(pks []packets.Packet) string {
	var b bytes.Buffer
	for _, pk := range pks {
		fmt.Fprintf(&b, "[%s dup=%v id=%d] ", pk.Payload, pk.FixedHeader.Dup, pk.PacketID)
	}
	return b.String()
}

// keptSession connects a client with id and a kept session subscribed to
// cmd/<id>, has the inline client publish what it is given at QoS 1 (left
// unacknowledged), and ends the connection; it returns once the server has
// seen it end.
func (e *sessionEnv) keptSession(id string, inFlight ...string) {
	e.t.Helper()
	c, _ := e.dial(id, false)
	c.subscribe("cmd/" + id)
	for _, m := range inFlight {
		if err := e.s.Publish("cmd/"+id, []byte(m), false, 1); err != nil {
			e.t.Fatal(err)
		}
		if pk := c.next(); pk.FixedHeader.Type != packets.Publish || string(pk.Payload) != m {
			e.t.Fatalf("got %s %q, want PUBLISH %q", packets.PacketNames[pk.FixedHeader.Type], pk.Payload, m)
		}
	}
	_ = c.conn.Close()
	waitUntil(e.t, func() bool {
		cl, ok := e.s.Clients.Get(id)
		return ok && cl.Closed()
	}, func() string { return "the server never saw the connection end, or did not keep its session" })
}

// TestResumedSessionSendsEachMessageOnce: patch 27. A kept session resumed
// gets its CONNACK first, then each message it had in flight again (DUP),
// then what was published to it meanwhile, each once. Upstream added the
// client to Clients before its CONNACK, so a message published to it then
// could be written before the CONNACK by its writer, and was sent twice:
// once from the queue, once more with the messages the session inherited,
// as it was in flight by then.
func TestResumedSessionSendsEachMessageOnce(t *testing.T) {
	for _, v := range []byte{4, 5} {
		t.Run(fmt.Sprintf("v%d", v), func(t *testing.T) {
			e := newSessionEnv(t, v)
			e.keptSession("x", "m1")
			// On the server's goroutine: failures are t.Error, not Fatal.
			e.s.beforeConnack = func(cl *Client) {
				if err := e.s.Publish("cmd/x", []byte("m2"), false, 1); err != nil {
					t.Error(err)
				}
				// Held until the CONNACK is out (no writer runs); a writer
				// that was started is let write it first.
				if !pollUntil(func() bool {
					return !cl.State.writing.Load() || cl.queued() == 0 && atomic.LoadInt32(&cl.State.outboundQty) == 0
				}) {
					t.Error("a writer was started and never wrote the message")
				}
			}
			c, present := e.dial("x", false)
			if !present {
				t.Fatal("CONNACK: no session present")
			}
			got := c.published(e.s, "x")
			if len(got) != 2 || string(got[0].Payload) != "m1" || !got[0].FixedHeader.Dup ||
				string(got[1].Payload) != "m2" || got[1].FixedHeader.Dup {
				t.Fatalf("after the CONNACK the client got %s; want m1 again (DUP), then m2, each once", describe(got))
			}
		})
	}
}

// TestTakeoverKeepsMessagesPublishedMeanwhile: patch 27. A message
// published to a kept session as a new connection takes it over goes to
// the new connection. Upstream stored it in the old client's in-flight map
// when the publisher had looked the old client up before the takeover and
// stored it after the takeover had copied that map: it was never sent.
// After a clean start it goes nowhere: the new session did not subscribe.
func TestTakeoverKeepsMessagesPublishedMeanwhile(t *testing.T) {
	for _, v := range []byte{4, 5} {
		for _, clean := range []bool{false, true} {
			t.Run(fmt.Sprintf("v%d/clean=%v", v, clean), func(t *testing.T) {
				e := newSessionEnv(t, v)
				e.keptSession("x")
				var c *rawClient
				var present bool
				testHookDeliver = func(cl *Client) {
					if c == nil && cl.ID == "x" {
						// The publisher has looked up the kept session; a
						// new connection takes it over now.
						c, present = e.dial("x", clean)
					}
				}
				t.Cleanup(func() { testHookDeliver = nil })
				if err := e.s.Publish("cmd/x", []byte("m"), false, 1); err != nil {
					t.Fatal(err)
				}
				testHookDeliver = nil
				if c == nil {
					t.Fatal("the message was not delivered to the kept session")
				}
				if present == clean {
					t.Fatalf("CONNACK session present %v after a CONNECT with clean %v", present, clean)
				}
				got := c.published(e.s, "x")
				if !clean && (len(got) != 1 || string(got[0].Payload) != "m") {
					t.Fatalf("the session taken over got %s; want m once", describe(got))
				}
				if clean && len(got) != 0 {
					t.Fatalf("a clean start got %s, which its session never subscribed to", describe(got))
				}
			})
		}
	}
}

// TestSlowSubscriberHoldsNoSessionLock: patch 27. A message kept in flight
// for a client whose connection does not drain (its writer blocked in a
// write, holding the client's lock, up to the write deadline) must not
// hold up the connects of other client ids that share its session lock:
// the first form of the patch took that lock for the whole delivery, and a
// CONNECT on the same stripe waited for the slow client's write deadline.
func TestSlowSubscriberHoldsNoSessionLock(t *testing.T) {
	e := newSessionEnv(t, 4)
	slow, _ := e.dial("slow", true)
	slow.subscribe("cmd/slow")
	cl, ok := e.s.Clients.Get("slow")
	if !ok {
		t.Fatal("no client slow")
	}
	// slow reads nothing from here on: fill its connection until its
	// writer is stuck in a write and the queue grows, to more than the
	// socket buffers hold (on Linux at most about 10 MB together).
	big := bytes.Repeat([]byte("x"), 64<<10)
	for i := 0; cl.queued() < 300; i++ {
		if i == 10_000 {
			t.Fatal("the slow client's queue never grew: its writer is not blocked")
		}
		if err := e.s.Publish("cmd/slow", big, false, 0); err != nil {
			t.Fatal(err)
		}
	}
	reached := make(chan struct{})
	var once sync.Once
	testHookDeliver = func(c *Client) {
		if c.ID == "slow" {
			once.Do(func() { close(reached) })
		}
	}
	t.Cleanup(func() { testHookDeliver = nil })
	published := make(chan struct{})
	go func() { // blocks until the slow client's write ends
		defer close(published)
		_ = e.s.Publish("cmd/slow", []byte("m"), false, 1)
	}()
	<-reached
	other := sameStripe(e.s, "slow")
	connected := make(chan struct{})
	go func() { // off the test's goroutine: t.Error, not rawClient's Fatal
		defer close(connected)
		conn, err := net.Dial("tcp", e.ln.Addr().String())
		if err != nil {
			t.Error(err)
			return
		}
		defer conn.Close()
		var buf bytes.Buffer
		connect := connectPacket(4, other, true)
		if err := connect.ConnectEncode(&buf); err != nil {
			t.Error(err)
			return
		}
		if _, err := conn.Write(buf.Bytes()); err != nil {
			t.Error(err)
			return
		}
		_ = conn.SetReadDeadline(time.Now().Add(20 * time.Second))
		if typ, _, err := readPacket(bufio.NewReader(conn)); err != nil || typ != packets.Connack {
			t.Errorf("the CONNECT of %s: packet type %d, %v; want a CONNACK", other, typ, err)
		}
	}()
	select {
	case <-connected:
	case <-time.After(10 * time.Second):
		t.Error("a CONNECT on the slow client's session lock stripe waited for its blocked write")
	}
	// Unblock the slow client's writer: its connection ends.
	_ = slow.conn.Close()
	<-published
	<-connected
}

// TestDisconnectOnlyToMQTT5: patch 28. DisconnectClient writes the
// DISCONNECT, with its reason, to an MQTT 5 client only: MQTT 3.1.1 defines
// it from client to server only, and a 3.1.1 client (mosquitto_sub) takes
// one from the server for a protocol error. Either connection is closed.
func TestDisconnectOnlyToMQTT5(t *testing.T) {
	for _, v := range []byte{3, 4, 5} {
		s := New(&Options{Logger: nil})
		srv, cli := net.Pipe()
		cl := s.NewClient(srv, "t", "x", false)
		cl.Properties.ProtocolVersion = v
		go func() { _ = s.DisconnectClient(cl, packets.ErrNotAuthorized) }()
		got, err := io.ReadAll(cli)
		if err != nil {
			t.Fatalf("v%d: %v", v, err)
		}
		if wantPacket := v == 5; wantPacket != (len(got) > 0) || wantPacket && got[0]>>4 != packets.Disconnect {
			t.Fatalf("v%d: read % x before the close, want a DISCONNECT %v", v, got, wantPacket)
		}
		_ = s.Close()
	}
}

// TestEmptyPasswordIsNotAProtocolError: patch 31. A password flag with a
// zero-length password decodes and validates (authentication judges it);
// a password flag whose bytes are missing does not decode.
func TestEmptyPasswordIsNotAProtocolError(t *testing.T) {
	for _, v := range []byte{4, 5} {
		pk := packets.Packet{
			FixedHeader:     packets.FixedHeader{Type: packets.Connect},
			ProtocolVersion: v,
			Connect: packets.ConnectParams{
				ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 30,
				ClientIdentifier: "A", UsernameFlag: true, Username: []byte("A"), PasswordFlag: true,
			},
		}
		var buf bytes.Buffer
		if err := pk.ConnectEncode(&buf); err != nil {
			t.Fatalf("v%d: encode: %v", v, err)
		}
		raw := buf.Bytes()
		var got packets.Packet
		got.ProtocolVersion = v
		fh := new(packets.FixedHeader)
		if err := fh.Decode(raw[0]); err != nil {
			t.Fatal(err)
		}
		got.FixedHeader = *fh
		body := raw[2:] // remaining length fits one byte
		if err := got.ConnectDecode(body); err != nil {
			t.Fatalf("v%d: decode: %v", v, err)
		}
		if !got.Connect.PasswordFlag || len(got.Connect.Password) != 0 {
			t.Fatalf("v%d: decoded flag %v password %q", v, got.Connect.PasswordFlag, got.Connect.Password)
		}
		if code := got.ConnectValidate(); code != packets.CodeSuccess {
			t.Errorf("v%d: ConnectValidate = %v, want success", v, code)
		}
		// The flag set and the password's two length bytes cut off.
		var cut packets.Packet
		cut.ProtocolVersion = v
		cut.FixedHeader = *fh
		if err := cut.ConnectDecode(body[:len(body)-2]); err == nil {
			t.Errorf("v%d: a password flag without the password decoded", v)
		}
	}
}

// TestDiscardSession: patch 29. A kept session is discarded on demand, as
// an expired one is: its client, subscriptions and inflight messages go, and
// a SUBSCRIBE its reader may still be handling puts nothing back; a session
// that has since taken over the id is not touched.
func TestDiscardSession(t *testing.T) {
	e := newTakeoverEnv(t, 5)
	s := e.s
	cl := e.client("kept", nil)
	const filter = "lockers/v1/kept/cmd"
	sub := packets.Subscription{Filter: filter, Qos: 1}
	if _, ok := s.subscribeClient(cl, sub); !ok {
		t.Fatal("the client did not subscribe")
	}
	if cl.State.Inflight.Set(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, PacketID: 7, TopicName: filter}) {
		atomic.AddInt64(&s.Info.Inflight, 1)
	}
	s.Clients.Add(cl)
	cl.Stop(packets.ErrServerShuttingDown) // disconnected; its session kept

	newer := e.client("kept", nil) // has taken over the id meanwhile
	s.Clients.Add(newer)
	if s.DiscardSession(cl) {
		t.Fatal("discarded a client that is no longer the id's")
	}
	if got, ok := s.Clients.Get("kept"); !ok || got != newer {
		t.Fatal("the id's newer client was removed")
	}
	s.Clients.Add(cl) // the kept one is the id's again

	if !s.DiscardSession(cl) {
		t.Fatal("the kept session was not discarded")
	}
	if _, ok := s.Clients.Get("kept"); ok {
		t.Fatal("the discarded session's client is still held")
	}
	if subs := s.Topics.Subscribers(filter); len(subs.Subscriptions) != 0 || atomic.LoadInt64(&s.Info.Subscriptions) != 0 {
		t.Fatalf("the discarded session's filter still routes to %v", subs.Subscriptions)
	}
	if v := atomic.LoadInt64(&s.Info.Inflight); v != 0 || cl.State.Inflight.Len() != 0 {
		t.Fatalf("Info.Inflight = %d, %d held: want the queued message gone", v, cl.State.Inflight.Len())
	}
	if _, ok := s.subscribeClient(cl, sub); ok {
		t.Fatal("the discarded client subscribed again")
	}
}
