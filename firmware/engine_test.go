package firmware_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lockergate/lockergate/firmware"
	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/internal/testtool"
)

func ptr[T any](v T) *T { return &v }

func TestEngineRolloutInWaves(t *testing.T) {
	h := newHarness(t, hopt{})
	ids := h.addLockers("lk-a", "LX-24", "1.4.2", 60)
	h.addLockers("lk-b", "LX-8", "1.4.2", 5) // another model: never targeted
	a := h.upload("LX-24", "1.5.0")
	st := h.create(firmware.Spec{Firmware: a.ID, Waves: []int{5, 50, 100}, MinPerWave: 2, RatePerMin: 60000})
	if !slices.Equal(st.WaveSizes, []int{3, 27, 30}) || st.WrongModel != 5 || st.Targets != 60 {
		t.Fatalf("created: waves %v, wrong model %d, targets %d", st.WaveSizes, st.WrongModel, st.Targets)
	}
	st = h.waitStatus(st.ID, firmware.Completed, 20*time.Second)
	if st.Counts[firmware.StateSucceeded] != 60 || st.FinishedAt == nil {
		t.Fatalf("completed with %v", st.Counts)
	}
	for _, id := range ids {
		if v, _ := h.devs.fw.Load(id); v != "1.5.0" || h.devs.attempts(id) != 1 {
			t.Fatalf("%s runs %v after %d attempts", id, v, h.devs.attempts(id))
		}
	}
	for i := 1; i <= 5; i++ {
		if n := h.devs.attempts(fmt.Sprintf("lk-b%05d", i)); n != 0 {
			t.Fatalf("a locker of another model ran %d jobs", n)
		}
	}
	// Waves ran in order: every job of a wave was sent after the previous
	// wave's jobs had all finished.
	jobs := h.jobs(st.ID)
	lastDone := make([]time.Time, 3)
	firstSent := make([]time.Time, 3)
	for _, j := range jobs {
		if lastDone[j.Wave].Before(*j.DoneAt) {
			lastDone[j.Wave] = *j.DoneAt
		}
		if firstSent[j.Wave].IsZero() || j.SentAt.Before(firstSent[j.Wave]) {
			firstSent[j.Wave] = *j.SentAt
		}
	}
	for w := 1; w < 3; w++ {
		if firstSent[w].Before(lastDone[w-1]) {
			t.Fatalf("wave %d started at %v, before wave %d finished at %v", w+1, firstSent[w], w, lastDone[w-1])
		}
	}
	// Rollout actions are audited; the completion's entry is written after
	// the commit the status shows.
	var es []fleet.AuditEntry
	testtool.Eventually(t, 10*time.Second, "rollout.completed audited", func() (err error) {
		if es, err = h.db.ListAudit(context.Background(), fleet.AuditFilter{Limit: 100}); err != nil {
			return err
		}
		for _, e := range es {
			if e.Action == "rollout.completed" {
				return nil
			}
		}
		return fmt.Errorf("%d entries, no rollout.completed", len(es))
	})
	var actions []string
	for _, e := range es {
		actions = append(actions, e.Action)
		// The creation names the waves as asked (percentages) and their sizes.
		if e.Action == "rollout.create" && (fmt.Sprint(e.Detail["waves"]) != fmt.Sprint(st.Waves) || fmt.Sprint(e.Detail["wave_sizes"]) != fmt.Sprint(st.WaveSizes)) {
			t.Errorf("rollout.create detail %v, want waves %v and wave_sizes %v", e.Detail, st.Waves, st.WaveSizes)
		}
	}
	for _, want := range []string{"firmware.upload", "rollout.create", "rollout.wave", "rollout.completed"} {
		if !slices.Contains(actions, want) {
			t.Errorf("no %s in the audit log: %v", want, actions)
		}
	}
}

