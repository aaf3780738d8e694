package gateway_test

import (
	"crypto/tls"
	"crypto/x509"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/lockergate/lockergate/gateway"
)

// TestSecurityTLSCertNames: the certificate issued by the private CA on first
// start is valid for the host lockers are told to connect to, not only for
// localhost; a locker that pins the CA and checks the name gets in, and one
// that expects another name does not.
func TestSecurityTLSCertNames(t *testing.T) {
	dataDir := t.TempDir()
	tg := MustStart(t, func(o *gateway.Options) {
		o.DataDir = dataDir
		o.MQTTSAddr = "127.0.0.1:0"
		o.BrokerURL = "mqtts://lockers.store-042.example:8883"
	})
	caPEM, err := os.ReadFile(filepath.Join(dataDir, "tls", "ca.pem"))
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		t.Fatal("ca.pem holds no certificate")
	}
	hostname, err := os.Hostname()
	if err != nil {
		t.Fatal(err)
	}
	handshake := func(name string) error {
		d := &net.Dialer{Timeout: 5 * time.Second}
		c, err := tls.DialWithDialer(d, "tcp", tg.MQTTSAddr(), &tls.Config{RootCAs: pool, ServerName: name, MinVersion: tls.VersionTLS12})
		if err == nil {
			c.Close()
		}
		return err
	}
	for _, name := range []string{"lockers.store-042.example", hostname, "localhost", "127.0.0.1"} {
		if err := handshake(name); err != nil {
			t.Errorf("TLS as %s: %v", name, err)
		}
	}
	if err := handshake("elsewhere.example"); err == nil {
		t.Error("certificate valid for a name it was not issued for")
	}
}
