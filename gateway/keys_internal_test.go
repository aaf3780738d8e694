package gateway

import (
	"bytes"
	"crypto/x509"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// The generated server certificate is issued again from the same CA when it
// nears expiry or lacks a name, at start and while running; the CA, which
// lockers pin, never changes.
func TestCertIssuerRenews(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "tls")
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	clock := time.Now()
	now := func() time.Time { return clock }
	hosts := []string{"localhost", "127.0.0.1"}
	read := func(name string) []byte {
		t.Helper()
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	start := func(hosts []string) *certIssuer {
		t.Helper()
		ci, err := newCertIssuer(dir, hosts, now, log)
		if err != nil {
			t.Fatal(err)
		}
		return ci
	}
	served := func(ci *certIssuer) *x509.Certificate {
		t.Helper()
		c, err := ci.get(nil)
		if err != nil {
			t.Fatal(err)
		}
		return c.Leaf
	}
	chains := func(leaf *x509.Certificate, ca []byte, name string) error {
		pool := x509.NewCertPool()
		pool.AppendCertsFromPEM(ca)
		_, err := leaf.Verify(x509.VerifyOptions{Roots: pool, DNSName: name, CurrentTime: clock})
		return err
	}

	first := served(start(hosts))
	ca := read("ca.pem")
	if err := chains(first, ca, "localhost"); err != nil {
		t.Fatalf("first certificate: %v", err)
	}

	t.Run("KeptAcrossStarts", func(t *testing.T) {
		if got := served(start(hosts)); got.SerialNumber.Cmp(first.SerialNumber) != 0 {
			t.Error("a valid certificate was issued again at start")
		}
	})
	t.Run("NewNameAtStart", func(t *testing.T) {
		ci := start(append(hosts, "lockers.example"))
		got := served(ci)
		if err := chains(got, ca, "lockers.example"); err != nil {
			t.Errorf("certificate for the new name: %v", err)
		}
		if !bytes.Equal(read("ca.pem"), ca) {
			t.Error("the CA changed")
		}
		// Another name later: lockers told the earlier one still get in.
		got = served(start(append(hosts, "lockers2.example")))
		for _, name := range []string{"lockers.example", "lockers2.example", "localhost"} {
			if err := chains(got, ca, name); err != nil {
				t.Errorf("after a second new name, %s: %v", name, err)
			}
		}
	})
	t.Run("NearExpiryAtStart", func(t *testing.T) {
		cur := served(start(hosts))
		clock = cur.NotAfter.Add(-renewBefore / 2)
		got := served(start(hosts))
		if !got.NotAfter.After(cur.NotAfter) {
			t.Errorf("not renewed: expires %v, as before", got.NotAfter)
		}
		if err := chains(got, ca, "127.0.0.1"); err != nil {
			t.Errorf("renewed certificate: %v", err)
		}
	})
	t.Run("NearExpiryWhileRunning", func(t *testing.T) {
		ci := start(hosts)
		cur := served(ci)
		clock = cur.NotAfter.Add(-renewBefore - time.Hour) // an hour before the window
		if got := served(ci); got.SerialNumber.Cmp(cur.SerialNumber) != 0 {
			t.Fatal("renewed before the window")
		}
		clock = cur.NotAfter.Add(-renewBefore / 3)
		got := served(ci)
		if !got.NotAfter.After(cur.NotAfter) || chains(got, ca, "localhost") != nil {
			t.Fatalf("served %v (expires %v), want a renewed certificate from the same CA", got.SerialNumber, got.NotAfter)
		}
		// And stored: the next start serves the same one.
		if again := served(start(hosts)); again.SerialNumber.Cmp(got.SerialNumber) != 0 {
			t.Error("the renewed certificate was not stored")
		}
		if !bytes.Equal(read("ca.pem"), ca) {
			t.Error("the CA changed")
		}
	})
	t.Run("CAKeyOffline", func(t *testing.T) {
		// docs/security.md: the CA key may be kept offline between renewals.
		cur := served(start(hosts))
		keyPath := filepath.Join(dir, "ca.key")
		key := read("ca.key")
		if err := os.Remove(keyPath); err != nil {
			t.Fatal(err)
		}
		ci := start(hosts)
		if got := served(ci); got.SerialNumber.Cmp(cur.SerialNumber) != 0 {
			t.Fatal("a valid certificate was not served with the CA key offline")
		}
		// In the renewal window it keeps serving what it has.
		clock = cur.NotAfter.Add(-renewBefore / 2)
		if got := served(ci); got.SerialNumber.Cmp(cur.SerialNumber) != 0 {
			t.Error("renewed without the CA key")
		}
		// A start that must issue says to bring the key back.
		if _, err := newCertIssuer(dir, hosts, now, log); err == nil || !strings.Contains(err.Error(), "put tls/ca.key back") {
			t.Fatalf("start in the renewal window without the key: %v, want an error that says to put the key back", err)
		}
		if err := os.WriteFile(keyPath, key, 0o600); err != nil {
			t.Fatal(err)
		}
		if got := served(start(hosts)); !got.NotAfter.After(cur.NotAfter) {
			t.Error("not renewed once the key was back")
		}
	})
	t.Run("CACertificateMissing", func(t *testing.T) {
		if err := os.Remove(filepath.Join(dir, "ca.pem")); err != nil {
			t.Fatal(err)
		}
		_, err := newCertIssuer(dir, hosts, now, log)
		if err == nil || !strings.Contains(err.Error(), "restore ca.pem") {
			t.Fatalf("err %v, want one that says to restore ca.pem", err)
		}
		// Both CA files gone (ca.key kept offline, ca.pem lost): still no
		// new CA behind the lockers' backs while server.pem says one was.
		if err := os.Remove(filepath.Join(dir, "ca.key")); err != nil {
			t.Fatal(err)
		}
		_, err = newCertIssuer(dir, hosts, now, log)
		if err == nil || !strings.Contains(err.Error(), "restore ca.pem (and ca.key)") {
			t.Fatalf("err %v, want one that says to restore the CA", err)
		}
		if _, err := os.Stat(filepath.Join(dir, "ca.pem")); err == nil {
			t.Fatal("a new CA was made")
		}
	})
}
