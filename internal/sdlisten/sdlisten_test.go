package sdlisten

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

// passed places files at consecutive free fds, as a service manager does
// from fd 3 on, and returns the first; the fds left open at the end are
// closed.
func passed(t *testing.T, files ...*os.File) int {
	t.Helper()
	first := 100
search:
	for ; first < 1000; first++ {
		for i := range files {
			if _, _, e := syscall.Syscall(syscall.SYS_FCNTL, uintptr(first+i), syscall.F_GETFD, 0); e != syscall.EBADF {
				continue search
			}
		}
		break
	}
	for i, f := range files {
		if err := dupTo(int(f.Fd()), first+i); err != nil {
			t.Fatal(err)
		}
		f.Close()
	}
	t.Cleanup(func() {
		for i := range files {
			syscall.Close(first + i)
		}
	})
	return first
}

func tcpFile(t *testing.T) (*os.File, string) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	f, err := ln.(*net.TCPListener).File()
	if err != nil {
		t.Fatal(err)
	}
	return f, ln.Addr().String()
}

type env map[string]string

func (e env) get(k string) string { return e[k] }
func (e env) unset(k string) error {
	delete(e, k)
	return nil
}

func TestListeners(t *testing.T) {
	mqttF, mqttAddr := tcpFile(t)
	httpF, httpAddr := tcpFile(t)
	first := passed(t, mqttF, httpF)
	e := env{"LISTEN_PID": "42", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "mqtt:http"}
	lns, err := listeners(e.get, e.unset, 42, first)
	if err != nil {
		t.Fatal(err)
	}
	if len(e) != 0 {
		t.Errorf("environment left for children: %v", e)
	}
	for name, addr := range map[string]string{"mqtt": mqttAddr, "http": httpAddr} {
		ln := lns[name]
		if ln == nil {
			t.Fatalf("no %s listener in %v", name, lns)
		}
		defer ln.Close()
		if ln.Addr().String() != addr {
			t.Errorf("%s listens on %s, want %s", name, ln.Addr(), addr)
		}
		// The passed socket is the one served: a connection to its
		// address is accepted here.
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		a, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		a.Close()
	}
	// The passed fds themselves are released (the listeners hold
	// close-on-exec duplicates), so no child inherits a socket.
	for i := range 2 {
		if _, _, e := syscall.Syscall(syscall.SYS_FCNTL, uintptr(first+i), syscall.F_GETFD, 0); e != syscall.EBADF {
			t.Errorf("passed fd %d still open", first+i)
		}
	}
}

func TestListenersNotPassed(t *testing.T) {
	for name, e := range map[string]env{
		"nothing":       {},
		"another pid":   {"LISTEN_PID": "43", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "mqtt"},
		"no pid":        {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "mqtt"},
		"zero sockets":  {"LISTEN_PID": "42", "LISTEN_FDS": "0"},
		"pid, no count": {"LISTEN_PID": "42"},
	} {
		t.Run(name, func(t *testing.T) {
			lns, err := listeners(e.get, e.unset, 42, 100)
			if err != nil || lns != nil {
				t.Fatalf("got %v, %v; want nothing passed", lns, err)
			}
			if len(e) != 0 {
				t.Errorf("environment left for children: %v", e)
			}
		})
	}
}

func TestListenersRefused(t *testing.T) {
	pipe := func(t *testing.T) *os.File {
		r, w, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		w.Close()
		return r
	}
	udp := func(t *testing.T) *os.File {
		c, err := net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		f, err := c.(*net.UDPConn).File()
		if err != nil {
			t.Fatal(err)
		}
		return f
	}
	tcp := func(t *testing.T) *os.File {
		f, _ := tcpFile(t)
		return f
	}
	unix := func(t *testing.T) *os.File {
		ln, err := net.Listen("unix", t.TempDir()+"/s")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		f, err := ln.(*net.UnixListener).File()
		if err != nil {
			t.Fatal(err)
		}
		return f
	}
	connected := func(t *testing.T) *os.File {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		f, err := c.(*net.TCPConn).File()
		if err != nil {
			t.Fatal(err)
		}
		return f
	}
	for _, tc := range []struct {
		name  string
		files []func(*testing.T) *os.File
		count string
		names string
		want  string
		// closes: the passed fds are all closed after the error (none
		// left open for a child, or half served)
		closes bool
	}{
		{"unnamed", []func(*testing.T) *os.File{tcp}, "1", "", "FileDescriptorName=", true},
		{"fewer names", []func(*testing.T) *os.File{tcp, tcp}, "2", "mqtt", "2 sockets passed with 1 names", true},
		{"a connected socket", []func(*testing.T) *os.File{tcp, connected}, "2", "mqtt:http", "fd", true},
		{"count not a number", []func(*testing.T) *os.File{tcp}, "one", "mqtt", `LISTEN_FDS="one"`, false},
		{"count too large", []func(*testing.T) *os.File{tcp}, "100000", "mqtt", "at most", false},
		{"a unix socket", []func(*testing.T) *os.File{tcp, unix}, "2", "mqtt:http", "(http) is a unix socket", true},
		{"name twice", []func(*testing.T) *os.File{tcp, tcp, tcp}, "3", "mqtt:mqtt:http", `both named "mqtt"`, true},
		{"a pipe", []func(*testing.T) *os.File{tcp, pipe, tcp}, "3", "mqtt:http:mqtts", "(http)", true},
		{"a udp socket", []func(*testing.T) *os.File{udp}, "1", "mqtt", "(mqtt)", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var files []*os.File
			for _, f := range tc.files {
				files = append(files, f(t))
			}
			first := passed(t, files...)
			e := env{"LISTEN_PID": "42", "LISTEN_FDS": tc.count, "LISTEN_FDNAMES": tc.names}
			if tc.name == "a connected socket" {
				tc.want = "fd " + strconv.Itoa(first+1) + " (http) is not a listening socket"
			}
			lns, err := listeners(e.get, e.unset, 42, first)
			if err == nil {
				for _, ln := range lns {
					ln.Close()
				}
				t.Fatalf("no error; got %v", lns)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q does not say %q", err, tc.want)
			}
			if len(e) != 0 {
				t.Errorf("environment left for children: %v", e)
			}
			for i := range files {
				_, _, errno := syscall.Syscall(syscall.SYS_FCNTL, uintptr(first+i), syscall.F_GETFD, 0)
				if tc.closes && errno != syscall.EBADF {
					t.Errorf("passed fd %d left open after the error", first+i)
				}
			}
		})
	}
}