func TestEngineGateStopsAtTheCrossingWave(t *testing.T) {
	for _, action := range []string{firmware.ActionPause, firmware.ActionAbort} {
		t.Run(action, func(t *testing.T) {
			h := newHarness(t, hopt{})
			ids := h.addLockers("lk-", "LX-24", "1.4.2", 100)
			bad := map[string]bool{}
			for i, id := range ids {
				bad[id] = i%3 == 0 // a third fail to boot
			}
			h.devs.outcome = func(id string, _ int) string {
				if bad[id] {
					return outBoot
				}
				return outOK
			}
			a := h.upload("LX-24", "1.5.0")
			st := h.create(firmware.Spec{Firmware: a.ID, Waves: []int{10, 30, 100}, MinPerWave: 5, RatePerMin: 60000,
				MaxFailurePct: ptr(10.0), FailureAction: action})
			want := firmware.Paused
			if action == firmware.ActionAbort {
				want = firmware.Aborted
			}
			st = h.waitStatus(st.ID, want, 20*time.Second)
			if !strings.Contains(st.Reason, "over max_failure_pct 10") {
				t.Fatalf("reason %q", st.Reason)
			}
			// Let in-flight jobs of the wave finish, then check nothing past
			// the stopping wave was ever handed out.
			testtool.Eventually(t, 10*time.Second, "in-flight jobs done", func() error {
				s := h.status(st.ID)
				if n := s.Counts[firmware.StateSent] + s.Counts[firmware.StateRebooting]; n > 0 {
					return fmt.Errorf("%d in flight", n)
				}
				return nil
			})
			for _, j := range h.jobs(st.ID) {
				if j.Wave > st.CurrentWave-1 && (j.SentAt != nil || h.devs.attempts(j.DeviceID) > 0) {
					t.Fatalf("%s of wave %d got a job; the rollout stopped in wave %d", j.DeviceID, j.Wave+1, st.CurrentWave)
				}
				if action == firmware.ActionAbort && j.Wave > st.CurrentWave-1 && j.State != firmware.StateCancelled {
					t.Fatalf("aborted rollout left %s %s", j.DeviceID, j.State)
				}
			}
			if _, err := h.eng.Resume(context.Background(), st.ID, "test"); action == firmware.ActionAbort && !errors.Is(err, fleet.ErrConflict) {
				t.Fatalf("resume of an aborted rollout: %v", err)
			}
		})
	}
}

func TestEngineResumeAcceptsFailuresSoFar(t *testing.T) {
	h := newHarness(t, hopt{})
	ids := h.addLockers("lk-", "LX-24", "1.4.2", 20)
	h.devs.outcome = func(id string, _ int) string {
		if id == ids[0] || id == ids[1] || id == ids[2] {
			return outInstall
		}
		return outOK
	}
	a := h.upload("LX-24", "1.5.0")
	st := h.create(firmware.Spec{Firmware: a.ID, Waves: []int{100}, RatePerMin: 60000, MaxFailurePct: ptr(5.0)})
	h.waitStatus(st.ID, firmware.Paused, 20*time.Second)
	// The rollout pauses at the second failure; the third job may still be
	// on its way. A resume accepts only the failures the status shows, so
	// read it, as an operator would, until it shows all three.
	testtool.Eventually(t, 20*time.Second, "the status shows the three failures", func() error {
		if s := h.status(st.ID); !strings.HasPrefix(s.Reason, "wave 1: 3 of 20 jobs failed") {
			return fmt.Errorf("%s %v %q", s.Status, s.Counts, s.Reason)
		}
		return nil
	})
	if _, err := h.eng.Resume(context.Background(), st.ID, "operator"); err != nil {
		t.Fatal(err)
	}
	st = h.waitStatus(st.ID, firmware.Completed, 20*time.Second)
	if st.Counts[firmware.StateSucceeded] != 17 || st.Counts[firmware.StateFailed] != 3 {
		t.Fatalf("counts %v", st.Counts)
	}
	// Retry failed only: the three get a new attempt (and fail again).
	if _, err := h.eng.RetryFailed(context.Background(), st.ID, "operator"); err != nil {
		t.Fatal(err)
	}
	h.waitStatus(st.ID, firmware.Paused, 20*time.Second)
	// The rollout pauses at the second new failure; a retry sent before that
	// may still be reaching its locker, so wait for each to have run.
	testtool.Eventually(t, 10*time.Second, "the three retried", func() error {
		for _, id := range ids[:3] {
			if n := h.devs.attempts(id); n != 2 {
				return fmt.Errorf("%s ran %d attempts, want 2", id, n)
			}
		}
		return nil
	})
	var archived int
	if err := h.db.Pool().QueryRow(context.Background(), `SELECT count(*) FROM fw_job_attempts WHERE rollout_id = $1`, st.ID).Scan(&archived); err != nil || archived != 3 {
		t.Fatalf("archived attempts %d, %v", archived, err)
	}
}

