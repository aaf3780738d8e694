package firmware_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lockergate/lockergate/firmware"
	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/internal/testtool"
	"github.com/lockergate/lockergate/protocol"
)

// errInjected is the failure a faultStore makes a call return.
var errInjected = errors.New("injected store failure")

// faultStore is the real store with faults: fault, when set, is asked
// before each call below whether it fails (a non-nil error), given the
// call's name and the job (GetJob, Apply), rollout (GetRollout) or locker
// (RunningVersion) it is about. It may change the database first, to play
// a race.
type faultStore struct {
	firmware.Store
	mu    sync.Mutex
	fault func(call, key string) error
}

func (s *faultStore) set(f func(call, key string) error) {
	s.mu.Lock()
	s.fault = f
	s.mu.Unlock()
}

func (s *faultStore) check(call, key string) error {
	s.mu.Lock()
	f := s.fault
	s.mu.Unlock()
	if f == nil {
		return nil
	}
	return f(call, key)
}

func (s *faultStore) GetJob(ctx context.Context, deviceID, jobID string) (*firmware.Job, error) {
	if err := s.check("GetJob", jobID); err != nil {
		return nil, err
	}
	return s.Store.GetJob(ctx, deviceID, jobID)
}

func (s *faultStore) GetRollout(ctx context.Context, id string) (*firmware.Rollout, error) {
	if err := s.check("GetRollout", id); err != nil {
		return nil, err
	}
	return s.Store.GetRollout(ctx, id)
}

func (s *faultStore) RunningVersion(ctx context.Context, deviceID string) (string, error) {
	if err := s.check("RunningVersion", deviceID); err != nil {
		return "", err
	}
	return s.Store.RunningVersion(ctx, deviceID)
}

func (s *faultStore) Apply(ctx context.Context, t firmware.Transition) (*firmware.Job, error) {
	if err := s.check("Apply", t.JobID); err != nil {
		return nil, err
	}
	return s.Store.Apply(ctx, t)
}

func (s *faultStore) WaveFailures(ctx context.Context, id string, wave int) (int, int, error) {
	if err := s.check("WaveFailures", id); err != nil {
		return 0, 0, err
	}
	return s.Store.WaveFailures(ctx, id, wave)
}

// Update asks its fault once the rollout is locked ("Update", the
// rollout's id), before f runs.
func (s *faultStore) Update(ctx context.Context, id string, f func(tx firmware.StepTx) error) error {
	return s.Store.Update(ctx, id, func(tx firmware.StepTx) error {
		if err := s.check("Update", id); err != nil {
			return err
		}
		return f(tx)
	})
}

// failOn fails the calls named call about key.
func failOn(call, key string) func(string, string) error {
	return func(c, k string) error {
		if c == call && k == key {
			return errInjected
		}
		return nil
	}
}

// newFaultHarness is a harness on a test clock whose engine's store is a
// faultStore, logging to the returned buffer; its lockers say nothing (the
// test reports for them).
func newFaultHarness(t *testing.T) (*harness, *clock, *faultStore, *testtool.LockedBuffer) {
	clk := newClock()
	fs := &faultStore{}
	var log testtool.LockedBuffer
	h := newHarness(t, hopt{now: clk.now, log: slog.New(slog.NewTextHandler(&log, nil)),
		store: func(s firmware.Store) firmware.Store { fs.Store = s; return fs }})
	h.devs.outcome = func(string, int) string { return outSilent }
	return h, clk, fs, &log
}

// engineErrors returns lockergate_firmware_errors_total{op}.
func (h *harness) engineErrors(op string) float64 {
	h.tb.Helper()
	mfs, err := h.reg.Gather()
	if err != nil {
		h.tb.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "lockergate_firmware_errors_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "op" && l.GetValue() == op {
					return m.GetCounter().GetValue()
				}
			}
		}
	}
	return 0
}

