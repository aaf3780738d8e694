package gateway

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
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

// selfSignedTLS returns a server certificate issued by a private CA kept in
// dir (ca.pem, ca.key, server.pem, server.key), creating them on first use.
// Lockers pin ca.pem.
func selfSignedTLS(dir string, hosts []string) (*tls.Config, error) {
	caPEM, caKeyPEM := filepath.Join(dir, "ca.pem"), filepath.Join(dir, "ca.key")
	srvPEM, srvKeyPEM := filepath.Join(dir, "server.pem"), filepath.Join(dir, "server.key")
	if _, err := os.Stat(srvPEM); errors.Is(err, fs.ErrNotExist) {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, err
		}
		caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return nil, err
		}
		now := time.Now()
		caTmpl := &x509.Certificate{
			SerialNumber: randSerial(), Subject: pkix.Name{CommonName: "Lockergate private CA"},
			NotBefore: now.Add(-time.Hour), NotAfter: now.AddDate(10, 0, 0),
			IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		}
		caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
		if err != nil {
			return nil, err
		}
		ca, _ := x509.ParseCertificate(caDER)
		srvKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return nil, err
		}
		srvTmpl := &x509.Certificate{
			SerialNumber: randSerial(), Subject: pkix.Name{CommonName: "lockergate"},
			NotBefore: now.Add(-time.Hour), NotAfter: now.AddDate(2, 0, 0),
			KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		}
		for _, h := range hosts {
			if ip := net.ParseIP(h); ip != nil {
				srvTmpl.IPAddresses = append(srvTmpl.IPAddresses, ip)
			} else {
				srvTmpl.DNSNames = append(srvTmpl.DNSNames, h)
			}
		}
		srvDER, err := x509.CreateCertificate(rand.Reader, srvTmpl, ca, &srvKey.PublicKey, caKey)
		if err != nil {
			return nil, err
		}
		for path, block := range map[string]*pem.Block{
			caPEM:     {Type: "CERTIFICATE", Bytes: caDER},
			caKeyPEM:  mustECKey(caKey),
			srvPEM:    {Type: "CERTIFICATE", Bytes: srvDER},
			srvKeyPEM: mustECKey(srvKey),
		} {
			if err := writeFileAtomic(path, pem.EncodeToMemory(block), 0o600); err != nil {
				return nil, err
			}
		}
	}
	return loadTLS(srvPEM, srvKeyPEM)
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
