package devicesim

import (
	"context"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/lockergate/lockergate/protocol"
)

// The firmware updater: a locker runs the job on its retained fw/job the way
// docs/protocol.md describes. It downloads the image over HTTP for real
// (resuming with Range after a broken connection), checks size, SHA-256 and
// the Ed25519 signature against fw_pubkey from provisioning, waits for the
// install window, installs, reboots (a new session with a new birth) and
// reports each step on fw/status. Faults.Firmware makes shares of jobs fail,
// drawn per job from the locker's firmware stream, so a seed replays them.

// streamFirmware is the random stream of firmware-job decisions (ids 4..15
// are kept for device features, see fault.go).
const streamFirmware uint64 = 4

// Firmware decision kinds, with their stream name.
const (
	DecideFirmware     = "firmware_job" // Value: the job's fate (ok, silent, download_fail, corrupt, bad_signature, install_fail, boot_fail, rejected)
	streamNameFirmware = "firmware"
)

// fwRebootTopic is an internal inbox message: the updater asks the locker's
// goroutine to reboot (it is never a wire topic).
const fwRebootTopic = "\x00sim/fw-reboot"

// Timings of the updater.
const (
	fwChunk        = 32 << 10
	fwHTTPTimeout  = 30 * time.Second
	fwRetryFor     = 60 * time.Second // a download keeps resuming this long before failed/download
	fwRetryBase    = 100 * time.Millisecond
	fwRetryMax     = 2 * time.Second
	fwRebootWait   = 2 * time.Minute
	fwMaxRemembers = 256
)

// fwState is a locker's firmware: the running version and the job in hand.
// Guarded by Locker.mu.
type fwState struct {
	version   string // the running version; "" is Options.FW
	r         *rand.Rand
	n         int // decisions made
	cur       *fwRun
	done      map[string]bool // jobs finished (or refused), by id
	doneOrder []string
	jobs      int // jobs started
	installs  int // installs started
}

// fwRun is a job being run.
type fwRun struct {
	job        protocol.FwJob
	cancel     context.CancelFunc
	committed  bool // installing or later: a cancel no longer stops it
	downloaded int64
	resumes    int
}

// fwFate is what a job will do, drawn when it starts.
type fwFate struct {
	silent, downloadFail, corrupt, badSig, installFail, bootFail, interrupt bool
}

func (f fwFate) String() string {
	switch {
	case f.silent:
		return "silent"
	case f.downloadFail:
		return "download_fail"
	case f.corrupt:
		return "corrupt"
	case f.badSig:
		return "bad_signature"
	case f.installFail:
		return "install_fail"
	case f.bootFail:
		return "boot_fail"
	}
	return "ok"
}

// fwVersionLocked is the version the locker runs (birth and health).
func (l *Locker) fwVersionLocked() string {
	if l.fw.version != "" {
		return l.fw.version
	}
	return l.f.opts.FW
}

// FW returns the firmware version the locker runs.
func (l *Locker) FW() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.fwVersionLocked()
}

// FwJobsRun returns how many firmware jobs the locker started (a repeated
// delivery of a job it has is not a new one).
func (l *Locker) FwJobsRun() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.fw.jobs
}

// FwInstalls returns how many images the locker started installing.
func (l *Locker) FwInstalls() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.fw.installs
}

// FwResumes returns how many times the running or last job's download was
// resumed with a Range request.
func (l *Locker) FwResumes() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.fw.cur == nil {
		return 0
	}
	return l.fw.cur.resumes
}

// fwJobArrived reacts to the fw/job in hand (nil: none): it starts a new
// job, and withdraws the running one when it is replaced or cleared before
// it started installing. A job seen before is not started again.
func (l *Locker) fwJobArrived(job *protocol.FwJob) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.stopped {
		return
	}
	cur := l.fw.cur
	if job != nil && (l.fw.done[job.Job] || (cur != nil && cur.job.Job == job.Job)) {
		return
	}
	if cur != nil && !cur.committed && cur.cancel != nil {
		cur.cancel() // withdrawn or replaced: the download stops
		l.fw.cur = nil
	}
	if job == nil || (cur != nil && cur.committed) {
		return // nothing to run, or an install under way finishes first
	}
	if l.fw.r == nil {
		l.fw.r = newRand(l.f.opts.Seed, l.index, streamFirmware)
		l.fw.done = map[string]bool{}
	}
	ff := &l.f.opts.Faults.Firmware
	r := l.fw.r
	// Draw every share each time, in a fixed order, so one kind does not
	// shift another between runs.
	fate := fwFate{
		silent:       r.Float64() < ff.Silent,
		downloadFail: r.Float64() < ff.DownloadFail,
		corrupt:      r.Float64() < ff.Corrupt,
		badSig:       r.Float64() < ff.BadSignature,
		installFail:  r.Float64() < ff.InstallFail,
		bootFail:     r.Float64() < ff.BootFail,
		interrupt:    r.Float64() < ff.Interrupt,
	}
	run := &fwRun{job: *job}
	ctx, cancel := context.WithCancel(context.Background())
	run.cancel = cancel
	l.fw.cur = run
	l.fw.jobs++
	l.f.wg.Add(1) // the locker's goroutine holds the group open: Add is safe
	go func() {
		defer l.f.wg.Done()
		defer cancel()
		l.f.wg.Add(1) // this goroutine holds the group open
		go func() {
			defer l.f.wg.Done()
			l.fwCancelOnStop(ctx, cancel)
		}()
		l.runFwJob(ctx, run, fate)
	}()
}