// mustReport plays a locker's fw/status reports of a job and fails the
// test on an error.
func (h *harness) mustReport(clk *clock, id, job string, states ...string) {
	h.tb.Helper()
	for _, s := range states {
		if err := h.eng.JobStatus(context.Background(), id, &protocol.FwStatus{Job: job, State: s}, clk.now()); err != nil {
			h.tb.Fatalf("report %s of %s: %v", s, job, err)
		}
	}
}

// TestEngineReportLaterStoreCallFails: a fw/status report whose second or
// third store call fails (after the job was read) returns an error that is
// the store's (errors.Is: the fleet manager retries it, or drops a data
// error) and names the call; nothing is applied (the job keeps its state
// and attempt, the locker is not re-published) and it counts as a report
// not recorded. The same report tried again is recorded once.
func TestEngineReportLaterStoreCallFails(t *testing.T) {
	for _, tc := range []struct {
		name     string
		call     string // the failing call; its key is the job, rollout or locker
		state    string // the report
		names    string // what the error says failed
		want     string // the job's state once the report is recorded
		attempts int    // the job's attempt once the report is recorded
	}{
		{"SucceededRunningVersion", "RunningVersion", firmware.StateSucceeded, "read the version of locker", firmware.StateSucceeded, 1},
		{"SucceededApply", "Apply", firmware.StateSucceeded, "record succeeded of job", firmware.StateSucceeded, 1},
		{"FailedGetRollout", "GetRollout", firmware.StateFailed, "read rollout", firmware.StateQueued, 2},
		{"FailedApply", "Apply", firmware.StateFailed, "record failed of job", firmware.StateQueued, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h, clk, fs, _ := newFaultHarness(t)
			ctx := context.Background()
			ids := h.addLockers("lk-", "LX-24", "1.4.2", 1)
			a := h.upload("LX-24", "1.5.0")
			st := h.create(firmware.Spec{Firmware: a.ID, Waves: []int{100}, RatePerMin: 60000, StepTimeoutS: 60,
				MaxFailurePct: ptr(100.0), Retries: 1, RetryOn: []string{firmware.KindDownload}})
			h.eng.Tick(ctx)
			job := h.sentJob(st.ID, ids[0])
			report := &protocol.FwStatus{Job: job, State: tc.state}
			before := firmware.StateDownloading
			if tc.state == firmware.StateSucceeded {
				// Queued across the reboot: the birth on the version came first.
				h.mustReport(clk, ids[0], job, firmware.StateDownloading, firmware.StateVerifying,
					firmware.StateInstalling, firmware.StateRebooting)
				h.birth(clk, ids[0], "1.5.0", false)
				before = firmware.StateRebooting
			} else {
				h.mustReport(clk, ids[0], job, firmware.StateDownloading)
				report.Error = firmware.KindDownload
			}
			key := map[string]string{"RunningVersion": ids[0], "Apply": job, "GetRollout": st.ID}[tc.call]
			fs.set(failOn(tc.call, key))
			published := h.devs.published.Load()

			err := h.eng.JobStatus(ctx, ids[0], report, clk.now())
			fs.set(nil)
			if !errors.Is(err, errInjected) || !strings.Contains(err.Error(), tc.names) {
				t.Fatalf("report with %s failing: %v, want the store's error naming %q", tc.call, err, tc.names)
			}
			if j := h.job(st.ID, ids[0]); j.State != before || j.JobID != job || j.Attempt != 1 {
				t.Fatalf("after the report not recorded: %s %s attempt %d, want %s %s attempt 1", j.State, j.JobID, j.Attempt, before, job)
			}
			if n := h.devs.published.Load(); n != published {
				t.Fatalf("the locker was re-published %d times for a report not recorded", n-published)
			}
			if n := h.engineErrors("report"); n != 1 {
				t.Fatalf("errors_total{op=report} = %v, want 1", n)
			}

			for i := range 2 {
				if err := h.eng.JobStatus(ctx, ids[0], report, clk.now()); err != nil {
					t.Fatalf("report tried again (%d): %v", i+1, err)
				}
			}
			if j := h.job(st.ID, ids[0]); j.State != tc.want || j.Attempt != tc.attempts {
				t.Fatalf("after the report tried again: %s attempt %d, want %s attempt %d", j.State, j.Attempt, tc.want, tc.attempts)
			}
		})
	}
}

