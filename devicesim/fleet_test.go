package devicesim_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"runtime"
	"runtime/pprof"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/lockergate/lockergate/devicesim"
	"github.com/lockergate/lockergate/devicesim/devicesimtest"
	"github.com/lockergate/lockergate/protocol"
)

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn}))
}

// MustFleet builds a fleet against env that Close()s on cleanup.
func MustFleet(t *testing.T, env *devicesimtest.Env, n int, mutate func(*devicesim.Options)) *devicesim.Fleet {
	t.Helper()
	opts := devicesim.Options{
		Broker:         env.URL,
		ClaimToken:     env.Claim,
		Lockers:        n,
		Seed:           42,
		HealthInterval: 100 * time.Millisecond,
		DoorCloseDelay: 20 * time.Millisecond,
		RetryBase:      20 * time.Millisecond,
		RetryMax:       200 * time.Millisecond,
		Logger:         testLogger(t),
	}
	if mutate != nil {
		mutate(&opts)
	}
	f, err := devicesim.NewFleet(opts)
	if err != nil {
		t.Fatalf("NewFleet: %v", err)
	}
	t.Cleanup(f.Close)
	return f
}

func MustStart(t *testing.T, f *devicesim.Fleet) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	if err := f.Start(ctx); err != nil {
		t.Fatalf("Start: %v", err)
	}
}

// waitGoroutines polls until the goroutine count is back to baseline.
func waitGoroutines(t *testing.T, baseline int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		n := runtime.NumGoroutine()
		if n <= baseline {
			return
		}
		if time.Now().After(deadline) {
			var buf bytes.Buffer
			_ = pprof.Lookup("goroutine").WriteTo(&buf, 1)
			t.Fatalf("goroutines: %d after Close, baseline %d\n%s", n, baseline, buf.String())
		}
		time.Sleep(10 * time.Millisecond) // polling a condition with a deadline
	}
}

func decodeAll[T any, PT interface {
	*T
	protocol.Validator
}](t *testing.T, msgs []devicesimtest.Message) []T {
	t.Helper()
	out := make([]T, 0, len(msgs))
	for _, m := range msgs {
		v, err := protocol.Decode[T, PT](m.Payload)
		if err != nil {
			t.Fatalf("%s: %v: %s", m.Topic, err, m.Payload)
		}
		out = append(out, *v)
	}
	return out
}

func events(t *testing.T, env *devicesimtest.Env, id string) []protocol.Event {
	return decodeAll[protocol.Event](t, env.Messages(protocol.Topic(id, protocol.ChanEvents)))
}

func eventsWhere(t *testing.T, env *devicesimtest.Env, id string, keep func(protocol.Event) bool) []protocol.Event {
	var out []protocol.Event
	for _, e := range events(t, env, id) {
		if keep(e) {
			out = append(out, e)
		}
	}
	return out
}

func results(t *testing.T, env *devicesimtest.Env, id, cmdID string) []protocol.CommandResult {
	var out []protocol.CommandResult
	for _, r := range decodeAll[protocol.CommandResult](t, env.Messages(protocol.Topic(id, protocol.ChanCmdResult))) {
		if r.ID == cmdID {
			out = append(out, r)
		}
	}
	return out
}

func births(t *testing.T, env *devicesimtest.Env, id string) []protocol.Presence {
	var out []protocol.Presence
	for _, p := range decodeAll[protocol.Presence](t, env.Messages(protocol.Topic(id, protocol.ChanPresence))) {
		if p.Online {
			out = append(out, p)
		}
	}
	return out
}

func retainedPresence(t *testing.T, env *devicesimtest.Env, id string) (protocol.Presence, bool) {
	b, ok := env.Retained(protocol.Topic(id, protocol.ChanPresence))
	if !ok {
		return protocol.Presence{}, false
	}
	p, err := protocol.Decode[protocol.Presence](b)
	if err != nil {
		t.Fatalf("retained presence: %v", err)
	}
	return *p, true
}

func sendCmd(t *testing.T, env *devicesimtest.Env, deviceID string, c protocol.Command) {
	t.Helper()
	if c.IssuedAt.IsZero() {
		c.IssuedAt = protocol.Now()
	}
	if c.ExpiresAt.IsZero() {
		c.ExpiresAt = protocol.T(time.Now().Add(time.Minute))
	}
	if err := env.Publish(protocol.Topic(deviceID, protocol.ChanCmd), protocol.Encode(c), false); err != nil {
		t.Fatalf("publish command: %v", err)
	}
}

