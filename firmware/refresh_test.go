package firmware_test

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"strconv"
	"testing"
	"time"

	"github.com/lockergate/lockergate/firmware"
	"github.com/lockergate/lockergate/internal/testtool"
	"github.com/lockergate/lockergate/protocol"
)

// retainedJob is the fw/job a locker gets on its next connect.
func (h *harness) retainedJob(id string) *protocol.FwJob {
	h.tb.Helper()
	r, err := h.db.Retained(context.Background(), id)
	if err != nil {
		h.tb.Fatal(err)
	}
	if r.FwJob == nil {
		h.tb.Fatalf("%s has no fw/job", id)
	}
	return r.FwJob
}

func urlExp(tb testing.TB, raw string) (url.Values, time.Time) {
	tb.Helper()
	u, err := url.Parse(raw)
	if err != nil {
		tb.Fatal(err)
	}
	exp, err := strconv.ParseInt(u.Query().Get("exp"), 10, 64)
	if err != nil {
		tb.Fatalf("url %s: %v", raw, err)
	}
	return u.Query(), time.Unix(exp, 0)
}

// TestEngineRenewsURLAndWindow: a locker away for longer than the download
// URL's validity (the step timeout allows up to 7 days) gets, with the same
// job, a freshly signed URL that works and the install window's next times,
// on the broker's retained fw/job and on its next connect; the step
// timeout's clock does not move.
func TestEngineRenewsURLAndWindow(t *testing.T) {
	// Noon in Chicago (the site's zone), far from the window's ends and
	// from a DST change.
	clk := &clock{t: time.Date(2027, 1, 12, 18, 0, 0, 0, time.UTC)}
	h := newHarness(t, hopt{now: clk.now})
	ctx := context.Background()
	h.devs.outcome = func(string, int) string { return outSilent } // away: it never reports
	ids := h.addLockers("lk-", "LX-24", "1.4.2", 1)
	a := h.upload("LX-24", "1.5.0")
	deadline := clk.now().Add(10 * 24 * time.Hour)
	st := h.create(firmware.Spec{Firmware: a.ID, Waves: []int{100}, RatePerMin: 60000, StepTimeoutS: 7 * 86400,
		Window: "02:00-05:00", Deadline: &deadline})
	h.eng.Tick(ctx)
	first := h.retainedJob(ids[0])
	testtool.Eventually(t, 5*time.Second, "the job reached the locker", func() error {
		if n := h.devs.received(first.Job); n != 1 {
			return fmt.Errorf("received %d times", n)
		}
		return nil
	})
	q, exp := urlExp(t, first.URL)
	if err := h.eng.CheckDownload(ctx, a.ID, q); err != nil || !exp.After(clk.now()) {
		t.Fatalf("the first URL (exp %v): %v", exp, err)
	}
	sent := h.job(st.ID, ids[0])
	published := h.devs.published.Load()

	clk.advance(72 * time.Hour) // the locker is back after three days
	if err := h.eng.CheckDownload(ctx, a.ID, q); !errors.Is(err, firmware.ErrURLExpired) {
		t.Fatalf("the first URL three days later: %v, want expired", err)
	}
	h.eng.Tick(ctx)
	got := h.retainedJob(ids[0])
	q, exp = urlExp(t, got.URL)
	if !exp.After(clk.now()) {
		t.Fatalf("URL expires %v, before now %v: not renewed", exp, clk.now())
	}
	if err := h.eng.CheckDownload(ctx, a.ID, q); err != nil {
		t.Fatalf("the renewed URL: %v", err)
	}
	if q.Get("job") != first.Job {
		t.Fatalf("renewed URL signed for job %q, want %q", q.Get("job"), first.Job)
	}
	if want := first.InstallAfter.Add(72 * time.Hour); !got.InstallAfter.Equal(want) || !got.InstallBefore.After(clk.now()) {
		t.Fatalf("window %v-%v at %v (first %v-%v): want the next occurrence, opening %v", got.InstallAfter, got.InstallBefore,
			clk.now(), first.InstallAfter, first.InstallBefore, want)
	}
	// Everything else is the job as handed out.
	same := *got
	same.URL, same.InstallAfter, same.InstallBefore = first.URL, first.InstallAfter, first.InstallBefore
	if string(protocol.Encode(&same)) != string(protocol.Encode(first)) {
		t.Fatalf("renewed job %s\nwas %s", protocol.Encode(got), protocol.Encode(first))
	}
	// The broker's retained copy is renewed too (a locker may get that one
	// first on its connect).
	testtool.Eventually(t, 5*time.Second, "fw/job republished", func() error {
		if n := h.devs.received(first.Job); h.devs.published.Load() == published || n < 2 {
			return fmt.Errorf("not republished (the locker got it %d times)", n)
		}
		return nil
	})
	if j := h.job(st.ID, ids[0]); j.State != firmware.StateSent || !j.UpdatedAt.Equal(sent.UpdatedAt) || j.JobID != sent.JobID {
		t.Fatalf("job after the renewal: %s %s updated %v, want sent %s updated %v", j.JobID, j.State, j.UpdatedAt, sent.JobID, sent.UpdatedAt)
	}
	if n := h.devs.attempts(ids[0]); n != 1 {
		t.Fatalf("the locker started %d jobs; want the repeat ignored", n)
	}

	// Not renewed again before it is due.
	published = h.devs.published.Load()
	clk.advance(time.Minute)
	h.eng.Tick(ctx)
	if again := h.retainedJob(ids[0]); again.URL != got.URL {
		t.Fatalf("renewed again a minute later")
	}
	if h.devs.published.Load() != published {
		t.Fatal("republished again a minute later")
	}
}

