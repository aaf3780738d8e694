package firmware_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lockergate/lockergate/firmware"
	"github.com/lockergate/lockergate/internal/testtool"
)

// uploadTemps counts the images being uploaded into dir.
func uploadTemps(dir string) (int, error) {
	es, err := os.ReadDir(dir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return 0, err
	}
	n := 0
	for _, e := range es {
		if strings.HasPrefix(e.Name(), ".upload-") {
			n++
		}
	}
	return n, nil
}

// TestEngineUploadsBounded: at most two uploads stream to disk at once; a
// third is refused before its body is read (ErrUploadsBusy), and goes
// through once one has ended.
func TestEngineUploadsBounded(t *testing.T) {
	h := newHarness(t, hopt{})
	ctx := context.Background()
	type result struct {
		a   *firmware.Artifact
		err error
	}
	var writers []*io.PipeWriter
	done := make(chan result, 2)
	for i := range 2 {
		pr, pw := io.Pipe()
		writers = append(writers, pw)
		t.Cleanup(func() { pw.CloseWithError(errors.New("test over")) })
		go func() {
			a, err := h.eng.Upload(ctx, "LX-24", fmt.Sprintf("2.0.%d", i), pr, "test")
			pr.CloseWithError(err) // unblock the writer if it failed
			done <- result{a, err}
		}()
	}
	testtool.Eventually(t, 5*time.Second, "two uploads streaming", func() error {
		if n, err := uploadTemps(h.dir); err != nil || n != 2 {
			return fmt.Errorf("%d uploads streaming (%v)", n, err)
		}
		return nil
	})
	third := &readCounter{r: strings.NewReader("image")}
	if _, err := h.eng.Upload(ctx, "LX-24", "2.0.9", third, "test"); !errors.Is(err, firmware.ErrUploadsBusy) {
		t.Fatalf("a third upload at once: %v, want ErrUploadsBusy", err)
	}
	if third.n != 0 {
		t.Fatalf("the refused upload's body was read (%d bytes)", third.n)
	}
	// A repeat under an Idempotency-Key reads an image too: in a slot.
	if _, err := h.eng.SameImage("00", third); !errors.Is(err, firmware.ErrUploadsBusy) || third.n != 0 {
		t.Fatalf("an image compared at once: %v (%d bytes read), want ErrUploadsBusy before reading", err, third.n)
	}
	// One ends; the third goes through.
	if _, err := writers[0].Write([]byte("image 0")); err != nil {
		t.Fatal(err)
	}
	writers[0].Close()
	if r := <-done; r.err != nil {
		t.Fatalf("first upload: %v", r.err)
	}
	if _, err := h.eng.Upload(ctx, "LX-24", "2.0.9", strings.NewReader("image"), "test"); err != nil {
		t.Fatalf("the third, after one ended: %v", err)
	}
	writers[1].Write([]byte("image 1"))
	writers[1].Close()
	if r := <-done; r.err != nil {
		t.Fatalf("second upload: %v", r.err)
	}
}

type readCounter struct {
	r io.Reader
	n int
}

func (c *readCounter) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += n
	return n, err
}

// TestEngineRemovesUploadLeftovers: what an upload cut short by a crash
// left in the firmware directory is removed when the engine starts; a file
// still being written (another gateway's upload, on a shared directory)
// and images are not.
func TestEngineRemovesUploadLeftovers(t *testing.T) {
	h := newHarness(t, hopt{})
	h.stop() // a crash
	a := h.upload("LX-24", "1.5.0")
	old := filepath.Join(h.dir, ".upload-1234")
	fresh := filepath.Join(h.dir, ".upload-5678")
	for _, p := range []string{old, fresh} {
		if err := os.WriteFile(p, []byte("half an image"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	then := time.Now().Add(-time.Hour)
	if err := os.Chtimes(old, then, then); err != nil {
		t.Fatal(err)
	}
	h.start(hopt{})
	testtool.Eventually(t, 5*time.Second, "leftover removed", func() error {
		if _, err := os.Stat(old); !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("leftover still there (%v)", err)
		}
		return nil
	})
	for _, p := range []string{fresh, filepath.Join(h.dir, a.ID+".bin")} {
		if _, err := os.Stat(p); err != nil {
			t.Fatalf("%s: %v", filepath.Base(p), err)
		}
	}
}
