package firmware_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"testing"
	"time"

	"github.com/lockergate/lockergate/firmware"
	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/internal/testtool"
	"github.com/lockergate/lockergate/protocol"
)

// tickUntil ticks the engine on its test clock (a second a tick) until the
// rollout has status.
func (h *harness) tickUntil(clk *clock, id, status string) *firmware.Status {
	h.tb.Helper()
	var st *firmware.Status
	testtool.Eventually(h.tb, 10*time.Second, "rollout "+status, func() error {
		clk.advance(time.Second)
		h.eng.Tick(context.Background())
		if st = h.status(id); st.Status != status {
			return fmt.Errorf("status %s, counts %v, skipped %v, reason %q", st.Status, st.Counts, st.Skipped, st.Reason)
		}
		return nil
	})
	return st
}

// report plays a locker's fw/status reports of a job.
func (h *harness) report(clk *clock, id, job string, states ...string) {
	for _, s := range states {
		h.eng.JobStatus(context.Background(), id, &protocol.FwStatus{Job: job, State: s}, clk.now())
	}
}

// birth records a locker's birth on fw, as the fleet manager does; with
// booted false the engine is not told (a birth it missed).
func (h *harness) birth(clk *clock, id, fw string, booted bool) {
	h.tb.Helper()
	if err := h.db.RecordBirth(context.Background(), id, &protocol.Presence{Online: true, FW: fw}, clk.now(), false); err != nil {
		h.tb.Fatal(err)
	}
	if booted {
		h.eng.Booted(context.Background(), id, fw, clk.now())
	}
}

// rebootPastTimeout plays a locker that reports job up to rebooting and
// stays offline past the step timeout (60 s in these tests); the engine
// ticks once after it.
func (h *harness) rebootPastTimeout(clk *clock, id, job string) {
	h.tb.Helper()
	h.mustReport(clk, id, job, firmware.StateDownloading, firmware.StateVerifying, firmware.StateInstalling,
		firmware.StateRebooting)
	h.exec(`UPDATE devices SET online = false WHERE id = $1`, id)
	clk.advance(61 * time.Second)
	h.eng.Tick(context.Background())
}

// TestEngineLateBootSucceeds: a reboot that outlasts the step timeout times
// the job out, or re-queues it when timeouts are retried; the birth on the
// new version that follows is the job's success (the locker would ignore a
// retry for the version it runs, and time out again), and no retry goes out.
func TestEngineLateBootSucceeds(t *testing.T) {
	for _, tc := range []struct {
		name    string
		retries int
		after   string // the job's state after the timeout
	}{
		{"TimedOut", 0, firmware.StateTimedOut},
		{"Requeued", 1, firmware.StateQueued},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clk := newClock()
			h := newHarness(t, hopt{now: clk.now})
			ctx := context.Background()
			h.devs.outcome = func(string, int) string { return outSilent } // the test reports for it
			ids := h.addLockers("lk-", "LX-24", "1.4.2", 1)
			a := h.upload("LX-24", "1.5.0")
			st := h.create(firmware.Spec{Firmware: a.ID, Waves: []int{100}, RatePerMin: 60000, StepTimeoutS: 60,
				MaxFailurePct: ptr(100.0), Retries: tc.retries, RetryOn: []string{firmware.KindTimeout}})
			h.eng.Tick(ctx)
			j := h.job(st.ID, ids[0])
			// It reboots (offline) for longer than the step timeout.
			h.rebootPastTimeout(clk, ids[0], j.JobID)
			if got := h.job(st.ID, ids[0]); got.State != tc.after {
				t.Fatalf("after the step timeout: %s, want %s", got.State, tc.after)
			}
			clk.advance(time.Second)
			h.exec(`UPDATE devices SET online = true WHERE id = $1`, ids[0]) // back, on the new version
			h.birth(clk, ids[0], "1.5.0", true)
			got := h.job(st.ID, ids[0])
			if got.State != firmware.StateSucceeded || got.Error != "" {
				t.Fatalf("after the birth on 1.5.0: %s %q, want succeeded", got.State, got.Error)
			}
			s := h.tickUntil(clk, st.ID, firmware.Completed)
			if s.Counts[firmware.StateSucceeded] != 1 || s.Counts[firmware.StateTimedOut] != 0 {
				t.Fatalf("counts %v", s.Counts)
			}
			if n := h.devs.received(got.JobID); got.JobID != j.JobID && n != 0 {
				t.Fatalf("the retry %s went to a locker on the version (%d times)", got.JobID, n)
			}
		})
	}
}

