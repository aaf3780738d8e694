package protocol_test

import (
	"strings"
	"testing"

	"github.com/lockergate/lockergate/protocol"
)

// channelSpec is the topics table of protocol-v1.md.
var channelSpec = []struct {
	c          protocol.Channel
	suffix     string
	fromDevice bool
}{
	{protocol.ChanPresence, "presence", true},
	{protocol.ChanHealth, "health", true},
	{protocol.ChanEvents, "events", true},
	{protocol.ChanCmd, "cmd", false},
	{protocol.ChanCmdResult, "cmd/result", true},
	{protocol.ChanCreds, "creds", false},
	{protocol.ChanCredsAck, "creds/ack", true},
	{protocol.ChanConfig, "config", false},
	{protocol.ChanFwJob, "fw/job", false},
	{protocol.ChanFwStatus, "fw/status", true},
}

func TestChannels(t *testing.T) {
	if got, want := len(protocol.Channels), len(channelSpec); got != want {
		t.Fatalf("Channels: got %d, want %d", got, want)
	}
	for i, tt := range channelSpec {
		if protocol.Channels[i] != tt.c {
			t.Errorf("Channels[%d]: got %s, want %s", i, protocol.Channels[i], tt.c)
		}
		if !tt.c.Valid() {
			t.Errorf("%s: not Valid", tt.c)
		}
		if got := tt.c.DeviceToGateway(); got != tt.fromDevice {
			t.Errorf("%s.DeviceToGateway: got %v, want %v", tt.c, got, tt.fromDevice)
		}
	}
	for _, c := range []protocol.Channel{"", "cmd/", "Cmd", "fw", "result", "creds/ack/x", "#", "+"} {
		if c.Valid() {
			t.Errorf("%q: Valid, want not", c)
		}
	}
}

func TestTopic_RoundTrip(t *testing.T) {
	for _, id := range []string{"lk-1", "lk-01J3Z9.a_b:c", strings.Repeat("a", protocol.MaxIDLen)} {
		for _, tt := range channelSpec {
			topic := protocol.Topic(id, tt.c)
			if want := "lockers/v1/" + id + "/" + tt.suffix; topic != want {
				t.Fatalf("Topic: got %s, want %s", topic, want)
			}
			gotID, gotC, ok := protocol.ParseTopic(topic)
			if !ok || gotID != id || gotC != tt.c {
				t.Fatalf("ParseTopic(%s): got %q, %q, %v", topic, gotID, gotC, ok)
			}
		}
	}
}

func TestParseTopic_Rejects(t *testing.T) {
	for _, topic := range []string{
		"",
		"lockers/v1/",
		"lockers/v1/lk-1",
		"lockers/v1/lk-1/",
		"lockers/v2/lk-1/health",  // wrong root
		"Lockers/v1/lk-1/health",  // topics are case-sensitive
		"/lockers/v1/lk-1/health", // leading slash
		"lockers/v1//health",      // empty id
		"lockers//lk-1/health",
		"lockers/v1/+/health", // wildcard id
		"lockers/v1/#",
		"lockers/v1/lk+1/health",
		"lockers/v1/lk#1/health",
		"lockers/v1/$lk/health",
		"lockers/v1/lk$1/health",
		"lockers/v1/lk 1/health",
		"lockers/v1/lk-é/health",
		"lockers/v1/" + strings.Repeat("a", protocol.MaxIDLen+1) + "/health", // 65 bytes
		"lockers/v1/lk-1/unknown", // unknown channel
		"lockers/v1/lk-1/Health",
		"lockers/v1/lk-1/fw",
		"lockers/v1/lk-1/result",
		"lockers/v1/lk-1/+",
		"lockers/v1/lk-1/#",
		"lockers/v1/lk-1/cmd/+",
		"lockers/v1/lk-1/health/extra", // extra levels
		"lockers/v1/lk-1/cmd/result/x",
		"lockers/v1/lk-1/health/",
		"lockers/v1/lk-1//health",
		"lockers/v1/a/b/health",
		"$SYS/broker/clients",
		"$share/g/lockers/v1/lk-1/health",
		"provision/v1/SN-1/request",
	} {
		if id, c, ok := protocol.ParseTopic(topic); ok || id != "" || c != "" {
			t.Errorf("ParseTopic(%q): got %q, %q, %v; want rejected", topic, id, c, ok)
		}
	}
}

func TestValidID(t *testing.T) {
	for _, s := range []string{"a", "lk-1", "A.b_c:d-9", strings.Repeat("z", 64)} {
		if !protocol.ValidID(s) || !protocol.ValidSerial(s) {
			t.Errorf("%q: not valid", s)
		}
	}
	for _, s := range []string{"", strings.Repeat("z", 65), "a/b", "a+b", "a#b", "$a", "a b", "a\x00", "é", "a*", "a,b", "a\"b"} {
		if protocol.ValidID(s) || protocol.ValidSerial(s) {
			t.Errorf("%q: valid", s)
		}
	}
}