// A socket taken before a later one is refused is closed with the rest:
// nothing is left listening that nobody serves.
func TestListenersRefusedClosesTaken(t *testing.T) {
	taken, addr := tcpFile(t)
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	w.Close()
	first := passed(t, taken, r)
	e := env{"LISTEN_PID": "42", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "mqtt:http"}
	if _, err := listeners(e.get, e.unset, 42, first); err == nil {
		t.Fatal("a pipe passed as a socket was taken")
	}
	if c, err := net.Dial("tcp", addr); err == nil {
		c.Close()
		t.Fatalf("%s still accepts connections after the error", addr)
	}
}

func TestListenersBadPID(t *testing.T) {
	e := env{"LISTEN_PID": "4x2", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "mqtt"}
	if lns, err := listeners(e.get, e.unset, 42, 100); err == nil || !strings.Contains(err.Error(), `LISTEN_PID="4x2"`) {
		t.Fatalf("got %v, %v; want an error naming LISTEN_PID", lns, err)
	}
}

func TestTake(t *testing.T) {
	listen := func() net.Listener {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		return ln
	}
	mqtt, http := listen(), listen()
	got, err := Take(map[string]net.Listener{"mqtt": mqtt, "http": http}, "mqtt", "mqtts", "http")
	if err != nil {
		t.Fatal(err)
	}
	if got[0] != mqtt || got[1] != nil || got[2] != http {
		t.Fatalf("Take = %v", got)
	}
	mqtt.Close()
	http.Close()

	mqtt, extra := listen(), listen()
	_, err = Take(map[string]net.Listener{"mqtt": mqtt, "amqp": extra}, "mqtt", "http")
	if !errors.Is(err, ErrUnknownName) || !strings.Contains(err.Error(), `"amqp"`) {
		t.Fatalf("Take with an unknown name: %v", err)
	}
	// Nothing is left listening: a socket passed but not served would
	// leave its clients hanging.
	for _, ln := range []net.Listener{mqtt, extra} {
		if c, err := net.Dial("tcp", ln.Addr().String()); err == nil {
			c.Close()
			t.Errorf("%s still accepts connections", ln.Addr())
		}
	}
}

// TestPass: a child started through Pass finds the sockets by name with
// Listeners, at the addresses they were passed with. The child is this
// test binary again (TestPassChild).
func TestPass(t *testing.T) {
	mqttF, mqttAddr := tcpFile(t)
	httpF, httpAddr := tcpFile(t)
	defer mqttF.Close()
	defer httpF.Close()
	cmd := exec.Command(os.Args[0], "-test.run=^TestPassChild$")
	cmd.Env = append(os.Environ(), "SDLISTEN_CHILD=1")
	Pass(cmd, Socket{"mqtt", mqttF}, Socket{"http", httpF})
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("child: %v\n%s", err, out)
	}
	for _, want := range []string{"mqtt=" + mqttAddr, "http=" + httpAddr} {
		if !strings.Contains(string(out), want) {
			t.Errorf("child saw %q, want %s", out, want)
		}
	}
}

// TestPassChild is TestPass's child: it prints what Listeners finds.
func TestPassChild(t *testing.T) {
	if os.Getenv("SDLISTEN_CHILD") != "1" {
		return // run by TestPass only
	}
	lns, err := Listeners()
	if err != nil {
		t.Fatal(err)
	}
	for name, ln := range lns {
		fmt.Printf("%s=%s\n", name, ln.Addr())
		ln.Close()
	}
}
