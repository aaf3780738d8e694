package httpapi

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/lockergate/lockergate/firmware"
	"github.com/lockergate/lockergate/fleet"
)

// firmwareTable lists the firmware and rollout endpoints (api-v1.md,
// "Firmware and rollouts"; docs/firmware.md). The image download is served
// outside the table: lockers fetch it with a signed URL instead of a token.
func (s *Server) firmwareTable() []route {
	fw := s.withFirmware
	return []route{
		// Idempotent without buffering the image (streamedBodies).
		{"POST", "/v1/firmware", fleetRoles, true, fw(uploadFirmware)},
		{"GET", "/v1/firmware", fleetRoles, false, fw(listFirmware)},
		{"GET", "/v1/firmware/{id}", fleetRoles, false, fw(getFirmware)},
		{"POST", "/v1/rollouts", fleetRoles, true, fw(createRollout)},
		{"GET", "/v1/rollouts", fleetRoles, false, fw(listRollouts)},
		{"GET", "/v1/rollouts/{id}", fleetRoles, false, fw(getRollout)},
		{"GET", "/v1/rollouts/{id}/jobs", fleetRoles, false, fw(rolloutJobs)},
		{"POST", "/v1/rollouts/{id}/pause", fleetRoles, false, fw(rolloutAction((*firmware.Engine).Pause))},
		{"POST", "/v1/rollouts/{id}/resume", fleetRoles, false, fw(rolloutAction((*firmware.Engine).Resume))},
		{"POST", "/v1/rollouts/{id}/cancel", fleetRoles, false, fw(rolloutAction((*firmware.Engine).Cancel))},
		{"POST", "/v1/rollouts/{id}/retry-failed", fleetRoles, false, fw(rolloutAction((*firmware.Engine).RetryFailed))},
	}
}

// firmwareRoutes registers the image download: with a signed URL (what a
// job carries) it needs no token; without one it needs an admin or
// operator token.
func (s *Server) firmwareRoutes(m *http.ServeMux) {
	m.HandleFunc("GET /v1/firmware/{id}/blob", func(w http.ResponseWriter, r *http.Request) {
		// An image of up to 4 GiB, to lockers on slow links (resumable):
		// no bound on the whole answer, one on each chunk's progress.
		liftResponseTime(w)
		w = &progressWriter{ResponseWriter: w, rc: http.NewResponseController(w), stall: s.opts.DownloadStallTimeout}
		if r.URL.Query().Get("sig") == "" {
			s.auth(fleetRoles, s.withFirmware(serveImage))(w, r)
			return
		}
		if err := s.withFirmware(serveSigned)(w, r); err != nil {
			s.writeError(w, r, err)
		}
	})
}

var errNoFirmware = fmt.Errorf("%w: firmware is not enabled on this gateway", fleet.ErrNotFound)

// firmwareHandler is an endpoint of the firmware engine.
type firmwareHandler func(fw *firmware.Engine, w http.ResponseWriter, r *http.Request) error

// withFirmware hands h the firmware engine; a gateway without one answers
// every firmware endpoint 404.
func (s *Server) withFirmware(h firmwareHandler) handler {
	return func(w http.ResponseWriter, r *http.Request) error {
		if s.opts.Firmware == nil {
			return errNoFirmware
		}
		return h(s.opts.Firmware, w, r)
	}
}

// idempotentUpload makes the firmware upload honour Idempotency-Key. The
// image is streamed to disk, never held, so the key is claimed for the route
// and its query (model and version), and a repeat's body is compared with
// the first by its SHA-256, against the first answer's sha256, as it is
// read: within the uploads' bounds, refused as an upload would be.
func (s *Server) idempotentUpload(h handler) handler {
	upload := s.idempotentBy(h, secretSpec{}, func(r *http.Request) (*request, error) {
		sum := sha256.Sum256([]byte(r.URL.Query().Encode())) // sorted: one query in any order
		return &request{route: r.Method + " " + r.URL.Path, hash: sum[:], sameBody: func(first []byte) (bool, error) {
			var a firmware.Artifact
			if err := json.Unmarshal(first, &a); err != nil || a.SHA256 == "" || s.opts.Firmware == nil {
				return false, nil
			}
			return s.opts.Firmware.SameImage(a.SHA256, r.Body)
		}}, nil
	})
	return func(w http.ResponseWriter, r *http.Request) error {
		liftBodyTime(w) // an image of up to 4 GiB, from an authenticated operator
		return uploadRefused(w, upload(w, r))
	}
}