// TestEngineHandOutSettlesLockersOnTheVersion: a queued job whose locker
// runs the version by the time it would go out is not handed out (the
// locker would ignore it and time out): skipped up_to_date when it was never
// handed out (updated by other means), succeeded when it is a retry (an
// earlier attempt installed, its birth was missed). Neither counts against
// the wave.
func TestEngineHandOutSettlesLockersOnTheVersion(t *testing.T) {
	clk := newClock()
	h := newHarness(t, hopt{now: clk.now})
	ctx := context.Background()
	ids := h.addLockers("lk-", "LX-24", "1.4.2", 3)
	h.exec(`UPDATE devices SET online = false WHERE id = $1`, ids[0])
	h.devs.outcome = func(id string, _ int) string {
		if id == ids[1] {
			return outSilent
		}
		return outOK
	}
	a := h.upload("LX-24", "1.5.0")
	st := h.create(firmware.Spec{Firmware: a.ID, Waves: []int{100}, RatePerMin: 60000, StepTimeoutS: 60,
		MaxFailurePct: ptr(0.0), Retries: 1, RetryOn: []string{firmware.KindTimeout}})
	h.eng.Tick(ctx)
	silent := h.job(st.ID, ids[1])
	testtool.Eventually(t, 5*time.Second, "the first attempt reached ids[1]", func() error {
		if h.devs.received(silent.JobID) != 1 {
			return fmt.Errorf("not received")
		}
		return nil
	})
	// ids[2] updates as lockers do, in the harness's own goroutine and on
	// the real clock: done before this clock jumps past the step timeout,
	// or a loaded machine times it out too (and the gate pauses).
	testtool.Eventually(t, 10*time.Second, "ids[2] updated", func() error {
		if j := h.job(st.ID, ids[2]); j.State != firmware.StateSucceeded {
			return fmt.Errorf("%s", j.State)
		}
		return nil
	})
	// ids[0], offline, is updated by other means; it comes back.
	h.birth(clk, ids[0], "1.5.0", false)
	h.exec(`UPDATE devices SET online = true WHERE id = $1`, ids[0])
	// ids[1] reboots for longer than the step timeout: it times out
	// (re-queued, and offline it keeps it), then comes back on the version;
	// its birth reaches the database but not this engine.
	h.rebootPastTimeout(clk, ids[1], silent.JobID)
	if j := h.job(st.ID, ids[1]); j.State != firmware.StateQueued || j.Attempt != 2 {
		t.Fatalf("after the timeout: %s attempt %d", j.State, j.Attempt)
	}
	h.exec(`UPDATE devices SET online = true WHERE id = $1`, ids[1])
	h.birth(clk, ids[1], "1.5.0", false)

	s := h.tickUntil(clk, st.ID, firmware.Completed)
	if s.Counts[firmware.StateSucceeded] != 2 || s.Skipped[firmware.SkipUpToDate] != 1 || s.Counts[firmware.StateTimedOut] != 0 {
		t.Fatalf("counts %v, skipped %v; want 2 succeeded, 1 up to date", s.Counts, s.Skipped)
	}
	if j := h.job(st.ID, ids[0]); j.State != firmware.StateSkipped || j.Error != firmware.SkipUpToDate || j.SentAt != nil {
		t.Fatalf("%s: %s %q sent %v", ids[0], j.State, j.Error, j.SentAt)
	}
	retry := h.job(st.ID, ids[1])
	if retry.State != firmware.StateSucceeded || retry.SentAt != nil {
		t.Fatalf("%s: %s sent %v", ids[1], retry.State, retry.SentAt)
	}
	if h.devs.attempts(ids[0]) != 0 || h.devs.received(retry.JobID) != 0 {
		t.Fatalf("a locker on the version got a job: %d, %d", h.devs.attempts(ids[0]), h.devs.received(retry.JobID))
	}
}

// TestEngineBirthSettlesQueuedJob: an offline locker updated by other means
// comes back with a birth on the version: its queued job ends at once
// (skipped up_to_date), in a paused rollout too.
func TestEngineBirthSettlesQueuedJob(t *testing.T) {
	clk := newClock()
	h := newHarness(t, hopt{now: clk.now})
	ctx := context.Background()
	ids := h.addLockers("lk-", "LX-24", "1.4.2", 2)
	h.exec(`UPDATE devices SET online = false WHERE id = $1`, ids[0])
	a := h.upload("LX-24", "1.5.0")
	st := h.create(firmware.Spec{Firmware: a.ID, Waves: []int{100}, RatePerMin: 60000})
	if _, err := h.eng.Pause(ctx, st.ID, "operator"); err != nil {
		t.Fatal(err)
	}
	h.birth(clk, ids[0], "v1.5.0", true)
	if j := h.job(st.ID, ids[0]); j.State != firmware.StateSkipped || j.Error != firmware.SkipUpToDate {
		t.Fatalf("after the birth: %s %q, want skipped up_to_date", j.State, j.Error)
	}
	if j := h.job(st.ID, ids[1]); j.State != firmware.StateQueued {
		t.Fatalf("the other locker's job: %s", j.State)
	}
}

