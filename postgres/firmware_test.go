package postgres_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/lockergate/lockergate/firmware"
	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/postgres"
	"github.com/lockergate/lockergate/protocol"
)

// The firmware store's contract beyond what the engine tests exercise: the
// one-job-per-locker rule, conditional transitions, retries and the
// retained fw/job.

func mustFirmwareFixture(tb testing.TB) (*postgres.DB, *firmware.Artifact) {
	tb.Helper()
	db := MustOpen(tb)
	ctx := context.Background()
	if _, err := db.Pool().Exec(ctx, `INSERT INTO sites (id, name) VALUES ('s1', 'S1');
		INSERT INTO devices (id, serial, site, model, fw, secret_hash, online) VALUES
			('lk-1', 'SN-1', 's1', 'LX-24', '1.4.2', '\x00', true),
			('lk-2', 'SN-2', 's1', 'LX-24', '1.4.2', '\x00', true)`); err != nil {
		tb.Fatal(err)
	}
	a := &firmware.Artifact{ID: "fw-1", Model: "LX-24", Version: "1.5.0", Size: 10, SHA256: "00", Sig: "s", File: "fw-1.bin", CreatedAt: time.Now()}
	if err := db.CreateArtifact(ctx, a); err != nil {
		tb.Fatal(err)
	}
	return db, a
}

func mustRollout(tb testing.TB, db *postgres.DB, id string, devices ...string) {
	tb.Helper()
	now := time.Now()
	r := &firmware.Rollout{ID: id, Firmware: "fw-1", Version: "1.5.0", Model: "LX-24", Waves: []int{100},
		WaveSizes: []int{len(devices)}, MaxFailurePct: 5, MinPerWave: 1, RatePerMin: 600, StepTimeoutS: 60,
		FailureAction: firmware.ActionPause, RetryOn: []string{}, Status: firmware.Running, CreatedAt: now, UpdatedAt: now}
	var jobs []firmware.Job
	for i, d := range devices {
		jobs = append(jobs, firmware.Job{RolloutID: id, DeviceID: d, JobID: id + "." + d, Seq: i, State: firmware.StateQueued,
			Attempt: 1, FromFW: "1.4.2", Version: "1.5.0", TZ: "UTC", UpdatedAt: now})
	}
	if err := db.CreateRollout(context.Background(), r, jobs); err != nil {
		tb.Fatal(err)
	}
}

func dispatch(tb testing.TB, db *postgres.DB, id string) []firmware.Job {
	tb.Helper()
	var sent []firmware.Job
	err := db.Update(context.Background(), id, func(tx firmware.StepTx) error {
		var err error
		sent, err = tx.Dispatch(context.Background(), 0, 10, time.Now(), func(j *firmware.Job) (*protocol.FwJob, error) {
			return &protocol.FwJob{Job: j.JobID, Version: j.Version, URL: "http://x/" + j.JobID, Size: 10,
				SHA256: "0000000000000000000000000000000000000000000000000000000000000000", Sig: "s"}, nil
		})
		return err
	})
	if err != nil {
		tb.Fatal(err)
	}
	return sent
}

