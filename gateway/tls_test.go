package gateway_test

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/lockergate/lockergate/gateway"
	"github.com/lockergate/lockergate/protocol"
)

// TestTLSListener: with no certificate configured the gateway creates a
// private CA; a locker that trusts it provisions and connects over TLS, with
// plain TCP turned off.
func TestTLSListener(t *testing.T) {
	dataDir := t.TempDir()
	tg := MustStart(t, func(o *gateway.Options) {
		o.DataDir = dataDir
		o.MQTTAddr = ""
		o.MQTTSAddr = "127.0.0.1:0"
	})
	if tg.MQTTAddr() != "" {
		t.Fatalf("plain MQTT listening on %s though turned off", tg.MQTTAddr())
	}
	caPEM, err := os.ReadFile(filepath.Join(dataDir, "tls", "ca.pem"))
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		t.Fatal("ca.pem holds no certificate")
	}
	claim := tg.MustSiteAndClaim(t, "s1", 1)
	connect := func(id, user, pass string, roots *x509.CertPool) (paho.Client, error) {
		o := paho.NewClientOptions().AddBroker("ssl://" + tg.MQTTSAddr()).SetClientID(id).SetUsername(user).SetPassword(pass).
			SetTLSConfig(&tls.Config{RootCAs: roots, ServerName: "localhost", MinVersion: tls.VersionTLS12}).
			SetAutoReconnect(false).SetConnectTimeout(5 * time.Second)
		c := paho.NewClient(o)
		tk := c.Connect()
		tk.WaitTimeout(10 * time.Second)
		return c, tk.Error()
	}
	if _, err := connect("prov-SN-T", "claim", claim, x509.NewCertPool()); err == nil {
		t.Fatal("a client that does not trust the private CA connected")
	}
	c, err := connect("prov-SN-T", "claim", claim, pool)
	if err != nil {
		t.Fatalf("provisioning over TLS: %v", err)
	}
	got := make(chan []byte, 1)
	c.Subscribe(protocol.ProvisionResponseTopic("SN-T"), 1, func(_ paho.Client, m paho.Message) { got <- m.Payload() }).WaitTimeout(5 * time.Second)
	req := protocol.ProvisionRequest{Serial: "SN-T", Model: "LX", FW: "1.0", Compartments: []protocol.CompartmentSpec{{N: 1, Size: "S", Zone: "ambient"}}}
	c.Publish(protocol.ProvisionRequestTopic("SN-T"), 1, false, protocol.Encode(req)).WaitTimeout(5 * time.Second)
	var resp protocol.ProvisionResponse
	select {
	case b := <-got:
		if err := json.Unmarshal(b, &resp); err != nil || resp.Status != "ok" {
			t.Fatalf("answer %s", b)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no provisioning answer over TLS")
	}
	c.Disconnect(50)
	if resp.Broker != "mqtts://"+tg.MQTTSAddr() {
		t.Errorf("broker handed out %q, want mqtts://%s", resp.Broker, tg.MQTTSAddr())
	}
	dev, err := connect(resp.DeviceID, resp.DeviceID, resp.Password, pool)
	if err != nil {
		t.Fatalf("device over TLS: %v", err)
	}
	dev.Disconnect(50)
}