// TestEngineVersionSpelling: an image uploaded as "v1.5" is 1.5.0 (stored,
// signed and handed out so), a locker whose birth spells it otherwise has
// succeeded, and the same version spelled otherwise is a duplicate.
func TestEngineVersionSpelling(t *testing.T) {
	h := newHarness(t, hopt{})
	ctx := context.Background()
	ids := h.addLockers("lk-", "LX-24", "1.4.2", 20)
	h.devs.spell = func(v string) string { return "v" + v + "+build.7" }
	a := h.upload("LX-24", "v1.5")
	if a.Version != "1.5.0" {
		t.Fatalf("uploaded v1.5 as %q, want 1.5.0", a.Version)
	}
	for _, dup := range []string{"1.5.0", "v1.5.0", "1.5", "1.5.0+other"} {
		_, err := h.eng.Upload(ctx, "LX-24", dup, bytesOf(1), "test")
		if !isConflict(err) {
			t.Errorf("upload of %s after v1.5: %v, want a conflict", dup, err)
		}
	}
	// An image recorded before versions were stored canonically.
	if err := h.db.CreateArtifact(ctx, &firmware.Artifact{ID: "fw-old", Model: "LX-24", Version: "v1.6", Size: 1,
		SHA256: "00", Sig: "s", File: "fw-old.bin", CreatedAt: time.Now()}); err != nil {
		t.Fatal(err)
	}
	if _, err := h.eng.Upload(ctx, "LX-24", "1.6.0", bytesOf(1), "test"); !isConflict(err) {
		t.Errorf("upload of 1.6.0 with v1.6 recorded: %v, want a conflict", err)
	}
	if _, err := h.eng.Upload(ctx, "LX-8", "1.5.0", bytesOf(1), "test"); err != nil {
		t.Errorf("the version for another model: %v", err)
	}

	st := h.create(firmware.Spec{Firmware: a.ID, Waves: []int{10, 100}, RatePerMin: 60000, MinPerWave: 2})
	st = h.waitStatus(st.ID, firmware.Completed, 20*time.Second)
	if st.Counts[firmware.StateSucceeded] != 20 || st.Counts[firmware.StateFailed] != 0 {
		t.Fatalf("counts %v, reason %q", st.Counts, st.Reason)
	}
	if j := h.job(st.ID, ids[0]); j.Version != "1.5.0" {
		t.Fatalf("job version %q", j.Version)
	}
	// A succeeded report that arrives after the birth (queued across the
	// reboot) is taken on the spelled version too.
	b := h.upload("LX-24", "1.7.0")
	h.devs.outcome = func(string, int) string { return outSilent }
	st = h.create(firmware.Spec{Firmware: b.ID, Waves: []int{100}, RatePerMin: 60000, Selector: firmware.Selector{Lockers: ids[:1]}})
	job := h.sentJob(st.ID, ids[0])
	h.eng.JobStatus(ctx, ids[0], &protocol.FwStatus{Job: job, State: firmware.StateRebooting}, time.Now())
	if err := h.db.RecordBirth(ctx, ids[0], &protocol.Presence{Online: true, FW: "v1.7"}, time.Now(), false); err != nil {
		t.Fatal(err)
	}
	h.eng.JobStatus(ctx, ids[0], &protocol.FwStatus{Job: job, State: firmware.StateSucceeded}, time.Now())
	if j := h.job(st.ID, ids[0]); j.State != firmware.StateSucceeded {
		t.Fatalf("succeeded report after a birth on v1.7: %s", j.State)
	}
}