// fwCancelOnStop cancels a job when the locker stops (the fleet closes).
func (l *Locker) fwCancelOnStop(ctx context.Context, cancel context.CancelFunc) {
	for {
		l.mu.Lock()
		stopped, ch := l.stopped, l.changed
		l.mu.Unlock()
		if stopped {
			cancel()
			return
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return
		}
	}
}

// fwReport publishes a fw/status report (kept while offline, like events).
func (l *Locker) fwReport(job, state, errKind string, progress *float64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.fwReportLocked(job, state, errKind, progress)
}

func (l *Locker) fwReportLocked(job, state, errKind string, progress *float64) {
	st := protocol.FwStatus{Job: job, State: state, Error: errKind, Progress: progress, TS: wireTime(l.now())}
	l.sendLocked(outMsg{topic: l.topic(protocol.ChanFwStatus), payload: protocol.Encode(st), qos: 1, queue: true})
}

// finishFw ends the job: remembered as done, so a repeat is ignored.
func (l *Locker) finishFw(run *fwRun, state, errKind string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.fw.cur == run {
		l.fw.cur = nil
	}
	l.rememberFwLocked(run.job.Job)
	if state != "" {
		l.fwReportLocked(run.job.Job, state, errKind, nil)
	}
}

func (l *Locker) rememberFwLocked(id string) {
	if l.fw.done[id] {
		return
	}
	if len(l.fw.doneOrder) >= fwMaxRemembers {
		delete(l.fw.done, l.fw.doneOrder[0])
		l.fw.doneOrder = l.fw.doneOrder[1:]
	}
	l.fw.done[id] = true
	l.fw.doneOrder = append(l.fw.doneOrder, id)
}

func (l *Locker) runFwJob(ctx context.Context, run *fwRun, fate fwFate) {
	job := &run.job
	l.mu.Lock()
	current := l.fwVersionLocked()
	pub := ed25519.PublicKey(l.ident.FwPubkey)
	l.mu.Unlock()
	deadline := job.Deadline.Time

	// Refuse a downgrade the operator did not force, and a version that
	// does not parse. The version it already runs needs no install.
	c, err := compareFw(job.Version, current)
	if err != nil || (c < 0 && !job.Downgrade) {
		l.fwDecide(job.Job, "rejected")
		l.finishFw(run, protocol.FwRejected, "")
		return
	}
	if c == 0 {
		l.fwDecide(job.Job, "current")
		l.finishFw(run, protocol.FwSucceeded, "")
		return
	}
	l.fwDecide(job.Job, fate.String())
	if fate.silent {
		<-ctx.Done() // says nothing; a new job or a cancel ends it
		l.finishFw(run, "", "")
		return
	}
	if pastFw(deadline, l.now()) {
		l.finishFw(run, protocol.FwFailed, "deadline")
		return
	}

	l.fwReport(job.Job, protocol.FwDownloading, "", ptrFloat(0))
	sum, err := l.download(ctx, run, fate)
	if ctx.Err() != nil {
		l.finishFw(run, "", "") // withdrawn or closing: no report
		return
	}
	if err != nil {
		l.f.log.Debug("firmware download failed", "serial", l.serial, "job", job.Job, "err", err)
		l.finishFw(run, protocol.FwFailed, "download")
		return
	}
	l.fwReport(job.Job, protocol.FwVerifying, "", nil)
	if fate.corrupt {
		sum[0] ^= 0xff
	}
	sig := job.Sig
	if fate.badSig {
		sig = flipSig(sig)
	}
	switch {
	case run.downloaded != job.Size || !strings.EqualFold(hex.EncodeToString(sum), job.SHA256):
		l.finishFw(run, protocol.FwFailed, "checksum")
		return
	case len(pub) != ed25519.PublicKeySize || !protocol.VerifyFwSig(pub, &protocol.FwJob{SHA256: hex.EncodeToString(sum), Version: job.Version, Sig: sig}):
		l.finishFw(run, protocol.FwFailed, "signature")
		return
	}

	if !l.waitWindow(ctx, job) {
		l.finishFw(run, "", "")
		return
	}
	if pastFw(deadline, l.now()) {
		l.finishFw(run, protocol.FwFailed, "deadline")
		return
	}
	l.mu.Lock()
	if l.fw.cur != run || ctx.Err() != nil {
		l.mu.Unlock()
		l.finishFw(run, "", "")
		return
	}
	run.committed = true
	l.fw.installs++
	l.fwReportLocked(job.Job, protocol.FwInstalling, "", nil)
	l.mu.Unlock()
	if fate.installFail {
		l.finishFw(run, protocol.FwFailed, "install")
		return
	}

	// Reboot into the new version (or, failing to boot, back into the old).
	l.mu.Lock()
	oldBoot := l.bootID
	if !fate.bootFail {
		l.fw.version = job.Version
	}
	l.fwReportLocked(job.Job, protocol.FwRebooting, "", nil)
	l.mu.Unlock()
	l.in.push(fwRebootTopic, nil)
	if !l.waitRebooted(ctx, oldBoot) {
		l.finishFw(run, "", "") // closing
		return
	}
	if fate.bootFail {
		l.finishFw(run, protocol.FwFailed, "boot")
		return
	}
	l.finishFw(run, protocol.FwSucceeded, "")
}

