// Package mqttbus is the fleet Bus over an external MQTT broker cluster
// (EMQX, HiveMQ, VerneMQ, mosquitto) through paho: device topics are
// consumed through shared subscriptions so several gateway instances split
// the load, and any instance publishes commands and retained state.
package mqttbus

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"strings"
	"sync"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/lockergate/lockergate/fleet"
)

// Options configure a Bus.
type Options struct {
	// URL of the broker: mqtt://host:port or mqtts://host:port.
	URL string
	// ClientID must be unique per gateway instance.
	ClientID string
	Username string
	Password string
	TLS      *tls.Config
	// Group names the shared subscription group (default "lockergate"):
	// instances in one group split device messages between them.
	Group  string
	Logger *slog.Logger
}

// Bus implements fleet.Bus with paho.
type Bus struct {
	o   Options
	c   paho.Client
	log *slog.Logger

	mu   sync.Mutex
	subs map[string]paho.MessageHandler // filter → handler, restored on reconnect
}

var _ fleet.Bus = (*Bus)(nil)

// Dial connects to the broker; paho reconnects by itself afterwards (one
// client per gateway instance, so its back-off without jitter is harmless).
func Dial(ctx context.Context, o Options) (*Bus, error) {
	if o.Group == "" {
		o.Group = "lockergate"
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	u, err := url.Parse(o.URL)
	if err != nil || u.Host == "" {
		return nil, fmt.Errorf("broker url %q: want mqtt://host:port or mqtts://host:port", o.URL)
	}
	server := "tcp://" + u.Host
	switch u.Scheme {
	case "mqtt", "tcp":
	case "mqtts", "ssl", "tls":
		server = "ssl://" + u.Host
	default:
		return nil, fmt.Errorf("broker url %q: scheme must be mqtt or mqtts", o.URL)
	}
	b := &Bus{o: o, log: o.Logger, subs: map[string]paho.MessageHandler{}}
	opts := paho.NewClientOptions().AddBroker(server).SetClientID(o.ClientID).
		SetUsername(o.Username).SetPassword(o.Password).SetCleanSession(true).
		SetKeepAlive(30 * time.Second).SetOrderMatters(false).SetAutoReconnect(true).
		SetMaxReconnectInterval(10 * time.Second).SetConnectRetry(false).
		SetOnConnectHandler(b.resubscribe).
		SetConnectionLostHandler(func(_ paho.Client, err error) {
			b.log.Warn("external broker connection lost; reconnecting", "err", err)
		})
	if o.TLS != nil {
		opts.SetTLSConfig(o.TLS)
	}
	b.c = paho.NewClient(opts)
	t := b.c.Connect()
	if err := wait(ctx, t, 10*time.Second); err != nil {
		return nil, fmt.Errorf("connect to external broker %s as %s: %w", u.Host, o.ClientID, err)
	}
	return b, nil
}

func wait(ctx context.Context, t paho.Token, d time.Duration) error {
	select {
	case <-t.Done():
		return t.Error()
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(d):
		return errors.New("timed out")
	}
}

// Publish implements fleet.Bus.
func (b *Bus) Publish(ctx context.Context, topic string, payload []byte, qos byte, retain bool) error {
	return wait(ctx, b.c.Publish(topic, qos, retain, payload), 10*time.Second)
}

// Subscribe implements fleet.Bus. Device-to-gateway filters are taken
// through the shared group.
func (b *Bus) Subscribe(filter string, h fleet.Handler) error {
	shared := filter
	if strings.HasPrefix(filter, "lockers/v1/") {
		shared = "$share/" + b.o.Group + "/" + filter
	}
	return b.subscribe(shared, b.handler(h))
}

// subscribe subscribes at QoS 1 and keeps the subscription across reconnects.
func (b *Bus) subscribe(filter string, h paho.MessageHandler) error {
	b.mu.Lock()
	b.subs[filter] = h
	b.mu.Unlock()
	return wait(context.Background(), b.c.Subscribe(filter, 1, h), 10*time.Second)
}

func (b *Bus) handler(h fleet.Handler) paho.MessageHandler {
	return func(_ paho.Client, m paho.Message) {
		h(fleet.Message{Topic: m.Topic(), Payload: m.Payload(), QoS: m.Qos(), Retain: m.Retained()})
	}
}

// resubscribe restores subscriptions after a reconnect (clean sessions).
func (b *Bus) resubscribe(c paho.Client) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for f, h := range b.subs {
		c.Subscribe(f, 1, h)
	}
}

// Close disconnects.
func (b *Bus) Close() { b.c.Disconnect(250) }
