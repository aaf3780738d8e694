// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: 2023 mochi-mqtt, mochi-co
// SPDX-FileContributor: mochi-co

package mqtt

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/xid"

	"github.com/mochi-mqtt/server/v2/packets"
)

const (
	defaultKeepalive             uint16 = 10 // the default connection keepalive value in seconds.
	defaultClientProtocolVersion byte   = 4  // the default mqtt protocol version of connecting clients (if somehow unspecified).
	minimumKeepalive             uint16 = 5  // the minimum recommended keepalive - values under with display a warning.
)

var (
	ErrMinimumKeepalive = errors.New("client keepalive is below minimum recommended value and may exhibit connection instability")
)

// ReadFn is the function signature for the function used for reading and processing new packets.
type ReadFn func(*Client, packets.Packet) error

// Clients contains a map of the clients known by the broker.
type Clients struct {
	internal map[string]*Client // clients known by the broker, keyed on client id.
	sync.RWMutex
}

// NewClients returns an instance of Clients.
func NewClients() *Clients {
	return &Clients{
		internal: make(map[string]*Client),
	}
}

// Add adds a new client to the clients map, keyed on client id.
func (cl *Clients) Add(val *Client) {
	cl.Lock()
	defer cl.Unlock()
	cl.internal[val.ID] = val
}

// GetAll returns all the clients.
func (cl *Clients) GetAll() map[string]*Client {
	cl.RLock()
	defer cl.RUnlock()
	m := map[string]*Client{}
	for k, v := range cl.internal {
		m[k] = v
	}
	return m
}

// Each calls f for every client, under the read lock: f must not change
// the clients. Lockergate patch: GetAll copies the map, which the server's
// once-a-second sweeps did for every client.
func (cl *Clients) Each(f func(id string, client *Client)) {
	cl.RLock()
	defer cl.RUnlock()
	for k, v := range cl.internal {
		f(k, v)
	}
}

// Get returns the value of a client if it exists.
func (cl *Clients) Get(id string) (*Client, bool) {
	cl.RLock()
	defer cl.RUnlock()
	val, ok := cl.internal[id]
	return val, ok
}

// Len returns the length of the clients map.
func (cl *Clients) Len() int {
	cl.RLock()
	defer cl.RUnlock()
	val := len(cl.internal)
	return val
}

// DeleteClient removes c from the internal map if it is the client kept
// under its id, and reports whether it was. Lockergate patch 18: Delete by
// id removed whichever client held the id by then, a newer one that had
// taken over the session included.
func (cl *Clients) DeleteClient(c *Client) bool {
	cl.Lock()
	defer cl.Unlock()
	if cur, ok := cl.internal[c.ID]; !ok || cur != c {
		return false
	}
	delete(cl.internal, c.ID)
	return true
}

// Delete removes a client from the internal map.
func (cl *Clients) Delete(id string) {
	cl.Lock()
	defer cl.Unlock()
	delete(cl.internal, id)
}

// GetByListener returns clients matching a listener id.
func (cl *Clients) GetByListener(id string) []*Client {
	cl.RLock()
	defer cl.RUnlock()
	// Lockergate patch: len, not cl.Len(), which read-locks again and
	// deadlocks when a writer queues between the two.
	clients := make([]*Client, 0, len(cl.internal))
	for _, client := range cl.internal {
		if client.Net.Listener == id && !client.Closed() {
			clients = append(clients, client)
		}
	}
	return clients
}

// Client contains information about a client known by the broker.
type Client struct {
	Properties   ClientProperties // client properties
	State        ClientState      // the operational state of the client.
	Net          ClientConnection // network connection state of the client
	ID           string           // the client id.
	ops          *ops             // ops provides a reference to server ops.
	sync.RWMutex                  // mutex
}

// ClientConnection contains the connection transport and metadata for the client.
type ClientConnection struct {
	Conn     net.Conn      // the net.Conn used to establish the connection
	bconn    *bufio.Reader // a buffered net.Conn for reading packets
	outbuf   *bytes.Buffer // a buffer for writing packets
	Remote   string        // the remote address of the client
	Listener string        // listener id of the client
	Inline   bool          // if true, the client is the built-in 'inline' embedded client
}

// ClientProperties contains the properties which define the client behaviour.
type ClientProperties struct {
	Props           packets.Properties
	Will            Will
	Username        []byte
	ProtocolVersion byte
	Clean           bool
}

// Will contains the last will and testament details for a client connection.
type Will struct {
	Payload           []byte                 // -
	User              []packets.UserProperty // -
	TopicName         string                 // -
	Flag              uint32                 // 0,1
	WillDelayInterval uint32                 // -
	Qos               byte                   // -
	Retain            bool                   // -
}

