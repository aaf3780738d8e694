// Package protocol is the locker device contract, v1 (docs/protocol.md): topic
// builders and parsers, payload types, validation and the topic access rules.
//
// It imports only the standard library so the broker, the fleet manager and the
// device simulator share one definition of the wire.
package protocol
