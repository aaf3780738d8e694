package httpapi

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"

	"github.com/lockergate/lockergate/firmware"
	"github.com/lockergate/lockergate/fleet"
)

// firmwareTable lists the firmware and rollout endpoints (api-v1.md,
// "Firmware and rollouts"; docs/firmware.md). The image download is served
// outside the table: lockers fetch it with a signed URL instead of a token.
func (s *Server) firmwareTable() []route {
	return []route{
		// Not idempotent-wrapped: the image is streamed, never buffered;
		// a repeated upload of a version is a 409 anyway.
		{"POST", "/v1/firmware", fleetRoles, false, s.uploadFirmware},
		{"GET", "/v1/firmware", fleetRoles, false, s.listFirmware},
		{"GET", "/v1/firmware/{id}", fleetRoles, false, s.getFirmware},
		{"POST", "/v1/rollouts", fleetRoles, true, s.createRollout},
		{"GET", "/v1/rollouts", fleetRoles, false, s.listRollouts},
		{"GET", "/v1/rollouts/{id}", fleetRoles, false, s.getRollout},
		{"GET", "/v1/rollouts/{id}/jobs", fleetRoles, false, s.rolloutJobs},
		{"POST", "/v1/rollouts/{id}/pause", fleetRoles, false, s.rolloutAction((*firmware.Engine).Pause)},
		{"POST", "/v1/rollouts/{id}/resume", fleetRoles, false, s.rolloutAction((*firmware.Engine).Resume)},
		{"POST", "/v1/rollouts/{id}/cancel", fleetRoles, false, s.rolloutAction((*firmware.Engine).Cancel)},
		{"POST", "/v1/rollouts/{id}/retry-failed", fleetRoles, false, s.rolloutAction((*firmware.Engine).RetryFailed)},
	}
}

// firmwareRoutes registers the image download: with a signed URL (what a
// job carries) it needs no token; without one it needs an admin or
// operator token.
func (s *Server) firmwareRoutes(m *http.ServeMux) {
	m.HandleFunc("GET /v1/firmware/{id}/blob", func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Query().Get("sig") == "" {
			s.auth(fleetRoles, s.serveImage)(w, r)
			return
		}
		fw, err := s.firmware()
		if err != nil {
			s.writeError(w, r, err)
			return
		}
		if err := fw.CheckDownload(r.PathValue("id"), r.URL.Query()); err != nil {
			writeProblem(w, http.StatusForbidden, err.Error())
			return
		}
		if err := s.serveImage(w, r); err != nil {
			s.writeError(w, r, err)
		}
	})
}

var errNoFirmware = fmt.Errorf("%w: firmware is not enabled on this gateway", fleet.ErrNotFound)

func (s *Server) firmware() (*firmware.Engine, error) {
	if s.opts.Firmware == nil {
		return nil, errNoFirmware
	}
	return s.opts.Firmware, nil
}

func (s *Server) uploadFirmware(w http.ResponseWriter, r *http.Request) error {
	fw, err := s.firmware()
	if err != nil {
		return err
	}
	q := r.URL.Query()
	if q.Get("version") == "" || q.Get("model") == "" {
		return badRequest("query parameters version and model are required")
	}
	a, err := fw.Upload(r.Context(), q.Get("model"), q.Get("version"), r.Body, principal(r).Actor())
	if errors.Is(err, firmware.ErrTooLarge) {
		writeProblem(w, http.StatusRequestEntityTooLarge, err.Error())
		return nil
	}
	if err != nil {
		return err
	}
	w.Header().Set("Location", "/v1/firmware/"+a.ID)
	writeJSON(w, http.StatusCreated, a)
	return nil
}

func (s *Server) listFirmware(w http.ResponseWriter, r *http.Request) error {
	fw, err := s.firmware()
	if err != nil {
		return err
	}
	limit, after, err := pageParams(r)
	if err != nil {
		return err
	}
	as, err := fw.Artifacts(r.Context(), after, limit)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, listOf(as, limit, func(a firmware.Artifact) string { return a.ID }))
	return nil
}

func (s *Server) getFirmware(w http.ResponseWriter, r *http.Request) error {
	fw, err := s.firmware()
	if err != nil {
		return err
	}
	a, err := fw.Artifact(r.Context(), r.PathValue("id"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, a)
	return nil
}

// serveImage sends an image with HTTP Range support (resume), counting
// the bytes sent.
func (s *Server) serveImage(w http.ResponseWriter, r *http.Request) error {
	fw, err := s.firmware()
	if err != nil {
		return err
	}
	f, a, err := fw.OpenImage(r.Context(), r.PathValue("id"))
	if err != nil {
		return err
	}
	defer f.Close()
	w.Header().Set("Content-Type", "application/octet-stream")
	// A strong validator: If-Range resumes only the same image.
	w.Header().Set("ETag", `"`+a.SHA256+`"`)
	cw := &countingWriter{ResponseWriter: w}
	http.ServeContent(cw, r, a.ID+".bin", a.CreatedAt, f)
	fw.ServedBytes(cw.n)
	return nil
}

// countingWriter counts body bytes. It keeps the ResponseWriter's
// io.ReaderFrom path, so images still go out with sendfile.
type countingWriter struct {
	http.ResponseWriter
	n int64
}

func (c *countingWriter) Write(b []byte) (int, error) {
	n, err := c.ResponseWriter.Write(b)
	c.n += int64(n)
	return n, err
}

func (c *countingWriter) ReadFrom(src io.Reader) (int64, error) {
	n, err := io.Copy(c.ResponseWriter, src)
	c.n += n
	return n, err
}

func (s *Server) createRollout(w http.ResponseWriter, r *http.Request) error {
	fw, err := s.firmware()
	if err != nil {
		return err
	}
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

func (s *Server) listRollouts(w http.ResponseWriter, r *http.Request) error {
	fw, err := s.firmware()
	if err != nil {
		return err
	}
	limit, after, err := pageParams(r)
	if err != nil {
		return err
	}
	rs, err := fw.List(r.Context(), after, limit)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, listOf(rs, limit, func(st firmware.Status) string { return st.ID }))
	return nil
}

func (s *Server) getRollout(w http.ResponseWriter, r *http.Request) error {
	fw, err := s.firmware()
	if err != nil {
		return err
	}
	st, err := fw.Status(r.Context(), r.PathValue("id"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, st)
	return nil
}

func (s *Server) rolloutJobs(w http.ResponseWriter, r *http.Request) error {
	fw, err := s.firmware()
	if err != nil {
		return err
	}
	limit, after, err := pageParams(r)
	if err != nil {
		return err
	}
	f := firmware.JobFilter{State: r.URL.Query().Get("state"), After: after, Limit: limit}
	if v := r.URL.Query().Get("wave"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			return badRequest("wave must be a wave number, 1 or more")
		}
		n-- // 1-based in the API
		f.Wave = &n
	}
	js, err := fw.Jobs(r.Context(), r.PathValue("id"), f)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, listOf(js, limit, func(j firmware.Job) string { return j.DeviceID }))
	return nil
}

// rolloutAction serves pause, resume, cancel and retry-failed.
func (s *Server) rolloutAction(act func(e *firmware.Engine, ctx context.Context, id, actor string) (*firmware.Status, error)) handler {
	return func(w http.ResponseWriter, r *http.Request) error {
		fw, err := s.firmware()
		if err != nil {
			return err
		}
		st, err := act(fw, r.Context(), r.PathValue("id"), principal(r).Actor())
		if err != nil {
			return err
		}
		writeJSON(w, http.StatusOK, st)
		return nil
	}
}
