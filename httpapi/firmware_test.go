package httpapi

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"testing/iotest"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/lockergate/lockergate/firmware"
	"github.com/lockergate/lockergate/fleet"
)

// TestFirmwareDisabled: without a firmware engine every firmware and
// rollout endpoint answers 404, after authentication and before reading
// the request.
func TestFirmwareDisabled(t *testing.T) {
	s := New(Options{Store: &fakeStore{}})
	const notEnabled = "not found: firmware is not enabled on this gateway"
	rt := s.firmwareTable()
	if len(rt) == 0 {
		t.Fatal("no firmware routes")
	}
	for _, r := range rt {
		target := strings.ReplaceAll(r.pattern, "{id}", "x")
		call(t, s, r.method, target, "admin").wantProblem(t, http.StatusNotFound, notEnabled)
		call(t, s, r.method, target, "").wantProblem(t, http.StatusUnauthorized, "missing bearer token: send Authorization: Bearer <token>")
	}
	call(t, s, "GET", "/v1/firmware/x/blob", "admin").wantProblem(t, http.StatusNotFound, notEnabled)
	call(t, s, "GET", "/v1/firmware/x/blob?sig=abc&exp=1", "").wantProblem(t, http.StatusNotFound, notEnabled)
	call(t, s, "GET", "/v1/firmware/x/blob", "").wantProblem(t, http.StatusUnauthorized, "missing bearer token: send Authorization: Bearer <token>")
}

// fakeFirmwareStore is the part of firmware.Store the firmware list and
// get endpoints reach; any other method panics.
type fakeFirmwareStore struct {
	firmware.Store
	artifacts []firmware.Artifact
	rollouts  []firmware.Rollout
	jobs      []firmware.Job

	gotJobs firmware.JobFilter
}

func artifactID(a firmware.Artifact) string { return a.ID }
func rolloutID(r firmware.Rollout) string   { return r.ID }

func (f *fakeFirmwareStore) GetArtifact(_ context.Context, id string) (*firmware.Artifact, error) {
	return find(f.artifacts, artifactID, id)
}

func (f *fakeFirmwareStore) ListArtifacts(_ context.Context, after string, limit int) ([]firmware.Artifact, error) {
	return page(f.artifacts, artifactID, after, limit), nil
}

func (f *fakeFirmwareStore) GetRollout(_ context.Context, id string) (*firmware.Rollout, error) {
	return find(f.rollouts, rolloutID, id)
}

func (f *fakeFirmwareStore) ListRollouts(_ context.Context, after string, limit int) ([]firmware.Rollout, error) {
	return page(f.rollouts, rolloutID, after, limit), nil
}

func (f *fakeFirmwareStore) ListJobs(_ context.Context, id string, jf firmware.JobFilter) ([]firmware.Job, error) {
	f.gotJobs = jf
	var of []firmware.Job
	for _, j := range f.jobs {
		if j.RolloutID == id {
			of = append(of, j)
		}
	}
	return page(of, func(j firmware.Job) string { return j.DeviceID }, jf.After, jf.Limit), nil
}

func newFirmwareServer(t *testing.T, st *fakeFirmwareStore) *Server {
	t.Helper()
	_, key, err := ed25519.GenerateKey(nil)
	if err != nil {
		t.Fatal(err)
	}
	fw, err := firmware.New(firmware.Options{Store: st, Fleet: firmware.FleetFunc(func(context.Context, string) error { return nil }),
		Key: key, URLKey: []byte("0123456789abcdef"), Dir: t.TempDir(), Registerer: prometheus.NewRegistry()})
	if err != nil {
		t.Fatal(err)
	}
	return New(Options{Store: &fakeStore{}, Firmware: fw})
}