// uploadRefused answers an upload's refusals that have statuses of their
// own: an image over the size limit (413) and all upload slots taken (429,
// refused before the body is read: the client sends it again later).
// Other errors are returned.
func uploadRefused(w http.ResponseWriter, err error) error {
	switch {
	case errors.Is(err, firmware.ErrTooLarge):
		writeProblem(w, http.StatusRequestEntityTooLarge, err.Error())
		return nil
	case errors.Is(err, firmware.ErrUploadsBusy):
		w.Header().Set("Retry-After", strconv.Itoa(uploadRetryAfter))
		writeProblem(w, http.StatusTooManyRequests, err.Error())
		return nil
	}
	return err
}

// uploadRetryAfter is the Retry-After (seconds) of an upload refused
// because others are in progress: an image takes seconds to minutes.
const uploadRetryAfter = 30

func uploadFirmware(fw *firmware.Engine, w http.ResponseWriter, r *http.Request) error {
	q := r.URL.Query()
	if q.Get("version") == "" || q.Get("model") == "" {
		return badRequest("query parameters version and model are required")
	}
	a, err := fw.Upload(r.Context(), q.Get("model"), q.Get("version"), r.Body, principal(r).Actor())
	if err != nil {
		return uploadRefused(w, err)
	}
	w.Header().Set("Location", "/v1/firmware/"+a.ID)
	writeJSON(w, http.StatusCreated, a)
	return nil
}

func listFirmware(fw *firmware.Engine, w http.ResponseWriter, r *http.Request) error {
	return listPage(w, r, fw.Artifacts, func(a firmware.Artifact) string { return a.ID })
}

