package mqttbus

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/lockergate/lockergate/internal/testtool"
)

// gate holds back a hook of the bus once it is shut, until it is opened:
// entered says a hook is waiting at it.
type gate struct {
	shut    atomic.Bool
	entered chan struct{}
	open    chan struct{}
	once    sync.Once
}

func newGate(t *testing.T) *gate {
	g := &gate{entered: make(chan struct{}, 1), open: make(chan struct{})}
	t.Cleanup(g.release)
	return g
}

func (g *gate) pass() {
	if !g.shut.Load() {
		return
	}
	select {
	case g.entered <- struct{}{}:
	default:
	}
	<-g.open
}

func (g *gate) release() { g.once.Do(func() { close(g.open) }) }

// waitEntered waits until a hook is held at g.
func (g *gate) waitEntered(t *testing.T, what string) {
	t.Helper()
	select {
	case <-g.entered:
	case <-time.After(20 * time.Second):
		t.Fatalf("%s: the hook was not reached", what)
	}
}

// TestNotReadyUntilResubscribed: paho marks a new connection up before it
// starts the connection's handler; until that handler has subscribed again
// the bus is not ready (a clean session holds no subscriptions: what is
// published meanwhile does not reach this instance).
func TestNotReadyUntilResubscribed(t *testing.T) {
	addr := mosquitto(t, "")
	handler := newGate(t)
	cut := &cuttable{}
	gw := dialBus(t, addr, "gw-1", Options{openConn: cut.open, onConnect: handler.pass})
	r := &received{got: map[string]int{}}
	if err := gw.Subscribe("lockers/v1/+/events", r.handler); err != nil {
		t.Fatal(err)
	}
	testtool.Eventually(t, 10*time.Second, "ready on Dial's connection", gw.Ready)
	handler.shut.Store(true)
	cut.drop()
	handler.waitEntered(t, "the second connection's handler")
	if !gw.Connected() {
		t.Fatal("not connected while the new connection's handler runs")
	}
	if err := gw.Ready(); err == nil {
		t.Fatal("ready on a new connection whose handler has not subscribed again")
	}
	handler.release()
	testtool.Eventually(t, 20*time.Second, "ready once subscribed again", gw.Ready)
}

// TestCloseSendsNoSubscriptionAfterLeaving: a resubscription that was
// about to go out (past its closing check) when Close began is not sent
// after Close's UNSUBSCRIBE (it would put the persistent session back in
// the group, where the broker keeps giving it a share of device messages
// nobody takes): everything published after Close reaches the other
// instance.
func TestCloseSendsNoSubscriptionAfterLeaving(t *testing.T) {
	addr := mosquitto(t, "")
	pub := dialBus(t, addr, "pub", Options{})
	sub := newGate(t)
	cut := &cuttable{}
	a := dialBus(t, addr, "gw-a", Options{Persistent: true, openConn: cut.open, subscribing: func(string) { sub.pass() }})
	b := dialBus(t, addr, "gw-b", Options{Persistent: true})
	ra, rb := shareHealth(t, pub, a, b)
	// A reconnects; its resubscription waits at the gate.
	sub.shut.Store(true)
	cut.drop()
	sub.waitEntered(t, "A's resubscription")
	testtool.Eventually(t, 20*time.Second, "A connected again", func() error {
		if !a.Connected() {
			return errors.New("not yet")
		}
		return nil
	})
	// Close begins while the resubscription, past its closing check, has
	// not been queued: Close waits for it (new readers of subMu wait
	// behind a waiting writer), and its UNSUBSCRIBE goes out after it.
	released := false
	closeHolding(t, a, ra, "A's Close past its UNSUBSCRIBE", func() error {
		if !released {
			if a.subMu.TryRLock() {
				a.subMu.RUnlock()
				return errors.New("Close not waiting for the resubscription")
			}
			sub.release()
			released = true
		}
		a.mu.Lock()
		defer a.mu.Unlock()
		if a.idle == nil {
			return errors.New("not waiting for acknowledgements yet")
		}
		return nil
	})
	takesAllAfter(t, pub, rb)
}

// TestFailedDialLeavesNoConnection: a Dial that gives up (its context
// ended while paho was still connecting) leaves no connection behind to
// hold the client id.
func TestFailedDialLeavesNoConnection(t *testing.T) {
	addr := mosquitto(t, "")
	var opened, closed atomic.Int32
	slow := func(u *url.URL, _ paho.ClientOptions) (net.Conn, error) {
		time.Sleep(300 * time.Millisecond) // a slow network, longer than the Dial's context
		c, err := net.Dial("tcp", u.Host)
		if err != nil {
			return nil, err
		}
		opened.Add(1)
		return &countedConn{Conn: c, closed: &closed}, nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	_, err := Dial(ctx, Options{URL: "mqtt://" + addr, ClientID: "gw-1", Logger: quiet(), openConn: slow})
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("dial: %v, want the context's deadline", err)
	}
	testtool.Eventually(t, 10*time.Second, "every connection the failed Dial made closed", func() error {
		if o, c := opened.Load(), closed.Load(); o == 0 || c != o {
			return fmt.Errorf("%d opened, %d closed", o, c)
		}
		return nil
	})
}

