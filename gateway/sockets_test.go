package gateway_test

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/lockergate/lockergate/gateway"
	"github.com/lockergate/lockergate/internal/pgtest"
	"github.com/lockergate/lockergate/internal/sdlisten"
)

// TestSocketActivatedRestart: lockergate serves the sockets a service
// manager holds (systemd socket activation; the test holds them here).
// While the gateway restarts, a locker's connection and an API request are
// not refused: they wait in the sockets' accept queues, and the next
// process answers them.
func TestSocketActivatedRestart(t *testing.T) {
	bin := buildLockergate(t)
	dsn := pgtest.NewDB(t)
	dataDir := t.TempDir()
	b := MustStart(t, func(o *gateway.Options) { o.DataDir, o.DatabaseURL = dataDir, dsn })
	claim := b.MustSiteAndClaim(t, "s1", 1)
	id := MustProvision(t, b, claim, "SOCK-001")
	b.Stop(t)

	mqttF, mqttAddr := heldSocket(t)
	httpF, httpAddr := heldSocket(t)
	start := func() *gatewayProcess {
		// As systemd starts a socket-activated service.
		cmd := exec.Command(bin, "serve",
			"--data-dir", dataDir, "--database-url", dsn, "--mqtts-addr", "", "--log-level", "info",
			// Taken by the passed sockets: were these used, the
			// addresses checked below would not answer.
			"--mqtt-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0")
		sdlisten.Pass(cmd, sdlisten.Socket{Name: "mqtt", File: mqttF}, sdlisten.Socket{Name: "http", File: httpF})
		return startGatewayCmd(t, cmd)
	}
	connect := func() (paho.Client, error) {
		o := paho.NewClientOptions().AddBroker("tcp://" + mqttAddr).SetClientID(id.DeviceID).SetUsername(id.DeviceID).
			SetPassword(id.Password).SetAutoReconnect(false).SetConnectRetry(false).SetConnectTimeout(60 * time.Second)
		c := paho.NewClient(o)
		tk := c.Connect()
		if !tk.WaitTimeout(90 * time.Second) {
			return nil, fmt.Errorf("connect timed out")
		}
		return c, tk.Error()
	}

	p := start()
	if p.http != httpAddr {
		t.Fatalf("the gateway serves its API on %s, not on the passed socket %s", p.http, httpAddr)
	}
	c, err := connect()
	if err != nil {
		t.Fatalf("locker connect on the passed socket: %v", err)
	}
	c.Disconnect(50)

	p.stop(t)
	// No gateway runs now. The locker reconnects, and an API client asks.
	locker := make(chan error, 1)
	go func() {
		c, err := connect()
		if err == nil {
			c.Disconnect(50)
		}
		locker <- err
	}()
	api := make(chan error, 1)
	go func() {
		resp, err := (&http.Client{Timeout: 90 * time.Second}).Get("http://" + httpAddr + "/readyz")
		if err == nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				err = fmt.Errorf("readyz: %s", resp.Status)
			}
		}
		api <- err
	}()
	// Both are waiting, not refused: a connection to either address is
	// taken by the kernel while no process serves it.
	for _, addr := range []string{mqttAddr, httpAddr} {
		conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
		if err != nil {
			t.Fatalf("connect to %s while the gateway restarts: %v (refused: the socket did not outlive the process)", addr, err)
		}
		conn.Close()
	}
	select {
	case err := <-locker:
		t.Fatalf("the locker's connect ended while no gateway ran: %v", err)
	case err := <-api:
		t.Fatalf("the API request ended while no gateway ran: %v", err)
	default:
	}

	start()
	select {
	case err := <-locker:
		if err != nil {
			t.Fatalf("the locker that connected during the restart: %v", err)
		}
	case <-time.After(90 * time.Second):
		t.Fatal("the locker that connected during the restart got no answer")
	}
	select {
	case err := <-api:
		if err != nil {
			t.Fatalf("the API request made during the restart: %v", err)
		}
	case <-time.After(90 * time.Second):
		t.Fatal("the API request made during the restart got no answer")
	}
}

// heldSocket returns a listening socket on 127.0.0.1 that outlives the
// processes it is passed to (sdlisten.Pass), as systemd holds one, and its
// address.
func heldSocket(t *testing.T) (*os.File, string) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close() // f holds the socket
	f, err := ln.(*net.TCPListener).File()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f, ln.Addr().String()
}
