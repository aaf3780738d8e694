package firmware_test

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"strings"
	"testing"
	"time"

	"github.com/lockergate/lockergate/firmware"
	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/internal/testtool"
)

// TestEnginePausedRolloutShowsItsGate: a gate crossed while an operator has
// the rollout paused is recorded on it (its reason names the wave), and no
// wave advances; a resume accepts a crossing only once the status shows it
// (409 before), and then gates the next wave afresh.
func TestEnginePausedRolloutShowsItsGate(t *testing.T) {
	h, clk := newSilentHarness(t)
	ctx := context.Background()
	ids, st := h.rolloutOf(20, firmware.Spec{Waves: []int{10, 100}, RatePerMin: 60000, MaxFailurePct: ptr(5.0)})
	h.eng.Tick(ctx)
	if _, err := h.eng.Pause(ctx, st.ID, "operator"); err != nil {
		t.Fatal(err)
	}
	var first []string // wave 1's two lockers
	for _, id := range ids {
		if j := h.job(st.ID, id); j.State == firmware.StateSent {
			first = append(first, id)
			h.report(clk, id, j.JobID, firmware.StateFailed)
		}
	}
	if len(first) != 2 {
		t.Fatalf("%d jobs went out, want wave 1's 2", len(first))
	}
	s := h.status(st.ID)
	if s.Status != firmware.Paused || !strings.HasPrefix(s.Reason, "wave 1: ") || !strings.HasSuffix(s.Reason, "while paused by operator") {
		t.Fatalf("after wave 1 failed while paused: %s %q, want paused with the gate's reason", s.Status, s.Reason)
	}
	clk.advance(time.Second)
	h.eng.Tick(ctx)
	if s := h.status(st.ID); s.Counts[firmware.StateQueued] != 18 {
		t.Fatalf("counts %v: wave 2 went out from a paused rollout", s.Counts)
	}

	// A crossing not shown yet (as if its recording were still on its way):
	// the resume is refused, naming it; the next step records it.
	h.exec(`UPDATE rollouts SET reason = 'paused by operator' WHERE id = $1`, st.ID)
	if _, err := h.eng.Resume(ctx, st.ID, "operator"); !errors.Is(err, fleet.ErrConflict) || !strings.Contains(err.Error(), "wave 1: 2 of 2 jobs failed") {
		t.Fatalf("resume over a crossing the status does not show: %v, want a conflict naming it", err)
	}
	clk.advance(time.Second)
	h.eng.Tick(ctx)
	if s := h.status(st.ID); !strings.HasPrefix(s.Reason, "wave 1: ") {
		t.Fatalf("after a step: reason %q, want the gate's", s.Reason)
	}
	if _, err := h.eng.Resume(ctx, st.ID, "operator"); err != nil {
		t.Fatalf("resume once the crossing shows: %v", err)
	}
	clk.advance(time.Second)
	h.eng.Tick(ctx)
	s = h.status(st.ID)
	if s.Status != firmware.Running || s.Counts[firmware.StateQueued] != 0 {
		t.Fatalf("after the resume: %s %v, want wave 2 handed out", s.Status, s.Counts)
	}
}

// TestEngineDisabledLockerIsSkippedNotFailed: a locker disabled after its
// job went out (stolen, say) cannot report: its job ends skipped
// (disabled) with the disable, and does not count against the gate.
func TestEngineDisabledLockerIsSkippedNotFailed(t *testing.T) {
	h, clk := newSilentHarness(t)
	ctx := context.Background()
	ids, st := h.rolloutOf(10, firmware.Spec{Waves: []int{100}, RatePerMin: 60000, MaxFailurePct: ptr(5.0), StepTimeoutS: 60})
	h.tickWhileQueued(clk, st.ID, 0)
	if _, err := h.db.UpdateLocker(ctx, ids[0], ptr(true), nil); err != nil {
		t.Fatal(err)
	}
	h.updated(clk, st.ID, ids[1:]...)
	clk.advance(61 * time.Second) // past the step timeout
	s := h.tickUntil(clk, st.ID, firmware.Completed)
	if j := h.job(st.ID, ids[0]); j.State != firmware.StateSkipped || j.Error != firmware.SkipDisabled {
		t.Fatalf("the disabled locker's job: %s %q, want skipped %q", j.State, j.Error, firmware.SkipDisabled)
	}
	if s.Counts[firmware.StateSucceeded] != 9 || s.Counts[firmware.StateTimedOut] != 0 {
		t.Fatalf("counts %v", s.Counts)
	}
}