// waitResult waits for the n-th answer to cmdID and returns all answers.
func waitResult(t *testing.T, env *devicesimtest.Env, id, cmdID string, n int) []protocol.CommandResult {
	t.Helper()
	env.Wait(t, fmt.Sprintf("%d answer(s) to %s", n, cmdID), func() bool { return len(results(t, env, id, cmdID)) >= n })
	return results(t, env, id, cmdID)
}

func sendCreds(t *testing.T, env *devicesimtest.Env, deviceID string, set protocol.CredSet) {
	t.Helper()
	if err := env.Publish(protocol.Topic(deviceID, protocol.ChanCreds), protocol.Encode(set), true); err != nil {
		t.Fatalf("publish creds: %v", err)
	}
	env.Wait(t, fmt.Sprintf("creds/ack version %d", set.Version), func() bool {
		for _, a := range decodeAll[protocol.CredsAck](t, env.Messages(protocol.Topic(deviceID, protocol.ChanCredsAck))) {
			if a.Version == set.Version {
				return true
			}
		}
		return false
	})
}

func pin(t *testing.T, env *devicesimtest.Env, l *devicesim.Locker, credID, code string, notAfter time.Time, comps ...int) protocol.Credential {
	t.Helper()
	id, ok := env.Identity(l.Serial())
	if !ok {
		t.Fatalf("%s has no identity at the gateway", l.Serial())
	}
	return protocol.Credential{ID: credID, Kind: protocol.KindPIN, MAC: protocol.CredMAC(id.CredKey, code),
		Compartments: comps, NotAfter: protocol.T(notAfter)}
}