// TestEngineLockerChangedBeforeHandOut: a locker whose model changed since
// the rollout was created (a birth reporting another model), or that an
// operator disabled, does not get its job: the job ends skipped with the
// reason, not as a failure, and the rollout completes. A disabled locker
// is skipped at creation too.
func TestEngineLockerChangedBeforeHandOut(t *testing.T) {
	clk := newClock()
	h := newHarness(t, hopt{now: clk.now})
	ctx := context.Background()
	ids := h.addLockers("lk-", "LX-24", "1.4.2", 4)
	h.exec(`UPDATE devices SET disabled = true, online = false WHERE id = $1`, ids[0])
	a := h.upload("LX-24", "1.5.0")
	st := h.create(firmware.Spec{Firmware: a.ID, Waves: []int{100}, RatePerMin: 60000, MaxFailurePct: ptr(0.0)})
	if st.Targets != 3 || st.Skipped[firmware.SkipDisabled] != 1 {
		t.Fatalf("created: targets %d, skipped %v; want the disabled locker skipped", st.Targets, st.Skipped)
	}
	// Before the first hand-out: a birth reports another model; an
	// operator disables another locker.
	if err := h.db.RecordBirth(ctx, ids[1], &protocol.Presence{Online: true, FW: "1.4.2", Model: "LX-8"}, clk.now(), false); err != nil {
		t.Fatal(err)
	}
	h.exec(`UPDATE devices SET disabled = true, online = false WHERE id = $1`, ids[2])
	h.tickUntil(clk, st.ID, firmware.Running) // one tick: the hand-out
	// ids[3] updates in the harness's own goroutine, on the real clock:
	// done before the ticks below pass the step timeout, or a loaded
	// machine times it out too (and the 0 % gate pauses).
	testtool.Eventually(t, 10*time.Second, "ids[3] updated", func() error {
		if j := h.job(st.ID, ids[3]); j.State != firmware.StateSucceeded {
			return fmt.Errorf("%s", j.State)
		}
		return nil
	})
	s := h.tickUntil(clk, st.ID, firmware.Completed)
	if s.Counts[firmware.StateSucceeded] != 1 || s.Skipped[firmware.SkipModelChanged] != 1 || s.Skipped[firmware.SkipDisabled] != 2 ||
		s.WaveStatus[0].Failed != 0 {
		t.Fatalf("counts %v, skipped %v, reason %q", s.Counts, s.Skipped, s.Reason)
	}
	for _, id := range ids[:3] {
		if n := h.devs.attempts(id); n != 0 {
			t.Fatalf("%s got %d jobs", id, n)
		}
	}
	if j := h.job(st.ID, ids[1]); j.State != firmware.StateSkipped || j.Error != firmware.SkipModelChanged || j.Wave != 0 {
		t.Fatalf("%s: %s %q wave %d", ids[1], j.State, j.Error, j.Wave)
	}
}

// TestEngineWaitsForTheBirth: a locker back online is not handed a job
// until its birth is recorded: before it, its model and version are its
// last session's. A board of another model whose birth comes a moment
// after its connect is skipped (model_changed), never sent the image; one
// of the rollout's model gets the job once its birth is in.
func TestEngineWaitsForTheBirth(t *testing.T) {
	clk := newClock()
	h := newHarness(t, hopt{now: clk.now})
	ctx := context.Background()
	ids := h.addLockers("lk-", "LX-24", "1.4.2", 2)
	// Both connected a moment ago; their last births are an hour old.
	h.exec(`UPDATE devices SET connected_at = $1, born_at = $2`, clk.now(), clk.now().Add(-time.Hour))
	a := h.upload("LX-24", "1.5.0")
	st := h.create(firmware.Spec{Firmware: a.ID, Waves: []int{100}, RatePerMin: 60000, MaxFailurePct: ptr(100.0)})
	for range 3 {
		clk.advance(time.Second)
		h.eng.Tick(ctx)
	}
	for _, id := range ids {
		if j := h.job(st.ID, id); j.State != firmware.StateQueued || h.devs.attempts(id) != 0 {
			t.Fatalf("%s before its birth: %s, %d jobs received; want queued, none", id, j.State, h.devs.attempts(id))
		}
	}
	clk.advance(time.Second)
	if err := h.db.RecordBirth(ctx, ids[0], &protocol.Presence{Online: true, FW: "1.4.2", Model: "LX-8"}, clk.now(), false); err != nil {
		t.Fatal(err)
	}
	h.birth(clk, ids[1], "1.4.2", true)
	h.eng.Booted(ctx, ids[0], "1.4.2", clk.now())
	testtool.Eventually(t, 10*time.Second, "the jobs judged after the births", func() error {
		clk.advance(time.Second)
		h.eng.Tick(ctx)
		if j := h.job(st.ID, ids[0]); j.State != firmware.StateSkipped || j.Error != firmware.SkipModelChanged {
			return fmt.Errorf("%s (now LX-8): %s %q", ids[0], j.State, j.Error)
		}
		if j := h.job(st.ID, ids[1]); j.State == firmware.StateQueued {
			return fmt.Errorf("%s: still queued", ids[1])
		}
		return nil
	})
	if n := h.devs.attempts(ids[0]); n != 0 {
		t.Fatalf("the LX-8 board got %d jobs for an LX-24 image", n)
	}
}