// ClientState tracks the state of the client.
type ClientState struct {
	TopicAliases    TopicAliases       // a map of topic aliases
	stopCause       atomic.Value       // reason for stopping
	Inflight        *Inflight          // a map of in-flight qos messages
	Subscriptions   *Subscriptions     // a map of the subscription filters a client maintains
	disconnected    int64              // the time the client disconnected in unix time, for calculating expiry
	queueMu         sync.Mutex         // guards queue and queueWake (Lockergate patch 24)
	queue           []*packets.Packet  // pending outbound packets; nil when none (patch 24)
	queueWake       chan struct{}      // wakes a WriteLoop; made by WriteLoop only (patch 24)
	endOnce         sync.Once          // only end once
	isTakenOver     atomic.Bool        // used to identify orphaned clients
	packetID        uint32             // the current highest packetID
	open            context.Context    // indicate that the client is open for packet exchange
	cancelOpen      context.CancelFunc // cancel function for open context
	outboundQty     int32              // number of messages currently in the outbound queue
	writing         atomic.Bool        // a goroutine is writing the outbound queue (Lockergate patch 12)
	ownWriter       atomic.Bool        // a WriteLoop writes the queue: start no writer (patch 12)
	writesHeld      atomic.Bool        // the CONNACK is not out yet: the queue waits (patch 27)
	restAfter       time.Duration      // an idle reader moves to a new goroutine after this; 0: never (patch 13)
	readExpiry      time.Time          // the keepalive read deadline; zero: none (patch 13)
	readSet         time.Time          // the read deadline set on the connection (patch 13)
	writeSet        time.Time          // the write deadline set on the connection (patch 13)
	bufferReleased  bool               // a resting reader gave its read buffer back (patch 15)
	maxPacketSize   atomic.Uint32      // the client's own packet limit; 0: the server's (patch 17)
	ackMu           sync.Mutex         // guards held and quotaFreed (patch 22)
	held            []uint16           // QoS 1 publishes whose PUBACK a hook sends later; nil when none (patch 22)
	acks            []uint16           // PUBACKs AckPublish queued for the writer (patch 22)
	quotaFreed      chan struct{}      // AckPublish wakes a reader waiting for receive quota (patch 22)
	Keepalive       uint16             // the number of seconds the connection can wait
	ServerKeepalive bool               // keepalive was set by the server
}

// newClient returns a new instance of Client. This is almost exclusively used by Server
// for creating new clients, but it lives here because it's not dependent.
func newClient(c net.Conn, o *ops) *Client {
	ctx, cancel := context.WithCancel(context.Background())
	cl := &Client{
		State: ClientState{
			Inflight:      NewInflights(),
			Subscriptions: NewSubscriptions(),
			TopicAliases:  NewTopicAliases(o.options.Capabilities.TopicAliasMaximum),
			open:          ctx,
			cancelOpen:    cancel,
			Keepalive:     defaultKeepalive,
			// The outbound queue is a slice made on its first packet (patch 24).
		},
		Properties: ClientProperties{
			ProtocolVersion: defaultClientProtocolVersion, // default protocol version
		},
		ops: o,
	}

	if c != nil {
		cl.Net = ClientConnection{
			Conn:   c,
			bconn:  bufio.NewReaderSize(c, o.options.ClientNetReadBufferSize),
			Remote: c.RemoteAddr().String(),
		}
	}

	return cl
}

// WriteLoop ranges over pending outbound messages and writes them to the
// client connection until the client closes.
//
// Lockergate patch 12: the server no longer runs a WriteLoop for every
// client. An idle client's writer parked on its channel for the whole
// connection (a goroutine and a 2–4 KiB stack per connection that nearly
// never writes); publishToClient now starts a writer when it queues a packet
// and none is running (kickWriter), and the writer ends when the queue is
// empty. WriteLoop is kept for callers that run a writer of their own (mochi's
// tests): once it runs, no other writer is started, and one started before
// it stops at the next empty queue.
func (cl *Client) WriteLoop() {
	wake := make(chan struct{}, 1)
	cl.State.queueMu.Lock()
	cl.State.queueWake = wake
	cl.State.queueMu.Unlock()
	cl.State.ownWriter.Store(true)
	cl.State.writing.Store(true)
	for {
		for !cl.State.writesHeld.Load() { // patch 27
			pk := cl.nextOutbound()
			if pk == nil {
				break
			}
			cl.writeOutbound(pk)
		}
		select {
		case <-wake:
		case <-cl.State.open.Done():
			return
		}
	}
}

// queueOutbound queues pk for the client's writer, starting one if none
// runs, unless MaximumClientWritesPending packets are waiting already.
//
// Lockergate patch 24: the queue was a channel of that capacity, made with
// the client: 640 bytes for each idle locker (64 slots), which is sent a
// handful of messages when it connects and then nearly nothing. It is now
// a slice made on the first packet and let go when the writer empties it.
func (cl *Client) queueOutbound(pk *packets.Packet) bool {
	cl.State.queueMu.Lock()
	if len(cl.State.queue) >= int(cl.ops.options.Capabilities.MaximumClientWritesPending) {
		cl.State.queueMu.Unlock()
		return false
	}
	cl.State.queue = append(cl.State.queue, pk)
	if cl.State.queueWake != nil {
		select {
		case cl.State.queueWake <- struct{}{}:
		default: // a wake-up is pending already
		}
	}
	cl.State.queueMu.Unlock()
	atomic.AddInt32(&cl.State.outboundQty, 1)
	cl.kickWriter() // patch 12
	return true
}

// nextOutbound takes the next queued packet off the queue, or returns nil
// when none waits; an emptied queue lets its array go (patch 24).
func (cl *Client) nextOutbound() *packets.Packet {
	cl.State.queueMu.Lock()
	defer cl.State.queueMu.Unlock()
	if len(cl.State.queue) == 0 {
		return nil
	}
	pk := cl.State.queue[0]
	cl.State.queue[0] = nil
	cl.State.queue = cl.State.queue[1:]
	if len(cl.State.queue) == 0 {
		cl.State.queue = nil
	}
	return pk
}

// queued returns the number of packets waiting in the outbound queue
// (patch 24).
func (cl *Client) queued() int {
	cl.State.queueMu.Lock()
	defer cl.State.queueMu.Unlock()
	return len(cl.State.queue)
}

// testHookQueueEmpty, when set by a test, runs where drainOutbound has found
// the queue empty and not yet cleared its flag: the window a packet queued
// concurrently falls in.
var testHookQueueEmpty func(*Client)

// kickWriter starts a writer for the outbound queue unless one is running.
// Called after a packet is queued (patch 12).
func (cl *Client) kickWriter() {
	if cl.State.ownWriter.Load() || cl.State.writesHeld.Load() {
		return
	}
	if cl.State.writing.CompareAndSwap(false, true) {
		go cl.drainOutbound()
	}
}

