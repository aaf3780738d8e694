package devicesim

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"time"

	"github.com/lockergate/lockergate/protocol"
)

// provision obtains an identity by claim (protocol v1, Provisioning): connect
// as prov-{serial}, subscribe to the response topic, then publish the request
// and wait for the answer.
func (l *Locker) provision(ctx context.Context) (Identity, error) {
	o := &l.f.opts
	claim := l.claimToken()
	if claim == "" {
		return Identity{}, fmt.Errorf("%w: no claim token", ErrConnRefused)
	}
	if err := l.f.lim.wait(ctx); err != nil {
		return Identity{}, err
	}
	respTopic := protocol.ProvisionResponseTopic(l.serial)
	answers := make(chan []byte, 1)
	s, err := dialSession(ctx, sessionConfig{
		broker:    o.Broker,
		tls:       o.TLSConfig,
		clientID:  protocol.ProvisionClientPrefix + l.serial,
		user:      protocol.ProvisionUsername,
		password:  claim,
		localAddr: l.localAddr(),
		keepAlive: o.KeepAlive,
		timeout:   o.ConnectTimeout,
		onMessage: func(topic string, payload []byte) {
			if topic != respTopic {
				return
			}
			select {
			case answers <- payload:
			default: // the first answer counts
			}
		},
	})
	if err != nil {
		return Identity{}, err
	}
	defer s.closeClean()
	if err := s.subscribe(ctx, respTopic); err != nil {
		return Identity{}, err
	}
	req := protocol.ProvisionRequest{
		Serial:       l.serial,
		Model:        l.model.Name,
		FW:           o.FW,
		Compartments: l.model.Compartments,
	}
	tok := s.cl.Publish(protocol.ProvisionRequestTopic(l.serial), 1, false, protocol.Encode(req))
	if err := waitToken(ctx, tok, ackTimeout); err != nil {
		return Identity{}, fmt.Errorf("publish request: %w", err)
	}
	t := time.NewTimer(o.ProvisionTimeout)
	defer t.Stop()
	var payload []byte
	select {
	case payload = <-answers:
	case <-s.lost:
		return Identity{}, fmt.Errorf("connection lost waiting for the answer: %w", s.lostReason())
	case <-t.C:
		return Identity{}, fmt.Errorf("no answer within %v", o.ProvisionTimeout)
	case <-ctx.Done():
		return Identity{}, ctx.Err()
	}
	return parseProvisionResponse(payload)
}

func parseProvisionResponse(payload []byte) (Identity, error) {
	r, err := protocol.Decode[protocol.ProvisionResponse](payload)
	if err != nil {
		return Identity{}, fmt.Errorf("answer: %w", err)
	}
	if r.Status != "ok" {
		return Identity{}, &ProvisionError{Code: r.Error}
	}
	key, err := decodeB64(r.CredKey)
	if err != nil || len(key) == 0 {
		return Identity{}, errors.New("answer: cred_key is not base64")
	}
	id := Identity{DeviceID: r.DeviceID, Password: r.Password, CredKey: key, Broker: r.Broker}
	if r.FwPubkey != "" {
		if id.FwPubkey, err = decodeB64(r.FwPubkey); err != nil {
			return Identity{}, errors.New("answer: fw_pubkey is not base64")
		}
	}
	return id, nil
}

// decodeB64 accepts padded and unpadded standard base64.
func decodeB64(s string) ([]byte, error) {
	if b, err := base64.StdEncoding.DecodeString(s); err == nil {
		return b, nil
	}
	return base64.RawStdEncoding.DecodeString(s)
}
