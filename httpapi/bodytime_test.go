package httpapi

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lockergate/lockergate/fleet"
)

// TestSlowBodyLosesTheConnection: a client that sends less of a body than
// its Content-Length says, with no token, loses its connection once the
// body's time is up: it no longer holds it and a goroutine for ever.
func TestSlowBodyLosesTheConnection(t *testing.T) {
	srv := httptest.NewServer(New(Options{Store: &fakeStore{}, BodyReadTimeout: 200 * time.Millisecond}))
	defer srv.Close()
	conn, err := net.Dial("tcp", srv.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := io.WriteString(conn, "POST /v1/sites HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"id\":\"s1\""); err != nil {
		t.Fatal(err)
	}
	conn.SetReadDeadline(time.Now().Add(10 * time.Second)) // the test's bound, far past the body's 200 ms
	_, err = io.Copy(io.Discard, conn)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatal("the connection is still open 10 s after a body that stopped coming")
	}
}

// TestBodyTimeLiftedAtItsEnd: a request whose body arrived is not cut short
// by the body's deadline while its handler waits (an unlock's wait_s), nor
// is one without a body; each is answered after the deadline has passed.
func TestBodyTimeLiftedAtItsEnd(t *testing.T) {
	const d = 100 * time.Millisecond
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		limitBodyTime(w, r, d)
		if _, err := io.ReadAll(r.Body); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		select {
		case <-r.Context().Done():
			http.Error(w, "cut short: "+context.Cause(r.Context()).Error(), http.StatusServiceUnavailable)
		case <-time.After(5 * d):
			io.WriteString(w, "waited")
		}
	}))
	defer srv.Close()
	for _, req := range []string{
		"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
		"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
		"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
	} {
		conn, err := net.Dial("tcp", srv.Listener.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		if _, err := io.WriteString(conn, req); err != nil {
			t.Fatal(err)
		}
		conn.SetReadDeadline(time.Now().Add(10 * time.Second))
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		if err != nil {
			t.Fatalf("%q: %v", req, err)
		}
		body, _ := io.ReadAll(resp.Body)
		conn.Close()
		if resp.StatusCode != http.StatusOK || string(body) != "waited" {
			t.Errorf("%q: %d %q, want 200 after the wait", strings.SplitN(req, "\r\n", 2)[0], resp.StatusCode, body)
		}
	}
}

// TestReadyzSaysWhichPart: /readyz, which needs no token, names the part
// that is not ready and leaves why (a database's user, name and address)
// to the log.
func TestReadyzSaysWhichPart(t *testing.T) {
	var logs strings.Builder
	s := New(Options{Store: &fakeStore{}, Logger: slog.New(slog.NewTextHandler(&logs, nil)),
		Ready: func(context.Context) error {
			return errors.New("database: failed to connect to `user=lockergate database=prod`: 10.0.0.5:5432 (db.internal): dial error")
		}})
	w := httptest.NewRecorder()
	s.ServeHTTP(w, httptest.NewRequest("GET", "/readyz", nil))
	body := w.Body.String()
	if w.Code != http.StatusServiceUnavailable || !strings.Contains(body, "not ready: database") {
		t.Fatalf("/readyz: %d %s, want 503 naming the database", w.Code, body)
	}
	for _, secret := range []string{"10.0.0.5", "prod", "db.internal", "user="} {
		if strings.Contains(body, secret) {
			t.Errorf("/readyz tells anyone %q: %s", secret, body)
		}
	}
	if !strings.Contains(logs.String(), "10.0.0.5") {
		t.Errorf("the log lacks why: %s", logs.String())
	}
}