// holdWrites keeps what is queued for the client unwritten until
// releaseWrites: the session being established is in Clients, so messages
// can be queued for it, before its CONNACK is written.
//
// Lockergate patch 27: a writer started by a message queued in that window
// could write it before the CONNACK, which must be the server's first
// packet [MQTT-3.2.0-1] (a client library reading for its CONNACK fails the
// connection), and before the session's resent in-flight messages.
func (cl *Client) holdWrites() {
	cl.State.writesHeld.Store(true)
}

// releaseWrites lets the outbound queue be written, starting a writer (or
// waking a WriteLoop) for what was queued while writes were held. Either
// queueOutbound's kickWriter sees the hold gone or the load here sees its
// packet counted (the same pairing as drainOutbound's re-check).
func (cl *Client) releaseWrites() {
	cl.State.writesHeld.Store(false)
	if atomic.LoadInt32(&cl.State.outboundQty) <= 0 {
		return
	}
	cl.State.queueMu.Lock()
	if cl.State.queueWake != nil {
		select {
		case cl.State.queueWake <- struct{}{}:
		default:
		}
	}
	cl.State.queueMu.Unlock()
	cl.kickWriter()
}

// drainOutbound writes queued packets until the queue is empty, then ends.
// At most one runs per client (the writing flag), so packets are written in
// the order they were queued. A packet queued after the queue was found
// empty but before the flag was cleared started no writer (kickWriter saw
// the flag set), so the queue is looked at again after clearing it: through
// outboundQty, which queueOutbound raises (atomically) before kickWriter,
// so that either its CompareAndSwap sees the flag cleared or this load sees
// the packet counted.
// Packets queued for a closed client are taken off the queue unwritten
// (WritePacket refuses them); the WriteLoop this replaces ended with the
// connection and left them unwritten too.
func (cl *Client) drainOutbound() {
	for {
		if pk := cl.nextOutbound(); pk != nil {
			cl.writeOutbound(pk)
			continue
		}
		if cl.writeAcks() {
			continue
		}
		if testHookQueueEmpty != nil {
			testHookQueueEmpty(cl)
		}
		if cl.State.ownWriter.Load() {
			return // a WriteLoop took over; the flag stays set for it
		}
		cl.State.writing.Store(false)
		if atomic.LoadInt32(&cl.State.outboundQty) <= 0 || !cl.State.writing.CompareAndSwap(false, true) {
			return
		}
	}
}

// writeOutbound writes one queued packet. Lockergate patch: a function of
// its own, so that the copy of the packet it passes on by value lives in
// its frame, not in WriteLoop's, where the goroutine parks between
// packets: a parked frame over a quarter of the stack keeps the runtime
// from ever shrinking it (8 KiB per client instead of 4 or less).
//
//go:noinline
func (cl *Client) writeOutbound(pk *packets.Packet) {
	if err := cl.WritePacket(*pk); err != nil {
		// TODO : Figure out what to do with error
		cl.ops.log.Debug("failed publishing packet", "error", err, "client", cl.ID, "packet", pk)
	}
	atomic.AddInt32(&cl.State.outboundQty, -1)
}

// HoldAck makes the PUBACK of the client's QoS 1 PUBLISH packetID an
// OnPublish hook's to send (Lockergate patch 22): the hook calls it before
// it hands the message on, returns ErrAckLater, and calls
// Server.AckPublish once the message is handled, which may be before the
// hook has returned. The message holds one of the client's receive quota
// until then.
func (cl *Client) HoldAck(packetID uint16) {
	cl.State.ackMu.Lock()
	if cl.State.quotaFreed == nil {
		cl.State.quotaFreed = make(chan struct{}, 1)
	}
	// A slice, not a map: usually one or two ids are held, and it is let
	// go when none is, so that an idle locker keeps nothing.
	cl.State.held = append(cl.State.held, packetID)
	cl.State.ackMu.Unlock()
	cl.State.Inflight.DecreaseReceiveQuota()
}

// ackHeld reports whether the PUBACK of packetID is held (patch 22).
func (cl *Client) ackHeld(packetID uint16) bool {
	cl.State.ackMu.Lock()
	defer cl.State.ackMu.Unlock()
	return slices.Contains(cl.State.held, packetID)
}

// unholdAck forgets a held packetID, reporting whether it was held, and
// returns the channel that wakes a reader waiting for receive quota
// (awaitReceiveQuota; patch 22).
func (cl *Client) unholdAck(packetID uint16) (freed chan struct{}, ok bool) {
	cl.State.ackMu.Lock()
	defer cl.State.ackMu.Unlock()
	i := slices.Index(cl.State.held, packetID)
	if i < 0 {
		return nil, false
	}
	cl.State.held = slices.Delete(cl.State.held, i, i+1)
	if len(cl.State.held) == 0 {
		cl.State.held = nil
	}
	return cl.State.quotaFreed, true
}

// testHookAwaitingQuota, when set by a test, runs when a reader starts to
// wait for receive quota.
var testHookAwaitingQuota func(*Client)

// awaitReceiveQuota waits, on the client's reader, until its receive quota
// is no longer spent; false when the client closed first, or when nothing
// held can give quota back (patch 22).
func (cl *Client) awaitReceiveQuota() bool {
	cl.State.ackMu.Lock()
	freed := cl.State.quotaFreed
	cl.State.ackMu.Unlock()
	if freed == nil {
		return false
	}
	if testHookAwaitingQuota != nil {
		testHookAwaitingQuota(cl)
	}
	for atomic.LoadInt32(&cl.State.Inflight.receiveQuota) == 0 {
		select {
		case <-freed:
		case <-cl.State.open.Done():
			return false
		}
	}
	return true
}