func TestEngineRetries(t *testing.T) {
	h := newHarness(t, hopt{})
	ids := h.addLockers("lk-", "LX-24", "1.4.2", 10)
	h.devs.outcome = func(id string, attempt int) string {
		if attempt == 1 && (id == ids[0] || id == ids[1]) {
			return outInstall
		}
		return outOK
	}
	a := h.upload("LX-24", "1.5.0")
	st := h.create(firmware.Spec{Firmware: a.ID, Waves: []int{100}, RatePerMin: 60000, MaxFailurePct: ptr(0.0),
		Retries: 2, RetryOn: []string{firmware.KindInstall}})
	st = h.waitStatus(st.ID, firmware.Completed, 20*time.Second)
	if st.Counts[firmware.StateSucceeded] != 10 {
		t.Fatalf("counts %v", st.Counts)
	}
	for _, j := range h.jobs(st.ID) {
		want := 1
		if j.DeviceID == ids[0] || j.DeviceID == ids[1] {
			want = 2
		}
		if j.Attempt != want || !strings.HasSuffix(j.JobID, fmt.Sprintf(".%d", want)) {
			t.Fatalf("%s: attempt %d job %s, want attempt %d", j.DeviceID, j.Attempt, j.JobID, want)
		}
	}
}

// TestEngineRetryHandedOutClearsItsError: a retry waits queued with the
// error its earlier attempt failed with; handed out, it has none (a sent
// job showed the last attempt's error).
func TestEngineRetryHandedOutClearsItsError(t *testing.T) {
	h := newHarness(t, hopt{})
	ids := h.addLockers("lk-", "LX-24", "1.4.2", 1)
	h.devs.outcome = func(_ string, attempt int) string {
		if attempt == 1 {
			return outInstall
		}
		return outSilent
	}
	a := h.upload("LX-24", "1.5.0")
	st := h.create(firmware.Spec{Firmware: a.ID, Waves: []int{100}, RatePerMin: 60000, MaxFailurePct: ptr(100.0),
		Retries: 1, RetryOn: []string{firmware.KindInstall}})
	testtool.Eventually(t, 10*time.Second, "the retry handed out", func() error {
		if j := h.job(st.ID, ids[0]); j.Attempt != 2 || j.State != firmware.StateSent {
			return fmt.Errorf("attempt %d %s %q", j.Attempt, j.State, j.Error)
		}
		return nil
	})
	if j := h.job(st.ID, ids[0]); j.Error != "" {
		t.Fatalf("the retry, sent, shows error %q", j.Error)
	}
}