// TestEngineDeadlineEndsWithoutAPause: the jobs a deadline times out are
// failures of their wave, but past its deadline a rollout ends (aborted,
// the deadline its reason), rather than first pausing at its gate: the
// reason said "paused" and the audit had a rollout.pause for a rollout no
// one paused.
func TestEngineDeadlineEndsWithoutAPause(t *testing.T) {
	clk := newClock()
	h := newHarness(t, hopt{now: clk.now})
	ctx := context.Background()
	h.devs.outcome = func(string, int) string { return outSilent } // the test reports for it
	ids := h.addLockers("lk-", "LX-24", "1.4.2", 1)
	a := h.upload("LX-24", "1.5.0")
	st := h.create(firmware.Spec{Firmware: a.ID, Waves: []int{100}, RatePerMin: 60000, Deadline: ptr(clk.now().Add(5 * time.Second))})
	h.eng.Tick(ctx)
	h.mustReport(clk, ids[0], h.job(st.ID, ids[0]).JobID, firmware.StateDownloading)
	clk.advance(6 * time.Second)
	s := h.tickUntil(clk, st.ID, firmware.Aborted)
	if s.Reason != "deadline passed with 1 jobs timed out" {
		t.Fatalf("reason %q, want the deadline's alone", s.Reason)
	}
	var pauses int
	if err := h.db.Pool().QueryRow(ctx, `SELECT count(*) FROM audit WHERE action = 'rollout.pause'`).Scan(&pauses); err != nil || pauses != 0 {
		t.Fatalf("%d rollout.pause audit entries (%v), want none", pauses, err)
	}
}

// TestEnginePausedRolloutEndsAtDeadline: a paused rollout does not outlive
// its deadline: its jobs time out and it ends, aborted, with the reason it
// was paused for.
func TestEnginePausedRolloutEndsAtDeadline(t *testing.T) {
	clk := newClock()
	h := newHarness(t, hopt{now: clk.now})
	ctx := context.Background()
	ids := h.addLockers("lk-", "LX-24", "1.4.2", 3)
	h.exec(`UPDATE devices SET online = false WHERE id = ANY($1)`, ids[1:])
	a := h.upload("LX-24", "1.5.0")
	deadline := clk.now().Add(time.Hour)
	st := h.create(firmware.Spec{Firmware: a.ID, Waves: []int{100}, RatePerMin: 60000, Deadline: &deadline})
	h.tickUntil(clk, st.ID, firmware.Running) // one tick
	testtool.Eventually(t, 5*time.Second, "the online locker done", func() error {
		if j := h.job(st.ID, ids[0]); j.State != firmware.StateSucceeded {
			return fmt.Errorf("%s", j.State)
		}
		return nil
	})
	if _, err := h.eng.Pause(ctx, st.ID, "operator"); err != nil {
		t.Fatal(err)
	}
	clk.advance(2 * time.Hour)
	s := h.tickUntil(clk, st.ID, firmware.Aborted)
	if s.Counts[firmware.StateTimedOut] != 2 || s.Counts[firmware.StateQueued] != 0 || s.FinishedAt == nil ||
		s.Reason != "deadline passed with 2 jobs timed out (paused: paused by operator)" {
		t.Fatalf("counts %v, reason %q, finished %v", s.Counts, s.Reason, s.FinishedAt)
	}
}

func bytesOf(n int) io.Reader { return bytes.NewReader(bytes.Repeat([]byte{1}, n)) }

func isConflict(err error) bool { return errors.Is(err, fleet.ErrConflict) }