func TestProvisionTopics(t *testing.T) {
	if got, want := protocol.ProvisionRequestTopic("SN-00042"), "provision/v1/SN-00042/request"; got != want {
		t.Fatalf("got %s, want %s", got, want)
	}
	if got, want := protocol.ProvisionResponseTopic("SN-00042"), "provision/v1/SN-00042/response"; got != want {
		t.Fatalf("got %s, want %s", got, want)
	}
	t.Run("OK", func(t *testing.T) {
		serial, ok := protocol.ParseProvisionRequestTopic("provision/v1/SN-00042/request")
		if !ok || serial != "SN-00042" {
			t.Fatalf("got %q, %v", serial, ok)
		}
	})
	t.Run("Rejected", func(t *testing.T) {
		for _, topic := range []string{
			"", "provision/v1//request", "provision/v1/SN-1/response", "provision/v2/SN-1/request",
			"provision/v1/+/request", "provision/v1/#", "provision/v1/a/b/request", "provision/v1/SN-1/request/x",
			"provision/v1/SN 1/request", "lockers/v1/SN-1/request",
			"provision/v1/" + strings.Repeat("s", 65) + "/request",
		} {
			if serial, ok := protocol.ParseProvisionRequestTopic(topic); ok {
				t.Errorf("%q: got %q, want rejected", topic, serial)
			}
		}
	})
	if protocol.ProvisionClientPrefix != "prov-" || protocol.ProvisionUsername != "claim" {
		t.Fatalf("got %q, %q", protocol.ProvisionClientPrefix, protocol.ProvisionUsername)
	}
}

func TestDeviceACL(t *testing.T) {
	const me, other = "lk-1", "lk-2"
	type rule struct {
		topic    string
		pub, sub bool
	}
	rules := []rule{
		// Own topics: published in their direction only, subscribed in
		// both (protocol v1: "its own topics").
		{"lockers/v1/lk-1/presence", true, true},
		{"lockers/v1/lk-1/health", true, true},
		{"lockers/v1/lk-1/events", true, true},
		{"lockers/v1/lk-1/cmd/result", true, true},
		{"lockers/v1/lk-1/creds/ack", true, true},
		{"lockers/v1/lk-1/fw/status", true, true},
		{"lockers/v1/lk-1/cmd", false, true},
		{"lockers/v1/lk-1/creds", false, true},
		{"lockers/v1/lk-1/config", false, true},
		{"lockers/v1/lk-1/fw/job", false, true},
		// Own unknown channels and extra levels.
		{"lockers/v1/lk-1/debug", false, false},
		{"lockers/v1/lk-1/cmd/x", false, false},
		// Wildcards under the own root that match own topics; none that
		// match nothing, are malformed, or leave the own root.
		{"lockers/v1/lk-1/#", false, true},
		{"lockers/v1/lk-1/+", false, true},
		{"lockers/v1/lk-1/fw/+", false, true},
		{"lockers/v1/lk-1/+/result", false, true},
		{"lockers/v1/lk-1/+/+", false, true},
		{"lockers/v1/lk-1/+/+/+", false, false},
		{"lockers/v1/lk-1/debug/#", false, false},
		{"lockers/v1/lk-1/#/cmd", false, false},
		{"lockers/v1/lk-1/fw+", false, false},
		{"lockers/v1/lk-1/c#", false, false},
		{"lockers/v1/lk-1//#", false, false},
		{"lockers/v1/lk-1+/#", false, false},
		{"lockers/v1/lk-1#", false, false},
		{"lockers/v1/+/cmd", false, false},
		{"lockers/v1/+/health", false, false},
		{"lockers/v1/#", false, false},
		{"lockers/#", false, false},
		{"#", false, false},
		{"+", false, false},
		{"+/v1/lk-1/cmd", false, false},
		{"$SYS/#", false, false},
		{"$SYS/broker/clients/connected", false, false},
		{"$share/g/lockers/v1/lk-1/cmd", false, false},
		// Another device's topics, both directions.
		{"lockers/v1/lk-2/presence", false, false},
		{"lockers/v1/lk-2/health", false, false},
		{"lockers/v1/lk-2/events", false, false},
		{"lockers/v1/lk-2/cmd", false, false},
		{"lockers/v1/lk-2/cmd/result", false, false},
		{"lockers/v1/lk-2/creds", false, false},
		{"lockers/v1/lk-2/creds/ack", false, false},
		{"lockers/v1/lk-2/config", false, false},
		{"lockers/v1/lk-2/fw/job", false, false},
		{"lockers/v1/lk-2/fw/status", false, false},
		{"lockers/v1/lk-10/health", false, false}, // prefix of own id is not own
		{"lockers/v1/lk/health", false, false},
		// Provisioning topics, even of a serial equal to the id.
		{"provision/v1/lk-1/request", false, false},
		{"provision/v1/lk-1/response", false, false},
		{"provision/v1/+/request", false, false},
		// Elsewhere.
		{"", false, false},
		{"lockers/v2/lk-1/health", false, false},
		{"lockers/v1/lk-1", false, false},
	}
	for _, r := range rules {
		if got := protocol.DeviceMayPublish(me, r.topic); got != r.pub {
			t.Errorf("DeviceMayPublish(%s, %s): got %v, want %v", me, r.topic, got, r.pub)
		}
		if got := protocol.DeviceMaySubscribe(me, r.topic); got != r.sub {
			t.Errorf("DeviceMaySubscribe(%s, %s): got %v, want %v", me, r.topic, got, r.sub)
		}
		// The other device sees none of lk-1's topics.
		if strings.HasPrefix(r.topic, "lockers/v1/lk-1/") {
			if protocol.DeviceMayPublish(other, r.topic) || protocol.DeviceMaySubscribe(other, r.topic) {
				t.Errorf("%s may use %s", other, r.topic)
			}
		}
	}
	// No session identity may be empty or a wildcard.
	for _, id := range []string{"", "+", "#"} {
		for _, topic := range []string{"lockers/v1/" + id + "/health", "lockers/v1/" + id + "/cmd"} {
			if protocol.DeviceMayPublish(id, topic) || protocol.DeviceMaySubscribe(id, topic) {
				t.Errorf("id %q may use %s", id, topic)
			}
		}
	}
}

