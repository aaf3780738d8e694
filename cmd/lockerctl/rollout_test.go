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