// TestEngineBootFailureNotRecorded: a birth on another version than the
// rebooting job's is a failed boot; when the store cannot record it, the
// birth logs it (locker, job, error) and counts it as a report not
// recorded, leaves the job rebooting, and still settles the late job the
// birth's version confirms. The job's step timeout ends it then.
func TestEngineBootFailureNotRecorded(t *testing.T) {
	for _, call := range []string{"GetRollout", "Apply"} {
		t.Run(call, func(t *testing.T) {
			h, clk, fs, log := newFaultHarness(t)
			ctx := context.Background()
			ids := h.addLockers("lk-", "LX-24", "1.4.2", 1)
			spec := firmware.Spec{Waves: []int{100}, RatePerMin: 60000, StepTimeoutS: 60, MaxFailurePct: ptr(100.0)}
			// A 1.5.0 job that timed out in a reboot longer than the step timeout.
			spec.Firmware = h.upload("LX-24", "1.5.0").ID
			old := h.create(spec)
			h.eng.Tick(ctx)
			late := h.sentJob(old.ID, ids[0])
			h.rebootPastTimeout(clk, ids[0], late)
			if j := h.job(old.ID, ids[0]); j.State != firmware.StateTimedOut {
				t.Fatalf("the 1.5.0 job after its step timeout: %s", j.State)
			}
			// A 1.6.0 job, rebooting, when the locker comes back on 1.5.0.
			h.exec(`UPDATE devices SET online = true WHERE id = $1`, ids[0])
			spec.Firmware = h.upload("LX-24", "1.6.0").ID
			cur := h.create(spec)
			clk.advance(time.Second)
			h.eng.Tick(ctx)
			job := h.sentJob(cur.ID, ids[0])
			h.mustReport(clk, ids[0], job, firmware.StateDownloading, firmware.StateVerifying, firmware.StateInstalling,
				firmware.StateRebooting)
			key := job
			if call == "GetRollout" {
				key = cur.ID
			}
			fs.set(failOn(call, key))

			h.birth(clk, ids[0], "1.5.0", true)
			fs.set(nil)
			if j := h.job(cur.ID, ids[0]); j.State != firmware.StateRebooting || j.JobID != job {
				t.Fatalf("the 1.6.0 job after a boot failure not recorded: %s %s, want %s rebooting", j.State, j.JobID, job)
			}
			if j := h.job(old.ID, ids[0]); j.State != firmware.StateSucceeded {
				t.Fatalf("the late 1.5.0 job after the birth on 1.5.0: %s, want succeeded", j.State)
			}
			if n := h.engineErrors("report"); n != 1 {
				t.Fatalf("errors_total{op=report} = %v, want 1", n)
			}
			out := log.String()
			if !strings.Contains(out, "boot failure not recorded") || !strings.Contains(out, "job="+job) ||
				!strings.Contains(out, errInjected.Error()) {
				t.Fatalf("log does not report the boot failure not recorded of %s:\n%s", job, out)
			}

			clk.advance(61 * time.Second)
			h.eng.Tick(ctx)
			if j := h.job(cur.ID, ids[0]); j.State != firmware.StateTimedOut || j.Error != firmware.KindTimeout {
				t.Fatalf("the 1.6.0 job after its step timeout: %s %q, want timed_out timeout", j.State, j.Error)
			}
		})
	}
}

