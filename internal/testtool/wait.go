package testtool

import (
	"bytes"
	"sync"
	"testing"
	"time"
)

// Eventually calls f until it returns nil and fails the test with f's last
// error if that has not happened within d. It is how tests wait for a
// condition: never a fixed sleep. The polling interval starts at 2 ms and
// doubles up to 100 ms.
func Eventually(tb testing.TB, d time.Duration, what string, f func() error) {
	tb.Helper()
	deadline := time.Now().Add(d)
	wait := 2 * time.Millisecond
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			tb.Fatalf("%s: not within %v: %v", what, d, err)
		}
		time.Sleep(wait) // polling interval of a condition wait, not synchronisation
		wait = min(wait*2, 100*time.Millisecond)
	}
}

// LockedBuffer is an io.Writer that many goroutines may write (a logger, a
// command's output) while the test reads it.
type LockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *LockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

// String returns what has been written so far.
func (b *LockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