func TestProvisionerACL(t *testing.T) {
	const serial = "SN-00042"
	for _, r := range []struct {
		topic    string
		pub, sub bool
	}{
		{"provision/v1/SN-00042/request", true, false},
		{"provision/v1/SN-00042/response", false, true},
		{"provision/v1/SN-00043/request", false, false},
		{"provision/v1/SN-00043/response", false, false},
		{"provision/v1/SN-00042/#", false, false},
		{"provision/v1/SN-00042/+", false, false},
		{"provision/v1/+/response", false, false},
		{"provision/v1/+/request", false, false},
		{"provision/#", false, false},
		{"#", false, false},
		{"$SYS/#", false, false},
		{"lockers/v1/SN-00042/presence", false, false},
		{"lockers/v1/SN-00042/cmd", false, false},
		{"lockers/v1/+/cmd", false, false},
		{"provision/v1/SN-00042/request/x", false, false},
		{"", false, false},
	} {
		if got := protocol.ProvisionerMayPublish(serial, r.topic); got != r.pub {
			t.Errorf("ProvisionerMayPublish(%s, %s): got %v, want %v", serial, r.topic, got, r.pub)
		}
		if got := protocol.ProvisionerMaySubscribe(serial, r.topic); got != r.sub {
			t.Errorf("ProvisionerMaySubscribe(%s, %s): got %v, want %v", serial, r.topic, got, r.sub)
		}
	}
	// A serial that is not one (from a hostile client id) gets nothing, even
	// where the topic string would line up.
	for _, bad := range []string{"", "+", "#", "a/b", "SN 1", strings.Repeat("s", 65)} {
		if protocol.ProvisionerMayPublish(bad, protocol.ProvisionRequestTopic(bad)) ||
			protocol.ProvisionerMaySubscribe(bad, protocol.ProvisionResponseTopic(bad)) {
			t.Errorf("serial %q: allowed", bad)
		}
	}
}

func TestTopicMatches(t *testing.T) {
	for _, c := range []struct {
		filter, topic string
		want          bool
	}{
		{"a/b", "a/b", true},
		{"a/b", "a/c", false},
		{"a/+", "a/b", true},
		{"a/+", "a/b/c", false},
		{"a/+", "a/", true},
		{"a/+/c", "a/b/c", true},
		{"a/#", "a", true},
		{"a/#", "a/b/c", true},
		{"#", "a/b", true},
		{"a/b/c", "a/b", false},
		{"a/b", "a", false},
		{"a", "a/b", false},
		{"+", "a/b", false},
		{"lockers/v1/+/events", "lockers/v1/L1/events", true},
		{"lockers/v1/+/events", "lockers/v1/L1/health", false},
		{"lockers/v1/+/events", "lockers/v1/L1/events/x", false},
		{"lockers/v1/+/fw/status", "lockers/v1/L1/fw/status", true},
		{"lockers/v1/#", "lockers/v1", true},
		{"$CONTROL/dynamic-security/v1/response", "$CONTROL/dynamic-security/v1/response", true},
	} {
		if got := protocol.TopicMatches(c.filter, c.topic); got != c.want {
			t.Errorf("TopicMatches(%q, %q) = %v, want %v", c.filter, c.topic, got, c.want)
		}
	}
}
