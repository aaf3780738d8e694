package gateway

import (
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/lockergate/lockergate/postgres"
)

// loadOrCreate returns the contents of path, creating it (mode 0600) with
// make() when it does not exist.
func loadOrCreate(path string, make func() ([]byte, error)) (b []byte, created bool, err error) {
	b, err = os.ReadFile(path)
	if err == nil {
		return b, false, nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return nil, false, fmt.Errorf("read %s: %w", path, err)
	}
	if b, err = make(); err != nil {
		return nil, false, err
	}
	if err := writeFileAtomic(path, b, 0o600); err != nil {
		return nil, false, err
	}
	return b, true, nil
}

func writeFileAtomic(path string, b []byte, mode os.FileMode) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), ".tmp-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if err := tmp.Chmod(mode); err != nil {
		tmp.Close()
		return err
	}
	if _, err := tmp.Write(b); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}

// masterKey is the 32-byte key every device's cred_key is derived from.
func masterKey(dataDir string) ([]byte, error) {
	b, _, err := loadOrCreate(filepath.Join(dataDir, "master.key"), func() ([]byte, error) {
		k := make([]byte, 32)
		_, err := rand.Read(k)
		return k, err
	})
	if err == nil && len(b) != 32 {
		return nil, fmt.Errorf("%s: want 32 bytes, found %d: restore it from backup (device cred_keys derive from it)", filepath.Join(dataDir, "master.key"), len(b))
	}
	return b, err
}

// firmwareKey is the Ed25519 key firmware images are signed with.
func firmwareKey(path string) (ed25519.PrivateKey, error) {
	b, _, err := loadOrCreate(path, func() ([]byte, error) {
		_, priv, err := ed25519.GenerateKey(rand.Reader)
		return priv.Seed(), err
	})
	if err != nil {
		return nil, err
	}
	if len(b) != ed25519.SeedSize {
		return nil, fmt.Errorf("%s: want a %d-byte Ed25519 seed, found %d bytes", path, ed25519.SeedSize, len(b))
	}
	return ed25519.NewKeyFromSeed(b), nil
}

// renewBefore is how long before it expires the generated server
// certificate is issued again (from the same CA).
const renewBefore = 30 * 24 * time.Hour

// serverCertLifetime is how long a generated server certificate is valid.
const serverCertLifetime = 2 * 365 * 24 * time.Hour

// selfSignedTLS serves a server certificate issued by a private CA kept in
// dir (ca.pem, ca.key, server.pem, server.key), creating the CA on first
// use. Lockers pin ca.pem, so the CA is never replaced: the server
// certificate is issued again from it when it is missing, does not chain to
// the CA, lacks one of hosts, or is within renewBefore of expiry, at start
// and, for a gateway that runs that long, at the next TLS handshake.
func selfSignedTLS(dir string, hosts []string, log *slog.Logger) (*tls.Config, error) {
	ci, err := newCertIssuer(dir, hosts, time.Now, log)
	if err != nil {
		return nil, err
	}
	return &tls.Config{GetCertificate: ci.get, MinVersion: tls.VersionTLS12}, nil
}

// certIssuer keeps the generated server certificate current.
type certIssuer struct {
	dir   string
	hosts []string
	now   func() time.Time
	log   *slog.Logger
	ca    *x509.Certificate
	caKey *ecdsa.PrivateKey

	mu       sync.Mutex
	cert     *tls.Certificate // its Leaf is set
	failedAt time.Time        // the last failed renewal
}

func newCertIssuer(dir string, hosts []string, now func() time.Time, log *slog.Logger) (*certIssuer, error) {
	ci := &certIssuer{dir: dir, hosts: hosts, now: now, log: log}
	if err := ci.loadCA(); err != nil {
		return nil, err
	}
	cert, why := ci.load()
	var old *x509.Certificate // names lockers were told before are kept
	if cert != nil {
		old = cert.Leaf
	}
	switch {
	case why != "" && ci.caKey == nil:
		return nil, fmt.Errorf("TLS: the server certificate in %s must be issued again (%s), which needs the CA key: put tls/ca.key back (it may be kept offline between renewals) and start again", ci.dir, why)
	case why != "":
		var err error
		if cert, err = ci.issue(why, old); err != nil {
			return nil, err
		}
	case ci.caKey == nil:
		ci.log.Warn("TLS: the CA key is offline; the server certificate cannot be renewed until tls/ca.key is back",
			"dir", ci.dir, "expires", cert.Leaf.NotAfter.UTC(), "renew_from", cert.Leaf.NotAfter.Add(-renewBefore).UTC())
	}
	if now := ci.now(); now.After(ci.ca.NotAfter.Add(-renewBefore)) {
		ci.log.Error("TLS: the private CA expires soon or has expired; lockers will reject the gateway then: install a new CA on every locker",
			"ca", filepath.Join(ci.dir, "ca.pem"), "ca_expires", ci.ca.NotAfter.UTC())
	}
	ci.cert = cert
	return ci, nil
}