// queueAck queues the PUBACK of packetID for the client's writer (patch 22):
// unbounded by the outbound queue (a batch may acknowledge many of one
// client's messages at once), but never more than its held messages.
// Counted in outboundQty like a queued packet, so that a writer finding
// the queue empty looks again (drainOutbound). A WriteLoop of the caller's
// own does not send them (Lockergate runs none).
func (cl *Client) queueAck(packetID uint16) {
	cl.State.ackMu.Lock()
	cl.State.acks = append(cl.State.acks, packetID)
	cl.State.ackMu.Unlock()
	atomic.AddInt32(&cl.State.outboundQty, 1)
	cl.kickWriter()
}

// writeAcks writes the queued PUBACKs (patch 22), reporting whether there
// were any. A closed connection refuses them (WritePacket), as it does
// queued packets.
func (cl *Client) writeAcks() bool {
	cl.State.ackMu.Lock()
	ids := cl.State.acks
	cl.State.acks = nil
	cl.State.ackMu.Unlock()
	for _, id := range ids {
		ack := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Puback}, PacketID: id}
		if err := cl.WritePacket(ack); err != nil {
			cl.ops.log.Debug("failed writing puback", "error", err, "client", cl.ID, "packet_id", id)
		}
	}
	atomic.AddInt32(&cl.State.outboundQty, -int32(len(ids)))
	return len(ids) > 0
}

// ParseConnect parses the connect parameters and properties for a client.
func (cl *Client) ParseConnect(lid string, pk packets.Packet) {
	cl.Net.Listener = lid

	cl.Properties.ProtocolVersion = pk.ProtocolVersion
	cl.Properties.Username = pk.Connect.Username
	cl.Properties.Clean = pk.Connect.Clean
	cl.Properties.Props = pk.Properties.Copy(false)

	if cl.Properties.Props.ReceiveMaximum > cl.ops.options.Capabilities.MaximumInflight { // 3.3.4 Non-normative
		cl.Properties.Props.ReceiveMaximum = cl.ops.options.Capabilities.MaximumInflight
	}

	if pk.Connect.Keepalive <= minimumKeepalive {
		cl.ops.log.Warn(
			ErrMinimumKeepalive.Error(),
			"client", cl.ID,
			"keepalive", pk.Connect.Keepalive,
			"recommended", minimumKeepalive,
		)
	}

	cl.State.Keepalive = pk.Connect.Keepalive                                              // [MQTT-3.2.2-22]
	cl.State.Inflight.ResetReceiveQuota(int32(cl.ops.options.Capabilities.ReceiveMaximum)) // server receive max per client
	cl.State.Inflight.ResetSendQuota(int32(cl.Properties.Props.ReceiveMaximum))            // client receive max
	cl.State.TopicAliases.Outbound = NewOutboundTopicAliases(cl.Properties.Props.TopicAliasMaximum)

	cl.ID = pk.Connect.ClientIdentifier
	if cl.ID == "" {
		cl.ID = xid.New().String() // [MQTT-3.1.3-6] [MQTT-3.1.3-7]
		cl.Properties.Props.AssignedClientID = cl.ID
	}

	if pk.Connect.WillFlag {
		cl.Properties.Will = Will{
			Qos:               pk.Connect.WillQos,
			Retain:            pk.Connect.WillRetain,
			Payload:           pk.Connect.WillPayload,
			TopicName:         pk.Connect.WillTopic,
			WillDelayInterval: pk.Connect.WillProperties.WillDelayInterval,
			User:              pk.Connect.WillProperties.User,
		}
		if pk.Properties.SessionExpiryIntervalFlag &&
			pk.Properties.SessionExpiryInterval < pk.Connect.WillProperties.WillDelayInterval {
			cl.Properties.Will.WillDelayInterval = pk.Properties.SessionExpiryInterval
		}
		if pk.Connect.WillFlag {
			cl.Properties.Will.Flag = 1 // atomic for checking
		}
	}
}

// refreshDeadline refreshes the read/write deadline for the net.Conn connection.
func (cl *Client) refreshDeadline(keepalive uint16) {
	var expiry time.Time // nil time can be used to disable deadline if keepalive = 0
	if keepalive > 0 {
		expiry = time.Now().Add(time.Duration(keepalive+(keepalive/2)) * time.Second) // [MQTT-3.1.2-22]
	}
	// Lockergate patch 13: what prepareRead goes on from.
	cl.State.readExpiry, cl.State.readSet, cl.State.writeSet = expiry, expiry, expiry

	if cl.Net.Conn != nil {
		_ = cl.Net.Conn.SetDeadline(expiry) // [MQTT-3.1.2-22]
	}
}

// NextPacketID returns the next available (unused) packet id for the client.
// If no unused packet ids are available, an error is returned and the client
// should be disconnected.
func (cl *Client) NextPacketID() (i uint32, err error) {
	cl.Lock()
	defer cl.Unlock()

	i = atomic.LoadUint32(&cl.State.packetID)
	started := i
	overflowed := false
	for {
		if overflowed && i == started {
			return 0, packets.ErrQuotaExceeded
		}

		if i >= cl.ops.options.Capabilities.maximumPacketID {
			overflowed = true
			i = 0
			continue
		}

		i++

		if _, ok := cl.State.Inflight.Get(uint16(i)); !ok {
			atomic.StoreUint32(&cl.State.packetID, i)
			return i, nil
		}
	}
}

// ResendInflightMessages attempts to resend any pending inflight messages to connected clients.
func (cl *Client) ResendInflightMessages(force bool) error {
	if cl.State.Inflight.Len() == 0 {
		return nil
	}
	return cl.resendInflight(cl.State.Inflight.GetAll(false))
}

