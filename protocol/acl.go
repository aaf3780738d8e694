package protocol

// The access rules for device and provisioning sessions. They are pure
// functions of the session's identity and the topic so the broker can check
// every publish and subscribe without touching the database.

// DeviceMayPublish reports whether device id may publish to topic.
func DeviceMayPublish(id, topic string) bool {
	tid, c, ok := ParseTopic(topic)
	return ok && tid == id && c.DeviceToGateway()
}

// DeviceMaySubscribe reports whether device id may subscribe to filter. Only
// its own gateway-to-device topics, literally (no wildcards), are allowed.
func DeviceMaySubscribe(id, filter string) bool {
	tid, c, ok := ParseTopic(filter)
	return ok && tid == id && !c.DeviceToGateway()
}

// ProvisionerMayPublish reports whether the claim session of serial may publish to topic.
func ProvisionerMayPublish(serial, topic string) bool {
	return ValidSerial(serial) && topic == ProvisionRequestTopic(serial)
}

// ProvisionerMaySubscribe reports whether the claim session of serial may subscribe to filter.
func ProvisionerMaySubscribe(serial, filter string) bool {
	return ValidSerial(serial) && filter == ProvisionResponseTopic(serial)
}
