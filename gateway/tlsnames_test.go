package gateway_test

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/lockergate/lockergate/gateway"
	"github.com/lockergate/lockergate/internal/pgtest"
)

// TestSecurityTLSCertNames: the certificate issued by the private CA on first
// start is valid for the host lockers are told to connect to, not only for
// localhost; a locker that pins the CA and checks the name gets in, and one
// that expects another name does not. Lockers told a new host after a
// restart get in too, through the same CA.
func TestSecurityTLSCertNames(t *testing.T) {
	dataDir := t.TempDir()
	dbURL := pgtest.NewDB(t)
	start := func(brokerURL string) *TestGateway {
		return MustStart(t, func(o *gateway.Options) {
			o.DataDir, o.DatabaseURL = dataDir, dbURL
			o.MQTTSAddr = "127.0.0.1:0"
			o.BrokerURL = brokerURL
		})
	}
	tg := start("mqtts://lockers.store-042.example:8883")
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

	// The lockers move to a new host name: the certificate is issued again
	// at start, from the CA they already pin.
	tg.Stop(t)
	tg = start("mqtts://lockers.store-043.example:8883")
	if err := handshake("lockers.store-043.example"); err != nil {
		t.Errorf("TLS as the new name after a restart: %v", err)
	}
	if after, err := os.ReadFile(filepath.Join(dataDir, "tls", "ca.pem")); err != nil || !bytes.Equal(after, caPEM) {
		t.Errorf("ca.pem changed across the restart (%v)", err)
	}
}
