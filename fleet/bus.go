package fleet

import (
	"context"
	"errors"
	"time"
)

// Message is one MQTT message as the fleet manager sees it.
type Message struct {
	Topic   string
	Payload []byte
	QoS     byte
	Retain  bool
	// ClientID is the publishing client's id when the bus knows it (the
	// embedded broker does; an external broker does not).
	ClientID string
	// Ack, when not nil, acknowledges the message to the bus. The fleet
	// manager calls it once the message's effect is stored, or when the
	// message is invalid for good; a message never acknowledged (the
	// gateway stopped or crashed first) is the bus's to deliver again.
	Ack func()
}

// Handler consumes messages from a subscription. Handlers are called on the
// bus's delivery goroutine (for the embedded broker: the publishing client's
// goroutine) and must not block; hand work off to a queue.
type Handler func(Message)

// Bus is how the fleet manager talks MQTT: the embedded broker in process, or
// an external broker cluster through shared subscriptions.
type Bus interface {
	// Publish sends a message to devices. Retained messages with an empty
	// payload clear the retained message of the topic.
	Publish(ctx context.Context, topic string, payload []byte, qos byte, retain bool) error
	// Subscribe delivers every message matching filter to h.
	Subscribe(filter string, h Handler) error
}

// ExpiringPublisher is a Bus that can publish a message that must not be
// delivered after a time (a command's expires_at): the embedded broker,
// whose kept sessions then drop it once expired instead of delivering it
// on the locker's next connection. An external broker through paho (MQTT
// 3.1.1) cannot: the locker refuses such a command itself (protocol v1).
type ExpiringPublisher interface {
	// PublishExpiring publishes a message (not retained) that expires at
	// expiresAt; one already expired is not published.
	PublishExpiring(ctx context.Context, topic string, payload []byte, qos byte, expiresAt time.Time) error
}

// RetainedReader is a Bus that can read a topic's retained message: an
// external broker's (mqttbus), where a locker's retained presence is the
// truth about its session while instances see its presence messages in
// no particular order.
type RetainedReader interface {
	// Retained returns topic's retained payload, nil when there is none.
	// An error wrapping ErrBusClosed: the bus is closing and can no
	// longer acknowledge what it delivered.
	Retained(ctx context.Context, topic string) ([]byte, error)
}

// ErrBusGone is what a Bus's Publish answers (wrapped) once the bus is
// closed for good: nothing published then reaches anyone, so the fleet
// manager does not retry it (a locker's retained state goes out again when
// it next connects).
var ErrBusGone = errors.New("the bus is closed for publishing")

// ErrBusClosed is a RetainedReader's answer once its bus can no longer
// acknowledge the messages it delivered, and the broker keeps them for this
// instance's next run (a persistent session): a message judged by the read
// is then neither applied nor acknowledged, and comes again. A bus whose
// session ends with it answers with another error, and the message is
// applied as when a read fails.
var ErrBusClosed = errors.New("the bus is closed")