// TestEngineReportNotRecordedIsAnError: a report the database did not take
// returns its error (the fleet manager tries it again) and changes nothing;
// the same report tried again is recorded once, and a repeat after that is
// no error.
func TestEngineReportNotRecordedIsAnError(t *testing.T) {
	h := newHarness(t, hopt{})
	ids := h.addLockers("lk-", "LX-24", "1.4.2", 1)
	a := h.upload("LX-24", "1.5.0")
	h.devs.outcome = func(string, int) string { return outSilent }
	st := h.create(firmware.Spec{Firmware: a.ID, Waves: []int{100}, RatePerMin: 60000})
	job := h.sentJob(st.ID, ids[0])
	for _, state := range []string{firmware.StateDownloading, firmware.StateFailed, firmware.StateSucceeded} {
		down, cancel := context.WithCancel(context.Background())
		cancel() // the database cannot be reached
		report := &protocol.FwStatus{Job: job, State: state, Error: "download"}
		if state != firmware.StateFailed {
			report.Error = ""
		}
		if err := h.eng.JobStatus(down, ids[0], report, time.Now()); err == nil {
			t.Fatalf("%s report without a database: no error", state)
		}
	}
	if j := h.job(st.ID, ids[0]); j.State != firmware.StateSent {
		t.Fatalf("after reports not recorded: %s, want sent", j.State)
	}
	failed := &protocol.FwStatus{Job: job, State: firmware.StateFailed, Error: "download"}
	for i := range 2 {
		if err := h.eng.JobStatus(context.Background(), ids[0], failed, time.Now()); err != nil {
			t.Fatalf("report %d: %v", i+1, err)
		}
	}
	if j := h.job(st.ID, ids[0]); j.State != firmware.StateFailed || j.Error != "download" {
		t.Fatalf("after the report: %s %q, want failed download", j.State, j.Error)
	}
}

// TestEngineSuccessClearsTheJob: a job the locker's birth confirmed leaves
// fw/job at once (the contract: an empty retained payload is no job), not
// at the locker's next connect.
func TestEngineSuccessClearsTheJob(t *testing.T) {
	h := newHarness(t, hopt{})
	ctx := context.Background()
	ids := h.addLockers("lk-", "LX-24", "1.4.2", 1)
	a := h.upload("LX-24", "1.5.0")
	h.devs.outcome = func(string, int) string { return outSilent }
	st := h.create(firmware.Spec{Firmware: a.ID, Waves: []int{100}, RatePerMin: 60000})
	job := h.sentJob(st.ID, ids[0])
	if err := h.eng.JobStatus(ctx, ids[0], &protocol.FwStatus{Job: job, State: firmware.StateRebooting}, time.Now()); err != nil {
		t.Fatal(err)
	}
	if err := h.db.RecordBirth(ctx, ids[0], &protocol.Presence{Online: true, FW: "1.5.0"}, time.Now(), false); err != nil {
		t.Fatal(err)
	}
	before, cleared := h.devs.published.Load(), h.devs.clearedFor(ids[0])
	h.eng.Booted(ctx, ids[0], "1.5.0", time.Now())
	if j := h.job(st.ID, ids[0]); j.State != firmware.StateSucceeded {
		t.Fatalf("after the birth: %s, want succeeded", j.State)
	}
	if h.devs.published.Load() == before {
		t.Fatal("the locker's retained state was not published after its job succeeded")
	}
	r, err := h.db.Retained(ctx, ids[0])
	if err != nil || r.FwJob != nil {
		t.Fatalf("retained fw/job after the success: %+v %v, want none", r.FwJob, err)
	}
	// What the locker was sent is its state without the job.
	testtool.Eventually(t, 5*time.Second, "an empty fw/job sent to the locker", func() error {
		if h.devs.clearedFor(ids[0]) == cleared {
			return errors.New("not yet")
		}
		return nil
	})
}

// TestEngineLateReportOfACancelledJob: a late "installing" of a job that
// was cancelled while the locker was handed another rollout's job cannot
// make it active again (one active job per locker). The report is not
// applied, and it is no error: the fleet manager retries errors, and this
// one would never pass.
func TestEngineLateReportOfACancelledJob(t *testing.T) {
	h := newHarness(t, hopt{})
	ctx := context.Background()
	ids := h.addLockers("lk-", "LX-24", "1.4.2", 1)
	h.devs.outcome = func(string, int) string { return outSilent }
	first := h.create(firmware.Spec{Firmware: h.upload("LX-24", "1.5.0").ID, Waves: []int{100}, RatePerMin: 60000})
	old := h.sentJob(first.ID, ids[0])
	if _, err := h.eng.Cancel(ctx, first.ID, "test"); err != nil {
		t.Fatal(err)
	}
	second := h.create(firmware.Spec{Firmware: h.upload("LX-24", "1.6.0").ID, Waves: []int{100}, RatePerMin: 60000})
	current := h.sentJob(second.ID, ids[0])
	if err := h.eng.JobStatus(ctx, ids[0], &protocol.FwStatus{Job: old, State: firmware.StateInstalling}, time.Now()); err != nil {
		t.Fatalf("late installing of the cancelled job: %v, want no error (nothing to apply)", err)
	}
	if j := h.job(first.ID, ids[0]); j.State != firmware.StateCancelled {
		t.Fatalf("the cancelled job after its late report: %s", j.State)
	}
	if j := h.job(second.ID, ids[0]); j.JobID != current || j.State != firmware.StateSent {
		t.Fatalf("the locker's current job: %s %s, want %s sent", j.JobID, j.State, current)
	}
}

