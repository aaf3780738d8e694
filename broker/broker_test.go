package broker

import (
	"crypto/tls"
	"crypto/x509"
	"log/slog"
	"net"
	"runtime"
	"strings"
	"testing"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil/promlint"

	"github.com/lockergate/lockergate/internal/testtool"
)

func TestNew(t *testing.T) {
	quiet := slog.New(slog.DiscardHandler)
	t.Run("ErrNoAuth", func(t *testing.T) {
		if _, err := New(Options{TCPAddr: "127.0.0.1:0", Logger: quiet}); err == nil {
			t.Error("New without Auth succeeded")
		}
	})
	t.Run("ErrTLSWithoutConfig", func(t *testing.T) {
		if _, err := New(Options{TLSAddr: "127.0.0.1:0", Auth: newFakeAuth(), Logger: quiet}); err == nil {
			t.Error("New with TLSAddr and no TLSConfig succeeded")
		}
	})
	t.Run("ErrAddressInUse", func(t *testing.T) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		reg := prometheus.NewRegistry()
		if _, err := New(Options{TCPAddr: ln.Addr().String(), Auth: newFakeAuth(), Logger: quiet, Registerer: reg}); err == nil {
			t.Error("New on a used port succeeded")
		}
		b, err := New(Options{TCPAddr: "127.0.0.1:0", Auth: newFakeAuth(), Logger: quiet, Registerer: reg})
		if err != nil {
			t.Fatalf("retry with the same registry: %v", err)
		}
		b.Close()
	})
	t.Run("ErrRegisteredTwice", func(t *testing.T) {
		reg := prometheus.NewRegistry()
		b, err := New(Options{Auth: newFakeAuth(), Logger: quiet, Registerer: reg})
		if err != nil {
			t.Fatal(err)
		}
		defer b.Close()
		if _, err := New(Options{Auth: newFakeAuth(), Logger: quiet, Registerer: reg}); err == nil {
			t.Error("second Broker on one registry succeeded")
		}
	})
	t.Run("OK", func(t *testing.T) {
		b, err := New(Options{TCPAddr: "127.0.0.1:0", Auth: newFakeAuth(), Logger: quiet})
		if err != nil {
			t.Fatal(err)
		}
		if b.TCPAddr() == nil || b.TLSAddr() != nil {
			t.Errorf("addresses %v %v", b.TCPAddr(), b.TLSAddr())
		}
		if err := b.Start(); err != nil {
			t.Fatal(err)
		}
		if err := b.Start(); err == nil {
			t.Error("second Start succeeded")
		}
		if err := b.Close(); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("CloseWithoutStart", func(t *testing.T) {
		b, err := New(Options{TCPAddr: "127.0.0.1:0", Auth: newFakeAuth(), Logger: quiet})
		if err != nil {
			t.Fatal(err)
		}
		addr := b.TCPAddr().String()
		if err := b.Close(); err != nil {
			t.Fatal(err)
		}
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			t.Error("listener still open after Close")
		}
	})
}

// newTLSHarness is a harness whose broker listens on TLS only; dial
// connects a paho client to it that trusts its certificate.
func newTLSHarness(t *testing.T) (h *harness, dial func(id, pass string) (*client, error)) {
	t.Helper()
	cert, pool := selfSigned(t)
	h = newHarness(t, func(o *Options) {
		o.TCPAddr = ""
		o.TLSAddr = "127.0.0.1:0"
		o.TLSConfig = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	}, nil)
	return h, func(id, pass string) (*client, error) {
		return dialPaho(t, "ssl://"+h.b.TLSAddr().String(), id, id, pass, func(o *paho.ClientOptions) {
			o.SetTLSConfig(&tls.Config{RootCAs: pool, ServerName: "localhost", MinVersion: tls.VersionTLS12})
		})
	}
}

func TestTLS(t *testing.T) {
	h, dial := newTLSHarness(t)
	if h.b.TCPAddr() != nil {
		t.Errorf("TCPAddr = %v, want nil", h.b.TCPAddr())
	}
	c, err := dial("A", "secret-A")
	if err != nil {
		t.Fatalf("connect over TLS: %v", err)
	}
	waitFor(t, "connected", func() bool { return h.b.ConnectedDevices() == 1 })
	c.Disconnect(50)
	waitFor(t, "disconnected", func() bool { return h.b.ConnectedDevices() == 0 })

	if _, err := dial("A", "wrong"); err == nil {
		t.Error("wrong secret accepted over TLS")
	}
}

func TestMetricsLint(t *testing.T) {
	h := newHarness(t, nil, nil)
	h.mustDialDevice(t, "A")
	// testutil.GatherAndLint would do, but testutil needs a module missing
	// from go.sum (kylelemons/godebug); promlint is what it runs.
	mfs, err := h.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	problems, err := promlint.NewWithMetricFamilies(mfs).Lint()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("%s: %s", p.Metric, p.Text)
	}
}

func selfSigned(t *testing.T) (tls.Certificate, *x509.CertPool) {
	t.Helper()
	certPEM, keyPEM := testtool.SelfSigned(t)
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(certPEM)
	return cert, pool
}

func TestCloseLeavesNoGoroutines(t *testing.T) {
	before := runtime.NumGoroutine()
	b, err := New(Options{TCPAddr: "127.0.0.1:0", TLSAddr: "127.0.0.1:0", TLSConfig: &tls.Config{},
		Auth: newFakeAuth(), Provisioner: &fakeProv{}, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Start(); err != nil {
		t.Fatal(err)
	}
	r := dialRaw(t, b.TCPAddr().String(), 4)
	if ack := r.connect("A", "A", "secret-A", 30, nil); ack.ReasonCode != 0 {
		t.Fatalf("CONNACK %#x", ack.ReasonCode)
	}
	p := dialRaw(t, b.TCPAddr().String(), 4)
	if ack := p.connect("prov-SN1", "claim", claimToken, 30, nil); ack.ReasonCode != 0 {
		t.Fatalf("CONNACK %#x", ack.ReasonCode)
	}
	idle := dialRaw(t, b.TLSAddr().String(), 4) // TCP only: never completes the TLS handshake
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	r.waitClosed()
	p.waitClosed()
	idle.waitClosed()
	waitFor(t, "broker goroutines gone", func() bool { return runtime.NumGoroutine() <= before })
}

func TestMochiHandler(t *testing.T) {
	var buf testtool.LockedBuffer
	log := slog.New(newMochiHandler(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug})))
	log.Info("added hook", "hook", "x")
	log.Warn("publish packet error", "error", "payload over 16 KiB")
	log.With("listener", "t1").Warn("error processing packet", "client", "A", "pk", "SECRET-PAYLOAD")
	got := buf.String()
	if strings.Contains(got, "added hook") || strings.Contains(got, "publish packet error") {
		t.Errorf("info or duplicate lines passed:\n%s", got)
	}
	if !strings.Contains(got, "error processing packet") || !strings.Contains(got, "listener=t1") {
		t.Errorf("warning lost:\n%s", got)
	}
	if strings.Contains(got, "SECRET-PAYLOAD") {
		t.Errorf("packet dump passed:\n%s", got)
	}
}