// resendInflight sends the in-flight packets pks again, in their order.
// Lockergate patch 27: a resumed session resends only what it inherited
// (establishSession), not what was put in flight for it since.
func (cl *Client) resendInflight(pks []packets.Packet) error {
	now := time.Now().Unix()
	for _, tk := range pks {
		if tk.FixedHeader.Type == packets.Publish {
			// Lockergate patch 30: an expired message is dropped, not sent
			// again (as ClearExpiredInflights would a second later).
			if tk.Expiry > 0 && tk.Expiry < now {
				if ok := cl.State.Inflight.Delete(tk.PacketID); ok {
					cl.ops.hooks.OnQosDropped(cl, tk)
					atomic.AddInt64(&cl.ops.info.Inflight, -1)
				}
				continue
			}
			tk.FixedHeader.Dup = true // [MQTT-3.3.1-1] [MQTT-3.3.1-3]
		}

		cl.ops.hooks.OnQosPublish(cl, tk, tk.Created, 0)
		err := cl.WritePacket(tk)
		if err != nil {
			return err
		}

		if tk.FixedHeader.Type == packets.Puback || tk.FixedHeader.Type == packets.Pubcomp {
			if ok := cl.State.Inflight.Delete(tk.PacketID); ok {
				cl.ops.hooks.OnQosComplete(cl, tk)
				atomic.AddInt64(&cl.ops.info.Inflight, -1)
			}
		}
	}

	return nil
}

// ClearInflights deletes all inflight messages for the client, e.g. for a disconnected user with a clean session.
func (cl *Client) ClearInflights() {
	for _, tk := range cl.State.Inflight.GetAll(false) {
		if ok := cl.State.Inflight.Delete(tk.PacketID); ok {
			cl.ops.hooks.OnQosDropped(cl, tk)
			atomic.AddInt64(&cl.ops.info.Inflight, -1)
		}
	}
}

// ClearExpiredInflights deletes any inflight messages which have expired.
func (cl *Client) ClearExpiredInflights(now, maximumExpiry int64) []uint16 {
	deleted := []uint16{}
	for _, tk := range cl.State.Inflight.GetAll(false) {
		// Lockergate patch 30: by the message's expiry, whoever published
		// it and whatever the session's version (an inline publish's
		// packet has the inline client's version, 4).
		expired := tk.Expiry > 0 && tk.Expiry < now // [MQTT-3.3.2-5]

		// If the maximum message expiry interval is set (greater than 0), and the message
		// retention period exceeds the maximum expiry, the message will be forcibly removed.
		enforced := maximumExpiry > 0 && now-tk.Created > maximumExpiry

		if expired || enforced {
			if ok := cl.State.Inflight.Delete(tk.PacketID); ok {
				cl.ops.hooks.OnQosDropped(cl, tk)
				atomic.AddInt64(&cl.ops.info.Inflight, -1)
				deleted = append(deleted, tk.PacketID)
			}
		}
	}

	return deleted
}

// Read reads incoming packets from the connected client and transforms them into
// packets to be handled by the packetHandler.
func (cl *Client) Read(packetHandler ReadFn) error {
	return cl.read(receiver{fn: packetHandler}, false)
}

// receiver handles the packets a client's reader reads (Lockergate patch
// 26): a server's, which takes them by pointer, or the ReadFn given to
// Read, which takes them by value. A struct, not a function value: a
// pointer given to a function value escapes, and every packet read would
// be moved to the heap.
type receiver struct {
	s  *Server
	fn ReadFn
}

// receive handles pk, which it does not keep.
func (r receiver) receive(cl *Client, pk *packets.Packet) error {
	if r.s != nil {
		return r.s.receivePacket(cl, pk)
	}
	return r.receiveByValue(cl, pk)
}

// receiveByValue gives r.fn a copy of pk. A function of its own, so the
// copy is in its frame only, not in the reader's path for the server.
//
//go:noinline
func (r receiver) receiveByValue(cl *Client, pk *packets.Packet) error {
	return r.fn(cl, *pk)
}

// errReaderRested is returned by read when the client's reader has been
// idle for restAfter: its caller goes on reading in a new goroutine.
var errReaderRested = errors.New("reader rested")

// read is Read. Lockergate patch 13: a goroutine's stack grows to handle a
// packet (mochi passes 800-byte packets by value, so a PUBLISH takes a
// reader to 16 KiB) and the runtime only halves it once per collection
// afterwards, so a locker that reports every minute keeps its reader on
// 8–16 KiB for good. With restAfter set, a reader that has handled a packet
// (or, the first one, the CONNECT) and then sees no byte for restAfter
// returns errReaderRested, and Server.serveClient goes on in a new
// goroutine, which starts on a small stack; the old one is freed at once.
// resumed is set in that new goroutine: it reads with the keepalive
// deadline the rested reader computed, not one refreshed from now, so
// resting never extends a keepalive.
func (cl *Client) read(r receiver, resumed bool) error {
	var err error
	// A goroutine that has handled packets (CONNECT, in the first one) may
	// rest; a resumed one not before it handles one.
	handled := !resumed
	for {
		if cl.Closed() {
			return nil
		}

		if cl.State.bufferReleased {
			// Patch 15: this reader follows one that gave its buffer back.
			if err := cl.awaitInput(); err != nil {
				return err
			}
		}
		if cl.State.restAfter > 0 {
			rested, err := cl.prepareRead(handled)
			if err != nil {
				return err
			}
			if rested {
				return errReaderRested
			}
		} else {
			cl.refreshDeadline(cl.State.Keepalive)
		}

		fh := new(packets.FixedHeader)
		err = cl.ReadFixedHeader(fh)
		if err != nil {
			return err
		}

		err = cl.readAndHandle(fh, r)
		if err != nil {
			return err
		}
		handled = true
	}
}