func TestFleetEndToEnd(t *testing.T) {
	env := devicesimtest.Start(t, devicesimtest.Options{})
	baseline := runtime.NumGoroutine()
	const n = 20
	f := MustFleet(t, env, n, nil)
	MustStart(t, f)
	ls := f.Lockers()
	ctx := t.Context()

	t.Run("ProvisionsAndConnects", func(t *testing.T) {
		if len(ls) != n {
			t.Fatalf("got %d lockers, want %d", len(ls), n)
		}
		for _, l := range ls {
			gw, ok := env.Identity(l.Serial())
			switch {
			case !ok:
				t.Errorf("%s: not provisioned at the gateway", l.Serial())
			case l.DeviceID() != gw.DeviceID:
				t.Errorf("%s: device id %q, gateway handed %q", l.Serial(), l.DeviceID(), gw.DeviceID)
			case !l.Connected():
				t.Errorf("%s: not connected", l.Serial())
			case f.Locker(gw.DeviceID) != l:
				t.Errorf("Locker(%q) does not find %s", gw.DeviceID, l.Serial())
			}
			if id, _ := l.Identity(); !bytes.Equal(id.CredKey, gw.CredKey) || !bytes.Equal(id.FwPubkey, gw.FwPubkey) {
				t.Errorf("%s: keys differ from what the gateway handed out", l.Serial())
			}
		}
		if f.Locker("lk-nope") != nil {
			t.Error("Locker(unknown) is not nil")
		}
		st := f.Stats()
		if st.Connected != n || st.Provisioned != n || env.Provisioned() != n {
			t.Errorf("stats %+v, gateway provisioned %d; want %d connected and provisioned", st, env.Provisioned(), n)
		}
	})

	t.Run("BirthRetained", func(t *testing.T) {
		for _, l := range ls {
			id := l.DeviceID()
			// Connected means the broker acknowledged the birth; mochi acks
			// before it delivers, so the recorder may still be behind.
			p, ok := retainedPresence(t, env, id)
			if !ok {
				t.Fatalf("%s: connected without a retained birth", id)
			}
			env.Wait(t, "birth of "+id+" delivered", func() bool { return len(births(t, env, id)) == 1 })
			if !p.Online || p.FW != "1.4.2" || p.Model != l.Model().Name || p.BootID != l.BootID() || p.BootID == "" {
				t.Errorf("%s: retained presence %+v; want online, fw 1.4.2, model %s, boot %s", id, p, l.Model().Name, l.BootID())
			}
			msgs := env.Messages(protocol.Topic(id, protocol.ChanPresence))
			if len(msgs) == 0 || !msgs[0].Retain || msgs[0].QoS != 1 {
				t.Errorf("%s: birth not published retained at QoS 1: %+v", id, msgs)
			}
		}
	})

	t.Run("HealthSeqIncrements", func(t *testing.T) {
		l := ls[0]
		topic := protocol.Topic(l.DeviceID(), protocol.ChanHealth)
		env.Wait(t, "3 health messages", func() bool { return len(env.Messages(topic)) >= 3 })
		hs := decodeAll[protocol.Health](t, env.Messages(topic))
		for i, h := range hs {
			if h.Seq != int64(i+1) {
				t.Fatalf("health #%d has seq %d, want %d", i, h.Seq, i+1)
			}
			if h.FW != "1.4.2" || h.Power != protocol.PowerMains || h.TempC == nil || h.RSSIdBm == nil || h.BatteryPct == nil {
				t.Errorf("health #%d incomplete: %+v", i, h)
			}
			if h.FreeCompartments == nil || *h.FreeCompartments != len(l.Model().Compartments) {
				t.Errorf("health #%d free_compartments %v, want %d", i, h.FreeCompartments, len(l.Model().Compartments))
			}
		}
	})

	l1 := ls[1]
	id1 := l1.DeviceID()
	t.Run("UnlockStagingRunsOnce", func(t *testing.T) {
		sendCmd(t, env, id1, protocol.Command{ID: "c-stage-1", Type: protocol.CmdUnlock, Compartment: 3, Reason: protocol.ReasonStaging})
		env.Wait(t, "door_closed of compartment 3", func() bool {
			return len(eventsWhere(t, env, id1, func(e protocol.Event) bool {
				return e.Type == protocol.EventDoorClosed && e.Compartment == 3
			})) == 1
		})
		rs := results(t, env, id1, "c-stage-1")
		if len(rs) != 1 || rs[0].Status != protocol.StatusOK {
			t.Fatalf("results %+v, want exactly one ok", rs)
		}
		doors := eventsWhere(t, env, id1, func(e protocol.Event) bool { return e.Compartment == 3 })
		if len(doors) != 2 {
			t.Fatalf("door events %+v, want opened and closed", doors)
		}
		if o := doors[0]; o.Type != protocol.EventDoorOpened || o.By != protocol.ByCommand || o.Command != "c-stage-1" {
			t.Errorf("first door event %+v, want door_opened by command c-stage-1", o)
		}
		if c := doors[1]; c.Occupied == nil || !*c.Occupied {
			t.Errorf("door_closed %+v, want occupied=true after staging", c)
		}
		// door_opened is published before the result.
		var order []string
		for _, m := range env.All() {
			if bytes.Contains(m.Payload, []byte(`"c-stage-1"`)) {
				order = append(order, m.Topic[strings.LastIndex(m.Topic, id1)+len(id1)+1:])
			}
		}
		if want := []string{"cmd", "events", "cmd/result"}; !slices.Equal(order, want) {
			t.Errorf("message order %v, want %v", order, want)
		}
		if got := l1.CommandsRun("c-stage-1"); got != 1 {
			t.Errorf("CommandsRun = %d, want 1", got)
		}
		if c := l1.Compartment(3); !c.Occupied || c.Open || !c.InService {
			t.Errorf("compartment 3 = %+v, want closed, occupied, in service", c)
		}
	})

	t.Run("RepeatedIDSameAnswerRunsOnce", func(t *testing.T) {
		sendCmd(t, env, id1, protocol.Command{ID: "c-stage-1", Type: protocol.CmdUnlock, Compartment: 3, Reason: protocol.ReasonStaging})
		rs := waitResult(t, env, id1, "c-stage-1", 2)
		if len(rs) != 2 || rs[0] != rs[1] {
			t.Errorf("answers %+v, want the same answer twice", rs)
		}
		if got := l1.CommandsRun("c-stage-1"); got != 1 {
			t.Errorf("CommandsRun = %d, want 1", got)
		}
		opened := eventsWhere(t, env, id1, func(e protocol.Event) bool { return e.Command == "c-stage-1" })
		if len(opened) != 1 {
			t.Errorf("door_opened for c-stage-1: %d, want 1", len(opened))
		}
	})

	t.Run("UnlockPickupEmpties", func(t *testing.T) {
		sendCmd(t, env, id1, protocol.Command{ID: "c-pick-1", Type: protocol.CmdUnlock, Compartment: 3, Reason: protocol.ReasonPickup})
		env.Wait(t, "second door_closed of compartment 3", func() bool {
			return len(eventsWhere(t, env, id1, func(e protocol.Event) bool {
				return e.Type == protocol.EventDoorClosed && e.Compartment == 3
			})) == 2
		})
		closed := eventsWhere(t, env, id1, func(e protocol.Event) bool {
			return e.Type == protocol.EventDoorClosed && e.Compartment == 3
		})
		if o := closed[1].Occupied; o == nil || *o {
			t.Errorf("door_closed after pickup %+v, want occupied=false", closed[1])
		}
	})

	t.Run("AnswersWithoutRunning", func(t *testing.T) {
		past := protocol.T(time.Now().Add(-time.Second))
		for _, tc := range []struct {
			name string
			cmd  protocol.Command
			want string
		}{
			{"Expired", protocol.Command{ID: "c-exp", Type: protocol.CmdUnlock, Compartment: 4, Reason: protocol.ReasonPickup, ExpiresAt: past}, protocol.StatusExpired},
			{"UnknownType", protocol.Command{ID: "c-unknown", Type: "self_destruct"}, protocol.StatusRejected},
			{"BadCompartment", protocol.Command{ID: "c-bad-99", Type: protocol.CmdUnlock, Compartment: 99, Reason: protocol.ReasonRemote}, protocol.StatusRejected},
			{"NoCompartment", protocol.Command{ID: "c-bad-0", Type: protocol.CmdUnlock, Reason: protocol.ReasonRemote}, protocol.StatusRejected},
			{"BadReason", protocol.Command{ID: "c-bad-reason", Type: protocol.CmdUnlock, Compartment: 4, Reason: "because"}, protocol.StatusRejected},
		} {
			t.Run(tc.name, func(t *testing.T) {
				sendCmd(t, env, id1, tc.cmd)
				rs := waitResult(t, env, id1, tc.cmd.ID, 1)
				if rs[0].Status != tc.want {
					t.Errorf("status %q, want %q", rs[0].Status, tc.want)
				}
				if got := l1.CommandsRun(tc.cmd.ID); got != 0 {
					t.Errorf("CommandsRun = %d, want 0", got)
				}
				if e := eventsWhere(t, env, id1, func(e protocol.Event) bool { return e.Command == tc.cmd.ID }); len(e) != 0 {
					t.Errorf("events for %s: %+v, want none", tc.cmd.ID, e)
				}
			})
		}
		if c := l1.Compartment(4); c.Open || c.Occupied {
			t.Errorf("compartment 4 = %+v, want untouched", c)
		}
	})

	t.Run("SetService", func(t *testing.T) {
		off := false
		sendCmd(t, env, id1, protocol.Command{ID: "c-svc", Type: protocol.CmdSetService, Compartment: 5, InService: &off})
		if rs := waitResult(t, env, id1, "c-svc", 1); rs[0].Status != protocol.StatusOK {
			t.Fatalf("set_service answered %+v", rs[0])
		}
		if l1.Compartment(5).InService {
			t.Error("compartment 5 still in service")
		}
		sendCmd(t, env, id1, protocol.Command{ID: "c-stage-5", Type: protocol.CmdUnlock, Compartment: 5, Reason: protocol.ReasonStaging})
		if rs := waitResult(t, env, id1, "c-stage-5", 1); rs[0].Status != protocol.StatusFailed || rs[0].Error != "out_of_service" {
			t.Errorf("staging into an out-of-service compartment answered %+v, want failed out_of_service", rs[0])
		}
	})

	l2 := ls[2]
	id2 := l2.DeviceID()
	t.Run("CredsAppliedAndAcked", func(t *testing.T) {
		hour := time.Now().Add(time.Hour)
		sendCreds(t, env, id2, protocol.CredSet{Version: 3, TS: protocol.Now(), Creds: []protocol.Credential{
			pin(t, env, l2, "k-good", "483920", hour, 2, 4),
			pin(t, env, l2, "k-old", "111111", time.Now().Add(-time.Minute), 1),
		}})
		if got := l2.CredsVersion(); got != 3 {
			t.Errorf("CredsVersion = %d, want 3", got)
		}
	})

	t.Run("Keypad", func(t *testing.T) {
		res := l2.EnterCode("483920")
		if !res.Accepted || res.Credential != "k-good" || !slices.Equal(res.Compartments, []int{2, 4}) {
			t.Fatalf("right code: %+v", res)
		}
		env.Wait(t, "doors 2 and 4 closed", func() bool {
			return len(eventsWhere(t, env, id2, func(e protocol.Event) bool { return e.Type == protocol.EventDoorClosed })) == 2
		})
		evs := events(t, env, id2)
		if e := evs[0]; e.Type != protocol.EventCodeAccepted || e.Credential != "k-good" || !slices.Equal(e.Compartments, []int{2, 4}) {
			t.Errorf("first event %+v, want code_accepted k-good [2 4]", e)
		}
		for _, e := range evs[1:] {
			switch e.Type {
			case protocol.EventDoorOpened:
				if e.By != protocol.ByCredential || e.Credential != "k-good" {
					t.Errorf("door_opened %+v, want by credential k-good", e)
				}
			case protocol.EventDoorClosed:
				if e.Occupied == nil || *e.Occupied {
					t.Errorf("door_closed %+v, want occupied=false", e)
				}
			}
		}
		for _, tc := range []struct{ name, code, want string }{
			{"Unknown", "000000", protocol.RejectUnknown},
			{"Used", "483920", protocol.RejectUsed},
			{"Expired", "111111", protocol.RejectExpired},
		} {
			t.Run(tc.name, func(t *testing.T) {
				before := len(events(t, env, id2))
				if res := l2.EnterCode(tc.code); res.Accepted || res.Reason != tc.want {
					t.Errorf("EnterCode = %+v, want rejected %s", res, tc.want)
				}
				env.Wait(t, "code_rejected "+tc.want, func() bool { return len(events(t, env, id2)) > before })
				if e := events(t, env, id2)[before]; e.Type != protocol.EventCodeRejected || e.Reason != tc.want {
					t.Errorf("event %+v, want code_rejected %s", e, tc.want)
				}
			})
		}
	})

	t.Run("Lockout", func(t *testing.T) {
		l := ls[3]
		id := l.DeviceID()
		sendCreds(t, env, id, protocol.CredSet{Version: 1, Creds: []protocol.Credential{
			pin(t, env, l, "k-1", "246810", time.Now().Add(time.Hour), 1)}})
		for i := range 5 {
			if res := l.EnterCode(fmt.Sprintf("99999%d", i)); res.Reason != protocol.RejectUnknown {
				t.Fatalf("wrong code #%d: %+v, want unknown", i+1, res)
			}
		}
		if res := l.EnterCode("246810"); res.Accepted || res.Reason != protocol.RejectLockedOut {
			t.Fatalf("right code while locked: %+v, want locked_out", res)
		}
		env.Wait(t, "code_rejected locked_out", func() bool {
			return len(eventsWhere(t, env, id, func(e protocol.Event) bool { return e.Reason == protocol.RejectLockedOut })) == 1
		})
		if c := l.Compartment(1); c.Open {
			t.Error("a locked keypad opened a door")
		}
	})

	t.Run("LastWillThenReconnect", func(t *testing.T) {
		l := ls[4]
		id := l.DeviceID()
		sendCreds(t, env, id, protocol.CredSet{Version: 1, Creds: []protocol.Credential{
			pin(t, env, l, "k-off", "135790", time.Now().Add(time.Hour), 2)}})
		l.Disconnect()
		if l.Connected() {
			t.Fatal("Connected after Disconnect")
		}
		env.Wait(t, "retained Last Will", func() bool {
			p, ok := retainedPresence(t, env, id)
			return ok && !p.Online
		})
		// The keypad works offline; the gateway hears about it on reconnect.
		if res := l.EnterCode("135790"); !res.Accepted {
			t.Fatalf("offline code: %+v", res)
		}
		if n := len(eventsWhere(t, env, id, func(e protocol.Event) bool { return e.Type == protocol.EventCodeAccepted })); n != 0 {
			t.Fatalf("code_accepted published while offline")
		}
		before := len(births(t, env, id))
		rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		if err := l.Reconnect(rctx); err != nil {
			t.Fatalf("Reconnect: %v", err)
		}
		env.Wait(t, "a new retained birth", func() bool {
			p, ok := retainedPresence(t, env, id)
			return ok && p.Online && len(births(t, env, id)) == before+1
		})
		if p, _ := retainedPresence(t, env, id); p.BootID != l.BootID() {
			t.Errorf("boot id changed on reconnect: %s, was %s", p.BootID, l.BootID())
		}
		env.Wait(t, "offline events delivered", func() bool {
			return len(eventsWhere(t, env, id, func(e protocol.Event) bool {
				return e.Type == protocol.EventCodeAccepted || e.Type == protocol.EventDoorClosed
			})) == 2
		})
	})

	t.Run("Reboot", func(t *testing.T) {
		l := ls[5]
		id := l.DeviceID()
		oldBoot := l.BootID()
		sendCmd(t, env, id, protocol.Command{ID: "c-reboot", Type: protocol.CmdReboot})
		if rs := waitResult(t, env, id, "c-reboot", 1); rs[0].Status != protocol.StatusOK {
			t.Fatalf("reboot answered %+v", rs[0])
		}
		env.Wait(t, "birth after reboot", func() bool {
			bs := births(t, env, id)
			return len(bs) == 2 && bs[1].BootID != oldBoot && l.Connected()
		})
		env.Wait(t, "reboot event", func() bool {
			return len(eventsWhere(t, env, id, func(e protocol.Event) bool { return e.Type == protocol.EventReboot })) == 1
		})
		if p, _ := retainedPresence(t, env, id); !p.Online || p.BootID == oldBoot {
			t.Errorf("retained presence after reboot %+v", p)
		}
		// seq restarts at 1: the health after the second birth has seq 1.
		env.Wait(t, "health after reboot", func() bool {
			return healthAfterSecondBirth(t, env, id) != nil
		})
		if h := healthAfterSecondBirth(t, env, id); h.Seq != 1 {
			t.Errorf("first health after reboot has seq %d, want 1", h.Seq)
		}
		if got := l.CommandsRun("c-reboot"); got != 1 {
			t.Errorf("CommandsRun = %d, want 1", got)
		}
	})

	t.Run("ConfigAndFwJob", func(t *testing.T) {
		l := ls[6]
		id := l.DeviceID()
		cfg := protocol.Config{Version: 7, HealthIntervalS: 60, DoorAjarS: 120, Lockout: protocol.Lockout{MaxFailures: 2, WindowS: 60, LockS: 60}}
		job := protocol.FwJob{Job: "j-1", Version: "1.5.0", URL: "http://127.0.0.1:1/fw", Size: 10, SHA256: strings.Repeat("ab", 32), Sig: "c2ln"}
		if err := env.Publish(protocol.Topic(id, protocol.ChanConfig), protocol.Encode(cfg), true); err != nil {
			t.Fatal(err)
		}
		if err := env.Publish(protocol.Topic(id, protocol.ChanFwJob), protocol.Encode(job), true); err != nil {
			t.Fatal(err)
		}
		env.Wait(t, "config and job applied", func() bool { return l.ConfigVersion() == 7 && l.FwJob() != nil })
		if got := l.FwJob(); *got != job {
			t.Errorf("FwJob = %+v, want %+v", got, job)
		}
		// The empty retained payload clears the job.
		if err := env.Publish(protocol.Topic(id, protocol.ChanFwJob), nil, true); err != nil {
			t.Fatal(err)
		}
		env.Wait(t, "job cleared", func() bool { return l.FwJob() == nil })
		// The config's lockout policy applies: 2 failures lock.
		l.EnterCode("1")
		l.EnterCode("2")
		if res := l.EnterCode("3"); res.Reason != protocol.RejectLockedOut {
			t.Errorf("third wrong code with max_failures 2: %+v, want locked_out", res)
		}
	})

	t.Run("PayloadsValidate", func(t *testing.T) {
		seen := map[protocol.Channel]int{}
		for _, m := range env.All() {
			id, ch, ok := protocol.ParseTopic(m.Topic)
			if !ok {
				t.Errorf("unparseable topic %q", m.Topic)
				continue
			}
			if !ch.DeviceToGateway() {
				continue
			}
			if m.ClientID != id {
				t.Errorf("%s published by %q", m.Topic, m.ClientID)
			}
			seen[ch]++
			var err error
			switch ch {
			case protocol.ChanPresence:
				_, err = protocol.Decode[protocol.Presence](m.Payload)
			case protocol.ChanHealth:
				_, err = protocol.Decode[protocol.Health](m.Payload)
			case protocol.ChanEvents:
				_, err = protocol.Decode[protocol.Event](m.Payload)
			case protocol.ChanCmdResult:
				_, err = protocol.Decode[protocol.CommandResult](m.Payload)
			case protocol.ChanCredsAck:
				_, err = protocol.Decode[protocol.CredsAck](m.Payload)
			case protocol.ChanFwStatus:
				_, err = protocol.Decode[protocol.FwStatus](m.Payload)
			}
			if err != nil {
				t.Errorf("%s: %v: %s", m.Topic, err, m.Payload)
			}
		}
		for _, ch := range []protocol.Channel{protocol.ChanPresence, protocol.ChanHealth, protocol.ChanEvents, protocol.ChanCmdResult, protocol.ChanCredsAck} {
			if seen[ch] == 0 {
				t.Errorf("nothing published on %s", ch)
			}
		}
	})

	t.Run("EventIDsUnique", func(t *testing.T) {
		for _, l := range ls {
			ids := map[string]bool{}
			for _, e := range events(t, env, l.DeviceID()) {
				if ids[e.ID] {
					t.Errorf("%s: event id %s twice", l.DeviceID(), e.ID)
				}
				ids[e.ID] = true
			}
		}
	})

	t.Run("NoViolations", func(t *testing.T) {
		if v := env.Violations(); len(v) > 0 {
			t.Errorf("broker refused the simulator:\n%s", strings.Join(v, "\n"))
		}
		st := f.Stats()
		if st.ConnectFailures != 0 || st.DecodeErrors != 0 || st.Dropped != 0 || st.ConnectionsLost != 0 {
			t.Errorf("stats show trouble: %+v", st)
		}
		// Run: stage, pickup, set_service, reboot. Answered: those, the
		// repeat, 5 answered without running and the failed staging.
		if st.CommandsRun != 4 || st.CommandsAnswered != 11 || st.CommandRepeats != 1 || st.CodesAccepted != 2 || st.Published == 0 || st.Received == 0 {
			t.Errorf("stats: %+v; want 4 commands run, 11 answered, 1 repeat, 2 codes accepted", st)
		}
	})

	f.Close()
	f.Close() // idempotent
	for _, l := range ls {
		if l.Connected() {
			t.Errorf("%s connected after Close", l.Serial())
		}
	}
	// A will, if any, is published before the broker forgets the session.
	env.Wait(t, "the broker to end the session", func() bool {
		_, ok := env.Server.Clients.Get(ls[0].DeviceID())
		return !ok
	})
	// Not the will (the broker drops it at a clean DISCONNECT): the
	// locker's own goodbye, with its ts.
	if p, _ := retainedPresence(t, env, ls[0].DeviceID()); p.Online || p.TS.IsZero() {
		t.Errorf("retained presence after a clean Close %+v, want the locker's own {\"online\":false} with a ts", p)
	}
	waitGoroutines(t, baseline)
}