// TestEngineTimeoutAndDeadline: a silent locker times out at its step
// timeout, an offline one at the rollout's deadline. The step timeout (5 s)
// and the deadline (8 s) leave the lockers that answer time to finish on a
// loaded machine.
func TestEngineTimeoutAndDeadline(t *testing.T) {
	h := newHarness(t, hopt{})
	ids := h.addLockers("lk-", "LX-24", "1.4.2", 6)
	h.devs.outcome = func(id string, _ int) string {
		if id == ids[0] {
			return outSilent
		}
		return outOK
	}
	a := h.upload("LX-24", "1.5.0")
	st := h.create(firmware.Spec{Firmware: a.ID, Waves: []int{100}, RatePerMin: 60000, MaxFailurePct: ptr(50.0), StepTimeoutS: 5})
	st = h.waitStatus(st.ID, firmware.Completed, 20*time.Second)
	if st.Counts[firmware.StateTimedOut] != 1 || st.Counts[firmware.StateSucceeded] != 5 {
		t.Fatalf("counts %v", st.Counts)
	}

	// A locker that stays offline is timed out at the deadline.
	b := h.upload("LX-24", "1.6.0")
	if _, err := h.db.Pool().Exec(context.Background(), `UPDATE devices SET online = false WHERE id = $1`, ids[1]); err != nil {
		t.Fatal(err)
	}
	st = h.create(firmware.Spec{Firmware: b.ID, Waves: []int{100}, RatePerMin: 60000, MaxFailurePct: ptr(50.0),
		// Long enough for the four online lockers on a loaded machine
		// (each step is several transactions), short for the test.
		Deadline: ptr(time.Now().Add(8 * time.Second)), Selector: firmware.Selector{Lockers: ids[1:]}})
	st = h.waitStatus(st.ID, firmware.Aborted, 20*time.Second)
	if st.Counts[firmware.StateTimedOut] != 1 || st.Counts[firmware.StateSucceeded] != 4 || !strings.Contains(st.Reason, "deadline") {
		t.Fatalf("deadline: counts %v, reason %q", st.Counts, st.Reason)
	}
}

// TestEngineDeadlineStepBeforeSweep: the sweep (once a second) times out
// the jobs a deadline leaves; a step (at every change, or once a second) can
// see the deadline passed first. It must wait for the sweep, not end the
// rollout "completed" with a locker's job left queued for good. The engine
// runs on a test clock here, one Tick at a time.
func TestEngineDeadlineStepBeforeSweep(t *testing.T) {
	var mu sync.Mutex
	clock := time.Now().Truncate(time.Second)
	now := func() time.Time { mu.Lock(); defer mu.Unlock(); return clock }
	advance := func(d time.Duration) { mu.Lock(); clock = clock.Add(d); mu.Unlock() }
	h := newHarness(t, hopt{now: now})
	ctx := context.Background()
	ids := h.addLockers("lk-", "LX-24", "1.4.2", 1)
	if _, err := h.db.Pool().Exec(ctx, `UPDATE devices SET online = false WHERE id = $1`, ids[0]); err != nil {
		t.Fatal(err)
	}
	a := h.upload("LX-24", "1.5.0")
	t0 := now()
	h.eng.Tick(ctx) // t0: sweep and step, no rollout yet
	advance(500 * time.Millisecond)
	st := h.create(firmware.Spec{Firmware: a.ID, Waves: []int{100}, RatePerMin: 60000, MaxFailurePct: ptr(100.0),
		Deadline: ptr(t0.Add(1200 * time.Millisecond))})
	h.eng.Tick(ctx) // t0+0.5 s: a step (the creation kicked), no sweep; the offline locker stays queued
	advance(500 * time.Millisecond)
	h.eng.Tick(ctx) // t0+1.0 s: a sweep, before the deadline; no step
	advance(500 * time.Millisecond)
	h.eng.Tick(ctx) // t0+1.5 s: past the deadline, a step, no sweep
	if s := h.status(st.ID); s.Status != firmware.Running || s.Counts[firmware.StateQueued] != 1 {
		t.Fatalf("after the deadline, before the sweep: status %s, counts %v; want running with the job queued", s.Status, s.Counts)
	}
	advance(500 * time.Millisecond)
	h.eng.Tick(ctx) // t0+2.0 s: the sweep times the job out
	advance(time.Second)
	h.eng.Tick(ctx)
	s := h.status(st.ID)
	if s.Status != firmware.Aborted || s.Counts[firmware.StateTimedOut] != 1 || !strings.Contains(s.Reason, "deadline") {
		t.Fatalf("status %s, counts %v, reason %q; want aborted at the deadline with the job timed out", s.Status, s.Counts, s.Reason)
	}
}