func TestFirmwareLists(t *testing.T) {
	st := &fakeFirmwareStore{
		artifacts: []firmware.Artifact{{ID: "fw-1"}, {ID: "fw-2"}},
		rollouts:  []firmware.Rollout{{ID: "ro-1"}, {ID: "ro-2"}},
		jobs:      []firmware.Job{{RolloutID: "ro-1", DeviceID: "lk-1", Wave: 1}, {RolloutID: "ro-1", DeviceID: "lk-2", Wave: -1}},
	}
	s := newFirmwareServer(t, st)

	call(t, s, "GET", "/v1/firmware?limit=1", "admin").wantPage(t, []string{"fw-1"}, "fw-1")
	call(t, s, "GET", "/v1/firmware?after=fw-1", "admin").wantPage(t, []string{"fw-2"}, "")
	call(t, s, "GET", "/v1/rollouts?limit=1", "admin").wantPage(t, []string{"ro-1"}, "ro-1")
	call(t, s, "GET", "/v1/rollouts?limit=1&after=ro-1", "admin").wantPage(t, []string{"ro-2"}, "ro-2")
	for _, path := range []string{"/v1/firmware", "/v1/rollouts", "/v1/rollouts/ro-1/jobs"} {
		call(t, s, "GET", path+"?limit=1001", "admin").wantProblem(t, http.StatusBadRequest, "bad request: limit must be 1..1000")
	}

	// Jobs: the cursor is the locker id; waves are 1-based in the API.
	a := call(t, s, "GET", "/v1/rollouts/ro-1/jobs?limit=1&state=failed&wave=2", "admin")
	if a.status != http.StatusOK || len(a.items) != 1 || a.next != "lk-1" || !strings.Contains(a.raw, `"wave":2`) {
		t.Errorf("jobs: %d %s, want one job, of wave 2, and next lk-1", a.status, a.raw)
	}
	if jf := st.gotJobs; jf.Wave == nil || *jf.Wave != 1 || jf.State != "failed" || jf.Limit != 1 || jf.After != "" {
		t.Errorf("store asked for jobs %+v, want wave 1 (0-based), state failed, limit 1", jf)
	}
	if a := call(t, s, "GET", "/v1/rollouts/ro-1/jobs?after=lk-1", "admin"); !strings.Contains(a.raw, `"wave":0`) {
		t.Errorf("a skipped locker's job: %s, want wave 0", a.raw)
	}
	for _, wave := range []string{"0", "-1", "one"} {
		call(t, s, "GET", "/v1/rollouts/ro-1/jobs?wave="+wave, "admin").wantProblem(t, http.StatusBadRequest, "bad request: wave must be a wave number, 1 or more")
	}
	for _, state := range []string{"bogus", "FAILED", "done"} {
		call(t, s, "GET", "/v1/rollouts/ro-1/jobs?state="+state, "admin").wantProblem(t, http.StatusBadRequest,
			"bad request: state must be one of "+strings.Join(firmware.States, ", "))
	}
	call(t, s, "GET", "/v1/rollouts/ro-9/jobs", "admin").wantProblem(t, http.StatusNotFound, "not found")

	// One of each by id.
	if a := call(t, s, "GET", "/v1/firmware/fw-2", "admin"); a.status != http.StatusOK || !strings.Contains(a.raw, `"id":"fw-2"`) {
		t.Errorf("GET /v1/firmware/fw-2: %d %s", a.status, a.raw)
	}
	call(t, s, "GET", "/v1/firmware/fw-9", "admin").wantProblem(t, http.StatusNotFound, "not found")
	call(t, s, "GET", "/v1/rollouts/ro-9", "admin").wantProblem(t, http.StatusNotFound, "not found")

	// A signed download checks the signature before anything else.
	call(t, s, "GET", "/v1/firmware/fw-1/blob?sig=AAAA&exp=99999999999", "").wantProblem(t, http.StatusForbidden, "download URL signature invalid")
	call(t, s, "GET", "/v1/firmware/fw-9/blob", "admin").wantProblem(t, http.StatusNotFound, "not found")
}

// FindArtifact: no model has the version yet (an upload may go on).
func (f *fakeFirmwareStore) FindArtifact(context.Context, string, string) (*firmware.Artifact, error) {
	return nil, fleet.ErrNotFound
}