// prepareRead sets the deadlines for the next packet of a client whose
// reader may rest (patch 13) and waits up to restAfter for its first byte.
// handled: a packet was handled since the keepalive deadline was last
// computed, so it moves. rested reports that no byte came in restAfter,
// well before the keepalive deadline: the reader may move to a new
// goroutine. An error other than that wait's own timeout (the connection
// closed or reset) is returned as the next read would have returned it.
//
// Deadlines cost about 350 ns each to set, and mochi sets both on every
// packet (refreshDeadline), so here a packet costs one, as before: the
// short read deadline of the wait, which stays in place when the packet
// then arrives whole (nothing is read from the connection for it); the
// keepalive read deadline is set only before reading from the connection,
// and the write deadline only when the keepalive deadline has passed it,
// to restAfter beyond (it is up to restAfter later than mochi's, never
// earlier).
//
//go:noinline
func (cl *Client) prepareRead(handled bool) (rested bool, err error) {
	c := cl.Net.Conn
	st := &cl.State
	if c == nil || cl.Net.bconn == nil {
		return false, nil // ReadFixedHeader reports it
	}
	if handled {
		now := time.Now()
		var expiry time.Time // zero: no keepalive, no deadline
		if st.Keepalive > 0 {
			expiry = now.Add(time.Duration(st.Keepalive+(st.Keepalive/2)) * time.Second) // [MQTT-3.1.2-22]
		}
		st.readExpiry = expiry
		// The write deadline may lag late, never early: when the keepalive
		// deadline passes it, it is set restAfter beyond, so it is set
		// once per restAfter at most and never cuts a write that mochi's
		// would have allowed.
		if expiry.IsZero() != st.writeSet.IsZero() || expiry.After(st.writeSet) {
			w := expiry
			if !w.IsZero() {
				w = w.Add(st.restAfter)
			}
			_ = c.SetWriteDeadline(w)
			st.writeSet = w
		}
		wake := now.Add(st.restAfter)
		if cl.Net.bconn.Buffered() == 0 && (expiry.IsZero() || wake.Before(expiry)) {
			_ = c.SetReadDeadline(wake)
			st.readSet = wake
			if _, err := cl.Net.bconn.Peek(1); err != nil {
				if errors.Is(err, os.ErrDeadlineExceeded) {
					// Rested, unless the keepalive deadline has come since:
					// the new reader then times out as this one would have.
					// A client stopped meanwhile ends there, through read's
					// Closed check.
					cl.releaseBuffer(c)
					return true, nil
				}
				return false, err
			}
		}
	}
	if !st.readSet.Equal(st.readExpiry) && !cl.packetBuffered() {
		_ = c.SetReadDeadline(st.readExpiry)
		st.readSet = st.readExpiry
	}
	return false, nil
}

// readBuffers holds the read buffers of resting readers (patch 15).
var readBuffers sync.Pool

// releaseBuffer gives a resting reader's empty read buffer back, when the
// connection can be waited on without one (awaitReadable): an idle locker
// then holds no read buffer (1 KiB in the gateway) until its next packet.
func (cl *Client) releaseBuffer(c net.Conn) {
	if !canAwaitReadable(c) || cl.Net.bconn.Buffered() > 0 {
		return
	}
	cl.Net.bconn.Reset(nil)
	readBuffers.Put(cl.Net.bconn)
	cl.Net.bconn = nil
	cl.State.bufferReleased = true
	if testHookBufferReleased != nil {
		testHookBufferReleased()
	}
}

// testHookBufferReleased, when set by a test, runs when a resting reader
// has given its buffer back.
var testHookBufferReleased func()

// awaitInput is how a reader that follows one which gave its buffer back
// begins: it waits, under the keepalive read deadline, until the connection
// has something to read (or is closed, or the deadline passes: that error
// is returned as a read would have returned it), then gives the client a
// read buffer again. The wait is called from here, with nothing of the
// deadline's or the buffer's work in this frame: the reader parks under it,
// and it must fit the 2 KiB a new goroutine starts with.
//
//go:noinline
func (cl *Client) awaitInput() error {
	cl.restoreReadDeadline()
	if err := awaitReadable(cl.Net.Conn); err != nil {
		return err
	}
	cl.reacquireBuffer()
	return nil
}

// restoreReadDeadline puts the keepalive read deadline back in place.
//
//go:noinline
func (cl *Client) restoreReadDeadline() {
	st := &cl.State
	if !st.readSet.Equal(st.readExpiry) {
		_ = cl.Net.Conn.SetReadDeadline(st.readExpiry)
		st.readSet = st.readExpiry
	}
}

// reacquireBuffer gives the client a read buffer again.
//
//go:noinline
func (cl *Client) reacquireBuffer() {
	c, st := cl.Net.Conn, &cl.State
	size := cl.ops.options.ClientNetReadBufferSize
	if r, ok := readBuffers.Get().(*bufio.Reader); ok && r.Size() == size {
		r.Reset(c)
		cl.Net.bconn = r
	} else {
		cl.Net.bconn = bufio.NewReaderSize(c, size)
	}
	st.bufferReleased = false
}

// packetBuffered reports that the whole of the next packet is in the read
// buffer, so reading it does not touch the connection or its deadline.
func (cl *Client) packetBuffered() bool {
	n := cl.Net.bconn.Buffered()
	b, _ := cl.Net.bconn.Peek(min(n, 5)) // never reads: n bytes are buffered
	remaining, mul := 0, 1
	for i := 1; i < len(b); i++ {
		remaining += int(b[i]&0x7f) * mul
		if b[i]&0x80 == 0 {
			return 1+i+remaining <= n
		}
		mul *= 128
	}
	return false
}