// TestEngineBirthCreditsOneJob: a birth on the version credits one job
// with the install. With a job active on it, that job: an earlier
// rollout's timed-out job for the version stays timed out, whether it timed
// out rebooting (its boot failed or was never seen) or at its deadline
// while downloading (withdrawn), and its ended rollout's counts do not
// change. Without one, only the timed-out job handed out last succeeds.
func TestEngineBirthCreditsOneJob(t *testing.T) {
	for _, tc := range []struct {
		name string
		// timeOut ends the first rollout's job, handed out to locker id.
		timeOut func(h *harness, clk *clock, id, job string)
	}{
		{"RebootPastTimeout", func(h *harness, clk *clock, id, job string) { h.rebootPastTimeout(clk, id, job) }},
		{"DeadlineWhileDownloading", func(h *harness, clk *clock, id, job string) {
			h.mustReport(clk, id, job, firmware.StateDownloading)
			clk.advance(10 * time.Second) // past the deadline
			h.eng.Tick(context.Background())
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clk := newClock()
			h := newHarness(t, hopt{now: clk.now})
			ctx := context.Background()
			h.devs.outcome = func(string, int) string { return outSilent } // the test reports for it
			ids := h.addLockers("lk-", "LX-24", "1.4.2", 1)
			a := h.upload("LX-24", "1.5.0")
			spec := firmware.Spec{Firmware: a.ID, Waves: []int{100}, RatePerMin: 60000, StepTimeoutS: 60, MaxFailurePct: ptr(100.0)}
			firstSpec := spec
			firstSpec.Deadline = ptr(clk.now().Add(5 * time.Second))
			if tc.name == "RebootPastTimeout" {
				firstSpec.Deadline = nil
			}
			first := h.create(firstSpec)
			h.eng.Tick(ctx)
			old := h.job(first.ID, ids[0])
			tc.timeOut(h, clk, ids[0], old.JobID)
			if got := h.job(first.ID, ids[0]); got.State != firmware.StateTimedOut {
				t.Fatalf("the first rollout's job: %s, want timed_out", got.State)
			}
			h.eng.Tick(ctx)
			ended := h.status(first.ID) // its counts as it ended
			h.exec(`UPDATE devices SET online = true WHERE id = $1`, ids[0])
			second := h.create(spec)
			h.eng.Tick(ctx)
			cur := h.job(second.ID, ids[0])
			if !firmware.IsActive(cur.State) {
				t.Fatalf("the second rollout's job: %s, want it handed out", cur.State)
			}
			h.mustReport(clk, ids[0], cur.JobID, firmware.StateDownloading, firmware.StateVerifying, firmware.StateInstalling,
				firmware.StateRebooting)
			clk.advance(time.Second)
			h.birth(clk, ids[0], "1.5.0", true)
			if got := h.job(second.ID, ids[0]); got.State != firmware.StateSucceeded {
				t.Fatalf("the second rollout's job after the birth on 1.5.0: %s, want succeeded", got.State)
			}
			if got := h.job(first.ID, ids[0]); got.State != firmware.StateTimedOut {
				t.Fatalf("the first rollout's job after the birth on 1.5.0: %s, want timed_out (the install is the second's)", got.State)
			}
			if st := h.status(first.ID); !maps.Equal(st.Counts, ended.Counts) {
				t.Fatalf("the first rollout's counts went from %v to %v", ended.Counts, st.Counts)
			}
		})
	}
}

