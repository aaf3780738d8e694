package gateway_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/lockergate/lockergate/client"
	"github.com/lockergate/lockergate/devicesim"
	"github.com/lockergate/lockergate/firmware"
	"github.com/lockergate/lockergate/gateway"
	"github.com/lockergate/lockergate/internal/pgtest"
	"github.com/lockergate/lockergate/protocol"
)

// Firmware rollouts end to end (issue 6): the real gateway and PostgreSQL,
// simulated lockers over MQTT downloading over HTTP.

// fwImage is a small image: the updater's logic, not its bandwidth, is
// under test.
func fwImage(version string) []byte {
	return bytes.Repeat([]byte("lockergate firmware "+version+"\n"), 2048) // ~50 KiB
}

func fwUpload(tb testing.TB, tg *TestGateway, model, version string, img []byte) firmware.Artifact {
	tb.Helper()
	var a firmware.Artifact
	_, err := tg.Admin.Do(context.Background(), client.Request{Method: http.MethodPost, Path: "/v1/firmware",
		Query: url.Values{"model": {model}, "version": {version}}, Body: img}, &a)
	if err != nil {
		tb.Fatalf("upload firmware: %v", err)
	}
	return a
}

func fwCreate(tb testing.TB, tg *TestGateway, spec map[string]any) firmware.Status {
	tb.Helper()
	var st firmware.Status
	if err := tg.Admin.Post(context.Background(), "/v1/rollouts", spec, &st); err != nil {
		tb.Fatalf("create rollout: %v", err)
	}
	return st
}

func fwStatus(tb testing.TB, tg *TestGateway, id string) firmware.Status {
	tb.Helper()
	var st firmware.Status
	if err := tg.Admin.Get(context.Background(), "/v1/rollouts/"+id, nil, &st); err != nil {
		tb.Fatalf("rollout status: %v", err)
	}
	return st
}

func fwWait(tb testing.TB, tg *TestGateway, id, status string, d time.Duration) firmware.Status {
	tb.Helper()
	var st firmware.Status
	Eventually(tb, d, "rollout "+status, func() error {
		if err := tg.Admin.Get(context.Background(), "/v1/rollouts/"+id, nil, &st); err != nil {
			return err
		}
		if st.Status != status {
			return fmt.Errorf("status %s, wave %d, counts %v, reason %q", st.Status, st.CurrentWave, st.Counts, st.Reason)
		}
		return nil
	})
	return st
}

func fwJobs(tb testing.TB, tg *TestGateway, id string) []firmware.Job {
	tb.Helper()
	var all []firmware.Job
	q := url.Values{"limit": {"1000"}}
	for {
		var page struct {
			Items []firmware.Job `json:"items"`
			Next  string         `json:"next"`
		}
		if err := tg.Admin.Get(context.Background(), "/v1/rollouts/"+id+"/jobs", q, &page); err != nil {
			tb.Fatalf("rollout jobs: %v", err)
		}
		all = append(all, page.Items...)
		if page.Next == "" {
			return all
		}
		q.Set("after", page.Next)
	}
}

// fwFleet starts n lockers of model on a new site; health is off to keep
// the gateway's attention on firmware.
func fwFleet(tb testing.TB, tg *TestGateway, site, model string, n int, mod ...func(*devicesim.Options)) *devicesim.Fleet {
	tb.Helper()
	claim := tg.MustSiteAndClaim(tb, site, n)
	return fwFleetClaim(tb, tg, claim, site, model, n, mod...)
}

func fwFleetClaim(tb testing.TB, tg *TestGateway, claim, prefix, model string, n int, mod ...func(*devicesim.Options)) *devicesim.Fleet {
	tb.Helper()
	o := devicesim.Options{
		Broker: "tcp://" + tg.MQTTAddr(), ClaimToken: claim, Lockers: n, Seed: 42, SerialPrefix: prefix,
		HealthInterval: -1, DoorCloseDelay: 20 * time.Millisecond, ConnectRate: 1000, RetryMax: time.Second,
		Logger: testLogger(tb),
	}
	for _, m := range devicesim.DefaultModels {
		if m.Name == model {
			o.Models = []devicesim.Model{m}
		}
	}
	for _, f := range mod {
		f(&o)
	}
	f, err := devicesim.NewFleet(o)
	if err != nil {
		tb.Fatalf("simulator: %v", err)
	}
	tb.Cleanup(f.Close)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	err = f.Start(ctx)
	// Provisioning hundreds of lockers at once can outlast the broker's
	// provisioning budget on a loaded host (the locker is answered
	// "invalid" and waits for Reconnect): those try once more.
	var se *devicesim.StartError
	if errors.As(err, &se) {
		tb.Logf("retrying %d lockers: %v", len(se.Failed), err)
		for _, l := range f.Lockers() {
			if _, failed := se.Failed[l.Serial()]; failed {
				if err := l.Reconnect(ctx); err != nil {
					tb.Fatalf("start simulated fleet: %s: %v", l.Serial(), err)
				}
			}
		}
		err = nil
	}
	if err != nil {
		tb.Fatalf("start simulated fleet: %v", err)
	}
	return f
}