// TestRefusedExpectContinueAnsweredAtOnce: a request that waits for "100
// Continue" before sending its body, and is refused (no token), is
// answered at once, not after the body's deadline: the server knows not
// to wait for a body it never asked for.
func TestRefusedExpectContinueAnsweredAtOnce(t *testing.T) {
	srv := httptest.NewServer(New(Options{Store: &fakeStore{}, BodyReadTimeout: time.Hour}))
	defer srv.Close()
	conn, err := net.Dial("tcp", srv.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := io.WriteString(conn, "POST /v1/sites HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"+
		"Expect: 100-continue\r\nContent-Length: 1000\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	conn.SetReadDeadline(time.Now().Add(20 * time.Second)) // the test's bound; the body's is an hour
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatalf("no answer to a refused request waiting for 100 Continue: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("status %d, want 401", resp.StatusCode)
	}
}

// deadlineRecorder is a ResponseWriter that records the write deadlines
// set on it, as http.ResponseController sets them on a connection.
type deadlineRecorder struct {
	*httptest.ResponseRecorder
	write []time.Time
}

func (d *deadlineRecorder) SetWriteDeadline(t time.Time) error {
	d.write = append(d.write, t)
	return nil
}

// TestResponseTime: every answer has ResponseTimeout to be written (a
// client that does not read it loses the connection then), but a firmware
// image's, which takes what a slow locker's link takes: each of its
// writes has DownloadStallTimeout (TestDownloadThatStallsIsCut).
func TestResponseTime(t *testing.T) {
	s := New(Options{Store: &fakeStore{}, ResponseTimeout: time.Minute, DownloadStallTimeout: 7 * time.Second})
	for _, c := range []struct {
		path string
		want time.Duration
	}{{"/v1/openapi.json", time.Minute}, {"/healthz", time.Minute}, {"/v1/firmware/fw-1/blob?sig=x&exp=1&job=j", 7 * time.Second}} {
		w := &deadlineRecorder{ResponseRecorder: httptest.NewRecorder()}
		before := time.Now()
		s.ServeHTTP(w, httptest.NewRequest("GET", c.path, nil))
		if len(w.write) == 0 {
			t.Fatalf("%s: no write deadline set", c.path)
		}
		if last := w.write[len(w.write)-1]; last.Before(before.Add(c.want)) || last.After(time.Now().Add(c.want)) {
			t.Errorf("%s: write deadline %v, want %v on", c.path, last, c.want)
		}
	}
}

// TestDownloadThatStallsIsCut: a client that asks for an image and stops
// reading loses the connection once a chunk has waited
// DownloadStallTimeout to be written, and the handler ends (it would hold
// the connection, a goroutine and the open image for good); one that
// reads gets the whole image through the chunks.
func TestDownloadThatStallsIsCut(t *testing.T) {
	img := make([]byte, 32<<20) // past what loopback's socket buffers hold
	for i := range img {
		img[i] = byte(i)
	}
	f, err := os.CreateTemp(t.TempDir(), "img")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.Write(img); err != nil {
		t.Fatal(err)
	}
	ended := make(chan *countingWriter, 2)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		pw := &progressWriter{ResponseWriter: w, rc: http.NewResponseController(w), stall: 2 * time.Second}
		cw := &countingWriter{ResponseWriter: pw, r: r, size: int64(len(img))}
		http.ServeContent(cw, r, "img.bin", time.Time{}, io.NewSectionReader(f, 0, int64(len(img))))
		ended <- cw
	}))
	defer srv.Close()

	// A client that reads it all.
	resp, err := http.Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || !bytes.Equal(got, img) {
		t.Fatalf("read %d of %d bytes (%v), or not the image", len(got), len(img), err)
	}
	if cw := <-ended; cw.n != int64(len(img)) || cw.stalled {
		t.Fatalf("counted %d bytes sent (stalled %v), want %d", cw.n, cw.stalled, len(img))
	}

	// A client that asks and never reads, with a small receive buffer.
	d := net.Dialer{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) { serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096) })
		return errors.Join(err, serr)
	}}
	conn, err := d.Dial("tcp", srv.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := io.WriteString(conn, "GET / HTTP/1.1\r\nHost: x\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	select {
	case cw := <-ended:
		if cw.n >= int64(len(img)) || !cw.stalled {
			t.Fatalf("%d bytes sent to a client that reads none, stalled %v; want fewer, and stalled (counted)", cw.n, cw.stalled)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the download to a client that stopped reading never ended")
	}
}

// heldSites holds every read of sites (a store's GET /v1/sites reads its
// own, an admin's lists them) until release is closed, and says when one
// began.
type heldSites struct {
	fakeStore
	began   chan struct{}
	release chan struct{}
}

func (s *heldSites) hold() {
	s.began <- struct{}{}
	<-s.release
}

func (s *heldSites) GetSite(ctx context.Context, id string) (*fleet.Site, error) {
	s.hold()
	return s.fakeStore.GetSite(ctx, id)
}

func (s *heldSites) ListSites(ctx context.Context, after string, n int) ([]fleet.Site, error) {
	s.hold()
	return s.fakeStore.ListSites(ctx, after, n)
}

// TestInFlightPerToken: a store token with MaxInFlightPerToken requests in
// flight gets a 429 with Retry-After for one more, and is served again once
// one is answered; an admin token is not bounded.
func TestInFlightPerToken(t *testing.T) {
	st := &heldSites{fakeStore: fakeStore{sites: []fleet.Site{{ID: "a", Name: "A"}}}, began: make(chan struct{}, 64), release: make(chan struct{})}
	s := New(Options{Store: st})
	released := false
	release := func() {
		if !released {
			released = true
			close(st.release)
		}
	}
	defer release()
	// get answers a GET /v1/sites with secret, off the test's goroutine (no
	// t.Fatal there: call's).
	get := func(secret string) *httptest.ResponseRecorder {
		req := httptest.NewRequest("GET", "/v1/sites", nil)
		req.Header.Set("Authorization", "Bearer "+secret)
		rec := httptest.NewRecorder()
		s.ServeHTTP(rec, req)
		return rec
	}
	done := make(chan *httptest.ResponseRecorder, MaxInFlightPerToken+2)
	for range MaxInFlightPerToken {
		go func() { done <- get("store-a") }()
		<-st.began
	}
	extra := make(chan *httptest.ResponseRecorder, 1)
	go func() { extra <- get("store-a") }()
	select {
	case rec := <-extra:
		want := "this token has 16 requests in flight on this gateway instance, the most one store token may: " +
			"retry once one is answered (Retry-After), or send fewer at once"
		if rec.Code != http.StatusTooManyRequests || !strings.Contains(rec.Body.String(), want) || rec.Header().Get("Retry-After") != "1" {
			t.Errorf("a request past the bound: %d %v %s; want 429 with Retry-After 1 saying %q", rec.Code, rec.Header(), rec.Body, want)
		}
	case <-st.began:
		release()
		t.Fatal("a request past the store token's bound reached the store")
	}
	go func() { done <- get("admin") }()
	<-st.began // admin's, past the store token's bound
	release()
	for range MaxInFlightPerToken + 1 {
		if rec := <-done; rec.Code != http.StatusOK {
			t.Fatalf("a held request: %d %s", rec.Code, rec.Body)
		}
	}
	if a := call(t, s, "GET", "/v1/sites", "store-a"); a.status != http.StatusOK {
		t.Fatalf("once its requests were answered: %d %s", a.status, a.raw)
	}
}
