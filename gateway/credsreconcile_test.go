package gateway_test

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
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
	sets := credSets(t, c, r.DeviceID)
	received := func() int { return len(sets()) }
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
	// The metric counts a publish as it leaves; the set may still be on
	// its way to this client.
	Eventually(t, 10*time.Second, "the sets received", func() error {
		if n := received(); n < 6 { // the one at the birth, then five
			return fmt.Errorf("%d sets received, want 6 or more", n)
		}
		return nil
	})
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
	last := lastOf(sets())
	if _, err := tg.DB().Pool().Exec(ctx, `UPDATE devices SET creds_version = creds_version + 1 WHERE id = $1`, r.DeviceID); err != nil {
		t.Fatal(err)
	}
	before, _ := tg.Metric("lockergate_creds_republished_total")
	Eventually(t, 10*time.Second, "the new version republished", func() error {
		if got := lastOf(sets()); got != last+1 {
			return fmt.Errorf("last set received %d, want %d", got, last+1)
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
	// A census that read the locker behind before its ack was committed
	// may still republish once: the observation starts after the next.
	censusSince(t, tg, r.DeviceID)
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

// TestOlderAckGetsTheSetAgain: a locker that acknowledges an older
// credential set than the one it had acknowledged (it applied a stale set
// last, or an external broker's instance handled its acks out of order)
// is sent its current set at once, not after two censuses (an hour apart
// here), once per version, and reads current once it acknowledges that.
func TestOlderAckGetsTheSetAgain(t *testing.T) {
	ctx := context.Background()
	tg := MustStart(t, func(o *gateway.Options) { o.CensusInterval = time.Hour })
	r, c := rawLocker(t, tg, "SN-CREDS-BACK")
	sets := credSets(t, c, r.DeviceID)
	received := func(v int64) int {
		n := 0
		for _, got := range sets() {
			if got == v {
				n++
			}
		}
		return n
	}
	// The connect's retained state is sent before the versions change
	// under it (else it would be set 2, unasked).
	publishBirthHandled(t, tg, c, r.DeviceID)
	// Sets 1 and 2 stand issued (as pickups would have made them); the
	// locker applies 2.
	if _, err := tg.DB().Pool().Exec(ctx, `UPDATE devices SET creds_version = 2 WHERE id = $1`, r.DeviceID); err != nil {
		t.Fatal(err)
	}
	ack := func(v int) {
		t.Helper()
		if tok := c.Publish(protocol.Topic(r.DeviceID, protocol.ChanCredsAck), 1, false, fmt.Sprintf(`{"version":%d}`, v)); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
			t.Fatalf("ack %d: %v", v, tok.Error())
		}
	}
	current := func(want bool) func() error {
		return func() error {
			var l fleet.Locker
			if err := tg.Admin.Get(ctx, "/v1/lockers/"+r.DeviceID, nil, &l); err != nil {
				return err
			}
			if l.CredsCurrent != want {
				return fmt.Errorf("creds_current %v (acked %d of %d), want %v", l.CredsCurrent, l.CredsAcked, l.CredsVersion, want)
			}
			return nil
		}
	}
	ack(2)
	Eventually(t, 10*time.Second, "the locker current", current(true))
	if n := received(2); n != 0 {
		t.Fatalf("set 2 received %d times before any older ack, want 0", n)
	}
	ack(1)
	Eventually(t, 10*time.Second, "set 2 sent again after the ack of 1", func() error {
		if n := received(2); n != 1 {
			return fmt.Errorf("set 2 received %d times, want 1", n)
		}
		return nil
	})
	// Counted once the publish has left, which the set's arrival can beat.
	tg.WaitMetric(t, 10*time.Second, "lockergate_creds_republished_total", 1)
	if err := current(false)(); err != nil {
		t.Fatal(err)
	}
	ack(2)
	Eventually(t, 10*time.Second, "the locker current again", current(true))
	// Going back again at the same version (firmware that re-applies a
	// stale copy after every set) is left to the census: the set was sent
	// once for it. An ack repeated (QoS 1) is no step back either.
	ack(2)
	ack(1)
	ack(1)
	// At a new version, once more; a locker's acks are handled in order,
	// so once set 3 is in, the acks of 1 before it were handled.
	if _, err := tg.DB().Pool().Exec(ctx, `UPDATE devices SET creds_version = 3 WHERE id = $1`, r.DeviceID); err != nil {
		t.Fatal(err)
	}
	ack(3)
	ack(2)
	Eventually(t, 10*time.Second, "set 3 sent after the ack of 2", func() error {
		if n := received(3); n != 1 {
			return fmt.Errorf("set 3 received %d times, want 1", n)
		}
		return nil
	})
	if n := received(2); n != 1 {
		t.Fatalf("set 2 received %d times, want once: going back twice at one version sends it once", n)
	}
	ack(3)
	Eventually(t, 10*time.Second, "the locker current at last", current(true))
	if n, err := tg.Metric("lockergate_creds_republished_total"); err != nil || n != 2 {
		t.Fatalf("lockergate_creds_republished_total = %v (%v), want 2: once per version", n, err)
	}
}

// censusSince waits until a census has begun after the call, and so
// until every credential reconciliation that read the database before the
// call has published what it would (the manager's loop runs them in turn):
// it registers a marker locker at like's site by hand and waits for
// lockergate_devices_registered to count it.
func censusSince(t *testing.T, tg *TestGateway, like string) {
	t.Helper()
	marker := fmt.Sprintf("census-marker-%d", time.Now().UnixNano())
	if _, err := tg.DB().Pool().Exec(context.Background(), `INSERT INTO devices (id, serial, site, model, fw, secret_hash)
		SELECT $1, $1, site, model, fw, '\x00' FROM devices WHERE id = $2`, marker, like); err != nil {
		t.Fatal(err)
	}
	tg.WaitMetric(t, 10*time.Second, "lockergate_devices_registered",
		float64(tg.Count(t, `SELECT count(*) FROM devices WHERE NOT disabled`)))
}

// credSets subscribes plain client c to locker id's credential sets and
// returns what it has received so far: each set's version, in the order
// the client's handlers ran (paho runs each in its own goroutine, so not
// always the order of arrival).
func credSets(t *testing.T, c paho.Client, id string) func() []int64 {
	t.Helper()
	var mu sync.Mutex
	var versions []int64
	tok := c.Subscribe(protocol.Topic(id, protocol.ChanCreds), 1, func(_ paho.Client, m paho.Message) {
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
	return func() []int64 {
		mu.Lock()
		defer mu.Unlock()
		return slices.Clone(versions)
	}
}

// lastOf is the last of versions, or -1 when there is none.
func lastOf(versions []int64) int64 {
	if len(versions) == 0 {
		return -1
	}
	return versions[len(versions)-1]
}
