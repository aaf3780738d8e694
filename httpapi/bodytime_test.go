package httpapi

import (
	"bufio"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
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