func getFirmware(fw *firmware.Engine, w http.ResponseWriter, r *http.Request) error {
	a, err := fw.Artifact(r.Context(), r.PathValue("id"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, a)
	return nil
}

// serveSigned serves the image of a signed URL (what a job carries),
// without a token.
func serveSigned(fw *firmware.Engine, w http.ResponseWriter, r *http.Request) error {
	switch err := fw.CheckDownload(r.Context(), r.PathValue("id"), r.URL.Query()); {
	case errors.Is(err, firmware.ErrURLInvalid), errors.Is(err, firmware.ErrURLExpired):
		writeProblem(w, http.StatusForbidden, err.Error())
		return nil
	case errors.Is(err, firmware.ErrJobWithdrawn):
		writeProblem(w, http.StatusGone, err.Error()+": this locker's fw/job no longer holds it")
		return nil
	case err != nil:
		return err
	}
	return serveImage(fw, w, r)
}

// serveImage sends an image with HTTP Range support (resume), counting
// the bytes sent.
func serveImage(fw *firmware.Engine, w http.ResponseWriter, r *http.Request) error {
	f, a, err := fw.OpenImage(r.Context(), r.PathValue("id"))
	if err != nil {
		return err
	}
	defer f.Close()
	w.Header().Set("Content-Type", "application/octet-stream")
	// A strong validator: If-Range resumes only the same image.
	w.Header().Set("ETag", `"`+a.SHA256+`"`)
	cw := &countingWriter{ResponseWriter: w, r: r, size: a.Size}
	http.ServeContent(cw, r, a.ID+".bin", a.CreatedAt, f)
	fw.ServedBytes(cw.n)
	if cw.stalled {
		fw.DownloadStalled(a.ID, r.URL.Query().Get("job"), cw.n)
	}
	return nil
}

// countingWriter counts body bytes. It keeps the ResponseWriter's
// io.ReaderFrom path, so images still go out with sendfile. A Range that
// http.ServeContent cannot serve (its plain-text 416) is answered as a
// problem, like every other error of the API.
type countingWriter struct {
	http.ResponseWriter
	r       *http.Request
	size    int64 // the image's
	n       int64
	refused bool // the 416 is written; ServeContent's own text is dropped
	stalled bool // a write ran past progressWriter's stall timeout
}

func (c *countingWriter) WriteHeader(code int) {
	if code != http.StatusRequestedRangeNotSatisfiable {
		c.ResponseWriter.WriteHeader(code)
		return
	}
	c.refused = true
	h := c.ResponseWriter.Header()
	h.Del("X-Content-Type-Options")
	// ServeContent sets it for a range past the end, not for a malformed one.
	h.Set("Content-Range", fmt.Sprintf("bytes */%d", c.size))
	writeProblem(c.ResponseWriter, code, fmt.Sprintf("Range %q cannot be served from this image of %d bytes: ask for bytes within it, e.g. bytes=0-",
		c.r.Header.Get("Range"), c.size))
}

func (c *countingWriter) Write(b []byte) (int, error) {
	if c.refused {
		return len(b), nil
	}
	n, err := c.ResponseWriter.Write(b)
	c.n += int64(n)
	return n, err
}

func (c *countingWriter) ReadFrom(src io.Reader) (int64, error) {
	if c.refused {
		return io.Copy(io.Discard, src)
	}
	n, err := io.Copy(c.ResponseWriter, src)
	c.n += n
	c.stalled = c.stalled || errors.Is(err, os.ErrDeadlineExceeded)
	return n, err
}

// downloadChunk is how much of an image progressWriter gives one stall
// timeout to be written.
const downloadChunk = 64 << 10

// progressWriter writes a firmware image in chunks of downloadChunk, each
// with stall to be written: a client that stops reading (a link gone
// without a FIN, or one that asks and never reads) loses the connection
// then, instead of holding it, a goroutine and an open image for good; a
// locker resumes with Range. It keeps the ResponseWriter's io.ReaderFrom
// path (sendfile) for each chunk.
type progressWriter struct {
	http.ResponseWriter
	rc    *http.ResponseController
	stall time.Duration
}

func (p *progressWriter) Unwrap() http.ResponseWriter { return p.ResponseWriter }

func (p *progressWriter) Write(b []byte) (int, error) {
	var n int
	for len(b) > 0 {
		p.rc.SetWriteDeadline(time.Now().Add(p.stall))
		m, err := p.ResponseWriter.Write(b[:min(len(b), downloadChunk)])
		n, b = n+m, b[m:]
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

func (p *progressWriter) ReadFrom(src io.Reader) (int64, error) {
	// What http.ServeContent hands over is the image file under a limit
	// (io.CopyN): each chunk is a limit on the file itself, for sendfile.
	lr, ok := src.(*io.LimitedReader)
	if !ok {
		lr = &io.LimitedReader{R: src, N: math.MaxInt64}
	}
	var total int64
	for lr.N > 0 {
		p.rc.SetWriteDeadline(time.Now().Add(p.stall))
		want := min(lr.N, downloadChunk)
		n, err := io.Copy(p.ResponseWriter, &io.LimitedReader{R: lr.R, N: want})
		lr.N -= n
		total += n
		if err != nil || n < want { // an error, or the end of the image
			return total, err
		}
	}
	return total, nil
}

func createRollout(fw *firmware.Engine, w http.ResponseWriter, r *http.Request) error {
	var in firmware.Spec
	if err := decode(r, &in); err != nil {
		return err
	}
	st, err := fw.Create(r.Context(), in, principal(r).Actor())
	if err != nil {
		return err
	}
	w.Header().Set("Location", "/v1/rollouts/"+st.ID)
	writeJSON(w, http.StatusCreated, st)
	return nil
}

func listRollouts(fw *firmware.Engine, w http.ResponseWriter, r *http.Request) error {
	return listPage(w, r, fw.List, func(st firmware.Status) string { return st.ID })
}

func getRollout(fw *firmware.Engine, w http.ResponseWriter, r *http.Request) error {
	st, err := fw.Status(r.Context(), r.PathValue("id"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, st)
	return nil
}

func rolloutJobs(fw *firmware.Engine, w http.ResponseWriter, r *http.Request) error {
	return listPage(w, r, func(ctx context.Context, after string, limit int) ([]firmware.Job, error) {
		f := firmware.JobFilter{State: r.URL.Query().Get("state"), After: after, Limit: limit}
		if f.State != "" && !slices.Contains(firmware.States, f.State) {
			return nil, badRequest("state must be one of %s", strings.Join(firmware.States, ", "))
		}
		if v := r.URL.Query().Get("wave"); v != "" {
			n, err := strconv.Atoi(v)
			if err != nil || n < 1 {
				return nil, badRequest("wave must be a wave number, 1 or more")
			}
			n-- // 1-based in the API
			f.Wave = &n
		}
		jobs, err := fw.Jobs(ctx, r.PathValue("id"), f)
		for i := range jobs {
			// 1-based in the API, as ?wave= and wave_status (0: a skipped
			// locker, which is in no wave).
			jobs[i].Wave++
		}
		return jobs, err
	}, func(j firmware.Job) string { return j.DeviceID })
}

// rolloutAction serves pause, resume, cancel and retry-failed.
func rolloutAction(act func(e *firmware.Engine, ctx context.Context, id, actor string) (*firmware.Status, error)) firmwareHandler {
	return func(fw *firmware.Engine, w http.ResponseWriter, r *http.Request) error {
		st, err := act(fw, r.Context(), r.PathValue("id"), principal(r).Actor())
		if err != nil {
			return err
		}
		writeJSON(w, http.StatusOK, st)
		return nil
	}
}