// lateJobs sets a locker up with two jobs a birth on 1.5.0 settles, in two
// rollouts of 1.5.0: one timed out in a long reboot, and one queued
// (created after, while the locker was offline). It returns the locker and
// the two rollouts.
func (h *harness) lateJobs(clk *clock) (id string, timedOut, queued *firmware.Status) {
	h.tb.Helper()
	ctx := context.Background()
	id = h.addLockers("lk-", "LX-24", "1.4.2", 1)[0]
	spec := firmware.Spec{Firmware: h.upload("LX-24", "1.5.0").ID, Waves: []int{100}, RatePerMin: 60000,
		StepTimeoutS: 60, MaxFailurePct: ptr(100.0)}
	timedOut = h.create(spec)
	h.eng.Tick(ctx)
	h.mustReport(clk, id, h.sentJob(timedOut.ID, id), firmware.StateDownloading, firmware.StateVerifying,
		firmware.StateInstalling, firmware.StateRebooting)
	h.exec(`UPDATE devices SET online = false WHERE id = $1`, id)
	clk.advance(61 * time.Second)
	h.eng.Tick(ctx)
	queued = h.create(spec)
	if a, b := h.job(timedOut.ID, id), h.job(queued.ID, id); a.State != firmware.StateTimedOut || b.State != firmware.StateQueued {
		h.tb.Fatalf("set up: %s and %s, want timed_out and queued", a.State, b.State)
	}
	return id, timedOut, queued
}

// TestEngineBirthSettleFails: a late job whose settling by a birth the
// store fails is counted and logged as a birth error and keeps its state;
// the jobs after it are still settled.
func TestEngineBirthSettleFails(t *testing.T) {
	h, clk, fs, log := newFaultHarness(t)
	id, timedOut, queued := h.lateJobs(clk)
	var failed string // the job of the first settling, which fails
	fs.set(func(call, key string) error {
		if call != "Apply" || failed != "" && failed != key {
			return nil
		}
		failed = key
		return errInjected
	})
	h.birth(clk, id, "1.5.0", true)
	fs.set(nil)
	want := map[string]string{timedOut.ID: firmware.StateSucceeded, queued.ID: firmware.StateSkipped}
	for _, r := range []*firmware.Status{timedOut, queued} {
		j := h.job(r.ID, id)
		if j.JobID == failed {
			want[r.ID] = map[string]string{timedOut.ID: firmware.StateTimedOut, queued.ID: firmware.StateQueued}[r.ID]
		}
		if j.State != want[r.ID] {
			t.Errorf("job %s after the birth (settling of %s failed): %s, want %s", j.JobID, failed, j.State, want[r.ID])
		}
	}
	if n := h.engineErrors("birth"); n != 1 {
		t.Fatalf("errors_total{op=birth} = %v, want 1", n)
	}
	if out := log.String(); !strings.Contains(out, "op=birth") || !strings.Contains(out, errInjected.Error()) {
		t.Fatalf("log does not report the birth error:\n%s", out)
	}
}

// TestEngineBirthConfirmReadFails: a queued job handed out between the
// birth's read and its settling is confirmed by reading it again; when
// that read fails, the birth counts and logs the error (it is not
// swallowed) and the job stays handed out, for its succeeded report or
// step timeout to judge; the other late job is settled still.
func TestEngineBirthConfirmReadFails(t *testing.T) {
	h, clk, fs, log := newFaultHarness(t)
	id, timedOut, queued := h.lateJobs(clk)
	qjob := h.job(queued.ID, id).JobID
	fs.set(func(call, key string) error {
		switch {
		case call == "Apply" && key == qjob:
			// Handed out meanwhile (another gateway instance's step).
			h.exec(`UPDATE fw_jobs SET state = 'sent', sent_at = $2, updated_at = $2 WHERE job_id = $1`, qjob, clk.now())
		case call == "GetJob" && key == qjob:
			return fmt.Errorf("read %s: %w", key, errInjected)
		}
		return nil
	})
	h.birth(clk, id, "1.5.0", true)
	fs.set(nil)
	if j := h.job(queued.ID, id); j.State != firmware.StateSent {
		t.Fatalf("the job handed out meanwhile, not read again: %s, want sent", j.State)
	}
	if j := h.job(timedOut.ID, id); j.State != firmware.StateSucceeded {
		t.Fatalf("the late job: %s, want succeeded", j.State)
	}
	if n := h.engineErrors("birth"); n != 1 {
		t.Fatalf("errors_total{op=birth} = %v, want 1", n)
	}
	if out := log.String(); !strings.Contains(out, "op=birth") || !strings.Contains(out, errInjected.Error()) ||
		!strings.Contains(out, qjob) {
		t.Fatalf("log does not report the failed read of %s:\n%s", qjob, out)
	}
}

