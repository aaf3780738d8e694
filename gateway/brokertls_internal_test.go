package gateway

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestBrokerTLS: --broker-ca-file is checked before anything dials: it
// needs an mqtts:// broker, a file that exists and a PEM certificate in it.
func TestBrokerTLS(t *testing.T) {
	dir := t.TempDir()
	junk := filepath.Join(dir, "junk.pem")
	if err := os.WriteFile(junk, []byte("not a certificate"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		url, ca, want string
	}{
		{"mqtt://broker:1883", junk, "is for an mqtts:// --broker-url"},
		{"mqtts://broker:8883", filepath.Join(dir, "absent.pem"), "no such file"},
		{"mqtts://broker:8883", junk, "no PEM certificate"},
	} {
		if _, err := brokerTLS(Options{ExternalBroker: c.url, ExternalCAFile: c.ca}); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s with %s: %v, want an error saying %q", c.url, filepath.Base(c.ca), err, c.want)
		}
	}
	if conf, err := brokerTLS(Options{ExternalBroker: "mqtts://broker:8883"}); conf != nil || err != nil {
		t.Errorf("no CA file: %v %v, want the system's (nil)", conf, err)
	}
}