// countedConn counts its closes.
type countedConn struct {
	net.Conn
	closed *atomic.Int32
	once   sync.Once
}

func (c *countedConn) Close() error {
	c.once.Do(func() { c.closed.Add(1) })
	return c.Conn.Close()
}

// TestRetainedReadGetsNoEarlierReadsMessage: a read that gave up before its
// retained message arrived does not hand that message to the topic's next
// read: the next read returns what the topic holds now, not an older one (a
// birth judged against an older presence could be taken for a stale one).
func TestRetainedReadGetsNoEarlierReadsMessage(t *testing.T) {
	addr := mosquitto(t, "")
	ctx := context.Background()
	pub := dialBus(t, addr, "pub", Options{})
	var slow atomic.Bool
	open := func(u *url.URL, o paho.ClientOptions) (net.Conn, error) {
		c, err := net.Dial("tcp", u.Host)
		if err != nil || o.ClientID != "gw-peek" {
			return c, err
		}
		return &slowConn{Conn: c, slow: &slow}, nil
	}
	gw := dialBus(t, addr, "gw", Options{openConn: open, peekWait: 5 * time.Second})
	const topic = "lockers/v1/lk-1/presence"
	if err := pub.Publish(ctx, topic, []byte("v1"), 1, true); err != nil {
		t.Fatal(err)
	}
	if got, err := gw.Retained(ctx, topic); err != nil || string(got) != "v1" {
		t.Fatalf("first read: %q %v", got, err)
	}
	// The read connection slows down: the next read's message is on its
	// way when that read gives up.
	slow.Store(true)
	short, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	if got, err := gw.Retained(short, topic); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("a read given 50 ms on a slow connection: %q %v, want the deadline", got, err)
	}
	if err := pub.Publish(ctx, topic, []byte("v2"), 1, true); err != nil {
		t.Fatal(err)
	}
	slow.Store(false)
	if got, err := gw.Retained(ctx, topic); err != nil || string(got) != "v2" {
		t.Fatalf("the read after: %q %v, want v2 (what the topic holds now)", got, err)
	}
}

// slowConn delays each read while slow is set (a slow network).
type slowConn struct {
	net.Conn
	slow *atomic.Bool
}

func (c *slowConn) Read(p []byte) (int, error) {
	if c.slow.Load() {
		time.Sleep(40 * time.Millisecond) // the network's latency, not a synchronisation
	}
	return c.Conn.Read(p)
}

// TestCommandNotQueuedWhileDown: while the connection is down a command is
// refused at once, not queued for the next connection (it could be past its
// expiry by then); retained state is queued as before.
func TestCommandNotQueuedWhileDown(t *testing.T) {
	addr := mosquitto(t, "")
	cut := &cuttable{}
	gw := dialBus(t, addr, "gw-1", Options{openConn: cut.open})
	cut.mu.Lock()
	cut.dead = true // every dial fails from now on
	cut.mu.Unlock()
	cut.drop()
	testtool.Eventually(t, 10*time.Second, "the connection down", func() error {
		if gw.Connected() {
			return errors.New("still connected")
		}
		return nil
	})
	err := gw.Publish(context.Background(), "lockers/v1/lk-1/cmd", []byte(`{"id":"c-1"}`), 1, false)
	if err == nil || !strings.Contains(err.Error(), "not connected") {
		t.Fatalf("a command while down: %v, want refused as not connected", err)
	}
}

// TestResubscribedAfterReconnect: Resubscribed runs once per reconnect,
// after its subscriptions are in again, and not for Dial's connection.
func TestResubscribedAfterReconnect(t *testing.T) {
	addr := mosquitto(t, "")
	cut := &cuttable{}
	calls := make(chan error, 4)
	var gw *Bus // set before the first reconnect, which the test makes
	gw = dialBus(t, addr, "gw-1", Options{openConn: cut.open, Resubscribed: func() { calls <- gw.Ready() }})
	r := &received{got: map[string]int{}}
	if err := gw.Subscribe("lockers/v1/+/events", r.handler); err != nil {
		t.Fatal(err)
	}
	testtool.Eventually(t, 10*time.Second, "ready on Dial's connection", gw.Ready)
	select {
	case err := <-calls:
		t.Fatalf("Resubscribed ran for Dial's connection (ready: %v)", err)
	default:
	}
	for i := range 2 {
		cut.drop()
		select {
		case err := <-calls:
			if err != nil {
				t.Fatalf("reconnect %d: Resubscribed ran before the subscriptions were in: %v", i+1, err)
			}
		case <-time.After(20 * time.Second):
			t.Fatalf("reconnect %d: Resubscribed not run", i+1)
		}
	}
}