func TestEngineOfflineAndBusyLockersWait(t *testing.T) {
	h := newHarness(t, hopt{})
	ids := h.addLockers("lk-", "LX-24", "1.4.2", 10)
	ctx := context.Background()
	pool := h.db.Pool()
	if _, err := pool.Exec(ctx, `UPDATE devices SET online = false WHERE id = $1`, ids[0]); err != nil {
		t.Fatal(err)
	}
	if _, err := pool.Exec(ctx, `INSERT INTO compartments (device_id, n, size, zone, door) VALUES ($1, 1, 'M', 'ambient', 'open')`, ids[1]); err != nil {
		t.Fatal(err)
	}
	a := h.upload("LX-24", "1.5.0")
	st := h.create(firmware.Spec{Firmware: a.ID, Waves: []int{100}, RatePerMin: 60000})
	testtool.Eventually(t, 10*time.Second, "the others done", func() error {
		if s := h.status(st.ID); s.Counts[firmware.StateSucceeded] != 8 {
			return fmt.Errorf("counts %v", s.Counts)
		}
		return nil
	})
	if s := h.status(st.ID); s.Status != firmware.Running || s.Counts[firmware.StateQueued] != 2 {
		t.Fatalf("with an offline and a busy locker: %s %v", s.Status, s.Counts)
	}
	if h.devs.attempts(ids[0])+h.devs.attempts(ids[1]) != 0 {
		t.Fatal("an offline or busy locker got its job")
	}
	// The door closes; the locker comes back.
	if _, err := pool.Exec(ctx, `UPDATE compartments SET door = 'closed' WHERE device_id = $1`, ids[1]); err != nil {
		t.Fatal(err)
	}
	if _, err := pool.Exec(ctx, `UPDATE devices SET online = true WHERE id = $1`, ids[0]); err != nil {
		t.Fatal(err)
	}
	h.eng.Booted(ctx, ids[0], "1.4.2", time.Now())
	h.waitStatus(st.ID, firmware.Completed, 10*time.Second)
}

func TestEngineCancel(t *testing.T) {
	h := newHarness(t, hopt{})
	h.addLockers("lk-", "LX-24", "1.4.2", 30)
	a := h.upload("LX-24", "1.5.0")
	// One a second: the cancel finds 20 or more of the 30 queued even
	// when the first two take a while to succeed.
	st := h.create(firmware.Spec{Firmware: a.ID, Waves: []int{100}, RatePerMin: 60})
	testtool.Eventually(t, 10*time.Second, "some jobs done", func() error {
		if s := h.status(st.ID); s.Counts[firmware.StateSucceeded] < 2 {
			return fmt.Errorf("counts %v", s.Counts)
		}
		return nil
	})
	c, err := h.eng.Cancel(context.Background(), st.ID, "operator")
	if err != nil {
		t.Fatal(err)
	}
	cancelledAt := time.Now()
	if c.Status != firmware.Cancelled || c.Counts[firmware.StateCancelled] < 20 || c.Counts[firmware.StateQueued] != 0 {
		t.Fatalf("after cancel: %s %v", c.Status, c.Counts)
	}
	if _, err := h.eng.Cancel(context.Background(), st.ID, "operator"); !errors.Is(err, fleet.ErrConflict) {
		t.Fatalf("second cancel: %v", err)
	}
	for _, j := range h.jobs(st.ID) {
		if j.SentAt != nil && j.SentAt.After(cancelledAt) {
			t.Fatalf("%s handed out after the cancel", j.DeviceID)
		}
	}
}