func healthAfterSecondBirth(t *testing.T, env *devicesimtest.Env, id string) *protocol.Health {
	birthsSeen := 0
	for _, m := range env.All() {
		switch m.Topic {
		case protocol.Topic(id, protocol.ChanPresence):
			if p, err := protocol.Decode[protocol.Presence](m.Payload); err == nil && p.Online {
				birthsSeen++
			}
		case protocol.Topic(id, protocol.ChanHealth):
			if birthsSeen == 2 {
				h, err := protocol.Decode[protocol.Health](m.Payload)
				if err != nil {
					t.Fatal(err)
				}
				return h
			}
		}
	}
	return nil
}

func TestReconnectsAfterBrokerKick(t *testing.T) {
	env := devicesimtest.Start(t, devicesimtest.Options{})
	f := MustFleet(t, env, 2, nil)
	MustStart(t, f)
	l := f.Lockers()[0]
	id := l.DeviceID()
	cl, ok := env.Server.Clients.Get(id)
	if !ok {
		t.Fatalf("broker does not know %s", id)
	}
	_ = env.Server.DisconnectClient(cl, packets.ErrNotAuthorized)
	env.Wait(t, "reconnect with a new birth", func() bool { return len(births(t, env, id)) == 2 && l.Connected() })
	if st := f.Stats(); st.ConnectionsLost != 1 || st.Connects != 3 {
		t.Errorf("stats %+v, want 1 connection lost and 3 connects", st)
	}
}