// byWave maps device ids to their wave, 0-based (the API's is 1-based).
func byWave(jobs []firmware.Job) map[string]int {
	m := map[string]int{}
	for _, j := range jobs {
		m[j.DeviceID] = j.Wave - 1
	}
	return m
}

func TestFirmwareRolloutInWaves(t *testing.T) {
	tg := MustStart(t)
	claim := tg.MustSiteAndClaim(t, "fw-store", 310)
	sim := fwFleetClaim(t, tg, claim, "FWA", "LX-24", 300)
	other := fwFleetClaim(t, tg, claim, "FWB", "LX-8", 10) // same site, another model
	img := fwImage("1.5.0")
	a := fwUpload(t, tg, "LX-24", "1.5.0", img)
	sum := sha256.Sum256(img)
	if a.Size != int64(len(img)) || a.SHA256 != hex.EncodeToString(sum[:]) || a.Sig == "" {
		t.Fatalf("artifact %+v", a)
	}
	st := fwCreate(t, tg, map[string]any{"firmware": a.ID, "selector": map[string]any{"site": "fw-store"},
		"waves": []int{1, 10, 50, 100}, "min_per_wave": 3, "max_failure_pct": 5, "rate_per_min": 60000})
	if st.Targets != 300 || st.WrongModel != 10 || fmt.Sprint(st.WaveSizes) != "[3 27 120 150]" {
		t.Fatalf("created: targets %d, wrong model %d, waves %v", st.Targets, st.WrongModel, st.WaveSizes)
	}
	st = fwWait(t, tg, st.ID, firmware.Completed, 90*time.Second)
	if st.Counts[firmware.StateSucceeded] != 300 {
		t.Fatalf("completed with %v", st.Counts)
	}
	for _, l := range sim.Lockers() {
		if l.FW() != "1.5.0" || l.FwJobsRun() != 1 || l.FwInstalls() != 1 {
			t.Fatalf("%s: runs %s after %d jobs, %d installs", l.Serial(), l.FW(), l.FwJobsRun(), l.FwInstalls())
		}
	}
	for _, l := range other.Lockers() {
		if l.FwJob() != nil || l.FwJobsRun() != 0 || l.FW() != "1.4.2" {
			t.Fatalf("a locker of another model got a job: %s %+v", l.Serial(), l.FwJob())
		}
	}
	// Each wave was handed out only after the previous one had finished.
	jobs := fwJobs(t, tg, st.ID)
	lastDone, firstSent := map[int]time.Time{}, map[int]time.Time{}
	for _, j := range jobs {
		w := j.Wave - 1 // 1-based in the API
		if j.DoneAt.After(lastDone[w]) {
			lastDone[w] = *j.DoneAt
		}
		if f, ok := firstSent[w]; !ok || j.SentAt.Before(f) {
			firstSent[w] = *j.SentAt
		}
	}
	for w := 0; w < 4; w++ {
		t.Logf("wave %d: first sent %v, last done %v after the create", w+1, firstSent[w].Sub(st.CreatedAt).Round(time.Millisecond), lastDone[w].Sub(st.CreatedAt).Round(time.Millisecond))
	}
	for w := 1; w < 4; w++ {
		if firstSent[w].Before(lastDone[w-1]) {
			t.Fatalf("wave %d started %v before wave %d finished", w+1, lastDone[w-1].Sub(firstSent[w]), w)
		}
	}
	// The fleet shows the new version; bytes and jobs are counted.
	var ls lockerList
	if err := tg.Admin.Get(context.Background(), "/v1/lockers", url.Values{"fw": {"1.5.0"}, "limit": {"1000"}}, &ls); err != nil || len(ls.Items) != 300 {
		t.Fatalf("lockers on 1.5.0: %d, %v", len(ls.Items), err)
	}
	if v, err := tg.Metric("lockergate_firmware_bytes_served_total"); err != nil || v < float64(300*len(img)) {
		t.Fatalf("bytes served %v, %v", v, err)
	}
	// Counted after each success's commit: the last may still be on its way.
	tg.WaitMetric(t, 10*time.Second, `lockergate_firmware_jobs_finished_total{state="succeeded"}`, 300)
	// The list shows its targets, and its counts as empty, not null.
	var list struct {
		Items []json.RawMessage `json:"items"`
	}
	if err := tg.Admin.Get(context.Background(), "/v1/rollouts", nil, &list); err != nil || len(list.Items) != 1 {
		t.Fatalf("rollouts listed: %d, %v", len(list.Items), err)
	}
	for _, want := range []string{`"targets":300`, `"counts":{}`, `"skipped":{}`, `"wave_status":[]`} {
		if !strings.Contains(string(list.Items[0]), want) {
			t.Fatalf("listed rollout %s, want %s in it", list.Items[0], want)
		}
	}
	Eventually(t, 5*time.Second, "rollouts gauge", func() error {
		v, err := tg.Metric(`lockergate_firmware_rollouts{status="completed"}`)
		if err == nil && v != 1 {
			err = fmt.Errorf("completed rollouts %v", v)
		}
		return err
	})
}

