package gateway_test

import (
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/protocol"
)

// TestNoJobHeardAfterEveryConnect: a locker without a firmware job hears
// "none" (an empty fw/job) after every connect, also when its SUBSCRIBE
// comes after the gateway published its state for the connect. The empty
// retained payload that says "none" is not kept by the broker, so before
// it was heard only when the SUBSCRIBE won that race (3 connects in 6 in a
// black-box run). Each connect here waits for the gateway's publish first.
func TestNoJobHeardAfterEveryConnect(t *testing.T) {
	tg := MustStart(t)
	id := MustProvision(t, tg, tg.MustSiteAndClaim(t, "s1", 1), "SN-NOJOB")
	topic := protocol.Topic(id.DeviceID, protocol.ChanFwJob)
	var published atomic.Int64 // the gateway's publishes of the topic
	if err := tg.Broker().Subscribe(topic, func(fleet.Message) { published.Add(1) }); err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		before := published.Load()
		c, err := Connect(tg.MQTTAddr(), id.DeviceID, id.DeviceID, id.Password)
		if err != nil {
			t.Fatal(err)
		}
		Eventually(t, 10*time.Second, fmt.Sprintf("connect %d: the gateway's fw/job", i), func() error {
			if published.Load() == before {
				return fmt.Errorf("not published yet")
			}
			return nil
		})
		var mu sync.Mutex
		var got [][]byte
		if tk := c.Subscribe(topic, 1, func(_ paho.Client, m paho.Message) {
			mu.Lock()
			got = append(got, m.Payload())
			mu.Unlock()
		}); !tk.WaitTimeout(5*time.Second) || tk.Error() != nil {
			t.Fatalf("connect %d: subscribe: %v", i, tk.Error())
		}
		Eventually(t, 10*time.Second, fmt.Sprintf("connect %d: an empty fw/job", i), func() error {
			mu.Lock()
			defer mu.Unlock()
			for _, p := range got {
				if len(p) != 0 {
					return fmt.Errorf("a job %q, want none", p)
				}
			}
			if len(got) == 0 {
				return fmt.Errorf("nothing on fw/job")
			}
			return nil
		})
		c.Disconnect(50)
	}
}