// readAndHandle reads the packet whose fixed header is fh and handles it.
// Lockergate patch: a function of its own, so that the packet values live
// in its frame, not in Read's, where the goroutine parks waiting for the
// next header (see writeOutbound). Patch 26: the packet is this frame's
// only copy; what handles it takes it by pointer.
//
//go:noinline
func (cl *Client) readAndHandle(fh *packets.FixedHeader, r receiver) error {
	var pk packets.Packet
	if err := cl.readPacket(fh, &pk); err != nil {
		return err
	}
	if err := cl.ops.hooks.onPacketRead(cl, &pk); err != nil {
		return err
	}
	return r.receive(cl, &pk) // Process inbound packet.
}

// Stop instructs the client to shut down all processing goroutines and disconnect.
func (cl *Client) Stop(err error) {
	cl.State.endOnce.Do(func() {
		// Lockergate patch 16: the cause is stored before the connection
		// is closed. The reader wakes on the close and ends the session;
		// storing after it let the reader find no cause, so hooks (OnWill,
		// OnDisconnect) could not tell a session taken over from one lost.
		if err != nil {
			cl.State.stopCause.Store(err)
		}

		if cl.Net.Conn != nil {
			_ = cl.Net.Conn.Close() // omit close error
		}

		if cl.State.cancelOpen != nil {
			cl.State.cancelOpen()
		}

		atomic.StoreInt64(&cl.State.disconnected, time.Now().Unix())
	})
}

// StopCause returns the reason the client connection was stopped, if any.
func (cl *Client) StopCause() error {
	if cl.State.stopCause.Load() == nil {
		return nil
	}
	return cl.State.stopCause.Load().(error)
}

// StopTime returns the the time the client disconnected in unix time, else zero.
func (cl *Client) StopTime() int64 {
	return atomic.LoadInt64(&cl.State.disconnected)
}

// Closed returns true if client connection is closed.
func (cl *Client) Closed() bool {
	return cl.State.open == nil || cl.State.open.Err() != nil
}

func (cl *Client) IsTakenOver() bool {
	return cl.State.isTakenOver.Load()
}

// ReadFixedHeader reads in the values of the next packet's fixed header.
func (cl *Client) ReadFixedHeader(fh *packets.FixedHeader) error {
	if cl.Net.bconn == nil {
		return ErrConnectionClosed
	}

	b, err := cl.Net.bconn.ReadByte()
	if err != nil {
		return err
	}

	err = fh.Decode(b)
	if err != nil {
		return err
	}

	var bu int
	fh.Remaining, bu, err = packets.DecodeLength(cl.Net.bconn)
	if err != nil {
		return err
	}

	if max := cl.MaxPacketSize(); max > 0 && uint32(fh.Remaining+1) > max {
		return packets.ErrPacketTooLarge // [MQTT-3.2.2-15]
	}

	atomic.AddInt64(&cl.ops.info.BytesReceived, int64(bu+1))
	return nil
}

// Lockergate patch 17: a client's own packet limit. The reader allocates a
// packet's whole buffer once it has read the fixed header, before the
// packet is looked at, so the server's limit bounds what a connection that
// has not authenticated can make it allocate. A hook that authenticates a
// client may raise that client's limit (SetMaxPacketSize) for the packets
// that follow its CONNECT.

// SetMaxPacketSize sets the largest packet the client may send from now on;
// 0 restores the server's limit.
func (cl *Client) SetMaxPacketSize(n uint32) { cl.State.maxPacketSize.Store(n) }

// MaxPacketSize is the largest packet the client may send: its own limit,
// or the server's (0: none).
func (cl *Client) MaxPacketSize() uint32 {
	if n := cl.State.maxPacketSize.Load(); n > 0 {
		return n
	}
	return cl.ops.options.Capabilities.MaximumPacketSize
}

// ReadPacket reads the remaining buffer into an MQTT packet.
func (cl *Client) ReadPacket(fh *packets.FixedHeader) (pk packets.Packet, err error) {
	if err = cl.readPacket(fh, &pk); err != nil {
		return pk, err
	}
	return cl.ops.hooks.OnPacketRead(cl, pk)
}

// readPacket reads the packet whose fixed header is fh into pk, a zero
// packet, without the OnPacketRead hooks: ReadPacket by pointer (patch 26).
func (cl *Client) readPacket(fh *packets.FixedHeader, pk *packets.Packet) error {
	atomic.AddInt64(&cl.ops.info.PacketsReceived, 1)

	pk.ProtocolVersion = cl.Properties.ProtocolVersion // inherit client protocol version for decoding
	pk.FixedHeader = *fh
	p := make([]byte, pk.FixedHeader.Remaining)
	n, err := io.ReadFull(cl.Net.bconn, p)
	if err != nil {
		return err
	}

	atomic.AddInt64(&cl.ops.info.BytesReceived, int64(n))

	// Lockergate patch: p is made for this packet alone, so it is decoded
	// as it is; upstream copied it once more ("otherwise the next packet
	// will change the data of this one"), a second allocation per packet.
	px := p
	switch pk.FixedHeader.Type {
	case packets.Connect:
		err = pk.ConnectDecode(px)
	case packets.Disconnect:
		err = pk.DisconnectDecode(px)
	case packets.Connack:
		err = pk.ConnackDecode(px)
	case packets.Publish:
		err = pk.PublishDecode(px)
		if err == nil {
			atomic.AddInt64(&cl.ops.info.MessagesReceived, 1)
		}
	case packets.Puback:
		err = pk.PubackDecode(px)
	case packets.Pubrec:
		err = pk.PubrecDecode(px)
	case packets.Pubrel:
		err = pk.PubrelDecode(px)
	case packets.Pubcomp:
		err = pk.PubcompDecode(px)
	case packets.Subscribe:
		err = pk.SubscribeDecode(px)
	case packets.Suback:
		err = pk.SubackDecode(px)
	case packets.Unsubscribe:
		err = pk.UnsubscribeDecode(px)
	case packets.Unsuback:
		err = pk.UnsubackDecode(px)
	case packets.Pingreq:
	case packets.Pingresp:
	case packets.Auth:
		err = pk.AuthDecode(px)
	default:
		err = fmt.Errorf("invalid packet type; %v", pk.FixedHeader.Type)
	}
	return err
}