func TestFirmwareBootFailuresPauseAtTheCrossingWave(t *testing.T) {
	tg := MustStart(t)
	sim := fwFleet(t, tg, "fw-boot", "LX-24", 100, func(o *devicesim.Options) {
		o.Faults.Firmware.BootFail = 0.2
	})
	a := fwUpload(t, tg, "LX-24", "1.5.0", fwImage("1.5.0"))
	st := fwCreate(t, tg, map[string]any{"firmware": a.ID, "waves": []int{5, 10, 100}, "min_per_wave": 5,
		"max_failure_pct": 10, "rate_per_min": 60000})
	st = fwWait(t, tg, st.ID, firmware.Paused, 60*time.Second)
	if !strings.Contains(st.Reason, "over max_failure_pct 10") {
		t.Fatalf("reason %q", st.Reason)
	}
	stopWave := st.CurrentWave - 1
	// The jobs already on lockers finish; nothing new goes out.
	Eventually(t, 30*time.Second, "in-flight jobs finished", func() error {
		s := fwStatus(t, tg, st.ID)
		n := 0
		for _, state := range firmware.ActiveStates {
			n += s.Counts[state]
		}
		if n > 0 {
			return fmt.Errorf("%d jobs in flight: %v", n, s.Counts)
		}
		st = s
		return nil
	})
	for i, w := range st.WaveStatus {
		switch {
		case i < stopWave && w.FailurePct > 10:
			t.Fatalf("wave %d passed its gate with %.0f%% failures", i+1, w.FailurePct)
		case i == stopWave && w.FailurePct <= 10:
			t.Fatalf("paused in wave %d at %.0f%% failures", i+1, w.FailurePct)
		}
	}
	wave := byWave(fwJobs(t, tg, st.ID))
	later := 0
	for _, l := range sim.Lockers() {
		if wave[l.DeviceID()] > stopWave {
			later++
			if l.FwJob() != nil || l.FwJobsRun() != 0 {
				t.Fatalf("%s of wave %d received the job; the rollout paused in wave %d", l.Serial(), wave[l.DeviceID()]+1, stopWave+1)
			}
		}
	}
	t.Logf("paused in wave %d of %d (%q); %d lockers in later waves never got the job", stopWave+1, len(st.WaveSizes), st.Reason, later)
	// Observed after the pause's commit.
	tg.WaitMetric(t, 10*time.Second, "lockergate_firmware_gate_stop_seconds_count", 1)
	if v, err := tg.Metric("lockergate_firmware_gate_stop_seconds_sum"); err == nil {
		t.Logf("threshold crossing to pause: %.1f ms", v*1000)
	}
}