func TestStartReportsRefusals(t *testing.T) {
	t.Run("SerialTaken", func(t *testing.T) {
		env := devicesimtest.Start(t, devicesimtest.Options{Refuse: map[string]string{"SIM-000001": protocol.ProvSerialTaken}})
		f := MustFleet(t, env, 3, nil)
		ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
		defer cancel()
		err := f.Start(ctx)
		var se *devicesim.StartError
		if !errors.As(err, &se) {
			t.Fatalf("Start = %v, want *StartError", err)
		}
		if len(se.Failed) != 1 || se.Failed["SIM-000001"] == nil || !errors.Is(err, devicesim.ErrProvisionRefused) {
			t.Errorf("Start = %v", err)
		}
		if !strings.Contains(err.Error(), "1 of 3") || !strings.Contains(err.Error(), "serial_taken") {
			t.Errorf("error %q does not say how many failed and why", err)
		}
		for _, l := range f.Lockers() {
			if got, want := l.Connected(), l.Serial() != "SIM-000001"; got != want {
				t.Errorf("%s connected = %v, want %v", l.Serial(), got, want)
			}
		}
	})
	t.Run("WrongClaimToken", func(t *testing.T) {
		env := devicesimtest.Start(t, devicesimtest.Options{})
		f := MustFleet(t, env, 2, func(o *devicesim.Options) { o.ClaimToken = "not-the-token" })
		ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
		defer cancel()
		err := f.Start(ctx)
		if !errors.Is(err, devicesim.ErrConnRefused) || ctx.Err() != nil {
			t.Errorf("Start = %v, want a prompt ErrConnRefused", err)
		}
	})
	t.Run("NoBroker", func(t *testing.T) {
		f := MustFleet(t, devicesimtest.Start(t, devicesimtest.Options{}), 1, func(o *devicesim.Options) { o.Broker = "tcp://127.0.0.1:1" })
		ctx, cancel := context.WithTimeout(t.Context(), 300*time.Millisecond)
		defer cancel()
		err := f.Start(ctx)
		if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "refused") {
			t.Errorf("Start = %v, want deadline exceeded naming the last error", err)
		}
	})
}