func TestFirmwareStore(t *testing.T) {
	ctx := context.Background()
	db, a := mustFirmwareFixture(t)

	t.Run("ErrConflictDuplicateVersion", func(t *testing.T) {
		dup := *a
		dup.ID, dup.File = "fw-2", "fw-2.bin"
		if err := db.CreateArtifact(ctx, &dup); !errors.Is(err, fleet.ErrConflict) {
			t.Fatalf("got %v", err)
		}
	})

	mustRollout(t, db, "ro-a", "lk-1", "lk-2")
	mustRollout(t, db, "ro-b", "lk-1")
	if got := dispatch(t, db, "ro-a"); len(got) != 2 {
		t.Fatalf("dispatched %d of ro-a", len(got))
	}
	t.Run("OneJobPerLocker", func(t *testing.T) {
		if got := dispatch(t, db, "ro-b"); len(got) != 0 {
			t.Fatalf("a second rollout handed lk-1 a job while it has one: %+v", got)
		}
	})
	t.Run("RetainedJob", func(t *testing.T) {
		r, err := db.Retained(ctx, "lk-1")
		if err != nil || r.FwJob == nil || r.FwJob.Job != "ro-a.lk-1" || r.FwJob.URL != "http://x/ro-a.lk-1" {
			t.Fatalf("retained %+v, %v", r, err)
		}
	})
	t.Run("RetainedManyJobs", func(t *testing.T) {
		rs, err := db.RetainedMany(ctx, []string{"lk-1", "lk-2", "lk-missing"})
		if err != nil {
			t.Fatal(err)
		}
		for _, id := range []string{"lk-1", "lk-2"} {
			if r := rs[id]; r == nil || r.FwJob == nil || r.FwJob.Job != "ro-a."+id {
				t.Errorf("retained of %s: %+v, want its own job ro-a.%s", id, r, id)
			}
		}
		if r, ok := rs["lk-missing"]; ok {
			t.Errorf("a locker that does not exist has retained state %+v", r)
		}
	})
	t.Run("BirthJobsMany", func(t *testing.T) {
		js, err := db.BirthJobs(ctx, []string{"lk-1", "lk-2", "lk-missing"})
		if err != nil {
			t.Fatal(err)
		}
		one, two := js["lk-1"], js["lk-2"]
		if one.Active == nil || one.Active.JobID != "ro-a.lk-1" || len(one.Settleable) != 1 || one.Settleable[0].JobID != "ro-b.lk-1" {
			t.Errorf("lk-1's birth jobs %+v, want ro-a's active and ro-b's queued", one)
		}
		if two.Active == nil || two.Active.JobID != "ro-a.lk-2" || len(two.Settleable) != 0 {
			t.Errorf("lk-2's birth jobs %+v, want ro-a's active only", two)
		}
		if _, ok := js["lk-missing"]; ok || len(js) != 2 {
			t.Errorf("birth jobs of lockers without any: %+v", js)
		}
	})
	t.Run("ApplyOnlyFrom", func(t *testing.T) {
		j, err := db.Apply(ctx, firmware.Transition{DeviceID: "lk-1", JobID: "ro-a.lk-1", From: []string{firmware.StateInstalling},
			To: firmware.StateRebooting, At: time.Now()})
		if err != nil || j != nil {
			t.Fatalf("a transition from the wrong state applied: %+v, %v", j, err)
		}
		j, err = db.Apply(ctx, firmware.Transition{DeviceID: "lk-2", JobID: "ro-a.lk-1", From: firmware.ActiveStates,
			To: firmware.StateDownloading, At: time.Now()})
		if err != nil || j != nil {
			t.Fatalf("another locker moved lk-1's job: %+v, %v", j, err)
		}
		p := 0.5
		j, err = db.Apply(ctx, firmware.Transition{DeviceID: "lk-1", JobID: "ro-a.lk-1", From: firmware.ActiveStates,
			To: firmware.StateDownloading, Progress: &p, At: time.Now()})
		if err != nil || j == nil || j.State != firmware.StateDownloading || j.Progress == nil || *j.Progress != 0.5 || j.DoneAt != nil {
			t.Fatalf("applied %+v, %v", j, err)
		}
	})
	t.Run("RetryIsANewAttempt", func(t *testing.T) {
		j, err := db.Apply(ctx, firmware.Transition{DeviceID: "lk-1", JobID: "ro-a.lk-1", From: firmware.ActiveStates,
			To: firmware.StateFailed, Error: firmware.KindDownload, At: time.Now(), RetryJobID: "ro-a.lk-1.2"})
		if err != nil || j == nil || j.State != firmware.StateQueued || j.JobID != "ro-a.lk-1.2" || j.Attempt != 2 || j.SentAt != nil {
			t.Fatalf("retry %+v, %v", j, err)
		}
		var n int
		if err := db.Pool().QueryRow(ctx, `SELECT count(*) FROM fw_job_attempts WHERE job_id = 'ro-a.lk-1' AND state = 'failed' AND error = 'download'`).Scan(&n); err != nil || n != 1 {
			t.Fatalf("archived attempts %d, %v", n, err)
		}
		if r, err := db.Retained(ctx, "lk-1"); err != nil || r.FwJob != nil {
			t.Fatalf("a queued retry is on fw/job: %+v, %v", r.FwJob, err)
		}
		if _, err := db.GetJob(ctx, "lk-1", "ro-a.lk-1"); !errors.Is(err, fleet.ErrNotFound) {
			t.Fatalf("the old attempt's id still names the job: %v", err)
		}
	})
	t.Run("CancelAndRequeue", func(t *testing.T) {
		var cancelled []firmware.Job
		err := db.Update(ctx, "ro-a", func(tx firmware.StepTx) error {
			var err error
			cancelled, err = tx.Cancel(ctx, append([]string{firmware.StateQueued}, firmware.PendingStates...), time.Now())
			return err
		})
		if err != nil || len(cancelled) != 2 {
			t.Fatalf("cancelled %d, %v", len(cancelled), err)
		}
		if js, err := db.BirthJobs(ctx, []string{"lk-2"}); err != nil || js["lk-2"].Active != nil {
			t.Fatalf("lk-2 still has an active job: %+v (%v)", js["lk-2"].Active, err)
		}
		if _, err := db.Apply(ctx, firmware.Transition{DeviceID: "lk-2", JobID: "ro-a.lk-2", From: []string{firmware.StateCancelled},
			To: firmware.StateTimedOut, Error: firmware.KindTimeout, At: time.Now()}); err != nil {
			t.Fatal(err)
		}
		var n int
		err = db.Update(ctx, "ro-a", func(tx firmware.StepTx) error {
			var err error
			n, err = tx.Requeue(ctx, time.Now(), []string{firmware.StateFailed, firmware.StateTimedOut}, func(j *firmware.Job) string { return j.JobID + ".r" })
			return err
		})
		if err != nil || n != 1 {
			t.Fatalf("requeued %d, %v", n, err)
		}
		if j, err := db.GetJob(ctx, "lk-2", "ro-a.lk-2.r"); err != nil || j.State != firmware.StateQueued || j.Attempt != 2 {
			t.Fatalf("requeued job %+v, %v", j, err)
		}
	})
	t.Run("Counts", func(t *testing.T) {
		cs, err := db.Counts(ctx, "ro-a")
		if err != nil {
			t.Fatal(err)
		}
		got := map[string]int{}
		for _, c := range cs {
			got[c.State] += c.N
		}
		if got[firmware.StateQueued] != 1 || got[firmware.StateCancelled] != 1 {
			t.Fatalf("counts %v", got)
		}
	})
}