// TestEngineReportDataErrorIsInvalid: a report the database cannot take
// (a job id text cannot hold, which the protocol's validation keeps from
// the wire) returns an error that is fleet.ErrInvalid, whichever store call
// meets it first, so the fleet manager drops it instead of retrying it
// for ever.
func TestEngineReportDataErrorIsInvalid(t *testing.T) {
	h := newHarness(t, hopt{now: newClock().now})
	ids := h.addLockers("lk-", "LX-24", "1.4.2", 1)
	for _, st := range []*protocol.FwStatus{
		{Job: "ro-x.0\x001", State: firmware.StateDownloading},                          // Apply
		{Job: "ro-x.0\x001", State: firmware.StateFailed, Error: firmware.KindDownload}, // GetJob
		{Job: "ro-x.0\x001", State: firmware.StateSucceeded},                            // GetJob
	} {
		if err := h.eng.JobStatus(context.Background(), ids[0], st, time.Now()); !errors.Is(err, fleet.ErrInvalid) {
			t.Errorf("%s report of a job id with NUL: %q, want fleet.ErrInvalid", st.State, err)
		}
	}
}

// TestEngineNoRetryIntoAnEndedRollout: a retryable failure whose rollout is
// cancelled between the engine's read of it and the failure's write is
// recorded as final: no retry is queued in a cancelled rollout (it would
// stay queued there for good, and a later birth could mark it succeeded).
func TestEngineNoRetryIntoAnEndedRollout(t *testing.T) {
	h, clk, fs, _ := newFaultHarness(t)
	ctx := context.Background()
	ids := h.addLockers("lk-", "LX-24", "1.4.2", 1)
	a := h.upload("LX-24", "1.5.0")
	st := h.create(firmware.Spec{Firmware: a.ID, Waves: []int{100}, RatePerMin: 60000, MaxFailurePct: ptr(100.0),
		Retries: 2, RetryOn: []string{firmware.KindInstall}})
	h.eng.Tick(ctx)
	job := h.job(st.ID, ids[0]).JobID
	h.mustReport(clk, ids[0], job, firmware.StateDownloading, firmware.StateVerifying, firmware.StateInstalling)
	fs.set(func(call, key string) error {
		if call == "Apply" && key == job {
			fs.set(nil)
			if _, err := h.eng.Cancel(ctx, st.ID, "operator"); err != nil { // installing: the job carries on
				t.Errorf("cancel: %v", err)
			}
		}
		return nil
	})
	if err := h.eng.JobStatus(ctx, ids[0], &protocol.FwStatus{Job: job, State: firmware.StateFailed, Error: firmware.KindInstall}, clk.now()); err != nil {
		t.Fatal(err)
	}
	j := h.job(st.ID, ids[0])
	if j.State != firmware.StateFailed || j.Attempt != 1 || j.JobID != job {
		t.Fatalf("the failure after the cancel: %s, attempt %d, job %s; want failed, attempt 1, %s (no retry)", j.State, j.Attempt, j.JobID, job)
	}
	if s := h.status(st.ID); s.Status != firmware.Cancelled || s.Counts[firmware.StateQueued] != 0 {
		t.Fatalf("rollout %s %v, want cancelled with nothing queued", s.Status, s.Counts)
	}
}

