package httpapi

import (
	"context"
	"crypto/ed25519"
	"net/http"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/lockergate/lockergate/firmware"
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
		jobs:      []firmware.Job{{RolloutID: "ro-1", DeviceID: "lk-1"}, {RolloutID: "ro-1", DeviceID: "lk-2"}},
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
	if a.status != http.StatusOK || len(a.items) != 1 || a.next != "lk-1" {
		t.Errorf("jobs: %d %s, want one job and next lk-1", a.status, a.raw)
	}
	if jf := st.gotJobs; jf.Wave == nil || *jf.Wave != 1 || jf.State != "failed" || jf.Limit != 1 || jf.After != "" {
		t.Errorf("store asked for jobs %+v, want wave 1 (0-based), state failed, limit 1", jf)
	}
	for _, wave := range []string{"0", "-1", "one"} {
		call(t, s, "GET", "/v1/rollouts/ro-1/jobs?wave="+wave, "admin").wantProblem(t, http.StatusBadRequest, "bad request: wave must be a wave number, 1 or more")
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
