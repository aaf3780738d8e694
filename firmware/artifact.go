package firmware

import (
	"context"
	"crypto/ed25519"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
	"unicode"

	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/protocol"
)

// DefaultMaxImageSize bounds an uploaded image unless Options say otherwise.
const DefaultMaxImageSize = 4 << 30

// DefaultMaxUploads bounds the uploads in progress at once unless Options
// say otherwise: each holds a connection, disk bandwidth and up to
// MaxImageSize of disk until it ends.
const DefaultMaxUploads = 2

// ErrTooLarge is an upload over the size limit.
var ErrTooLarge = errors.New("image too large")

// ErrUploadsBusy is an upload refused because MaxUploads are in progress.
var ErrUploadsBusy = errors.New("too many firmware uploads in progress")

// uploadPrefix starts the names of images being uploaded.
const uploadPrefix = ".upload-"

// leftoverIdle is how long an upload's temporary file must have gone
// unwritten before it is taken for a leftover (of an upload a crash cut
// short) and removed; an upload in progress writes all the time. With
// several gateways sharing the firmware directory it keeps one from
// removing another's upload. It is also how often leftovers are looked for.
const leftoverIdle = 15 * time.Minute

// DeriveURLKey derives the key that signs download URLs from the gateway's
// master key, so no new secret has to be kept.
func DeriveURLKey(master []byte) []byte {
	m := hmac.New(sha256.New, master)
	m.Write([]byte("lockergate firmware download url v1"))
	return m.Sum(nil)
}

func validModel(s string) bool {
	if s == "" || len(s) > 64 {
		return false
	}
	for _, r := range s {
		if !unicode.IsPrint(r) || r == '/' {
			return false
		}
	}
	return true
}