// TestDownloadOfWithdrawnJobRefused: a job's signed URL stops working once
// the rollout is cancelled, so a locker that missed the withdrawal
// (offline, or subscribed after an empty fw/job went by) cannot go on to
// download and install it; an attempt retried since still downloads (the
// same image) until then. A database that cannot answer is not taken for a
// withdrawal.
func TestDownloadOfWithdrawnJobRefused(t *testing.T) {
	h := newHarness(t, hopt{})
	ctx := context.Background()
	h.devs.outcome = func(string, int) string { return outSilent }
	ids := h.addLockers("lk-", "LX-24", "1.4.2", 1)
	a := h.upload("LX-24", "1.5.0")
	st := h.create(firmware.Spec{Firmware: a.ID, Waves: []int{100}, RatePerMin: 60000, MaxFailurePct: ptr(100.0),
		Retries: 1, RetryOn: []string{firmware.KindDownload}})
	first := h.sentJob(st.ID, ids[0])
	q1, _ := urlExp(t, h.retainedJob(ids[0]).URL)
	if err := h.eng.CheckDownload(ctx, a.ID, q1); err != nil {
		t.Fatalf("the sent job's URL: %v", err)
	}
	down, cancel := context.WithCancel(ctx)
	cancel()
	if err := h.eng.CheckDownload(down, a.ID, q1); err == nil || errors.Is(err, firmware.ErrJobWithdrawn) {
		t.Fatalf("without a database: %v, want its error", err)
	}

	// The download fails; the job is retried under a new id.
	if err := h.eng.JobStatus(ctx, ids[0], &protocol.FwStatus{Job: first, State: firmware.StateFailed, Error: firmware.KindDownload}, time.Now()); err != nil {
		t.Fatal(err)
	}
	second := h.sentJob(st.ID, ids[0]) // the running engine hands the retry out
	if second == first {
		t.Fatal("not retried")
	}
	q2, _ := urlExp(t, h.retainedJob(ids[0]).URL)
	for i, q := range []url.Values{q1, q2} {
		if err := h.eng.CheckDownload(ctx, a.ID, q); err != nil {
			t.Fatalf("attempt %d's URL: %v", i+1, err)
		}
	}

	if _, err := h.eng.Cancel(ctx, st.ID, "operator"); err != nil {
		t.Fatal(err)
	}
	for i, q := range []url.Values{q1, q2} {
		if err := h.eng.CheckDownload(ctx, a.ID, q); !errors.Is(err, firmware.ErrJobWithdrawn) {
			t.Fatalf("the cancelled job's attempt %d's URL: %v, want withdrawn", i+1, err)
		}
	}
	// One no job ever had (signed with the gateway's key all the same).
	q3, _ := urlExp(t, h.eng.DownloadURL(a.ID, "no-such-job", time.Now().Add(time.Hour)))
	if err := h.eng.CheckDownload(ctx, a.ID, q3); !errors.Is(err, firmware.ErrJobWithdrawn) {
		t.Fatalf("an unknown job's URL: %v, want withdrawn", err)
	}
}
