package gateway

import (
	"net"

	"github.com/lockergate/lockergate/internal/sdlisten"
)

// TakeSockets puts the listening sockets a service manager passed to this
// process (systemd socket activation; sockets named mqtt, mqtts and http)
// in o, in the place of the listen addresses, and logs them to o.Logger.
// Held by the service manager, the sockets outlive the process: lockers
// that reconnect while the gateway restarts wait in their accept queue for
// the next process rather than being refused (docs/operations.md). Call it
// once, before New.
func TakeSockets(o *Options) error {
	lns, err := sdlisten.Listeners()
	if err != nil || lns == nil {
		return err
	}
	got, err := sdlisten.Take(lns, "mqtt", "mqtts", "http")
	if err != nil {
		return err
	}
	o.MQTTListener, o.MQTTSListener, o.HTTPListener = got[0], got[1], got[2]
	addr := func(ln net.Listener) string {
		if ln == nil {
			return ""
		}
		return ln.Addr().String()
	}
	if o.Logger != nil {
		o.Logger.Info("serving the sockets passed by the service manager", "mqtt", addr(got[0]), "mqtts", addr(got[1]), "http", addr(got[2]))
	}
	return nil
}
