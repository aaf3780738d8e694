package postgres_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/lockergate/lockergate/firmware"
	"github.com/lockergate/lockergate/fleet"
)

// TestFirmwareDataErrorsAreInvalid: a value PostgreSQL cannot take (text
// with NUL or bytes that are not UTF-8) in GetJob's or Apply's arguments is
// fleet.ErrInvalid (the fleet manager drops the report instead of retrying
// it for ever), and Apply then changes nothing, its retry branch included;
// a job that is not there is not ErrInvalid, nor is a failure to reach the
// database (those are retried).
func TestFirmwareDataErrorsAreInvalid(t *testing.T) {
	ctx := context.Background()
	db, _ := mustFirmwareFixture(t)
	mustRollout(t, db, "ro-a", "lk-1")
	if got := dispatch(t, db, "ro-a"); len(got) != 1 {
		t.Fatalf("dispatched %d of ro-a", len(got))
	}
	unchanged := func(t *testing.T) {
		t.Helper()
		j, err := db.GetJob(ctx, "lk-1", "ro-a.lk-1")
		if err != nil || j.State != firmware.StateSent || j.Error != "" || j.Attempt != 1 {
			t.Fatalf("the job after a data error: %+v, %v; want it sent, attempt 1", j, err)
		}
		var n int
		if err := db.Pool().QueryRow(ctx, `SELECT count(*) FROM fw_job_attempts`).Scan(&n); err != nil || n != 0 {
			t.Fatalf("attempts archived after a data error: %d, %v", n, err)
		}
	}

	t.Run("GetJob", func(t *testing.T) {
		for _, tc := range []struct{ device, job string }{
			{"lk-1", "ro-a.lk\x00-1"},
			{"lk-1", "ro-a.lk\xff-1"},
			{"lk\x00-1", "ro-a.lk-1"},
		} {
			if _, err := db.GetJob(ctx, tc.device, tc.job); !errors.Is(err, fleet.ErrInvalid) || errors.Is(err, fleet.ErrNotFound) {
				t.Errorf("GetJob(%q, %q): %v, want fleet.ErrInvalid", tc.device, tc.job, err)
			}
		}
		if _, err := db.GetJob(ctx, "lk-1", "ro-a.lk-9"); !errors.Is(err, fleet.ErrNotFound) || errors.Is(err, fleet.ErrInvalid) {
			t.Errorf("GetJob of an unknown job: %v, want fleet.ErrNotFound only", err)
		}
	})
	t.Run("Apply", func(t *testing.T) {
		for _, tc := range []struct {
			name string
			t    firmware.Transition
		}{
			{"JobID", firmware.Transition{DeviceID: "lk-1", JobID: "ro-a.lk\x00-1", From: firmware.ActiveStates,
				To: firmware.StateDownloading}},
			{"Error", firmware.Transition{DeviceID: "lk-1", JobID: "ro-a.lk-1", From: firmware.ActiveStates,
				To: firmware.StateFailed, Error: "down\x00load"}},
			{"RetryJobID", firmware.Transition{DeviceID: "lk-1", JobID: "ro-a.lk-1", From: firmware.ActiveStates,
				To: firmware.StateFailed, Error: firmware.KindDownload, RetryJobID: "ro-a.lk-1\xff2"}},
		} {
			tc.t.At = time.Now()
			if _, err := db.Apply(ctx, tc.t); !errors.Is(err, fleet.ErrInvalid) {
				t.Errorf("Apply with NUL or non-UTF-8 in %s: %v, want fleet.ErrInvalid", tc.name, err)
			}
			unchanged(t)
		}
	})
	t.Run("NotReachedIsNotInvalid", func(t *testing.T) {
		down, cancel := context.WithCancel(ctx)
		cancel()
		if _, err := db.GetJob(down, "lk-1", "ro-a.lk-1"); err == nil || errors.Is(err, fleet.ErrInvalid) {
			t.Errorf("GetJob without a database: %v, want an error that is not fleet.ErrInvalid", err)
		}
		_, err := db.Apply(down, firmware.Transition{DeviceID: "lk-1", JobID: "ro-a.lk-1", From: firmware.ActiveStates,
			To: firmware.StateDownloading, At: time.Now()})
		if err == nil || errors.Is(err, fleet.ErrInvalid) {
			t.Errorf("Apply without a database: %v, want an error that is not fleet.ErrInvalid", err)
		}
		unchanged(t)
	})
}