// WritePacket encodes and writes a packet to the client.
func (cl *Client) WritePacket(pk packets.Packet) error {
	return cl.writePacket(&pk)
}

// writePacket is WritePacket by pointer (Lockergate patch 26): its caller's
// copy is the only one on the path, down to the hooks. It changes *pk (the
// protocol version, the encoding's limits, a message's expiry), as
// WritePacket changed its own copy.
func (cl *Client) writePacket(pk *packets.Packet) error {
	if cl.Closed() {
		return ErrConnectionClosed
	}

	if cl.Net.Conn == nil {
		return nil
	}

	if pk.Expiry > 0 {
		expiry := pk.Expiry - time.Now().Unix()
		if expiry < 1 {
			expiry = 1
		}
		pk.Properties.MessageExpiryInterval = uint32(expiry) // [MQTT-3.3.2-6]
	}

	pk.ProtocolVersion = cl.Properties.ProtocolVersion
	if pk.Mods.MaxSize == 0 { // NB we use this statement to embed client packet sizes in tests
		pk.Mods.MaxSize = cl.Properties.Props.MaximumPacketSize
	}

	if cl.Properties.Props.RequestProblemInfoFlag && cl.Properties.Props.RequestProblemInfo == 0x0 {
		pk.Mods.DisallowProblemInfo = true // [MQTT-3.1.2-29] strict, no problem info on any packet if set
	}

	if pk.FixedHeader.Type != packets.Connack || cl.Properties.Props.RequestResponseInfo == 0x1 || cl.ops.options.Capabilities.Compatibilities.AlwaysReturnResponseInfo {
		pk.Mods.AllowResponseInfo = true // [MQTT-3.1.2-28] we need to know which properties we can encode
	}

	cl.ops.hooks.onPacketEncode(cl, pk)

	var err error
	buf := new(bytes.Buffer)
	switch pk.FixedHeader.Type {
	case packets.Connect:
		err = pk.ConnectEncode(buf)
	case packets.Connack:
		err = pk.ConnackEncode(buf)
	case packets.Publish:
		err = pk.PublishEncode(buf)
	case packets.Puback:
		err = pk.PubackEncode(buf)
	case packets.Pubrec:
		err = pk.PubrecEncode(buf)
	case packets.Pubrel:
		err = pk.PubrelEncode(buf)
	case packets.Pubcomp:
		err = pk.PubcompEncode(buf)
	case packets.Subscribe:
		err = pk.SubscribeEncode(buf)
	case packets.Suback:
		err = pk.SubackEncode(buf)
	case packets.Unsubscribe:
		err = pk.UnsubscribeEncode(buf)
	case packets.Unsuback:
		err = pk.UnsubackEncode(buf)
	case packets.Pingreq:
		err = pk.PingreqEncode(buf)
	case packets.Pingresp:
		err = pk.PingrespEncode(buf)
	case packets.Disconnect:
		err = pk.DisconnectEncode(buf)
	case packets.Auth:
		err = pk.AuthEncode(buf)
	default:
		err = fmt.Errorf("%w: %v", packets.ErrNoValidPacketAvailable, pk.FixedHeader.Type)
	}
	if err != nil {
		return err
	}

	if pk.Mods.MaxSize > 0 && uint32(buf.Len()) > pk.Mods.MaxSize {
		return packets.ErrPacketTooLarge // [MQTT-3.1.2-24] [MQTT-3.1.2-25]
	}

	n, err := func() (int64, error) {
		cl.Lock()
		defer cl.Unlock()
		if cl.queued() == 0 {
			if cl.Net.outbuf == nil {
				return buf.WriteTo(cl.Net.Conn)
			}

			// first write to buffer, then flush buffer
			n, _ := cl.Net.outbuf.Write(buf.Bytes()) // will always be successful
			err = cl.flushOutbuf()
			return int64(n), err
		}

		// there are more writes in the queue
		if cl.Net.outbuf == nil {
			if buf.Len() >= cl.ops.options.ClientNetWriteBufferSize {
				return buf.WriteTo(cl.Net.Conn)
			}
			cl.Net.outbuf = new(bytes.Buffer)
		}

		n, _ := cl.Net.outbuf.Write(buf.Bytes()) // will always be successful
		if cl.Net.outbuf.Len() < cl.ops.options.ClientNetWriteBufferSize {
			return int64(n), nil
		}

		err = cl.flushOutbuf()
		return int64(n), err
	}()
	if err != nil {
		return err
	}

	atomic.AddInt64(&cl.ops.info.BytesSent, n)
	atomic.AddInt64(&cl.ops.info.PacketsSent, 1)
	if pk.FixedHeader.Type == packets.Publish {
		atomic.AddInt64(&cl.ops.info.MessagesSent, 1)
	}

	cl.ops.hooks.onPacketSent(cl, pk, buf.Bytes())

	return err
}

func (cl *Client) flushOutbuf() (err error) {
	if cl.Net.outbuf == nil {
		return
	}

	_, err = cl.Net.outbuf.WriteTo(cl.Net.Conn)
	if err == nil {
		cl.Net.outbuf = nil
	}
	return
}
