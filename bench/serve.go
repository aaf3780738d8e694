package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/lockergate/lockergate/broker"
	"github.com/lockergate/lockergate/gateway"
	"github.com/lockergate/lockergate/protocol"
)

// ServeBare runs the baseline broker until ctx ends: the embedded mochi
// broker with the gateway's capabilities and buffer sizes, but no
// authentication, no fleet logic and no database. An inline subscription
// counts what lockers publish (GET /stats); POST /rt?device= does an
// unlock's round trip (publish a command, wait for the locker's result) so
// the gateway's API round trip has a counterpart measured the same way.
// It admits every client: a benchmark baseline only.
func ServeBare(ctx context.Context, mqttAddr, httpAddr string, log *slog.Logger) error {
	caps := mqtt.NewDefaultServerCapabilities()
	caps.MaximumPacketSize = broker.MaxPacketSize
	caps.MaximumClientWritesPending = broker.DefaultMaxClientWritesPending
	caps.MaximumSessionExpiryInterval = uint32(broker.DefaultMaxSessionExpiry / time.Second)
	caps.MaximumInflight = 1024
	caps.MaximumMessageExpiryInterval = 0
	caps.TopicAliasMaximum = 0
	s := &bare{waiters: map[string]chan string{}}
	s.mq = mqtt.New(&mqtt.Options{InlineClient: true, Capabilities: caps,
		ClientNetReadBufferSize: broker.NetBufferSize, ClientNetWriteBufferSize: broker.NetBufferSize, SysTopicResendInterval: 60, Logger: log})
	if err := s.mq.AddHook(new(allowAll), nil); err != nil {
		return fmt.Errorf("add hook: %w", err)
	}
	if err := s.mq.AddListener(listeners.NewTCP(listeners.Config{Type: "tcp", ID: "t1", Address: mqttAddr})); err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	if err := s.mq.Subscribe(protocol.Root+"#", 1, s.receive); err != nil {
		return fmt.Errorf("subscribe: %w", err)
	}
	ln, err := net.Listen("tcp", httpAddr)
	if err != nil {
		return err
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) { fmt.Fprintln(w, "ok") })
	mux.HandleFunc("GET /stats", func(w http.ResponseWriter, r *http.Request) {
		json.NewEncoder(w).Encode(bareCounts{Received: s.received.Load(), Health: s.health.Load(), Results: s.results.Load()})
	})
	mux.HandleFunc("POST /rt", s.roundTrip)
	hs := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	if err := s.mq.Serve(); err != nil { // starts the listeners and returns
		return fmt.Errorf("serve MQTT: %w", err)
	}
	errc := make(chan error, 1)
	go func() { errc <- hs.Serve(ln) }()
	select {
	case <-ctx.Done():
	case err = <-errc:
	}
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = hs.Shutdown(sctx)
	if cerr := s.mq.Close(); cerr != nil && err == nil {
		err = cerr
	}
	if errors.Is(err, http.ErrServerClosed) {
		err = nil
	}
	return err
}

type bare struct {
	mq                        *mqtt.Server
	received, health, results atomic.Uint64
	seq                       atomic.Uint64
	mu                        sync.Mutex
	waiters                   map[string]chan string
}

// receive counts device messages and completes round trips; like the
// gateway's handler it runs on the publishing client's goroutine.
func (s *bare) receive(_ *mqtt.Client, _ packets.Subscription, pk packets.Packet) {
	s.received.Add(1)
	_, ch, ok := protocol.ParseTopic(pk.TopicName)
	if !ok {
		return
	}
	switch ch {
	case protocol.ChanHealth:
		s.health.Add(1)
	case protocol.ChanCmdResult:
		s.results.Add(1)
		var r protocol.CommandResult
		if json.Unmarshal(pk.Payload, &r) != nil {
			return
		}
		s.mu.Lock()
		w, ok := s.waiters[r.ID]
		delete(s.waiters, r.ID)
		s.mu.Unlock()
		if ok {
			w <- r.Status
		}
	}
}

// roundTrip publishes an unlock to ?device= and answers with its result.
func (s *bare) roundTrip(w http.ResponseWriter, r *http.Request) {
	dev := r.URL.Query().Get("device")
	id := fmt.Sprintf("c-bare-%d", s.seq.Add(1))
	done := make(chan string, 1)
	s.mu.Lock()
	s.waiters[id] = done
	s.mu.Unlock()
	now := time.Now()
	cmd := protocol.Command{ID: id, Type: protocol.CmdUnlock, Compartment: 1, Reason: protocol.ReasonRemote,
		IssuedAt: protocol.T(now), ExpiresAt: protocol.T(now.Add(30 * time.Second))}
	if err := s.mq.Publish(protocol.Topic(dev, protocol.ChanCmd), protocol.Encode(cmd), false, 1); err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	select {
	case st := <-done:
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusCreated)
		json.NewEncoder(w).Encode(map[string]string{"id": id, "status": st})
	case <-time.After(5 * time.Second):
		s.mu.Lock()
		delete(s.waiters, id)
		s.mu.Unlock()
		http.Error(w, "no result within 5s", http.StatusGatewayTimeout)
	}
}

// allowAll admits every client and topic: the baseline has no auth. (mochi's
// own hooks/auth would do, but pulls in a YAML module this repo does not use.)
type allowAll struct{ mqtt.HookBase }

func (h *allowAll) ID() string { return "allow-all-baseline" }

func (h *allowAll) Provides(b byte) bool {
	return b == mqtt.OnConnectAuthenticate || b == mqtt.OnACLCheck
}

func (h *allowAll) OnConnectAuthenticate(*mqtt.Client, packets.Packet) bool { return true }

func (h *allowAll) OnACLCheck(*mqtt.Client, string, bool) bool { return true }

// ServeGateway runs the gateway package as cmd/lockergate does, plus
// net/http/pprof on pprofAddr ("" for none; it has no authentication: for
// benchmarks only), until ctx ends.
func ServeGateway(ctx context.Context, o gateway.Options, pprofAddr string) error {
	if pprofAddr != "" {
		mux := http.NewServeMux()
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
		ln, err := net.Listen("tcp", pprofAddr)
		if err != nil {
			return fmt.Errorf("listen pprof: %w", err)
		}
		ps := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		go ps.Serve(ln)
		defer ps.Close()
	}
	g, err := gateway.New(ctx, o)
	if err != nil {
		return fmt.Errorf("gateway did not start: %w", err)
	}
	runErr := g.Run(ctx)
	if err := g.Close(); err != nil && runErr == nil {
		runErr = err
	}
	return runErr
}
