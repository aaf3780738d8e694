package mqttbus

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/lockergate/lockergate/protocol"
)

// DynSec manages device identities in mosquitto's dynamic security plugin:
// one client and one role per locker, whose ACL is exactly protocol v1's
// topic rules for that locker. The gateway's own broker user must hold the
// plugin's admin role.
type DynSec struct {
	b       *Bus
	prefix  string // correlation ids of this instance (all see all responses)
	seq     atomic.Int64
	mu      sync.Mutex
	pending map[string]chan dynsecResponse
}

const (
	dynsecTopic     = "$CONTROL/dynamic-security/v1"
	dynsecRespTopic = dynsecTopic + "/response"
	// GatewayRole lets the gateway publish to lockers' gateway-to-device topics.
	GatewayRole = "lockergate-gateway"
)

type dynsecResponse struct {
	Command         string          `json:"command"`
	Error           string          `json:"error"`
	CorrelationData string          `json:"correlationData"`
	Data            json.RawMessage `json:"data"`
}

// NewDynSec subscribes to the plugin's responses.
func NewDynSec(b *Bus) (*DynSec, error) {
	d := &DynSec{b: b, prefix: b.o.ClientID + "/", pending: map[string]chan dynsecResponse{}}
	err := b.subscribe(dynsecRespTopic, func(m paho.Message, ack func()) {
		if ack != nil {
			defer ack() // nothing to store: a lost response times its caller out
		}
		var r struct {
			Responses []dynsecResponse `json:"responses"`
		}
		if json.Unmarshal(m.Payload(), &r) != nil {
			return
		}
		d.mu.Lock()
		defer d.mu.Unlock()
		for _, x := range r.Responses {
			if ch, ok := d.pending[x.CorrelationData]; ok {
				ch <- x
				delete(d.pending, x.CorrelationData)
			}
		}
	})
	if err != nil {
		return nil, fmt.Errorf("subscribe to dynamic security responses: %w", err)
	}
	return d, nil
}

// do runs one dynsec command; errors listed in ok are not errors (e.g.
// "already exists" when the command is idempotent for us).
func (d *DynSec) do(ctx context.Context, cmd map[string]any, ok ...string) error {
	_, err := d.query(ctx, cmd, ok...)
	return err
}

// query runs one dynsec command and returns its data.
func (d *DynSec) query(ctx context.Context, cmd map[string]any, ok ...string) (json.RawMessage, error) {
	id := d.prefix + fmt.Sprint(d.seq.Add(1))
	cmd["correlationData"] = id
	ch := make(chan dynsecResponse, 1)
	d.mu.Lock()
	d.pending[id] = ch
	d.mu.Unlock()
	defer func() {
		d.mu.Lock()
		delete(d.pending, id)
		d.mu.Unlock()
	}()
	body, _ := json.Marshal(map[string]any{"commands": []any{cmd}})
	if err := d.b.Publish(ctx, dynsecTopic, body, 1, false); err != nil {
		return nil, err
	}
	select {
	case r := <-ch:
		if r.Error == "" {
			return r.Data, nil
		}
		for _, o := range ok {
			if strings.Contains(r.Error, o) {
				return r.Data, nil
			}
		}
		return nil, fmt.Errorf("dynsec %s: %s", cmd["command"], r.Error)
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-time.After(10 * time.Second):
		return nil, fmt.Errorf("dynsec %s: no answer from the broker (is the dynamic security plugin loaded?)", cmd["command"])
	}
}

// hasRole reports whether username holds rolename.
func (d *DynSec) hasRole(ctx context.Context, username, rolename string) (bool, error) {
	data, err := d.query(ctx, map[string]any{"command": "getClient", "username": username})
	if err != nil {
		return false, err
	}
	var r struct {
		Client struct {
			Roles []struct {
				Rolename string `json:"rolename"`
			} `json:"roles"`
		} `json:"client"`
	}
	if err := json.Unmarshal(data, &r); err != nil {
		return false, err
	}
	for _, x := range r.Client.Roles {
		if x.Rolename == rolename {
			return true, nil
		}
	}
	return false, nil
}