// TestEngineAcceptedFailureThatSucceedsHidesNoOther: a resume accepts the
// failures it saw, not a number of them: timed-out jobs it accepted that
// then succeed (their lockers' late births on the new version) leave no
// allowance behind, and new failures are gated in full.
func TestEngineAcceptedFailureThatSucceedsHidesNoOther(t *testing.T) {
	h, clk := newSilentHarness(t)
	ctx := context.Background()
	ids := h.addLockers("lk-", "LX-24", "1.4.2", 43)
	late := ids[40:] // offline: their jobs wait
	h.exec(`UPDATE devices SET online = false WHERE id = ANY($1)`, late)
	a := h.upload("LX-24", "1.5.0")
	st := h.create(firmware.Spec{Firmware: a.ID, Waves: []int{100}, RatePerMin: 60000, MaxFailurePct: ptr(5.0), StepTimeoutS: 60})
	h.tickWhileQueued(clk, st.ID, len(late)) // every job of an online locker out
	h.updated(clk, st.ID, ids[3:40]...)
	h.rebooting(clk, st.ID, ids[:3]...) // for longer than the step timeout: timed out, 7 % of 43
	clk.advance(61 * time.Second)
	h.tickUntil(clk, st.ID, firmware.Paused)
	if _, err := h.eng.Resume(ctx, st.ID, "operator"); err != nil {
		t.Fatal(err)
	}
	for _, id := range ids[:3] { // they come back on the new version
		h.birth(clk, id, "1.5.0", true)
	}
	if s := h.status(st.ID); s.Counts[firmware.StateTimedOut] != 0 || s.Counts[firmware.StateSucceeded] != 40 {
		t.Fatalf("after the late births: %v", s.Counts)
	}
	// The late three come online and fail: 7 % of 43, none of them accepted.
	h.exec(`UPDATE devices SET online = true WHERE id = ANY($1)`, late)
	for _, id := range late {
		h.birth(clk, id, "1.4.2", true)
	}
	h.tickWhileQueued(clk, st.ID, 0)
	h.failed(clk, st.ID, late...)
	s := h.status(st.ID)
	if s.Status != firmware.Paused || !strings.HasPrefix(s.Reason, "wave 1: 3 of 43 jobs failed") {
		t.Fatalf("after three new failures: %s %q %v, want paused by the gate", s.Status, s.Reason, s.Counts)
	}
}

// tickWhileQueued ticks the engine, a second of clk apart, until rollout id
// has left jobs queued (those whose lockers cannot take one).
func (h *harness) tickWhileQueued(clk *clock, id string, left int) {
	h.tb.Helper()
	testtool.Eventually(h.tb, 10*time.Second, fmt.Sprintf("%d jobs left queued", left), func() error {
		if n := h.status(id).Counts[firmware.StateQueued]; n != left {
			clk.advance(time.Second)
			h.eng.Tick(context.Background())
			return fmt.Errorf("%d queued", n)
		}
		return nil
	})
}

// rolloutOf adds n lockers of model LX-24 on 1.4.2 and creates a rollout
// of 1.5.0 to them by spec (its Firmware filled in).
func (h *harness) rolloutOf(n int, spec firmware.Spec) ([]string, *firmware.Status) {
	h.tb.Helper()
	ids := h.addLockers("lk-", "LX-24", "1.4.2", n)
	spec.Firmware = h.upload("LX-24", "1.5.0").ID
	return ids, h.create(spec)
}

// newSilentHarness is a harness on a test clock (the test ticks the
// engine) whose lockers say nothing: the test reports for them.
func newSilentHarness(t *testing.T) (*harness, *clock) {
	clk := newClock()
	h := newHarness(t, hopt{now: clk.now})
	h.devs.outcome = func(string, int) string { return outSilent }
	return h, clk
}

// TestEngineRetryAfterAnAbortRunsWhatItCancelled: retry-failed on a
// rollout its gate aborted gives a new attempt to the failed jobs and to
// those the abort cancelled before they ran; without them the rollout
// would complete with those lockers never updated.
func TestEngineRetryAfterAnAbortRunsWhatItCancelled(t *testing.T) {
	h, clk := newSilentHarness(t)
	ctx := context.Background()
	ids, st := h.rolloutOf(20, firmware.Spec{Waves: []int{100}, RatePerMin: 60000, MaxFailurePct: ptr(5.0),
		FailureAction: firmware.ActionAbort})
	h.tickWhileQueued(clk, st.ID, 0)
	h.failed(clk, st.ID, ids[:2]...) // 10 %: aborted, the other 18 withdrawn
	if s := h.status(st.ID); s.Status != firmware.Aborted || s.Counts[firmware.StateCancelled] != 18 {
		t.Fatalf("after two failures: %s %v, want aborted with 18 cancelled", s.Status, s.Counts)
	}
	s, err := h.eng.RetryFailed(ctx, st.ID, "operator")
	if err != nil {
		t.Fatal(err)
	}
	if s.Status != firmware.Running || s.Counts[firmware.StateQueued] != 20 || s.Counts[firmware.StateCancelled] != 0 {
		t.Fatalf("after retry-failed: %s %v, want running with all 20 queued", s.Status, s.Counts)
	}
}