// TestFirmwareUploadRefusals: an image over the size limit is a 413, and
// all upload slots taken a 429 with Retry-After before the body is read;
// the same for a repeat under its Idempotency-Key, whose image is read to
// be compared with the first (before: outside the slots, and a 409 when
// too large).
func TestFirmwareUploadRefusals(t *testing.T) {
	_, key, err := ed25519.GenerateKey(nil)
	if err != nil {
		t.Fatal(err)
	}
	fw, err := firmware.New(firmware.Options{Store: &fakeFirmwareStore{}, Fleet: firmware.FleetFunc(func(context.Context, string) error { return nil }),
		Key: key, URLKey: []byte("0123456789abcdef"), Dir: t.TempDir(), Registerer: prometheus.NewRegistry(), MaxImageSize: 16, MaxUploads: 1})
	if err != nil {
		t.Fatal(err)
	}
	image := []byte("image 1.0.0")
	sum := sha256.Sum256(image)
	const query = "model=LX-24&version=1.0.0"
	qsum := sha256.Sum256([]byte(query))
	first, err := json.Marshal(firmware.Artifact{ID: "fw-1", SHA256: hex.EncodeToString(sum[:])})
	if err != nil {
		t.Fatal(err)
	}
	st := &idemStore{prev: &fleet.Idempotent{Route: "POST /v1/firmware", BodyHash: qsum[:], Status: http.StatusCreated, Response: first}}
	s := New(Options{Store: st, Firmware: fw})
	post := func(key string, body io.Reader) *httptest.ResponseRecorder {
		t.Helper()
		req := httptest.NewRequest("POST", "/v1/firmware?"+query, body)
		req.Header.Set("Authorization", "Bearer admin")
		if key != "" {
			req.Header.Set("Idempotency-Key", key)
		}
		w := httptest.NewRecorder()
		s.ServeHTTP(w, req)
		return w
	}
	big := bytes.Repeat([]byte("x"), 17)
	for _, key := range []string{"", "fw-key"} {
		if w := post(key, bytes.NewReader(big)); w.Code != http.StatusRequestEntityTooLarge || !strings.Contains(w.Body.String(), "over 16 bytes") {
			t.Errorf("key %q, an image over the limit: %d %s, want 413", key, w.Code, w.Body)
		}
	}
	if w := post("fw-key", bytes.NewReader(image)); w.Code != http.StatusCreated || w.Header().Get("Idempotent-Replayed") != "true" {
		t.Fatalf("the repeat with the first image: %d %s, want the first answer", w.Code, w.Body)
	}
	// A repeat whose body breaks off is a bad request, not the first answer.
	cut := io.MultiReader(bytes.NewReader(image[:4]), iotest.ErrReader(errors.New("connection reset")))
	if w := post("fw-key", cut); w.Code != http.StatusBadRequest || !strings.Contains(w.Body.String(), "read the image: connection reset") {
		t.Errorf("a repeat cut short: %d %s, want 400", w.Code, w.Body)
	}

	// The one slot taken by an upload streaming.
	pr, pw := io.Pipe()
	done := make(chan error, 1)
	go func() {
		_, err := fw.Upload(context.Background(), "LX-24", "2.0.0", pr, "test")
		pr.CloseWithError(err)
		done <- err
	}()
	t.Cleanup(func() {
		pw.CloseWithError(errors.New("test over"))
		<-done
	})
	if _, err := pw.Write([]byte("2.0")); err != nil { // read: the upload holds its slot
		t.Fatal(err)
	}
	for _, key := range []string{"", "fw-key"} {
		body := &countingReader{r: bytes.NewReader(image)}
		w := post(key, body)
		if w.Code != http.StatusTooManyRequests || w.Header().Get("Retry-After") == "" || body.n != 0 {
			t.Errorf("key %q, with the slot taken: %d %s (Retry-After %q, %d bytes read), want 429 before reading",
				key, w.Code, w.Body, w.Header().Get("Retry-After"), body.n)
		}
	}
	// A first upload under its key, refused: the key is given up, so the
	// retry that Retry-After invites runs instead of being told "in
	// progress" or given the refusal again.
	st.claimed = true
	if w := post("fw-first", bytes.NewReader(image)); w.Code != http.StatusTooManyRequests || st.released != 1 || len(st.finished) != 0 {
		t.Errorf("a first upload refused: %d, %d keys released, answers kept %v; want 429, the key released, nothing kept",
			w.Code, st.released, st.finished)
	}
}

type countingReader struct {
	r io.Reader
	n int
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += n
	return n, err
}