// TestEngineBirthCreditsTheLastTimeout: without an active job, a birth on
// the version credits the timed-out job for it handed out last; an earlier
// rollout's timed-out job stays as it ended.
func TestEngineBirthCreditsTheLastTimeout(t *testing.T) {
	clk := newClock()
	h := newHarness(t, hopt{now: clk.now})
	ctx := context.Background()
	h.devs.outcome = func(string, int) string { return outSilent } // the test reports for it
	ids := h.addLockers("lk-", "LX-24", "1.4.2", 1)
	a := h.upload("LX-24", "1.5.0")
	spec := firmware.Spec{Firmware: a.ID, Waves: []int{100}, RatePerMin: 60000, StepTimeoutS: 60, MaxFailurePct: ptr(100.0)}
	var rollouts []string
	for range 2 {
		st := h.create(spec)
		h.eng.Tick(ctx)
		h.rebootPastTimeout(clk, ids[0], h.job(st.ID, ids[0]).JobID)
		h.exec(`UPDATE devices SET online = true WHERE id = $1`, ids[0])
		rollouts = append(rollouts, st.ID)
		clk.advance(time.Second)
	}
	h.birth(clk, ids[0], "1.5.0", true)
	if got := h.job(rollouts[0], ids[0]); got.State != firmware.StateTimedOut {
		t.Fatalf("the first rollout's job: %s, want timed_out", got.State)
	}
	if got := h.job(rollouts[1], ids[0]); got.State != firmware.StateSucceeded {
		t.Fatalf("the second rollout's job, handed out last: %s, want succeeded", got.State)
	}
}

// TestEngineBirthsTogether: births of several lockers handed to the engine
// at once (as a control shard does in a reconnect storm) settle each
// locker's own job: a birth on the new version is its job's success, one
// on the old version after rebooting a failed boot, and a locker without
// a job changes nothing.
func TestEngineBirthsTogether(t *testing.T) {
	clk := newClock()
	h := newHarness(t, hopt{now: clk.now})
	ctx := context.Background()
	h.devs.outcome = func(string, int) string { return outSilent } // the test reports for them
	ids := h.addLockers("lk-", "LX-24", "1.4.2", 2)
	a := h.upload("LX-24", "1.5.0")
	st := h.create(firmware.Spec{Firmware: a.ID, Waves: []int{100}, RatePerMin: 60000, MaxFailurePct: ptr(100.0)})
	h.eng.Tick(ctx)
	for _, id := range ids {
		h.mustReport(clk, id, h.job(st.ID, id).JobID, firmware.StateDownloading, firmware.StateVerifying,
			firmware.StateInstalling, firmware.StateRebooting)
	}
	clk.advance(time.Second)
	h.birth(clk, ids[0], "1.5.0", false)
	h.birth(clk, ids[1], "1.4.2", false)
	h.eng.BootedMany(ctx, []fleet.Boot{
		{DeviceID: ids[0], FW: "1.5.0", At: clk.now()},
		{DeviceID: ids[1], FW: "1.4.2", At: clk.now()},
		{DeviceID: "lk-without-a-job", FW: "1.4.2", At: clk.now()},
	})
	if j := h.job(st.ID, ids[0]); j.State != firmware.StateSucceeded {
		t.Errorf("%s, born on the new version: %s %q, want succeeded", ids[0], j.State, j.Error)
	}
	if j := h.job(st.ID, ids[1]); j.State != firmware.StateFailed || j.Error != firmware.KindBoot {
		t.Errorf("%s, born on the old version after rebooting: %s %q, want failed (boot)", ids[1], j.State, j.Error)
	}
}

// TestEngineFailureOfAnyKind: a locker's failed report is the attempt's
// end whatever its error says: none is recorded as "unknown", one outside
// the contract's kinds as sent, "timeout" (the gateway's own kind) too.
// None is retried, though the rollout retries every kind it can name.
func TestEngineFailureOfAnyKind(t *testing.T) {
	h := newHarness(t, hopt{})
	ctx := context.Background()
	ids := h.addLockers("lk-", "LX-24", "1.4.2", 3)
	a := h.upload("LX-24", "1.5.0")
	h.devs.outcome = func(string, int) string { return outSilent }
	st := h.create(firmware.Spec{Firmware: a.ID, Waves: []int{100}, RatePerMin: 60000, MaxFailurePct: ptr(100.0),
		Retries: 3, RetryOn: firmware.RetryKinds})
	for i, kind := range []string{"", "flash_worn", firmware.KindTimeout} {
		job := h.sentJob(st.ID, ids[i])
		if err := h.eng.JobStatus(ctx, ids[i], &protocol.FwStatus{Job: job, State: firmware.StateFailed, Error: kind}, time.Now()); err != nil {
			t.Fatal(err)
		}
		want := kind
		if kind == "" {
			want = firmware.KindUnknown
		}
		if j := h.job(st.ID, ids[i]); j.State != firmware.StateFailed || j.Error != want || j.Attempt != 1 {
			t.Fatalf("error %q: job %s %q attempt %d, want failed %q, not retried", kind, j.State, j.Error, j.Attempt, want)
		}
	}
}