// TestEnginePausedRolloutShowsFailuresAsTheyGrow: a paused rollout's
// reason follows its wave's failures while it is paused, and a resume
// accepts the failures its status shows, no more (one that shows fewer, a
// failure being recorded, is a 409), not the rest of the wave: failures
// after it are gated afresh against the wave, and stop it again.
func TestEnginePausedRolloutShowsFailuresAsTheyGrow(t *testing.T) {
	h, clk := newSilentHarness(t)
	ctx := context.Background()
	ids, st := h.rolloutOf(40, firmware.Spec{Waves: []int{100}, RatePerMin: 60000, MaxFailurePct: ptr(5.0)})
	h.tickWhileQueued(clk, st.ID, 0)
	fail := func(from, to int) { h.failed(clk, st.ID, ids[from:to]...) }
	fail(0, 3) // paused: 3 of 40
	fail(3, 5) // 2 more while paused
	if s := h.status(st.ID); s.Status != firmware.Paused || !strings.HasPrefix(s.Reason, "wave 1: 5 of 40 jobs failed") {
		t.Fatalf("after 5 failures: %s %q, want paused showing 5", s.Status, s.Reason)
	}
	// As if the fifth were still being recorded: the status shows 4.
	h.exec(`UPDATE rollouts SET reason = replace(reason, '5 of 40 jobs failed (12.5%)', '4 of 40 jobs failed (10.0%)') WHERE id = $1`, st.ID)
	if _, err := h.eng.Resume(ctx, st.ID, "operator"); !errors.Is(err, fleet.ErrConflict) || !strings.Contains(err.Error(), "5 of 40") {
		t.Fatalf("resume over a status showing fewer failures: %v, want a conflict naming 5", err)
	}
	clk.advance(time.Second)
	h.eng.Tick(ctx) // shows them as they are
	if _, err := h.eng.Resume(ctx, st.ID, "operator"); err != nil {
		t.Fatal(err)
	}
	fail(5, 7) // 2 of 40 after the resume: 5 %, not over
	if s := h.status(st.ID); s.Status != firmware.Running {
		t.Fatalf("after 2 more: %s %q, want running", s.Status, s.Reason)
	}
	fail(7, 8)
	if s := h.status(st.ID); s.Status != firmware.Paused || !strings.HasPrefix(s.Reason, "wave 1: 3 of 40 jobs failed (7.5%) beyond the 5 a resume accepted") {
		t.Fatalf("after 3 more: %s %q, want paused again", s.Status, s.Reason)
	}
}

// TestEnginePausedRolloutShowsEveryWaveCrossed: a paused rollout whose
// reason shows one wave's crossing gets another wave's added at the next
// step (no failure report needed: a wave can cross by shrinking), so that
// a resume, which accepts only what the status shows, is not refused for
// good.
func TestEnginePausedRolloutShowsEveryWaveCrossed(t *testing.T) {
	h, clk := newSilentHarness(t)
	ctx := context.Background()
	ids, st := h.rolloutOf(20, firmware.Spec{Waves: []int{10, 100}, RatePerMin: 60000, MaxFailurePct: ptr(5.0)})
	h.eng.Tick(ctx)
	var first []string
	for _, j := range h.jobs(st.ID) {
		if j.Wave == 0 {
			first = append(first, j.DeviceID)
		}
	}
	h.failed(clk, st.ID, first[0]) // wave 1: 1 of 2
	if _, err := h.eng.Resume(ctx, st.ID, "operator"); err != nil {
		t.Fatal(err)
	}
	h.updated(clk, st.ID, first[1])
	h.tickWhileQueued(clk, st.ID, 0) // wave 2 out
	var second string
	for _, id := range ids {
		if j := h.job(st.ID, id); j.Wave == 1 {
			second = id
			break
		}
	}
	h.failed(clk, st.ID, second) // wave 2: 1 of 18: paused
	// Both waves crossed, the reason showing wave 1's alone (as a wave 1
	// failure no longer accepted would leave it).
	h.exec(`UPDATE fw_jobs SET gate_accepted = false WHERE rollout_id = $1`, st.ID)
	h.exec(`UPDATE rollouts SET reason = 'wave 1: 1 of 2 jobs failed (50.0%), over max_failure_pct 5' WHERE id = $1`, st.ID)
	clk.advance(time.Second)
	h.eng.Tick(ctx)
	s := h.status(st.ID)
	if !strings.Contains(s.Reason, "wave 2: 1 of 18 jobs failed") || !strings.Contains(s.Reason, "wave 1: 1 of 2 jobs failed") {
		t.Fatalf("after a step: reason %q, want both waves' crossings", s.Reason)
	}
	if _, err := h.eng.Resume(ctx, st.ID, "operator"); err != nil {
		t.Fatalf("resume with both shown: %v", err)
	}
}

