package gateway_test

import (
	"context"
	"encoding/json"
	"fmt"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/lockergate/lockergate/gateway"
	"github.com/lockergate/lockergate/internal/testtool"
	"github.com/lockergate/lockergate/protocol"
)

// TestLockerConfigAcrossRestarts: the lockers' configuration from the
// flags (no version given) goes out under a version the database keeps:
// the default's 1 bumped for a configuration other than the default, the
// same after a restart with the same, the next after a restart with
// another, which a locker gets when it reconnects.
func TestLockerConfigAcrossRestarts(t *testing.T) {
	var opts gateway.Options
	tg := MustStart(t, func(o *gateway.Options) {
		o.Config = protocol.Config{HealthIntervalS: 30}
		opts = *o
	})
	claim := tg.MustSiteAndClaim(t, "s1", 1)
	id := MustProvision(t, tg, claim, "SN-CFG-1")
	// config connects as the locker and returns the configuration it gets
	// first whose version is want.
	config := func(tg *TestGateway, want int64) protocol.Config {
		t.Helper()
		dev := MustConnect(t, tg.MQTTAddr(), id.DeviceID, id.DeviceID, id.Password)
		defer dev.Disconnect(250)
		got := make(chan protocol.Config, 8)
		tok := dev.Subscribe(protocol.Topic(id.DeviceID, protocol.ChanConfig), 1, func(_ paho.Client, m paho.Message) {
			var c protocol.Config
			if json.Unmarshal(m.Payload(), &c) == nil {
				got <- c
			}
		})
		if !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
			t.Fatalf("subscribe: %v", tok.Error())
		}
		deadline := time.After(10 * time.Second)
		for {
			select {
			case c := <-got:
				if c.Version == want {
					return c
				}
			case <-deadline:
				t.Fatalf("no config version %d within 10 s", want)
			}
		}
	}
	if c := config(tg, 2); c.HealthIntervalS != 30 || c.DoorAjarS != 120 || c.Lockout != protocol.DefaultLockout {
		t.Fatalf("first configuration %+v, want health 30 s and the defaults", c)
	}
	tg.Stop(t)
	tg = MustRun(t, opts)
	config(tg, 2)
	tg.Stop(t)
	opts.Config.DoorAjarS = 300
	tg = MustRun(t, opts)
	if c := config(tg, 3); c.HealthIntervalS != 30 || c.DoorAjarS != 300 {
		t.Fatalf("changed configuration %+v, want health 30 s and door ajar 300 s", c)
	}
	// The API shows the version the locker is sent.
	var l struct {
		ConfigVersion int64 `json:"config_version"`
	}
	if err := tg.Admin.Get(context.Background(), "/v1/lockers/"+id.DeviceID, nil, &l); err != nil || l.ConfigVersion != 3 {
		t.Fatalf("config_version %d (%v), want 3", l.ConfigVersion, err)
	}
}

// TestExternalConfigChangeReachesConnectedLockers: behind an external
// broker a locker's session outlives a gateway restart, so a start that
// changed the configuration publishes it to every locker: a connected
// locker applies the new version without reconnecting (before, it kept the
// old one until its next connect, while the gateway judged its silence by
// the new interval). mosquitto delivers the lockers' retained births to a
// gateway's new shared subscription, which syncs each locker anew; brokers
// that follow MQTT 5 (no retained messages on shared subscriptions, 4.8.2:
// EMQX, HiveMQ) do not, so the test clears the retained birth first.
func TestExternalConfigChangeReachesConnectedLockers(t *testing.T) {
	mq := MustOpenMosquitto(t)
	var opts gateway.Options
	tg := MustStart(t, onExternal(mq, "gw-cfg"), func(o *gateway.Options) { opts = *o })
	r, sim := oneExternalLocker(t, tg, mq, "s1")
	locker := sim.Lockers()[0]
	testtool.Eventually(t, 10*time.Second, "the locker holds configuration 1", func() error {
		if v := locker.ConfigVersion(); v != 1 {
			return fmt.Errorf("version %d", v)
		}
		return nil
	})
	connects := sim.Stats().Connects
	other := MustConnect(t, mq.Addr, "clears-retained", "", "")
	MustPublish(t, other, protocol.Topic(r.DeviceID, protocol.ChanPresence), true, "")
	tg.Stop(t)
	opts.Config = protocol.Config{HealthIntervalS: 20}
	tg = MustRun(t, opts)
	testtool.Eventually(t, 15*time.Second, "the connected locker applies configuration 2", func() error {
		if v := locker.ConfigVersion(); v != 2 {
			return fmt.Errorf("version %d", v)
		}
		return nil
	})
	if c := sim.Stats().Connects; c != connects {
		t.Fatalf("the locker connected %d times more: it was to get the configuration in its session", c-connects)
	}
	var l struct {
		ConfigVersion int64 `json:"config_version"`
		Online        bool  `json:"online"`
	}
	if err := tg.Admin.Get(context.Background(), "/v1/lockers/"+r.DeviceID, nil, &l); err != nil || l.ConfigVersion != 2 || !l.Online {
		t.Fatalf("locker %+v (%v), want online with config_version 2", l, err)
	}

	// A start that changes nothing republishes too: in a rolling restart an
	// instance still on the old flags may have sent lockers the old values
	// since the change. A reader subscribed from before sees the retained
	// config cleared on the broker, then published again by the start
	// (both live, not the retained copy its subscription brought).
	got := make(chan []byte, 8)
	reader := MustConnect(t, mq.Addr, "config-reader", "", "")
	defer reader.Disconnect(50)
	if tok := reader.Subscribe(protocol.Topic(r.DeviceID, protocol.ChanConfig), 1, func(_ paho.Client, m paho.Message) {
		if !m.Retained() { // the copy handed to the new subscription is not news
			got <- m.Payload()
		}
	}); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("subscribe: %v", tok.Error())
	}
	MustPublish(t, other, protocol.Topic(r.DeviceID, protocol.ChanConfig), true, "")
	deadline := time.After(15 * time.Second)
	for cleared := false; ; {
		select {
		case p := <-got:
			switch {
			case len(p) == 0 && !cleared:
				cleared = true // from here on, only what the restart publishes
				tg.Stop(t)
				tg = MustRun(t, opts)
			case cleared:
				var c protocol.Config
				if err := json.Unmarshal(p, &c); err != nil || c.Version != 2 || c.HealthIntervalS != 20 {
					t.Fatalf("config published at the restart %s (%v), want version 2 with health 20 s", p, err)
				}
				return
			}
		case <-deadline:
			t.Fatal("no config published by a start that changed nothing")
		}
	}
}