// TestEngineResumeWaitsForAFailureBeingRecorded: a failure is recorded,
// then its wave's gate checked, in two transactions; a resume between the
// two would find a crossing its status does not show yet and be refused.
// It waits for the check instead, and accepts the failure with the others.
func TestEngineResumeWaitsForAFailureBeingRecorded(t *testing.T) {
	h, fs, st, third := pausedWithAThirdToFail(t)
	ctx := context.Background()
	entered, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	fs.set(func(call, key string) error {
		if call == "WaveFailures" && key == st.ID {
			once.Do(func() { close(entered); <-release })
		}
		return nil
	})
	defer func() {
		select {
		case <-release:
		default:
			close(release)
		}
	}()
	go third()
	select {
	case <-entered: // recorded; its gate check under way
	case <-time.After(10 * time.Second):
		t.Fatal("the third failure's gate check never began")
	}
	resumed := make(chan error, 1)
	go func() {
		_, err := h.eng.Resume(ctx, st.ID, "operator")
		resumed <- err
	}()
	select {
	case err := <-resumed:
		t.Fatalf("resume answered (%v) while a failure's gate check was under way; want it to wait for the check", err)
	case <-time.After(300 * time.Millisecond): // an observation window for something that must not happen
	}
	close(release)
	select {
	case err := <-resumed:
		if err != nil {
			t.Fatalf("resume once the check ran: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the resume did not answer after the check")
	}
	h.wantAccepted(st.ID, 3)
}

// TestEngineResumeWaitsForAFailureStoredAsItBegan: a failure stored just
// after the resume found none being recorded, and before it read the
// counts (its gate check then waits for the resume's lock), is waited for
// once the resume finds its crossing not shown, and the resume goes
// through.
func TestEngineResumeWaitsForAFailureStoredAsItBegan(t *testing.T) {
	h, fs, st, third := pausedWithAThirdToFail(t)
	ctx := context.Background()
	checking := make(chan struct{})
	var once, checked sync.Once
	fs.set(func(call, key string) error {
		switch {
		case call == "WaveFailures" && key == st.ID:
			checked.Do(func() { close(checking) })
		case call == "Update" && key == st.ID:
			// The resume holds the rollout: the third failure is stored,
			// and its gate check begins (and waits for the lock).
			once.Do(func() {
				go third()
				select {
				case <-checking:
				case <-time.After(10 * time.Second):
					t.Error("the third failure's gate check never began")
				}
			})
		}
		return nil
	})
	if _, err := h.eng.Resume(ctx, st.ID, "operator"); err != nil {
		t.Fatalf("resume with a failure stored as it began: %v", err)
	}
	h.wantAccepted(st.ID, 3)
}

// pausedWithAThirdToFail is a fault harness's rollout of 20 lockers paused
// by its gate at 2 failed (over 5 %), and third, which reports a third
// locker's job failed.
func pausedWithAThirdToFail(t *testing.T) (h *harness, fs *faultStore, st *firmware.Status, third func()) {
	h, clk, fs, _ := newFaultHarness(t)
	ids, st := h.rolloutOf(20, firmware.Spec{Waves: []int{100}, RatePerMin: 60000, MaxFailurePct: ptr(5.0)})
	h.tickWhileQueued(clk, st.ID, 0)
	h.failed(clk, st.ID, ids[0], ids[1])
	job := h.job(st.ID, ids[2]).JobID
	return h, fs, st, func() { h.report(clk, ids[2], job, firmware.StateFailed) }
}

// wantAccepted checks that rollout's resumes accepted n failures.
func (h *harness) wantAccepted(rollout string, n int) {
	h.tb.Helper()
	var accepted int
	if err := h.db.Pool().QueryRow(context.Background(), `SELECT count(*) FROM fw_jobs WHERE rollout_id = $1 AND gate_accepted`, rollout).Scan(&accepted); err != nil || accepted != n {
		h.tb.Fatalf("%d failures accepted (%v), want %d", accepted, err, n)
	}
}