// failed reports the current job of rollout's lockers ids failed.
func (h *harness) failed(clk *clock, rollout string, ids ...string) {
	for _, id := range ids {
		h.report(clk, id, h.job(rollout, id).JobID, firmware.StateFailed)
	}
}

// rebooting reports the current job of rollout's lockers ids through to
// rebooting.
func (h *harness) rebooting(clk *clock, rollout string, ids ...string) {
	h.tb.Helper()
	for _, id := range ids {
		h.mustReport(clk, id, h.job(rollout, id).JobID, firmware.StateDownloading, firmware.StateVerifying,
			firmware.StateInstalling, firmware.StateRebooting)
	}
}

// updated plays lockers ids installing rollout's job (1.5.0 in these
// tests): its reports through to rebooting, then a birth on 1.5.0.
func (h *harness) updated(clk *clock, rollout string, ids ...string) {
	h.tb.Helper()
	h.rebooting(clk, rollout, ids...)
	for _, id := range ids {
		h.birth(clk, id, "1.5.0", true)
	}
}

// TestEngineStatusShowsWhyJobsWait: a rollout that does not move while
// nothing fails says why: the queued jobs of its waves begun whose locker
// cannot take them now, by reason (offline, no birth recorded since it
// connected, a door not closed, another rollout's job on it).
func TestEngineStatusShowsWhyJobsWait(t *testing.T) {
	h, clk := newSilentHarness(t)
	ctx := context.Background()
	ids := h.addLockers("lk-", "LX-24", "1.4.2", 5)
	a := h.upload("LX-24", "1.5.0")
	other := h.create(firmware.Spec{Firmware: a.ID, Selector: firmware.Selector{Lockers: ids[3:4]}, Waves: []int{100}, RatePerMin: 60000})
	h.tickWhileQueued(clk, other.ID, 0)
	if _, err := h.eng.Cancel(ctx, other.ID, "operator"); err != nil {
		t.Fatal(err)
	}
	h.exec(`UPDATE devices SET online = false WHERE id = $1`, ids[0])
	h.exec(`INSERT INTO compartments (device_id, n, size, zone, door) VALUES ($1, 1, 'M', 'ambient', 'open')`, ids[1])
	h.exec(`UPDATE devices SET connected_at = now(), born_at = NULL WHERE id = $1`, ids[2])
	st := h.create(firmware.Spec{Firmware: a.ID, Waves: []int{100}, RatePerMin: 60000})
	// The other rollout's job on ids[3] again (as its retry-failed would
	// hand it out), before this rollout's.
	h.exec(`UPDATE fw_jobs SET state = 'installing' WHERE rollout_id = $1`, other.ID)
	h.tickWhileQueued(clk, st.ID, 4)
	want := map[string]int{firmware.WaitOffline: 1, firmware.WaitDoorOpen: 1, firmware.WaitNoBirth: 1, firmware.WaitOtherJob: 1}
	if s := h.status(st.ID); !maps.Equal(s.Waiting, want) {
		t.Fatalf("waiting %v, want %v (counts %v, skipped %v)", s.Waiting, want, s.Counts, s.Skipped)
	}

	h.exec(`UPDATE devices SET online = true WHERE id = $1`, ids[0])
	h.exec(`UPDATE compartments SET door = 'closed' WHERE device_id = $1`, ids[1])
	h.exec(`UPDATE devices SET born_at = connected_at WHERE id = $1`, ids[2])
	h.exec(`UPDATE fw_jobs SET state = 'failed' WHERE rollout_id = $1`, other.ID)
	h.tickWhileQueued(clk, st.ID, 0)
	if s := h.status(st.ID); len(s.Waiting) != 0 {
		t.Fatalf("waiting %v once every locker can take its job", s.Waiting)
	}
}