// SetupGateway grants the gateway's own user the right to publish commands
// and retained state to lockers, and a locker's retained presence (the
// will's {"online":false}, for a session it ended itself: the broker
// publishes no will for a client it disconnects).
func (d *DynSec) SetupGateway(ctx context.Context, username string) error {
	var acls []map[string]any
	for _, c := range protocol.Channels {
		if !c.DeviceToGateway() {
			acls = append(acls, map[string]any{"acltype": "publishClientSend", "topic": "lockers/v1/+/" + string(c), "allow": true})
		}
	}
	if err := d.do(ctx, map[string]any{"command": "createRole", "rolename": GatewayRole, "acls": acls}, "already exists"); err != nil {
		return err
	}
	// Added on its own: a role created by an older version lacks it.
	if err := d.do(ctx, map[string]any{"command": "addRoleACL", "rolename": GatewayRole, "acltype": "publishClientSend",
		"topic": "lockers/v1/+/" + string(protocol.ChanPresence), "allow": true}, "already exists"); err != nil {
		return err
	}
	if ok, err := d.hasRole(ctx, username, GatewayRole); err != nil || ok {
		return err
	}
	// Mosquitto disconnects every session of a user whose roles change, so
	// this answer may never arrive: paho reconnects, and the role is checked.
	actx, cancel := context.WithTimeout(ctx, 2*time.Second)
	d.do(actx, map[string]any{"command": "addClientRole", "username": username, "rolename": GatewayRole}, "already")
	cancel()
	deadline := time.Now().Add(15 * time.Second)
	for {
		qctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		ok, err := d.hasRole(qctx, username, GatewayRole)
		cancel()
		if ok {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("grant role %s to %s: %v", GatewayRole, username, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// PutDevice creates (or re-keys) a locker's broker identity: client id and
// username are its id, and its role allows exactly its own topics: it
// publishes its device-to-gateway ones and subscribes to any filter under
// lockers/v1/{id}/ (protocol.DeviceMaySubscribe; mosquitto also lets
// through a filter there that matches none of them, which is harmless).
func (d *DynSec) PutDevice(ctx context.Context, id, password string) error {
	role := "dev-" + id
	var acls []map[string]any
	for _, c := range protocol.Channels {
		if c.DeviceToGateway() {
			acls = append(acls, map[string]any{"acltype": "publishClientSend", "topic": protocol.Topic(id, c), "allow": true})
		}
	}
	if err := d.do(ctx, map[string]any{"command": "createRole", "rolename": role, "acls": acls}, "already exists"); err != nil {
		return err
	}
	// The subscriptions on their own, so that a role made before they were
	// a pattern (3 December 2026) gets it too when its locker is
	// provisioned again.
	if err := d.do(ctx, map[string]any{"command": "addRoleACL", "rolename": role, "acltype": "subscribePattern",
		"topic": protocol.Root + id + "/#", "allow": true}, "already exists"); err != nil {
		return err
	}
	err := d.do(ctx, map[string]any{"command": "createClient", "username": id, "password": password, "clientid": id,
		"roles": []any{map[string]any{"rolename": role}}})
	if err != nil && strings.Contains(err.Error(), "already exists") {
		// A replaced (or re-provisioned) locker: the old secret must stop
		// working at once, and a live session with it must end.
		if err := d.do(ctx, map[string]any{"command": "setClientPassword", "username": id, "password": password}); err != nil {
			return err
		}
		if err := d.DisableDevice(ctx, id); err != nil {
			return err
		}
		return d.EnableDevice(ctx, id)
	}
	return err
}

// Clients returns the usernames of every client the plugin holds, read in
// pages of 1,000 (one answer holding a large fleet's could pass the
// broker's packet limit).
func (d *DynSec) Clients(ctx context.Context) ([]string, error) {
	const page = 1000
	var all []string
	for offset := 0; ; offset += page {
		data, err := d.query(ctx, map[string]any{"command": "listClients", "verbose": false, "count": page, "offset": offset})
		if err != nil {
			return nil, err
		}
		var r struct {
			TotalCount int      `json:"totalCount"`
			Clients    []string `json:"clients"`
		}
		if err := json.Unmarshal(data, &r); err != nil {
			return nil, fmt.Errorf("dynsec listClients: %w", err)
		}
		all = append(all, r.Clients...)
		if len(r.Clients) == 0 || len(all) >= r.TotalCount {
			return all, nil
		}
	}
}

// DisableDevice refuses a locker's connections (and ends a live one).
func (d *DynSec) DisableDevice(ctx context.Context, id string) error {
	return d.do(ctx, map[string]any{"command": "disableClient", "username": id})
}

// EnableDevice lets a disabled locker connect again.
func (d *DynSec) EnableDevice(ctx context.Context, id string) error {
	return d.do(ctx, map[string]any{"command": "enableClient", "username": id})
}