func TestFirmwareTamperedImageRefused(t *testing.T) {
	dir := t.TempDir()
	tg := MustStart(t, func(o *gateway.Options) { o.DataDir = dir })
	sim := fwFleet(t, tg, "fw-tamper", "LX-24", 10)
	ctx := context.Background()
	tamper := func(a firmware.Artifact) []byte {
		path := filepath.Join(dir, "firmware", a.ID+".bin")
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		b[len(b)/2] ^= 0x55
		if err := os.WriteFile(path, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return b
	}
	for _, tc := range []struct {
		version, want string
		fixHash       bool // the attacker also rewrites the recorded sha256, but cannot sign
	}{
		{"1.5.0", firmware.KindSignature, true},
		{"1.5.1", firmware.KindChecksum, false},
	} {
		t.Run(tc.want, func(t *testing.T) {
			a := fwUpload(t, tg, "LX-24", tc.version, fwImage(tc.version))
			b := tamper(a)
			if tc.fixHash {
				sum := sha256.Sum256(b)
				if _, err := tg.DB().Pool().Exec(ctx, `UPDATE firmware SET sha256 = $2 WHERE id = $1`, a.ID, hex.EncodeToString(sum[:])); err != nil {
					t.Fatal(err)
				}
			}
			st := fwCreate(t, tg, map[string]any{"firmware": a.ID, "waves": []int{100}, "max_failure_pct": 100, "rate_per_min": 60000})
			st = fwWait(t, tg, st.ID, firmware.Completed, 30*time.Second)
			if st.Counts[firmware.StateFailed] != 10 {
				t.Fatalf("counts %v", st.Counts)
			}
			for _, j := range fwJobs(t, tg, st.ID) {
				if j.Error != tc.want {
					t.Fatalf("%s failed with %q, want %q", j.DeviceID, j.Error, tc.want)
				}
			}
			for _, l := range sim.Lockers() {
				if l.FW() != "1.4.2" || l.FwInstalls() != 0 {
					t.Fatalf("%s installed a tampered image: runs %s", l.Serial(), l.FW())
				}
			}
		})
	}
}

func TestFirmwareRestartMidRollout(t *testing.T) {
	o := gateway.Options{
		DataDir: t.TempDir(), DatabaseURL: pgtest.NewDB(t),
		MQTTAddr: "127.0.0.1:0", HTTPAddr: "127.0.0.1:0", Logger: testLogger(t),
		Config: protocol.Config{Version: 1, HealthIntervalS: 60, DoorAjarS: 120, Lockout: protocol.DefaultLockout},
	}
	tg := MustRun(t, o)
	sim := fwFleet(t, tg, "fw-restart", "LX-24", 40)
	a := fwUpload(t, tg, "LX-24", "1.5.0", fwImage("1.5.0"))
	// 10 jobs a second: the restart lands in the middle.
	st := fwCreate(t, tg, map[string]any{"firmware": a.ID, "waves": []int{25, 100}, "rate_per_min": 600, "max_failure_pct": 0})
	Eventually(t, 30*time.Second, "a third done", func() error {
		if s := fwStatus(t, tg, st.ID); s.Counts[firmware.StateSucceeded] < 13 {
			return fmt.Errorf("counts %v", s.Counts)
		}
		return nil
	})
	o.MQTTAddr, o.HTTPAddr = tg.MQTTAddr(), tg.HTTPAddr() // the lockers and the job URLs keep their addresses
	tg.Stop(t)
	tg = MustRun(t, o)
	st = fwWait(t, tg, st.ID, firmware.Completed, 60*time.Second)
	if st.Counts[firmware.StateSucceeded] != 40 {
		t.Fatalf("counts %v", st.Counts)
	}
	for _, l := range sim.Lockers() {
		if l.FW() != "1.5.0" || l.FwJobsRun() != 1 || l.FwInstalls() != 1 {
			t.Fatalf("%s: runs %s after %d jobs and %d installs", l.Serial(), l.FW(), l.FwJobsRun(), l.FwInstalls())
		}
	}
	for _, j := range fwJobs(t, tg, st.ID) {
		if j.Attempt != 1 {
			t.Fatalf("%s needed attempt %d", j.DeviceID, j.Attempt)
		}
	}
}

func TestFirmwareCancel(t *testing.T) {
	tg := MustStart(t)
	img := fwImage("1.5.0")
	sim := fwFleet(t, tg, "fw-cancel", "LX-24", 30, func(o *devicesim.Options) {
		o.Faults.Firmware.DownloadBytesPerSecond = float64(len(img)) // a download takes a second
	})
	a := fwUpload(t, tg, "LX-24", "1.5.0", img)
	st := fwCreate(t, tg, map[string]any{"firmware": a.ID, "waves": []int{100}, "rate_per_min": 300})
	Eventually(t, 30*time.Second, "some done, some downloading", func() error {
		s := fwStatus(t, tg, st.ID)
		if s.Counts[firmware.StateSucceeded] < 3 || s.Counts[firmware.StateDownloading] == 0 {
			return fmt.Errorf("counts %v", s.Counts)
		}
		return nil
	})
	var c firmware.Status
	if err := tg.Admin.Post(context.Background(), "/v1/rollouts/"+st.ID+"/cancel", nil, &c); err != nil {
		t.Fatal(err)
	}
	cancelledAt := time.Now()
	if c.Status != firmware.Cancelled || c.Counts[firmware.StateQueued] != 0 || c.Counts[firmware.StateDownloading] != 0 || c.Counts[firmware.StateCancelled] == 0 {
		t.Fatalf("after cancel: %s %v", c.Status, c.Counts)
	}
	// Jobs installing finish (a locker that was already installing when
	// the cancel crossed its report finishes too); withdrawn jobs leave the
	// lockers' fw/job and nothing installs them.
	state := map[string]firmware.Job{}
	Eventually(t, 20*time.Second, "cancelled jobs withdrawn, installs finished", func() error {
		for _, j := range fwJobs(t, tg, st.ID) {
			if firmware.IsActive(j.State) {
				return fmt.Errorf("%s still %s", j.DeviceID, j.State)
			}
			state[j.DeviceID] = j
		}
		for _, l := range sim.Lockers() {
			j := state[l.DeviceID()]
			if j.State == firmware.StateCancelled && l.FwJob() != nil {
				return fmt.Errorf("%s still holds %s", l.Serial(), l.FwJob().Job)
			}
			// A locker that started installing as the cancel crossed it
			// reads cancelled until its "installing" report is processed.
			if j.State == firmware.StateCancelled && l.FwInstalls() != 0 {
				return fmt.Errorf("%s installing, its job still cancelled", l.Serial())
			}
		}
		return nil
	})
	for _, l := range sim.Lockers() {
		j := state[l.DeviceID()]
		if j.SentAt != nil && j.SentAt.After(cancelledAt) {
			t.Fatalf("%s handed out after the cancel", j.DeviceID)
		}
		switch {
		case j.State == firmware.StateCancelled && (l.FW() != "1.4.2" || l.FwInstalls() != 0):
			t.Fatalf("%s installed a cancelled job", l.Serial())
		case j.State == firmware.StateSucceeded && l.FW() != "1.5.0":
			t.Fatalf("%s: job succeeded, but runs %s", l.Serial(), l.FW())
		}
	}
	if s := fwStatus(t, tg, st.ID); s.Status != firmware.Cancelled {
		t.Fatalf("status %s", s.Status)
	}
	// A cancelled job's signed URL is withdrawn with it: a locker that
	// missed the empty fw/job cannot download it.
	var payload []byte
	if err := tg.DB().Pool().QueryRow(context.Background(), `SELECT payload FROM fw_jobs WHERE rollout_id = $1
		AND state = 'cancelled' AND payload IS NOT NULL LIMIT 1`, st.ID).Scan(&payload); err != nil {
		t.Fatalf("a cancelled job that was handed out: %v", err)
	}
	job, err := protocol.DecodeFwJob(payload)
	if err != nil {
		t.Fatal(err)
	}
	// A rollout without a deadline hands out jobs with one 30 days on
	// (protocol-v1's job always has one).
	if left := time.Until(job.Deadline.Time); left <= firmware.DefaultJobDeadline-10*time.Minute || left > firmware.DefaultJobDeadline {
		t.Fatalf("job deadline %v, %v from now; want %v", job.Deadline, left, firmware.DefaultJobDeadline)
	}
	resp, err := http.Get(job.URL)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusGone || resp.Header.Get("Content-Type") != "application/problem+json" {
		t.Fatalf("cancelled job's URL: %s %s, want 410 problem", resp.Status, resp.Header.Get("Content-Type"))
	}
}

func TestFirmwareOfflineLockersGetTheJobOnReturn(t *testing.T) {
	tg := MustStart(t)
	sim := fwFleet(t, tg, "fw-offline", "LX-24", 20)
	away := sim.Lockers()[:5]
	for _, l := range away {
		l.Disconnect()
		id := l.DeviceID()
		Eventually(t, 10*time.Second, id+" offline", func() error {
			var lk struct {
				Online bool `json:"online"`
			}
			if err := tg.Admin.Get(context.Background(), "/v1/lockers/"+id, nil, &lk); err != nil || lk.Online {
				return fmt.Errorf("online %v, %v", lk.Online, err)
			}
			return nil
		})
	}
	a := fwUpload(t, tg, "LX-24", "1.5.0", fwImage("1.5.0"))
	st := fwCreate(t, tg, map[string]any{"firmware": a.ID, "waves": []int{100}, "rate_per_min": 60000})
	Eventually(t, 30*time.Second, "the online lockers updated", func() error {
		if s := fwStatus(t, tg, st.ID); s.Counts[firmware.StateSucceeded] != 15 {
			return fmt.Errorf("counts %v", s.Counts)
		}
		return nil
	})
	if s := fwStatus(t, tg, st.ID); s.Status != firmware.Running || s.Counts[firmware.StateQueued] != 5 || s.Waiting[firmware.WaitOffline] != 5 {
		t.Fatalf("with 5 lockers away: %s %v, waiting %v", s.Status, s.Counts, s.Waiting)
	}
	for _, l := range away {
		if err := l.Reconnect(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	fwWait(t, tg, st.ID, firmware.Completed, 30*time.Second)
	for _, l := range sim.Lockers() {
		if l.FW() != "1.5.0" || l.FwJobsRun() != 1 {
			t.Fatalf("%s runs %s after %d jobs", l.Serial(), l.FW(), l.FwJobsRun())
		}
	}
}

func TestFirmwareDownloadRangeAndSignedURL(t *testing.T) {
	tg := MustStart(t)
	sim := fwFleet(t, tg, "fw-range", "LX-24", 3, func(o *devicesim.Options) {
		o.Faults.Firmware.Interrupt = 1 // every download breaks once halfway
	})
	img := fwImage("1.5.0")
	a := fwUpload(t, tg, "LX-24", "1.5.0", img)
	st := fwCreate(t, tg, map[string]any{"firmware": a.ID, "waves": []int{100}, "rate_per_min": 60000})
	fwWait(t, tg, st.ID, firmware.Completed, 30*time.Second)
	for _, l := range sim.Lockers() {
		if l.FW() != "1.5.0" {
			t.Fatalf("%s runs %s", l.Serial(), l.FW())
		}
	}

	// The job's signed URL: Range works without a token.
	var payload []byte
	if err := tg.DB().Pool().QueryRow(context.Background(), `SELECT payload FROM fw_jobs WHERE rollout_id = $1 LIMIT 1`, st.ID).Scan(&payload); err != nil {
		t.Fatal(err)
	}
	job, err := protocol.DecodeFwJob(payload)
	if err != nil {
		t.Fatal(err)
	}
	get := func(u string, header ...string) (*http.Response, []byte) {
		req, _ := http.NewRequest(http.MethodGet, u, nil)
		for i := 0; i+1 < len(header); i += 2 {
			req.Header.Set(header[i], header[i+1])
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp, b
	}
	before, _ := tg.Metric("lockergate_firmware_bytes_served_total")
	resp, body := get(job.URL, "Range", "bytes=100-199")
	if resp.StatusCode != http.StatusPartialContent || !bytes.Equal(body, img[100:200]) ||
		resp.Header.Get("Content-Range") != fmt.Sprintf("bytes 100-199/%d", len(img)) {
		t.Fatalf("range: %s %q, %d bytes", resp.Status, resp.Header.Get("Content-Range"), len(body))
	}
	resp, body = get(job.URL, "Range", fmt.Sprintf("bytes=%d-", len(img)-10), "If-Range", `"`+a.SHA256+`"`)
	if resp.StatusCode != http.StatusPartialContent || !bytes.Equal(body, img[len(img)-10:]) {
		t.Fatalf("resume with If-Range: %s, %d bytes", resp.Status, len(body))
	}
	if after, _ := tg.Metric("lockergate_firmware_bytes_served_total"); after-before != 110 {
		t.Fatalf("bytes served grew by %v, want 110", after-before)
	}
	// A tampered or expired URL, or none at all, is refused.
	u, _ := url.Parse(job.URL)
	q := u.Query()
	q.Set("job", "another-job")
	u.RawQuery = q.Encode()
	if resp, _ := get(u.String()); resp.StatusCode != http.StatusForbidden {
		t.Fatalf("URL signed for another job: %s", resp.Status)
	}
	q = u.Query()
	q.Set("job", job.Job)
	q.Set("exp", "1000")
	u.RawQuery = q.Encode()
	if resp, _ := get(u.String()); resp.StatusCode != http.StatusForbidden {
		t.Fatalf("expired URL: %s", resp.Status)
	}
	if resp, _ := get("http://" + tg.HTTPAddr() + "/v1/firmware/" + a.ID + "/blob"); resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("no signature, no token: %s", resp.Status)
	}
	// Operators download with their token.
	resp, body = get("http://"+tg.HTTPAddr()+"/v1/firmware/"+a.ID+"/blob", "Authorization", "Bearer "+tg.Admin.Token)
	if resp.StatusCode != http.StatusOK || !bytes.Equal(body, img) {
		t.Fatalf("download with a token: %s, %d bytes", resp.Status, len(body))
	}
	// A duplicate version of the model is refused.
	_, err = tg.Admin.Do(context.Background(), client.Request{Method: http.MethodPost, Path: "/v1/firmware",
		Query: url.Values{"model": {"LX-24"}, "version": {"1.5.0"}}, Body: img}, nil)
	if ce, ok := err.(*client.Error); !ok || ce.Status != http.StatusConflict {
		t.Fatalf("duplicate upload: %v", err)
	}
}

func TestFirmwareInstallWindow(t *testing.T) {
	tg := MustStart(t)
	sim := fwFleet(t, tg, "fw-window", "LX-24", 5)
	a := fwUpload(t, tg, "LX-24", "1.5.0", fwImage("1.5.0"))
	// A window two hours from now, in the site's time zone (America/Chicago).
	loc, _ := time.LoadLocation("America/Chicago")
	now := time.Now().In(loc)
	window := fmt.Sprintf("%02d:00-%02d:00", (now.Hour()+2)%24, (now.Hour()+3)%24)
	st := fwCreate(t, tg, map[string]any{"firmware": a.ID, "waves": []int{100}, "rate_per_min": 60000, "window": window})
	Eventually(t, 30*time.Second, "all downloaded and waiting", func() error {
		if s := fwStatus(t, tg, st.ID); s.Counts[firmware.StateVerifying] != 5 {
			return fmt.Errorf("counts %v", s.Counts)
		}
		return nil
	})
	for _, l := range sim.Lockers() {
		j := l.FwJob()
		if j == nil || !j.InstallAfter.After(time.Now()) || j.InstallBefore.Sub(j.InstallAfter.Time) != time.Hour {
			t.Fatalf("%s: job %+v", l.Serial(), j)
		}
		if l.FwInstalls() != 0 {
			t.Fatalf("%s installed outside its window", l.Serial())
		}
	}
	// Waiting jobs are pending: a cancel withdraws them.
	if err := tg.Admin.Post(context.Background(), "/v1/rollouts/"+st.ID+"/cancel", nil, nil); err != nil {
		t.Fatal(err)
	}
	Eventually(t, 10*time.Second, "jobs withdrawn", func() error {
		for _, l := range sim.Lockers() {
			if l.FwJob() != nil {
				return fmt.Errorf("%s holds its job", l.Serial())
			}
		}
		return nil
	})
}

// TestFirmwareUploadsBounded: two uploads stream at once; a third is
// answered 429 with Retry-After before its body is read, and goes through
// once one has ended.
func TestFirmwareUploadsBounded(t *testing.T) {
	dataDir := t.TempDir()
	tg := MustStart(t, func(o *gateway.Options) { o.DataDir = dataDir })
	// upload answers nil when the request failed (not a test error: the
	// streaming ones run on their own goroutines).
	upload := func(version string, body io.Reader) *http.Response {
		req, err := http.NewRequest(http.MethodPost, "http://"+tg.HTTPAddr()+"/v1/firmware?model=LX-24&version="+version, body)
		if err != nil {
			return nil
		}
		req.Header.Set("Authorization", "Bearer "+tg.Admin.Token)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return nil
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp
	}
	var writers []*io.PipeWriter
	answers := make(chan *http.Response, 2)
	for i := range 2 {
		pr, pw := io.Pipe()
		writers = append(writers, pw)
		t.Cleanup(func() { pw.CloseWithError(errors.New("test over")) })
		go func() { answers <- upload(fmt.Sprintf("2.0.%d", i), pr) }()
	}
	Eventually(t, 10*time.Second, "two uploads streaming", func() error {
		if es, _ := filepath.Glob(filepath.Join(dataDir, "firmware", ".upload-*")); len(es) != 2 {
			return fmt.Errorf("%d streaming", len(es))
		}
		return nil
	})
	resp := upload("2.0.9", bytes.NewReader(fwImage("2.0.9")))
	if resp == nil || resp.StatusCode != http.StatusTooManyRequests || resp.Header.Get("Retry-After") == "" ||
		resp.Header.Get("Content-Type") != "application/problem+json" {
		t.Fatalf("a third upload at once: %+v", resp)
	}
	finish := func(pw *io.PipeWriter, version string) {
		if _, err := pw.Write(fwImage(version)); err != nil {
			t.Fatal(err)
		}
		pw.Close()
	}
	finish(writers[0], "2.0.0")
	if resp := <-answers; resp == nil || resp.StatusCode != http.StatusCreated {
		t.Fatalf("first upload: %+v", resp)
	}
	if resp := upload("2.0.9", bytes.NewReader(fwImage("2.0.9"))); resp == nil || resp.StatusCode != http.StatusCreated {
		t.Fatalf("the third, after one ended: %+v", resp)
	}
	finish(writers[1], "2.0.1")
	if resp := <-answers; resp == nil || resp.StatusCode != http.StatusCreated {
		t.Fatalf("second upload: %+v", resp)
	}
	if es, _ := filepath.Glob(filepath.Join(dataDir, "firmware", ".upload-*")); len(es) != 0 {
		t.Fatalf("temporary files left: %v", es)
	}
}

// TestFirmwareUploadIdempotent: POST /v1/firmware honours Idempotency-Key
// (the contract's "POST that creates") without holding the image: a repeat
// with the same key, query and image answers the first artifact and stores
// nothing; the same key with another image or another version is a 409.
func TestFirmwareUploadIdempotent(t *testing.T) {
	tg := MustStart(t)
	upload := func(key, version string, image []byte) (int, map[string]any, http.Header) {
		t.Helper()
		req, err := http.NewRequest(http.MethodPost, "http://"+tg.HTTPAddr()+"/v1/firmware?version="+version+"&model=LX-24", bytes.NewReader(image))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Authorization", "Bearer "+tg.Admin.Token)
		req.Header.Set("Idempotency-Key", key)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var out map[string]any
		json.NewDecoder(resp.Body).Decode(&out)
		return resp.StatusCode, out, resp.Header
	}
	image := fwImage("3.0.0")
	status, first, _ := upload("fw-300", "3.0.0", image)
	if status != http.StatusCreated || first["id"] == nil {
		t.Fatalf("first upload: %d %v", status, first)
	}
	// The answer says what a read says (times as stored: microseconds).
	var stored map[string]any
	if err := tg.Admin.Get(context.Background(), "/v1/firmware/"+first["id"].(string), nil, &stored); err != nil {
		t.Fatal(err)
	}
	if stored["created_at"] != first["created_at"] {
		t.Fatalf("created_at %v in the answer, %v when read", first["created_at"], stored["created_at"])
	}
	status, again, h := upload("fw-300", "3.0.0", image)
	if status != http.StatusCreated || again["id"] != first["id"] || again["sha256"] != first["sha256"] || h.Get("Idempotent-Replayed") != "true" {
		t.Fatalf("repeat: %d %v (%s), want the first answer %v", status, again, h.Get("Idempotent-Replayed"), first)
	}
	if status, body, _ := upload("fw-300", "3.0.0", fwImage("3.0.1")); status != http.StatusConflict {
		t.Fatalf("the key with another image: %d %v, want 409", status, body)
	}
	if status, body, _ := upload("fw-300", "3.0.1", image); status != http.StatusConflict {
		t.Fatalf("the key with another version: %d %v, want 409", status, body)
	}
	if n := tg.Count(t, `SELECT count(*) FROM firmware`); n != 1 {
		t.Fatalf("%d artifacts stored, want 1", n)
	}
	// Without a key a repeat is what it always was: the version exists.
	if status, body, _ := upload("", "3.0.0", image); status != http.StatusConflict {
		t.Fatalf("a repeat without a key: %d %v, want 409", status, body)
	}
}

// TestFirmwareJobClearedForAReplacedBoard: a locker whose board is
// replaced (re-provisioned) while a firmware job is out for the old board
// has no fw/job on the broker by the time the new board, which connects
// with the provisioning answer, subscribes: the job ended in the
// replacement and its retained copy is cleared before the answer. Before,
// the new board could run the old board's job (a model's image) until its
// first connect made the gateway republish.
func TestFirmwareJobClearedForAReplacedBoard(t *testing.T) {
	tg := MustStart(t)
	claim := tg.MustSiteAndClaim(t, "fw-swap", 2)
	r, _, st := rawLockerWithAFwJob(t, tg, claim, "SWAP-1")
	patchLocker(t, tg, r.DeviceID, map[string]bool{"replaceable": true})
	nr := MustProvision(t, tg, claim, "SWAP-1")
	board := MustConnect(t, tg.MQTTAddr(), nr.DeviceID, nr.DeviceID, nr.Password)
	if job := firstRetainedFwJob(t, board, nr.DeviceID); len(job) != 0 {
		t.Fatalf("the new board's first subscription got the old board's job: %s", job)
	}
	if js := fwJobs(t, tg, st.ID); len(js) != 1 || js[0].State != firmware.StateSkipped {
		t.Fatalf("jobs after the replacement %+v, want the old board's skipped", js)
	}
}

// TestFirmwareJobClearedForADisabledLocker: disabling a locker ends its
// job (skipped, disabled) and clears its retained fw/job, so that when it
// is enabled again its first subscription finds no job the rollout no
// longer follows (it would install it, and its birth would not count).
func TestFirmwareJobClearedForADisabledLocker(t *testing.T) {
	tg := MustStart(t)
	claim := tg.MustSiteAndClaim(t, "fw-off", 1)
	r, _, st := rawLockerWithAFwJob(t, tg, claim, "OFF-1")
	patchLocker(t, tg, r.DeviceID, map[string]bool{"disabled": true})
	if js := fwJobs(t, tg, st.ID); len(js) != 1 || js[0].State != firmware.StateSkipped || js[0].Error != firmware.SkipDisabled {
		t.Fatalf("jobs after the disable %+v, want skipped disabled", js)
	}
	patchLocker(t, tg, r.DeviceID, map[string]bool{"disabled": false})
	back := MustConnect(t, tg.MQTTAddr(), r.DeviceID, r.DeviceID, r.Password)
	if job := firstRetainedFwJob(t, back, r.DeviceID); len(job) != 0 {
		t.Fatalf("the re-enabled locker's first subscription got its ended job: %s", job)
	}
}

// rawLockerWithAFwJob provisions serial with claim, connects it as a plain
// client born on 1.0.0 (model LX-4), and starts a rollout of 1.5.0 whose
// job it is sent (retained on its fw/job, never answered).
func rawLockerWithAFwJob(t *testing.T, tg *TestGateway, claim, serial string) (protocol.ProvisionResponse, paho.Client, firmware.Status) {
	t.Helper()
	r := MustProvision(t, tg, claim, serial)
	fwJob := protocol.Topic(r.DeviceID, protocol.ChanFwJob)
	old := MustConnect(t, tg.MQTTAddr(), r.DeviceID, r.DeviceID, r.Password)
	publishBirth(t, tg, old, r.DeviceID) // on 1.0.0, model LX-4
	sent := make(chan []byte, 4)
	if tok := old.Subscribe(fwJob, 1, func(_ paho.Client, m paho.Message) { sent <- m.Payload() }); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("subscribe: %v", tok.Error())
	}
	a := fwUpload(t, tg, "LX-4", "1.5.0", fwImage("1.5.0"))
	st := fwCreate(t, tg, map[string]any{"firmware": a.ID, "waves": []int{100}, "rate_per_min": 60000})
	// The job is recorded sent, then published (retained): wait for the
	// publish, so that the broker holds it before the checks below.
	for job := []byte(nil); len(job) == 0; {
		select {
		case job = <-sent:
		case <-time.After(20 * time.Second):
			t.Fatal("no fw/job published to the locker within 20 s")
		}
	}
	Eventually(t, 20*time.Second, "the job sent to the locker (which never answers it)", func() error {
		if js := fwJobs(t, tg, st.ID); len(js) != 1 || js[0].State != firmware.StateSent {
			return fmt.Errorf("jobs %+v", js)
		}
		return nil
	})
	if job := firstRetainedFwJob(t, old, r.DeviceID); len(job) == 0 {
		t.Fatal("no retained fw/job for the locker: the test proves nothing")
	}
	return r, old, st
}

// firstRetainedFwJob subscribes c to locker id's fw/job, then to its creds,
// and reports the fw/job payload that came before the creds (the broker
// handles a client's packets in order and sends a filter's retained
// message with its subscription; the creds are always there); nil when
// none did.
func firstRetainedFwJob(t *testing.T, c paho.Client, id string) []byte {
	t.Helper()
	fwJob, creds := protocol.Topic(id, protocol.ChanFwJob), protocol.Topic(id, protocol.ChanCreds)
	got := make(chan paho.Message, 4)
	tok := c.Subscribe(fwJob, 1, func(_ paho.Client, m paho.Message) { got <- m })
	if !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("subscribe: %v", tok.Error())
	}
	tok = c.Subscribe(creds, 1, func(_ paho.Client, m paho.Message) { got <- m })
	if !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("subscribe: %v", tok.Error())
	}
	var job []byte
	for {
		select {
		case m := <-got:
			if m.Topic() == creds {
				return job
			}
			job = m.Payload()
		case <-time.After(10 * time.Second):
			t.Fatal("no retained creds within 10 s")
		}
	}
}