func (l *Locker) fwDecide(job, fate string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.decideLocked(streamNameFirmware, l.fw.n, 0, DecideFirmware, Decision{Value: fate})
	l.fw.n++
}

// waitRebooted waits until the locker is connected again on a new boot.
func (l *Locker) waitRebooted(ctx context.Context, oldBoot string) bool {
	t := time.NewTimer(fwRebootWait)
	defer t.Stop()
	for {
		l.mu.Lock()
		up := l.connected.Load() && l.bootID != oldBoot
		stopped, ch := l.stopped, l.changed
		l.mu.Unlock()
		switch {
		case up:
			return true
		case stopped:
			return false
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return false
		case <-t.C:
			return false
		}
	}
}

// waitWindow waits for the job's install window (a Lockergate extension:
// [install_after, install_before), repeating every 24 h); false if ctx ended.
func (l *Locker) waitWindow(ctx context.Context, job *protocol.FwJob) bool {
	if job.InstallAfter.IsZero() {
		return true
	}
	open, close := job.InstallAfter.Time, job.InstallBefore.Time
	now := l.now()
	for !now.Before(close) {
		open, close = open.Add(24*time.Hour), close.Add(24*time.Hour)
	}
	if !now.Before(open) {
		return true
	}
	t := time.NewTimer(open.Sub(now))
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// download fetches the image, resuming with Range after a broken
// connection, and returns its SHA-256 (the bytes are hashed, not kept).
func (l *Locker) download(ctx context.Context, run *fwRun, fate fwFate) ([]byte, error) {
	job := &run.job
	client := &http.Client{Timeout: fwHTTPTimeout, Transport: &http.Transport{DisableKeepAlives: true}}
	h := sha256.New()
	var etag string
	interrupted := false
	nextReport := 0.25
	var lastErr error
	begin := time.Now()
	for attempt := 0; attempt == 0 || time.Since(begin) < fwRetryFor; attempt++ {
		if pastFw(job.Deadline.Time, l.now()) {
			break
		}
		if attempt > 0 {
			t := time.NewTimer(min(fwRetryBase<<min(attempt-1, 16), fwRetryMax))
			select {
			case <-t.C:
			case <-ctx.Done():
				t.Stop()
				return nil, ctx.Err()
			}
		}
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, job.URL, nil)
		if err != nil {
			return nil, err
		}
		l.mu.Lock()
		have := run.downloaded
		if have > 0 {
			run.resumes++
		}
		l.mu.Unlock()
		if have > 0 {
			req.Header.Set("Range", "bytes="+strconv.FormatInt(have, 10)+"-")
			if etag != "" {
				req.Header.Set("If-Range", etag)
			}
		}
		resp, err := client.Do(req)
		if err != nil {
			lastErr = err
			continue
		}
		switch {
		case resp.StatusCode == http.StatusOK && have > 0:
			// The server sent the whole image (it changed, or ignored
			// Range): start over.
			h.Reset()
			l.setDownloaded(run, 0)
		case resp.StatusCode == http.StatusOK, resp.StatusCode == http.StatusPartialContent && have > 0:
		default:
			resp.Body.Close()
			lastErr = fmt.Errorf("GET image: %s", resp.Status)
			if resp.StatusCode >= 400 && resp.StatusCode < 500 {
				return nil, lastErr // refused (expired or bad URL): resuming will not help
			}
			continue
		}
		etag = resp.Header.Get("ETag")
		err = l.readBody(ctx, run, resp.Body, h, fate, &interrupted, &nextReport)
		resp.Body.Close()
		if err == nil {
			return h.Sum(nil), nil
		}
		lastErr = err
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		if fate.downloadFail {
			break // the link is gone for good
		}
	}
	return nil, fmt.Errorf("download gave up after %v: %w", time.Since(begin).Round(time.Millisecond), lastErr)
}