func TestIdentitiesSkipProvisioning(t *testing.T) {
	env := devicesimtest.Start(t, devicesimtest.Options{})
	first := MustFleet(t, env, 3, nil)
	MustStart(t, first)
	ids := map[string]devicesim.Identity{}
	for _, l := range first.Lockers() {
		ids[l.Serial()], _ = l.Identity()
	}
	first.Close()

	again := MustFleet(t, env, 3, func(o *devicesim.Options) { o.Identities = ids; o.ClaimToken = "" })
	MustStart(t, again)
	if env.Provisioned() != 3 || again.Stats().Provisioned != 0 {
		t.Errorf("provisioned again: gateway %d, fleet %d", env.Provisioned(), again.Stats().Provisioned)
	}
	for _, l := range again.Lockers() {
		if l.DeviceID() != ids[l.Serial()].DeviceID || again.Locker(l.DeviceID()) != l {
			t.Errorf("%s came back as %q", l.Serial(), l.DeviceID())
		}
	}
}

func TestSameSeedSameFleet(t *testing.T) {
	build := func(seed int64) *devicesim.Fleet {
		f, err := devicesim.NewFleet(devicesim.Options{Broker: "tcp://127.0.0.1:1883", ClaimToken: "x", Lockers: 50, Seed: seed})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(f.Close)
		return f
	}
	describe := func(f *devicesim.Fleet) (serials, models []string) {
		for _, l := range f.Lockers() {
			serials = append(serials, l.Serial())
			models = append(models, l.Model().Name)
		}
		return
	}
	s1, m1 := describe(build(7))
	s2, m2 := describe(build(7))
	s3, m3 := describe(build(8))
	if !slices.Equal(s1, s2) || !slices.Equal(m1, m2) {
		t.Errorf("same seed, different fleets:\n%v %v\n%v %v", s1, m1, s2, m2)
	}
	if !slices.Equal(s1, s3) || slices.Equal(m1, m3) {
		t.Errorf("another seed should change models, not serials")
	}
	if s1[0] != "SIM-000000" || s1[49] != "SIM-000049" {
		t.Errorf("serials %s..%s", s1[0], s1[49])
	}
	if m := slices.Compact(slices.Sorted(slices.Values(m1))); len(m) != len(devicesim.DefaultModels) {
		t.Errorf("50 lockers use models %v, want all defaults", m)
	}
}