// Upload streams an image to the firmware directory, hashing it on the
// way (it is never held in memory), signs sha256 || version with the
// firmware key and records it. The version is stored, signed and handed
// out in its canonical form ("v1.5" is 1.5.0). A model that has the version
// already (compared as semantic versions) is fleet.ErrConflict; an image
// over the limit is ErrTooLarge (wrapped in fleet.ErrInvalid); one upload
// more than MaxUploads at once is ErrUploadsBusy.
func (e *Engine) Upload(ctx context.Context, model, version string, body io.Reader, actor string) (*Artifact, error) {
	if !validModel(model) {
		return nil, fmt.Errorf("%w: model must be 1-64 printable bytes", fleet.ErrInvalid)
	}
	if len(version) > 64 {
		return nil, fmt.Errorf("%w: version longer than 64 bytes", fleet.ErrInvalid)
	}
	version, err := CanonicalVersion(version)
	if err != nil {
		return nil, fmt.Errorf("%w: %v (want a semantic version such as 1.5.0)", fleet.ErrInvalid, err)
	}
	// Refuse a duplicate before reading a large body; the unique index
	// settles a race between two uploads (both canonical).
	if _, err := e.store.FindArtifact(ctx, model, version); err == nil {
		return nil, fmt.Errorf("%w: model %s already has firmware %s", fleet.ErrConflict, model, version)
	} else if !errors.Is(err, fleet.ErrNotFound) {
		return nil, err
	}
	release, err := e.uploadSlot()
	if err != nil {
		return nil, err
	}
	defer release()
	if err := os.MkdirAll(e.opts.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("firmware directory: %w", err)
	}
	tmp, err := os.CreateTemp(e.opts.Dir, uploadPrefix+"*")
	if err != nil {
		return nil, fmt.Errorf("firmware directory: %w", err)
	}
	defer func() {
		tmp.Close()
		os.Remove(tmp.Name()) // no-op after the rename
	}()
	h := sha256.New()
	n, err := io.Copy(io.MultiWriter(tmp, h), io.LimitReader(body, e.opts.MaxImageSize+1))
	if err != nil {
		return nil, fmt.Errorf("%w: read image: %v", fleet.ErrInvalid, err)
	}
	if n > e.opts.MaxImageSize {
		return nil, fmt.Errorf("%w: %w: over %d bytes", fleet.ErrInvalid, ErrTooLarge, e.opts.MaxImageSize)
	}
	if n == 0 {
		return nil, fmt.Errorf("%w: empty image", fleet.ErrInvalid)
	}
	if err := tmp.Sync(); err != nil {
		return nil, fmt.Errorf("write image: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return nil, fmt.Errorf("write image: %w", err)
	}
	sum := h.Sum(nil)
	a := &Artifact{
		ID: fleet.NewID("fw"), Model: model, Version: version, Size: n,
		SHA256:    hex.EncodeToString(sum),
		Sig:       base64.StdEncoding.EncodeToString(ed25519.Sign(e.opts.Key, protocol.FwSigMessage(sum, version))),
		CreatedBy: actor, CreatedAt: e.now().UTC().Truncate(time.Microsecond),
	}
	a.File = a.ID + ".bin"
	path := filepath.Join(e.opts.Dir, a.File)
	if err := os.Rename(tmp.Name(), path); err != nil {
		return nil, fmt.Errorf("store image: %w", err)
	}
	if err := e.store.CreateArtifact(ctx, a); err != nil {
		os.Remove(path)
		return nil, err
	}
	if err := e.store.Audit(ctx, fleet.AuditEntry{Actor: actor, Action: "firmware.upload",
		Detail: map[string]any{"firmware": a.ID, "model": model, "version": version, "size": n, "sha256": a.SHA256}}); err != nil {
		return nil, err
	}
	e.log.Info("firmware uploaded", "firmware", a.ID, "model", model, "version", version, "size", n)
	return a, nil
}

// removeLeftovers removes the temporary files of uploads a crash cut short
// (unwritten for leftoverIdle), which nothing else would ever remove.
func (e *Engine) removeLeftovers() {
	entries, err := os.ReadDir(e.opts.Dir)
	if err != nil {
		if !errors.Is(err, fs.ErrNotExist) {
			e.fail("leftovers", err)
		}
		return
	}
	for _, de := range entries {
		if !strings.HasPrefix(de.Name(), uploadPrefix) || !de.Type().IsRegular() {
			continue
		}
		fi, err := de.Info()
		if err != nil || time.Since(fi.ModTime()) < leftoverIdle {
			continue // gone meanwhile, or an upload in progress
		}
		if err := os.Remove(filepath.Join(e.opts.Dir, de.Name())); err != nil && !errors.Is(err, fs.ErrNotExist) {
			e.fail("leftovers", err)
			continue
		}
		e.log.Info("removed the leftover of an interrupted firmware upload", "file", de.Name(), "size", fi.Size())
	}
}

// Artifact returns an artifact.
func (e *Engine) Artifact(ctx context.Context, id string) (*Artifact, error) {
	return e.store.GetArtifact(ctx, id)
}

// Artifacts lists artifacts.
func (e *Engine) Artifacts(ctx context.Context, after string, limit int) ([]Artifact, error) {
	return e.store.ListArtifacts(ctx, after, limit)
}

// OpenImage opens an artifact's image for reading.
func (e *Engine) OpenImage(ctx context.Context, id string) (*os.File, *Artifact, error) {
	a, err := e.store.GetArtifact(ctx, id)
	if err != nil {
		return nil, nil, err
	}
	f, err := os.Open(filepath.Join(e.opts.Dir, a.File))
	if err != nil {
		return nil, nil, fmt.Errorf("open image of %s: %w", id, err)
	}
	return f, a, nil
}

// ServedBytes counts image bytes sent to lockers and operators.
func (e *Engine) ServedBytes(n int64) { e.m.bytesServed.Add(float64(n)) }

// DownloadStalled counts and logs an image download cut for taking no
// progress (the client stopped reading: a link gone, or a stalled locker).
func (e *Engine) DownloadStalled(id, job string, sent int64) {
	e.m.stalled.Inc()
	e.log.Info("firmware download cut: the client took nothing for the stall timeout; a locker resumes with Range",
		"firmware", id, "job", job, "bytes_sent", sent)
}

// uploadSlot takes one of the MaxUploads slots that bound the images being
// read at once, or answers ErrUploadsBusy without waiting.
func (e *Engine) uploadSlot() (release func(), err error) {
	select {
	case e.uploads <- struct{}{}:
		return func() { <-e.uploads }, nil
	default:
		return nil, fmt.Errorf("%w (at most %d at once); retry when one has ended", ErrUploadsBusy, e.opts.MaxUploads)
	}
}

// SameImage reports whether body is the image whose SHA-256 is sha (hex),
// reading all of it (an upload repeated under its Idempotency-Key). It is
// read as an upload is: in one of the MaxUploads slots (ErrUploadsBusy
// before reading when none is free) and up to the size limit (ErrTooLarge,
// wrapped in fleet.ErrInvalid).
func (e *Engine) SameImage(sha string, body io.Reader) (bool, error) {
	release, err := e.uploadSlot()
	if err != nil {
		return false, err
	}
	defer release()
	h := sha256.New()
	n, err := io.Copy(h, io.LimitReader(body, e.opts.MaxImageSize+1))
	if err != nil {
		return false, fmt.Errorf("%w: read the image: %v", fleet.ErrInvalid, err)
	}
	if n > e.opts.MaxImageSize {
		return false, fmt.Errorf("%w: %w: over %d bytes", fleet.ErrInvalid, ErrTooLarge, e.opts.MaxImageSize)
	}
	return hex.EncodeToString(h.Sum(nil)) == sha, nil
}

// Errors of download URL checks.
var (
	ErrURLExpired = errors.New("download URL expired")
	ErrURLInvalid = errors.New("download URL signature invalid")
	// ErrJobWithdrawn: the URL's job was cancelled (or skipped), or is
	// not known.
	ErrJobWithdrawn = errors.New("download URL's job was withdrawn (its rollout cancelled)")
)

func (e *Engine) urlMAC(artifact, job string, exp int64) []byte {
	m := hmac.New(sha256.New, e.opts.URLKey)
	fmt.Fprintf(m, "fw-blob\n%s\n%s\n%d", artifact, job, exp)
	return m.Sum(nil)
}

// DownloadURL returns the URL a locker downloads artifact's image from for
// job: signed for that job, valid until exp.
func (e *Engine) DownloadURL(artifact, job string, exp time.Time) string {
	q := url.Values{}
	q.Set("job", job)
	q.Set("exp", strconv.FormatInt(exp.Unix(), 10))
	q.Set("sig", base64.RawURLEncoding.EncodeToString(e.urlMAC(artifact, job, exp.Unix())))
	return e.baseURL() + "/v1/firmware/" + url.PathEscape(artifact) + "/blob?" + q.Encode()
}

// CheckDownload verifies a signed download URL's query for artifact, and
// that its job still stands: a locker that missed the cancel (offline
// then, and told of it only by an empty retained fw/job that a locker
// subscribing after its birth never gets) cannot go on downloading, and
// so installing, a withdrawn job. A job that ended otherwise (succeeded,
// failed, timed out), and an attempt retried since (the same image: a
// slow locker's resumed download finishes, and its birth settles the
// retry), may still be downloaded. Other errors are the database's.
func (e *Engine) CheckDownload(ctx context.Context, artifact string, q url.Values) error {
	exp, err := strconv.ParseInt(q.Get("exp"), 10, 64)
	if err != nil {
		return ErrURLInvalid
	}
	sig, err := base64.RawURLEncoding.DecodeString(q.Get("sig"))
	if err != nil || !hmac.Equal(sig, e.urlMAC(artifact, q.Get("job"), exp)) {
		return ErrURLInvalid
	}
	if e.now().Unix() >= exp {
		return ErrURLExpired
	}
	state, err := e.store.JobState(ctx, q.Get("job"))
	if errors.Is(err, fleet.ErrNotFound) || state == StateCancelled || state == StateSkipped {
		return ErrJobWithdrawn
	}
	return err
}

func (e *Engine) baseURL() string {
	if e.opts.BaseURL == nil {
		return ""
	}
	return e.opts.BaseURL()
}
