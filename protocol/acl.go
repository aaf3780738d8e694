package protocol

import "strings"

// The access rules for device and provisioning sessions. They are pure
// functions of the session's identity and the topic so the broker can check
// every publish and subscribe without touching the database.

// DeviceMayPublish reports whether device id may publish to topic.
func DeviceMayPublish(id, topic string) bool {
	tid, c, ok := ParseTopic(topic)
	return ok && tid == id && c.DeviceToGateway()
}

// DeviceMaySubscribe reports whether device id may subscribe to filter:
// one of its own topics (either direction, as protocol v1 puts it: "its own
// topics"), or a wildcard filter under its own root, lockers/v1/{id}/, that
// matches at least one of them. No filter can reach another device's
// topics: the id level is always literal.
func DeviceMaySubscribe(id, filter string) bool {
	if !ValidID(id) {
		return false
	}
	if !strings.ContainsAny(filter, "+#") {
		tid, _, ok := ParseTopic(filter)
		return ok && tid == id
	}
	rest, ok := strings.CutPrefix(filter, Root+id+"/")
	if !ok || !validFilter(rest) {
		return false
	}
	for _, c := range Channels {
		if TopicMatches(filter, Topic(id, c)) {
			return true
		}
	}
	return false
}

// SubscribesUplink reports whether a device's filter (one DeviceMaySubscribe
// allows) matches any of its device-to-gateway topics: the device then
// gets its own messages there back, as MQTT delivers them to every
// matching subscription.
func SubscribesUplink(id, filter string) bool {
	for _, c := range Channels {
		if c.DeviceToGateway() && TopicMatches(filter, Topic(id, c)) {
			return true
		}
	}
	return false
}

// validFilter reports whether f is a well-formed MQTT topic filter: no
// empty level, "#" only as a whole last level, "+" only as a whole level.
func validFilter(f string) bool {
	for {
		level, rest, more := strings.Cut(f, "/")
		switch {
		case level == "":
			return false
		case level == "#":
			return !more
		case level != "+" && strings.ContainsAny(level, "+#"):
			return false
		}
		if !more {
			return true
		}
		f = rest
	}
}

// ProvisionerMayPublish reports whether the claim session of serial may publish to topic.
func ProvisionerMayPublish(serial, topic string) bool {
	return ValidSerial(serial) && topic == ProvisionRequestTopic(serial)
}

// ProvisionerMaySubscribe reports whether the claim session of serial may subscribe to filter.
func ProvisionerMaySubscribe(serial, filter string) bool {
	return ValidSerial(serial) && filter == ProvisionResponseTopic(serial)
}