var errLinkDropped = errors.New("link dropped (simulated)")

func (l *Locker) setDownloaded(run *fwRun, n int64) {
	l.mu.Lock()
	run.downloaded = n
	l.mu.Unlock()
}

// readBody hashes the body into h, reports progress at each quarter, and
// acts out the job's faults: a broken link halfway (resumed), or a
// download that breaks off for good.
func (l *Locker) readBody(ctx context.Context, run *fwRun, body io.Reader, h io.Writer, fate fwFate, interrupted *bool, nextReport *float64) error {
	job := &run.job
	buf := make([]byte, fwChunk)
	rate := l.f.opts.Faults.Firmware.DownloadBytesPerSecond
	start := time.Now()
	var got int64
	for {
		n, err := body.Read(buf)
		if n > 0 {
			h.Write(buf[:n])
			got += int64(n)
			l.mu.Lock()
			run.downloaded += int64(n)
			total := run.downloaded
			l.mu.Unlock()
			frac := float64(total) / float64(max(job.Size, 1))
			if frac >= *nextReport && frac < 1 {
				l.fwReport(job.Job, protocol.FwDownloading, "", ptrFloat(float64(int(frac*100))/100))
				for *nextReport <= frac {
					*nextReport += 0.25
				}
			}
			if (fate.interrupt && !*interrupted || fate.downloadFail) && total >= job.Size/2 && total < job.Size {
				*interrupted = true
				return errLinkDropped
			}
			if rate > 0 {
				if ahead := time.Duration(float64(got)/rate*float64(time.Second)) - time.Since(start); ahead > 0 {
					t := time.NewTimer(ahead) // the throttle: simulated bandwidth
					select {
					case <-t.C:
					case <-ctx.Done():
						t.Stop()
						return ctx.Err()
					}
				}
			}
		}
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// compareFw compares versions as the gateway does (semantic versioning,
// "v" prefix and missing minor/patch allowed): -1, 0 or +1.
func compareFw(a, b string) (int, error) {
	pa, err := parseFw(a)
	if err != nil {
		return 0, err
	}
	pb, err := parseFw(b)
	if err != nil {
		return 0, err
	}
	for i := range pa.nums {
		if pa.nums[i] != pb.nums[i] {
			if pa.nums[i] < pb.nums[i] {
				return -1, nil
			}
			return 1, nil
		}
	}
	switch {
	case pa.pre == pb.pre:
		return 0, nil
	case pa.pre == "":
		return 1, nil
	case pb.pre == "":
		return -1, nil
	}
	// Pre-releases: identifiers compared numerically when both are numbers.
	as, bs := strings.Split(pa.pre, "."), strings.Split(pb.pre, ".")
	for i := 0; i < len(as) && i < len(bs); i++ {
		if as[i] == bs[i] {
			continue
		}
		an, aerr := strconv.ParseUint(as[i], 10, 64)
		bn, berr := strconv.ParseUint(bs[i], 10, 64)
		switch {
		case aerr == nil && berr == nil:
			if an < bn {
				return -1, nil
			}
			return 1, nil
		case aerr == nil:
			return -1, nil
		case berr == nil:
			return 1, nil
		case as[i] < bs[i]:
			return -1, nil
		default:
			return 1, nil
		}
	}
	switch {
	case len(as) < len(bs):
		return -1, nil
	case len(as) > len(bs):
		return 1, nil
	}
	return 0, nil
}

type fwVersion struct {
	nums [3]uint64
	pre  string
}

func parseFw(s string) (fwVersion, error) {
	var v fwVersion
	core := strings.TrimPrefix(s, "v")
	core, _, _ = strings.Cut(core, "+")
	core, v.pre, _ = strings.Cut(core, "-")
	parts := strings.Split(core, ".")
	if len(parts) > 3 {
		return v, fmt.Errorf("version %q", s)
	}
	for i, p := range parts {
		n, err := strconv.ParseUint(p, 10, 64)
		if err != nil {
			return v, fmt.Errorf("version %q", s)
		}
		v.nums[i] = n
	}
	return v, nil
}

// flipSig returns another signature of the same shape (a flipped bit), as
// a corrupted signature block would read.
func flipSig(sig string) string {
	b, err := base64.StdEncoding.DecodeString(sig)
	if err != nil || len(b) == 0 {
		return sig + "x"
	}
	b[0] ^= 1
	return base64.StdEncoding.EncodeToString(b)
}

func pastFw(deadline, now time.Time) bool { return !deadline.IsZero() && !now.Before(deadline) }

func ptrFloat(v float64) *float64 { return &v }
