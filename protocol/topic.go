package protocol

import (
	"strings"
)

// Root is the topic root of protocol v1 device topics.
const Root = "lockers/v1/"

// ProvisionRoot is the topic root of protocol v1 provisioning topics.
const ProvisionRoot = "provision/v1/"

// Channel names one device topic below lockers/v1/{id}/.
type Channel string

// The device channels of protocol v1.
const (
	ChanPresence  Channel = "presence"
	ChanHealth    Channel = "health"
	ChanEvents    Channel = "events"
	ChanCmd       Channel = "cmd"
	ChanCmdResult Channel = "cmd/result"
	ChanCreds     Channel = "creds"
	ChanCredsAck  Channel = "creds/ack"
	ChanConfig    Channel = "config"
	ChanFwJob     Channel = "fw/job"
	ChanFwStatus  Channel = "fw/status"
)

// Channels lists every device channel.
var Channels = []Channel{ChanPresence, ChanHealth, ChanEvents, ChanCmd, ChanCmdResult,
	ChanCreds, ChanCredsAck, ChanConfig, ChanFwJob, ChanFwStatus}

// DeviceToGateway reports whether devices publish on c (and the gateway consumes it).
func (c Channel) DeviceToGateway() bool {
	switch c {
	case ChanPresence, ChanHealth, ChanEvents, ChanCmdResult, ChanCredsAck, ChanFwStatus:
		return true
	}
	return false
}

// Valid reports whether c is a channel of protocol v1.
func (c Channel) Valid() bool {
	for _, k := range Channels {
		if k == c {
			return true
		}
	}
	return false
}

// Topic returns the topic of channel c for device id.
func Topic(id string, c Channel) string { return Root + id + "/" + string(c) }

// ParseTopic splits a device topic into device id and channel. ok is false for
// any topic that is not exactly lockers/v1/{id}/{channel} with a valid id and
// a known channel.
func ParseTopic(topic string) (id string, c Channel, ok bool) {
	rest, found := strings.CutPrefix(topic, Root)
	if !found {
		return "", "", false
	}
	i := strings.IndexByte(rest, '/')
	if i <= 0 {
		return "", "", false
	}
	id, c = rest[:i], Channel(rest[i+1:])
	if !ValidID(id) || !c.Valid() {
		return "", "", false
	}
	return id, c, true
}

// ProvisionRequestTopic is where a new locker with serial publishes its request.
func ProvisionRequestTopic(serial string) string {
	return ProvisionRoot + serial + "/request"
}

// ProvisionResponseTopic is where the gateway answers the locker with serial.
func ProvisionResponseTopic(serial string) string {
	return ProvisionRoot + serial + "/response"
}

// ParseProvisionRequestTopic returns the serial of a provisioning request topic.
func ParseProvisionRequestTopic(topic string) (serial string, ok bool) {
	rest, found := strings.CutPrefix(topic, ProvisionRoot)
	if !found {
		return "", false
	}
	serial, found = strings.CutSuffix(rest, "/request")
	if !found || !ValidSerial(serial) {
		return "", false
	}
	return serial, true
}

// ProvisionClientPrefix prefixes the MQTT client id of a locker that provisions.
const ProvisionClientPrefix = "prov-"

// ProvisionUsername is the MQTT username a locker uses with a claim token.
const ProvisionUsername = "claim"

// MaxIDLen bounds gateway-minted ids and device ids (bytes).
const MaxIDLen = 64

// ValidID reports whether s can be a device, command, credential or event id:
// 1-64 bytes of [A-Za-z0-9._:-]. MQTT wildcards, separators and '$' never are.
func ValidID(s string) bool { return validToken(s, MaxIDLen) }

// ValidSerial reports whether s can be a locker serial number (same alphabet as ids).
func ValidSerial(s string) bool { return validToken(s, MaxIDLen) }

func validToken(s string, max int) bool {
	if len(s) == 0 || len(s) > max {
		return false
	}
	for i := 0; i < len(s); i++ {
		b := s[i]
		switch {
		case b >= 'a' && b <= 'z', b >= 'A' && b <= 'Z', b >= '0' && b <= '9':
		case b == '-' || b == '_' || b == '.' || b == ':':
		default:
			return false
		}
	}
	return true
}

// TopicMatches reports whether topic matches the MQTT topic filter (+ and #;
// "a/#" also matches "a"). It does not treat $ topics or shared
// subscriptions specially.
func TopicMatches(filter, topic string) bool {
	for {
		f, frest, fmore := strings.Cut(filter, "/")
		t, trest, tmore := strings.Cut(topic, "/")
		switch {
		case f == "#":
			return true
		case f != "+" && f != t:
			return false
		case !fmore && !tmore:
			return true
		case !fmore:
			return false
		case !tmore:
			return frest == "#"
		}
		filter, topic = frest, trest
	}
}
