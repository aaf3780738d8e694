package main

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
)

func TestFirmwareUploadStreamsTheFile(t *testing.T) {
	img := bytes.Repeat([]byte("image"), 100000)
	path := filepath.Join(t.TempDir(), "fw.bin")
	if err := os.WriteFile(path, img, 0o600); err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost || r.URL.Path != "/v1/firmware" || r.URL.Query().Get("version") != "1.5.0" ||
			r.URL.Query().Get("model") != "LX-24" || r.Header.Get("Authorization") != "Bearer tok" || r.ContentLength != int64(len(img)) {
			http.Error(w, "bad request "+r.URL.String(), http.StatusBadRequest)
			return
		}
		h := sha256.New()
		n, _ := io.Copy(h, r.Body)
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusCreated)
		json.NewEncoder(w).Encode(map[string]any{"id": "fw-1", "size": n, "sha256": hex.EncodeToString(h.Sum(nil))})
	}))
	defer srv.Close()
	var out, errOut bytes.Buffer
	code := run([]string{"--url", srv.URL, "--token", "tok", "firmware", "upload", path, "--version", "1.5.0", "--model", "LX-24"}, &out, &errOut)
	sum := sha256.Sum256(img)
	if code != 0 || !strings.Contains(out.String(), hex.EncodeToString(sum[:])) {
		t.Fatalf("exit %d, out %q, err %q", code, out.String(), errOut.String())
	}
}

func TestRolloutWatchUntilTheEnd(t *testing.T) {
	for _, tc := range []struct {
		final string
		code  int
	}{{"completed", 0}, {"aborted", 1}} {
		t.Run(tc.final, func(t *testing.T) {
			var calls atomic.Int32
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				status, done := "running", 1
				if calls.Add(1) >= 3 {
					status, done = tc.final, 4
				}
				w.Header().Set("Content-Type", "application/json")
				json.NewEncoder(w).Encode(map[string]any{
					"id": "ro-1", "firmware": "fw-1", "model": "LX-24", "version": "1.5.0", "status": status,
					"current_wave": 2, "targets": 4, "counts": map[string]int{"succeeded": done, "queued": 4 - done},
					"wave_status": []map[string]any{
						{"wave": 1, "percent": 25, "size": 1, "state": "done", "counts": map[string]int{"succeeded": 1}},
						{"wave": 2, "percent": 100, "size": 3, "state": status, "counts": map[string]int{"succeeded": done - 1, "queued": 4 - done}},
					},
				})
			}))
			defer srv.Close()
			var out, errOut bytes.Buffer
			code := run([]string{"--url", srv.URL, "--token", "t", "rollout", "watch", "ro-1", "--interval", "1ms"}, &out, &errOut)
			if code != tc.code {
				t.Fatalf("exit %d, want %d; stderr %q", code, tc.code, errOut.String())
			}
			// Two distinct frames: running, then the final one.
			if n := strings.Count(out.String(), "rollout ro-1"); n != 2 {
				t.Fatalf("%d frames:\n%s", n, out.String())
			}
			if !strings.Contains(out.String(), strings.ToUpper(tc.final)) || !strings.Contains(out.String(), "SUCCEEDED") {
				t.Fatalf("output:\n%s", out.String())
			}
		})
	}
}

// Without a token, lockerctl reads the admin token from the gateway's data
// directory; a 401 says where it looked.
func TestTokenFromDataDir(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "admin.token"), []byte("from-file\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "Bearer from-file" {
			w.Header().Set("Content-Type", "application/problem+json")
			w.WriteHeader(http.StatusUnauthorized)
			w.Write([]byte(`{"title":"Unauthorized","status":401,"detail":"missing or bad bearer token"}`))
			return
		}
		w.Header().Set("Content-Type", "application/json")
		w.Write([]byte(`{"items":[]}`))
	}))
	defer srv.Close()
	t.Setenv("LOCKERGATE_TOKEN", "")
	var out, errOut bytes.Buffer
	if code := run([]string{"--url", srv.URL, "--data-dir", dir, "sites", "list"}, &out, &errOut); code != 0 {
		t.Fatalf("--data-dir: exit %d, err %q", code, errOut.String())
	}
	t.Setenv("LOCKERGATE_DATA_DIR", dir)
	if code := run([]string{"--url", srv.URL, "sites", "list"}, &out, &errOut); code != 0 {
		t.Fatalf("LOCKERGATE_DATA_DIR: exit %d, err %q", code, errOut.String())
	}
	errOut.Reset()
	missing := filepath.Join(t.TempDir(), "nowhere")
	if code := run([]string{"--url", srv.URL, "--data-dir", missing, "sites", "list"}, &out, &errOut); code != 1 ||
		!strings.Contains(errOut.String(), filepath.Join(missing, "admin.token")) {
		t.Fatalf("no token: exit %d, err %q; want 1 and the path it tried", code, errOut.String())
	}
}

// TestRolloutCreateLeavesDefaultsOut: flags not given are left out of the
// body (the gateway's defaults apply to a field left out; 0 is a 400), and
// those given are sent.
func TestRolloutCreateLeavesDefaultsOut(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want map[string]float64 // fields of the body; absent: left out
	}{
		{nil, map[string]float64{}},
		{[]string{"--rate", "120", "--step-timeout", "90s", "--min-per-wave", "3"},
			map[string]float64{"rate_per_min": 120, "step_timeout_s": 90, "min_per_wave": 3}},
	} {
		var body map[string]any
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if err := json.NewDecoder(r.Body).Decode(&body); err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusCreated)
			json.NewEncoder(w).Encode(map[string]any{"id": "ro-1", "status": "running", "targets": 1})
		}))
		var out, errOut bytes.Buffer
		code := run(append([]string{"--url", srv.URL, "--token", "t", "rollout", "create", "--firmware", "fw-1"}, tc.args...), &out, &errOut)
		srv.Close()
		if code != 0 {
			t.Fatalf("%v: exit %d, stderr %q", tc.args, code, errOut.String())
		}
		for _, name := range []string{"rate_per_min", "step_timeout_s", "min_per_wave"} {
			got, sent := body[name]
			want, ok := tc.want[name]
			if sent != ok || ok && got != want {
				t.Errorf("%v: %s sent %v as %v, want sent %v as %v", tc.args, name, sent, got, ok, want)
			}
		}
	}
	var out, errOut bytes.Buffer
	if code := run([]string{"--url", "http://127.0.0.1:1", "--token", "t", "rollout", "create", "--firmware", "fw-1", "--step-timeout", "500ms"}, &out, &errOut); code == 0 {
		t.Fatal("a step timeout under a second was taken")
	}
}

// TestRolloutViewSaysWhatWaits: the view lists skipped lockers and the
// jobs waiting for their lockers by reason, in the reasons' order.
func TestRolloutViewSaysWhatWaits(t *testing.T) {
	st := &rolloutStatus{ID: "ro-1", Status: "running", Targets: 9,
		Skipped: map[string]int{"up_to_date": 2, "disabled": 1},
		Waiting: map[string]int{"offline": 3, "door_open": 1}}
	out := renderRollout(st)
	for _, want := range []string{"not updated: disabled 1, up_to_date 2\n", "waiting for their lockers: door_open 1, offline 3\n"} {
		if !strings.Contains(out, want) {
			t.Fatalf("view without %q:\n%s", want, out)
		}
	}
	if out := renderRollout(&rolloutStatus{ID: "ro-1", Status: "running"}); strings.Contains(out, "waiting") {
		t.Fatalf("a rollout with nothing waiting:\n%s", out)
	}
}