// get is tls.Config.GetCertificate.
func (ci *certIssuer) get(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	ci.mu.Lock()
	defer ci.mu.Unlock()
	now := ci.now()
	// Not without the CA key, and not more often than once a minute when
	// it fails (every handshake would pay for it).
	if ci.due(ci.cert.Leaf, now) && ci.caKey != nil && now.Sub(ci.failedAt) >= time.Minute {
		cert, err := ci.issue("expires "+ci.cert.Leaf.NotAfter.UTC().Format(time.DateOnly), ci.cert.Leaf)
		if err != nil {
			// Keep serving the old one while it is valid.
			ci.failedAt = now
			ci.log.Error("TLS: renewing the server certificate failed; trying again in a minute", "dir", ci.dir, "err", err)
			return ci.cert, nil
		}
		ci.cert = cert
	}
	return ci.cert, nil
}

// loadCA reads the CA, creating it when neither of its files exists.
func (ci *certIssuer) loadCA() error {
	caPEM, caKeyPEM := filepath.Join(ci.dir, "ca.pem"), filepath.Join(ci.dir, "ca.key")
	_, errCert := os.Stat(caPEM)
	_, errKey := os.Stat(caKeyPEM)
	_, errServer := os.Stat(filepath.Join(ci.dir, "server.pem"))
	switch {
	case errors.Is(errCert, fs.ErrNotExist) && errors.Is(errKey, fs.ErrNotExist) && errServer == nil:
		// A CA was made here before (it issued server.pem), and lockers
		// pinned it: the CA files were lost or moved (ca.key offline
		// with ca.pem by mistake), not never made.
		return fmt.Errorf("private CA in %s: ca.pem and ca.key are missing but server.pem is there: restore ca.pem (and ca.key) from backup; to start over with a new CA, which every locker that pinned the old one rejects, delete server.pem too", ci.dir)
	case errors.Is(errCert, fs.ErrNotExist) && errors.Is(errKey, fs.ErrNotExist):
		return ci.createCA(caPEM, caKeyPEM)
	case errCert != nil:
		return fmt.Errorf("private CA in %s: ca.pem is missing or unreadable (%v) but ca.key is there: restore ca.pem from backup (or from a locker's pinned copy); deleting both makes a new CA, which every locker that pinned the old one rejects", ci.dir, errCert)
	case errors.Is(errKey, fs.ErrNotExist):
		// The key is kept offline (docs/security.md): serve what was issued.
		b, err := os.ReadFile(caPEM)
		if err != nil {
			return fmt.Errorf("private CA in %s: %w", ci.dir, err)
		}
		block, _ := pem.Decode(b)
		if block == nil {
			return fmt.Errorf("private CA in %s: ca.pem holds no certificate", ci.dir)
		}
		if ci.ca, err = x509.ParseCertificate(block.Bytes); err != nil {
			return fmt.Errorf("private CA in %s: ca.pem: %w", ci.dir, err)
		}
		return nil
	case errKey != nil:
		return fmt.Errorf("private CA in %s: ca.key: %w", ci.dir, errKey)
	}
	pair, err := tls.LoadX509KeyPair(caPEM, caKeyPEM)
	if err != nil {
		return fmt.Errorf("private CA in %s: %w", ci.dir, err)
	}
	key, ok := pair.PrivateKey.(*ecdsa.PrivateKey)
	if !ok || pair.Leaf == nil || !pair.Leaf.IsCA {
		return fmt.Errorf("private CA in %s: ca.pem is not a CA certificate with an ECDSA key in ca.key", ci.dir)
	}
	ci.ca, ci.caKey = pair.Leaf, key
	return nil
}

func (ci *certIssuer) createCA(caPEM, caKeyPEM string) error {
	if err := os.MkdirAll(ci.dir, 0o700); err != nil {
		return err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	now := ci.now()
	tmpl := &x509.Certificate{
		SerialNumber: randSerial(), Subject: pkix.Name{CommonName: "Lockergate private CA"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.AddDate(10, 0, 0),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return err
	}
	// The key first: a CA certificate without its key cannot issue.
	if err := writeFileAtomic(caKeyPEM, pem.EncodeToMemory(mustECKey(key)), 0o600); err != nil {
		return err
	}
	if err := writeFileAtomic(caPEM, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		return err
	}
	ci.ca, _ = x509.ParseCertificate(der)
	ci.caKey = key
	ci.log.Info("TLS: created a private CA; lockers must trust it", "ca", caPEM)
	return nil
}

// due reports whether leaf is in its renewal window and a renewal would
// extend it: nothing issued from the CA can outlive the CA.
func (ci *certIssuer) due(leaf *x509.Certificate, now time.Time) bool {
	return now.Add(renewBefore).After(leaf.NotAfter) && leaf.NotAfter.Before(ci.ca.NotAfter)
}

// load returns the stored server certificate and, if it must be issued
// again, why. The certificate is nil when it is missing or not from this CA.
func (ci *certIssuer) load() (*tls.Certificate, string) {
	pair, err := tls.LoadX509KeyPair(filepath.Join(ci.dir, "server.pem"), filepath.Join(ci.dir, "server.key"))
	if err != nil {
		return nil, "none usable (" + err.Error() + ")"
	}
	leaf := pair.Leaf
	roots := x509.NewCertPool()
	roots.AddCert(ci.ca)
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, CurrentTime: ci.now()}); err != nil {
		return nil, "not valid from this CA (" + err.Error() + ")"
	}
	if ci.due(leaf, ci.now()) {
		return &pair, "expires " + leaf.NotAfter.UTC().Format(time.DateOnly)
	}
	for _, h := range ci.hosts {
		if leaf.VerifyHostname(h) != nil {
			return &pair, "does not name " + h
		}
	}
	return &pair, ""
}

