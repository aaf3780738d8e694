package devicesimtest

import (
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/lockergate/lockergate/protocol"
)

// connect logs id in with a retained Last Will on its presence topic and
// publishes a retained birth with bootID.
func connect(t *testing.T, e *Env, id, password, bootID string) paho.Client {
	t.Helper()
	presence := protocol.Topic(id, protocol.ChanPresence)
	o := paho.NewClientOptions().
		AddBroker(e.URL).
		SetClientID(id).
		SetUsername(id).
		SetPassword(password).
		SetProtocolVersion(4).
		SetCleanSession(true).
		SetAutoReconnect(false).
		SetConnectRetry(false).
		SetBinaryWill(presence, protocol.Encode(protocol.Presence{Online: false}), 1, true)
	cl := paho.NewClient(o)
	if tok := cl.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("connect %s: %v", bootID, tok.Error())
	}
	t.Cleanup(func() { cl.Disconnect(0) })
	birth := protocol.Encode(protocol.Presence{Online: true, TS: protocol.Now(), BootID: bootID})
	if tok := cl.Publish(presence, 1, true, birth); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("birth %s: %v", bootID, tok.Error())
	}
	return cl
}

// A locker that reconnects before the broker has seen its old connection
// end takes its own session over. The old session's Last Will must not
// follow the new birth: the retained presence would say "offline" while
// the locker is online.
func TestTakenOverSessionSendsNoWill(t *testing.T) {
	e := Start(t, Options{})
	const id, password = "lk-0123456789abcdef", "secret"
	e.mu.Lock()
	e.passwords[id] = password
	e.mu.Unlock()

	connect(t, e, id, password, "first")
	// The first connection never sends DISCONNECT: the second takes over.
	connect(t, e, id, password, "second")
	e.Wait(t, "the first session to end", func() bool { return e.SessionsEnded(id) == 1 })

	b, ok := e.Retained(protocol.Topic(id, protocol.ChanPresence))
	if !ok {
		t.Fatal("no retained presence")
	}
	p, err := protocol.Decode[protocol.Presence](b)
	if err != nil {
		t.Fatalf("retained presence: %v", err)
	}
	if !p.Online || p.BootID != "second" {
		t.Errorf("retained presence %+v, want the second birth", *p)
	}
	for _, m := range e.Messages(protocol.Topic(id, protocol.ChanPresence)) {
		if p, err := protocol.Decode[protocol.Presence](m.Payload); err == nil && !p.Online {
			t.Errorf("the taken-over session's will was published: %s", m.Payload)
		}
	}
	if v := e.Violations(); len(v) != 0 {
		t.Errorf("violations: %v", v)
	}
}
