package gateway_test

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/gateway"
	"github.com/lockergate/lockergate/protocol"
)

// TestCredsRepublishedUntilAcknowledged: an online locker that does not
// acknowledge its credential set (the set was lost, or its publish failed
// after the change was committed) gets it again at the next census, a
// bounded number of times; once it acknowledges, no more.
func TestCredsRepublishedUntilAcknowledged(t *testing.T) {
	ctx := context.Background()
	tg := MustStart(t, func(o *gateway.Options) { o.CensusInterval = 100 * time.Millisecond })
	r, c := rawLocker(t, tg, "SN-CREDS-1")
	var mu sync.Mutex
	var versions []int64
	tok := c.Subscribe(protocol.Topic(r.DeviceID, protocol.ChanCreds), 1, func(_ paho.Client, m paho.Message) {
		var set protocol.CredSet
		if json.Unmarshal(m.Payload(), &set) == nil {
			mu.Lock()
			versions = append(versions, set.Version)
			mu.Unlock()
		}
	})
	if !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("subscribe: %v", tok.Error())
	}
	received := func() int {
		mu.Lock()
		defer mu.Unlock()
		return len(versions)
	}
	publishBirth(t, tg, c, r.DeviceID)
	Eventually(t, 10*time.Second, "the set republished, unacknowledged", func() error {
		if n, err := tg.Metric("lockergate_creds_republished_total"); err != nil || n < 2 {
			return fmt.Errorf("lockergate_creds_republished_total = %v (%v), want 2 or more", n, err)
		}
		return nil
	})
	// A locker that never acknowledges is left alone after a few tries.
	Eventually(t, 10*time.Second, "republishing to stop", func() error {
		n, err := tg.Metric("lockergate_creds_republished_total")
		if err != nil || n != 5 {
			return fmt.Errorf("lockergate_creds_republished_total = %v (%v), want 5", n, err)
		}
		return nil
	})
	if n := received(); n < 6 { // the one at the birth, then five
		t.Errorf("%d sets received, want 6 or more", n)
	}
	var l fleet.Locker
	if err := tg.Admin.Get(ctx, "/v1/lockers/"+r.DeviceID, nil, &l); err != nil {
		t.Fatal(err)
	}
	if l.CredsCurrent {
		t.Fatal("creds_current true for a locker that never acknowledged")
	}
	// Staff are told: the codes made since its last set do not open it.
	openAlert := func() (int, string) {
		var n int
		var detail string
		if err := tg.DB().Pool().QueryRow(ctx, `SELECT count(*), coalesce(max(detail), '') FROM alerts WHERE device_id = $1
			AND kind = 'creds_not_applied' AND cleared_at IS NULL`, r.DeviceID).Scan(&n, &detail); err != nil {
			t.Fatal(err)
		}
		return n, detail
	}
	Eventually(t, 10*time.Second, "the creds_not_applied alert", func() error {
		if n, _ := openAlert(); n != 1 {
			return fmt.Errorf("%d open", n)
		}
		return nil
	})
	if _, detail := openAlert(); !strings.Contains(detail, "after 5 republishes") {
		t.Errorf("alert detail %q, want the tries", detail)
	}

	// A change publishes a new set, which the locker acknowledges: current,
	// and nothing more is republished.
	mu.Lock()
	last := versions[len(versions)-1]
	mu.Unlock()
	if _, err := tg.DB().Pool().Exec(ctx, `UPDATE devices SET creds_version = creds_version + 1 WHERE id = $1`, r.DeviceID); err != nil {
		t.Fatal(err)
	}
	before, _ := tg.Metric("lockergate_creds_republished_total")
	Eventually(t, 10*time.Second, "the new version republished", func() error {
		mu.Lock()
		defer mu.Unlock()
		if versions[len(versions)-1] != last+1 {
			return fmt.Errorf("last set received %d, want %d", versions[len(versions)-1], last+1)
		}
		return nil
	})
	ack := fmt.Sprintf(`{"version":%d}`, last+1)
	if tok := c.Publish(protocol.Topic(r.DeviceID, protocol.ChanCredsAck), 1, false, ack); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("ack: %v", tok.Error())
	}
	Eventually(t, 10*time.Second, "creds current", func() error {
		var l fleet.Locker
		if err := tg.Admin.Get(ctx, "/v1/lockers/"+r.DeviceID, nil, &l); err != nil {
			return err
		}
		if !l.CredsCurrent {
			return fmt.Errorf("creds_current false: version %d, acked %d", l.CredsVersion, l.CredsAcked)
		}
		return nil
	})
	// Current again: its alert is cleared by the gateway.
	if n, _ := openAlert(); n != 0 {
		t.Fatalf("%d creds_not_applied alerts open once the locker acknowledged its set, want none", n)
	}
	if n := tg.Count(t, `SELECT count(*) FROM alerts WHERE device_id = $1 AND kind = 'creds_not_applied' AND cleared_by = 'gateway'`, r.DeviceID); n != 1 {
		t.Fatalf("%d creds_not_applied alerts cleared by the gateway, want 1", n)
	}
	after, _ := tg.Metric("lockergate_creds_republished_total")
	n := received()
	// Ten censuses: a locker still behind would have had its set again.
	time.Sleep(time.Second) // an observation window for something that must not happen
	if got, _ := tg.Metric("lockergate_creds_republished_total"); got != after {
		t.Fatalf("republished %v more times after the acknowledgement", got-after)
	}
	if m := received(); m != n {
		t.Fatalf("%d more sets after the acknowledgement", m-n)
	}
	if after-before != 1 {
		t.Logf("the new version was republished %v times before its acknowledgement", after-before)
	}
}