// maxCertNames bounds the names a server certificate keeps across
// re-issues (a container's host name can change at every start).
const maxCertNames = 32

// issue makes and stores a new server certificate for ci.hosts and, up to
// maxCertNames, the names of old (lockers may have been told any of them).
func (ci *certIssuer) issue(why string, old *x509.Certificate) (*tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	now := ci.now()
	notAfter := now.Add(serverCertLifetime)
	if notAfter.After(ci.ca.NotAfter) {
		notAfter = ci.ca.NotAfter
	}
	tmpl := &x509.Certificate{
		SerialNumber: randSerial(), Subject: pkix.Name{CommonName: "lockergate"},
		NotBefore: now.Add(-time.Hour), NotAfter: notAfter,
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	names := slices.Clone(ci.hosts)
	if old != nil {
		for _, ip := range old.IPAddresses {
			names = append(names, ip.String())
		}
		names = append(names, old.DNSNames...)
	}
	seen := map[string]bool{}
	for _, h := range names {
		ip := net.ParseIP(h)
		if ip != nil {
			h = ip.String() // one spelling per address
		}
		if seen[h] || len(seen) == maxCertNames {
			continue
		}
		seen[h] = true
		if ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ci.ca, &key.PublicKey, ci.caKey)
	if err != nil {
		return nil, err
	}
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	keyPEM := pem.EncodeToMemory(mustECKey(key))
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, err
	}
	// The key before the certificate: a crash in between leaves a pair
	// that does not match, which the next start issues again.
	if err := writeFileAtomic(filepath.Join(ci.dir, "server.key"), keyPEM, 0o600); err != nil {
		return nil, err
	}
	if err := writeFileAtomic(filepath.Join(ci.dir, "server.pem"), certPEM, 0o600); err != nil {
		return nil, err
	}
	ci.log.Info("TLS: issued the server certificate from the private CA", "why", why, "hosts", ci.hosts, "expires", notAfter.UTC())
	return &pair, nil
}

func loadTLS(certFile, keyFile string) (*tls.Config, error) {
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("load TLS certificate %s / key %s: %w", certFile, keyFile, err)
	}
	return &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}, nil
}

func mustECKey(k *ecdsa.PrivateKey) *pem.Block {
	der, err := x509.MarshalECPrivateKey(k)
	if err != nil {
		panic(err) // a freshly generated P-256 key always marshals
	}
	return &pem.Block{Type: "EC PRIVATE KEY", Bytes: der}
}

func randSerial() *big.Int {
	n, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	return n
}

// checkKeys makes sure this instance's keys are the ones
// recorded in the database (postgres.CheckKey): the master key by an HMAC of a
// fixed text, the firmware key by its public half. The error says which
// file differs and what to do.
func checkKeys(ctx context.Context, db *postgres.DB, master []byte, masterPath string, fw ed25519.PrivateKey, fwPath string) error {
	mac := hmac.New(sha256.New, master)
	mac.Write([]byte("lockergate master key check v1"))
	for _, k := range []struct{ name, path, fingerprint, what string }{
		{"master", masterPath, hex.EncodeToString(mac.Sum(nil)), "lockers' credential keys and pickup codes derive from it"},
		{"firmware", fwPath, hex.EncodeToString(fw.Public().(ed25519.PublicKey)), "lockers check firmware signatures against it"},
	} {
		err := db.CheckKey(ctx, k.name, k.fingerprint)
		if errors.Is(err, postgres.ErrKeyMismatch) {
			return fmt.Errorf("%s is not the key recorded in this database (by the first instance that started on it since keys are checked; %s): every instance on one database must use the same one; copy it from the instance that set the database up (or give every instance the same --data-dir contents) and start again", k.path, k.what)
		}
		if err != nil {
			return fmt.Errorf("check %s against the database: %w", k.path, err)
		}
	}
	return nil
}
