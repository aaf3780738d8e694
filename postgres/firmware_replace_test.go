package postgres_test

import (
	"context"
	"testing"
	"time"

	"github.com/lockergate/lockergate/firmware"
	"github.com/lockergate/lockergate/protocol"
)

// TestFirmwareJobsEndWhenBoardReplaced: a locker re-provisioned with a new
// board is not the board its open firmware jobs were for: in the
// replacement's transaction its queued and handed-out jobs end, skipped
// with the reason "replaced" (not a failure), so the new board's first
// connect gets no fw/job. Other lockers' jobs carry on.
func TestFirmwareJobsEndWhenBoardReplaced(t *testing.T) {
	ctx := context.Background()
	db, _ := mustFirmwareFixture(t)
	mustRollout(t, db, "ro-a", "lk-1", "lk-2")
	if got := dispatch(t, db, "ro-a"); len(got) != 2 {
		t.Fatalf("dispatched %d", len(got))
	}
	mustRollout(t, db, "ro-b", "lk-1") // queued behind ro-a's job

	if _, err := db.UpdateLocker(ctx, "lk-1", nil, new(true)); err != nil {
		t.Fatal(err)
	}
	mustReregister(t, db, "lk-1", &protocol.ProvisionRequest{Serial: "SN-1", Model: "LX-8", FW: "2.0.0"})

	for _, c := range []struct{ rollout, device, state, err string }{
		{"ro-a", "lk-1", firmware.StateSkipped, firmware.SkipReplaced},
		{"ro-b", "lk-1", firmware.StateSkipped, firmware.SkipReplaced},
		{"ro-a", "lk-2", firmware.StateSent, ""},
	} {
		jobs, err := db.ListJobs(ctx, c.rollout, firmware.JobFilter{Limit: 10})
		if err != nil {
			t.Fatal(err)
		}
		found := false
		for _, j := range jobs {
			if j.DeviceID != c.device {
				continue
			}
			found = true
			if j.State != c.state || j.Error != c.err || (c.state == firmware.StateSkipped && j.DoneAt == nil) {
				t.Errorf("%s %s: %s %q done %v, want %s %q", c.rollout, c.device, j.State, j.Error, j.DoneAt, c.state, c.err)
			}
		}
		if !found {
			t.Errorf("no job of %s in %s", c.device, c.rollout)
		}
	}
	if ret, err := db.Retained(ctx, "lk-1"); err != nil || ret.FwJob != nil {
		t.Fatalf("the new board's fw/job: %+v, %v; want none", ret.FwJob, err)
	}
	if ret, err := db.Retained(ctx, "lk-2"); err != nil || ret.FwJob == nil {
		t.Fatalf("the other locker's fw/job: %+v, %v", ret, err)
	}
	// A skipped job takes no report (the new board may have seen the old
	// retained job).
	if j, err := db.Apply(ctx, firmware.Transition{DeviceID: "lk-1", JobID: "ro-a.lk-1", From: append(firmware.ActiveStates, firmware.StateCancelled),
		To: firmware.StateInstalling, At: time.Now()}); err != nil || j != nil {
		t.Fatalf("a report moved the replaced board's job: %+v, %v", j, err)
	}
}