func TestEngineSelectionAndDowngrades(t *testing.T) {
	h := newHarness(t, hopt{})
	h.addLockers("lk-old", "LX-24", "1.4.2", 3)
	h.addLockers("lk-cur", "LX-24", "1.5.0", 2)
	newer := h.addLockers("lk-new", "LX-24", "2.0.0", 2)
	a := h.upload("LX-24", "1.5.0")
	if _, err := h.eng.Upload(context.Background(), "LX-24", "1.5.0", strings.NewReader("x"), "test"); !errors.Is(err, fleet.ErrConflict) {
		t.Fatalf("duplicate version: %v", err)
	}
	// A selector's fw is a version: v1.4.2 selects the lockers on 1.4.2
	// (one of which reports it as 1.4.2+b7), and no others.
	h.exec(`UPDATE devices SET fw = '1.4.2+b7' WHERE id = 'lk-old00001'`)
	for _, fw := range []string{"v1.4.2", "1.4.2"} {
		got, err := h.db.Targets(context.Background(), firmware.Selector{FW: fw})
		if err != nil || len(got) != 3 {
			t.Fatalf("selector fw %s: %d lockers (%v), want the 3 on 1.4.2", fw, len(got), err)
		}
	}
	st := h.create(firmware.Spec{Firmware: a.ID, Waves: []int{100}, RatePerMin: 60000})
	if st.Targets != 3 || st.Skipped[firmware.SkipUpToDate] != 2 || st.Skipped[firmware.SkipDowngrade] != 2 {
		t.Fatalf("targets %d, skipped %v", st.Targets, st.Skipped)
	}
	h.waitStatus(st.ID, firmware.Completed, 10*time.Second)

	// Only downgrades left: refused unless forced; forced jobs say so.
	if _, err := h.eng.Create(context.Background(), firmware.Spec{Firmware: a.ID}, "test"); !errors.Is(err, fleet.ErrUnprocessable) ||
		!strings.Contains(err.Error(), "skipped: 2 "+firmware.SkipDowngrade+", 5 "+firmware.SkipUpToDate+";") {
		t.Fatalf("a rollout of only downgrades: %v", err)
	}
	if _, err := h.eng.Create(context.Background(), firmware.Spec{Firmware: a.ID, Selector: firmware.Selector{Model: "LX-8"}}, "test"); !errors.Is(err, fleet.ErrUnprocessable) {
		t.Fatalf("a selector of another model: %v", err)
	}
	h.devs.outcome = func(string, int) string { return outSilent }
	st = h.create(firmware.Spec{Firmware: a.ID, Force: true, Selector: firmware.Selector{Lockers: newer}, Waves: []int{100}, RatePerMin: 60000})
	testtool.Eventually(t, 10*time.Second, "forced downgrade handed out", func() error {
		for _, id := range newer {
			r, err := h.db.Retained(context.Background(), id)
			if err != nil {
				return err
			}
			if r.FwJob == nil || !r.FwJob.Downgrade {
				return fmt.Errorf("%s fw/job %+v", id, r.FwJob)
			}
		}
		return nil
	})
}

func TestEngineRestartResumesWithoutDuplicates(t *testing.T) {
	h := newHarness(t, hopt{})
	ids := h.addLockers("lk-", "LX-24", "1.4.2", 40)
	a := h.upload("LX-24", "1.5.0")
	st := h.create(firmware.Spec{Firmware: a.ID, Waves: []int{25, 100}, RatePerMin: 600}) // one job per 100 ms
	testtool.Eventually(t, 10*time.Second, "some progress", func() error {
		if s := h.status(st.ID); s.Counts[firmware.StateSucceeded] < 5 {
			return fmt.Errorf("counts %v", s.Counts)
		}
		return nil
	})
	h.stop()
	h.start(hopt{})
	st = h.waitStatus(st.ID, firmware.Completed, 30*time.Second)
	if st.Counts[firmware.StateSucceeded] != 40 {
		t.Fatalf("counts %v", st.Counts)
	}
	for _, id := range ids {
		if n := h.devs.attempts(id); n != 1 {
			t.Fatalf("%s ran %d jobs", id, n)
		}
	}
	for _, j := range h.jobs(st.ID) {
		if j.Attempt != 1 {
			t.Fatalf("%s: attempt %d", j.DeviceID, j.Attempt)
		}
	}
}
