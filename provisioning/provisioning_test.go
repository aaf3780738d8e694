package provisioning

// Unit tests of how Provision turns the store's outcome into an answer or
// into no answer, and of what AuthClaim tells the broker, against an
// in-memory store. The same paths run end to
// end over MQTT and PostgreSQL in gateway/ (TestSecurityClaims,
// TestDatabaseRestartDuringIngest).

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/lockergate/lockergate/protocol"
)

// registerStore answers Register with err (or a registration when nil).
// The embedded Store is nil: any other method panics.
type registerStore struct {
	Store
	err      error
	replaced bool  // the registration re-provisions an existing locker
	missing  []int // compartments the replaced board no longer reports
}

func (s registerStore) Register(_ context.Context, _ []byte, r Registration) (*Registered, error) {
	if s.err != nil {
		return nil, s.err
	}
	return &Registered{DeviceID: r.DeviceID, KeyGen: 1, Site: "s1", Replaced: s.replaced, Missing: s.missing}, nil
}

func TestProvisionAnswers(t *testing.T) {
	req := protocol.Encode(protocol.ProvisionRequest{Serial: "SN-1", Model: "LX", FW: "1.0.0",
		Compartments: []protocol.CompartmentSpec{{N: 1, Size: "S", Zone: "ambient"}}})
	issueFailed := func(context.Context, string, string) error { return errors.New("dynsec: connection refused") }
	rekeyFailed := func(context.Context, string) error { return errors.New("re-key: connection refused") }
	for _, tc := range []struct {
		name     string
		err      error // Register's
		onIssued func(context.Context, string, string) error
		want     string // the answer's error code; "" for ok, "-" for no answer
		replaced bool
		onRekey  func(context.Context, string) error
	}{
		{"Registered", nil, nil, "", false, nil},
		{"ClaimExhausted", ErrClaimExhausted, nil, protocol.ProvClaimExhausted, false, nil},
		{"SerialRefused", ErrSerialRefused, nil, protocol.ProvInvalid, false, nil},
		{"ClaimRevoked", ErrUnknownClaim, nil, protocol.ProvInvalid, false, nil},
		{"RejectedByTheDatabase", errors.New("register SN-1: unique violation"), nil, protocol.ProvInvalid, false, nil},
		{"StoreUnavailable", fmt.Errorf("register SN-1: %w: connection refused", ErrUnavailable), nil, "-", false, nil},
		{"IdentityNotHandedToTheBroker", nil, issueFailed, "-", false, nil},
		{"Replaced", nil, nil, "", true, nil},
		{"ReplacedButNotReKeyed", nil, nil, "-", true, rekeyFailed},
		{"NewLockerIsNotReKeyed", nil, nil, "", false, rekeyFailed},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := New(Options{Store: registerStore{err: tc.err, replaced: tc.replaced}, MasterKey: bytes.Repeat([]byte{7}, 32),
				OnIssued: tc.onIssued, OnReplace: func(string) {}, OnRekey: tc.onRekey})
			if err != nil {
				t.Fatal(err)
			}
			resp, err := s.Provision(context.Background(), "claim", "SN-1", req)
			switch tc.want {
			case "-":
				if err == nil || resp != (protocol.ProvisionResponse{}) {
					t.Fatalf("got %+v, %v; want no answer and an error (the locker retries)", resp, err)
				}
			case "":
				if err != nil || resp.Status != "ok" || resp.DeviceID == "" || resp.Password == "" {
					t.Fatalf("got %+v, %v; want an identity", resp, err)
				}
			default:
				if err != nil || resp.Status != "error" || resp.Error != tc.want {
					t.Fatalf("got %+v, %v; want the answer %q", resp, err, tc.want)
				}
			}
		})
	}
}

// TestProvisionWarnsOfMissingCompartments: a replaced board that no longer
// reports compartments holding live pickups is answered, and the gateway
// warns, naming them, so that staff see to those orders.
func TestProvisionWarnsOfMissingCompartments(t *testing.T) {
	var logs bytes.Buffer
	s, err := New(Options{Store: registerStore{replaced: true, missing: []int{4, 7}}, MasterKey: bytes.Repeat([]byte{7}, 32),
		OnReplace: func(string) {}, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	req := protocol.Encode(protocol.ProvisionRequest{Serial: "SN-1", Model: "LX", FW: "1.0.0",
		Compartments: []protocol.CompartmentSpec{{N: 1, Size: "S", Zone: "ambient"}}})
	if resp, err := s.Provision(context.Background(), "claim", "SN-1", req); err != nil || resp.Status != "ok" {
		t.Fatalf("got %+v, %v; want an identity", resp, err)
	}
	if !strings.Contains(logs.String(), "level=WARN") || !strings.Contains(logs.String(), "compartments=\"[4 7]\"") {
		t.Fatalf("no warning naming the missing compartments 4 and 7 in:\n%s", logs.String())
	}
}

// claimStore answers ClaimByHash with its claim.
type claimStore struct {
	Store
	c *Claim
}

func (s claimStore) ClaimByHash(context.Context, []byte) (*Claim, error) { return s.c, nil }

// TestAuthClaimUsable: a claim is usable for a serial while it has not
// expired, has uses left and its pattern allows the serial; any other
// unrevoked claim still authenticates (its request gets the refusal).
func TestAuthClaimUsable(t *testing.T) {
	now := time.Date(2026, 12, 7, 12, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		name string
		c    Claim
		want bool
	}{
		{"Live", Claim{MaxUses: 2, Used: 1, ExpiresAt: now.Add(time.Hour)}, true},
		{"Expired", Claim{MaxUses: 2, ExpiresAt: now}, false},
		{"Exhausted", Claim{MaxUses: 2, Used: 2, ExpiresAt: now.Add(time.Hour)}, false},
		{"OtherSerials", Claim{MaxUses: 2, ExpiresAt: now.Add(time.Hour), SerialPattern: "SN-9*"}, false},
		{"ItsSerials", Claim{MaxUses: 2, ExpiresAt: now.Add(time.Hour), SerialPattern: "SN-1*"}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := New(Options{Store: claimStore{c: &tc.c}, MasterKey: bytes.Repeat([]byte{7}, 32), Now: func() time.Time { return now }})
			if err != nil {
				t.Fatal(err)
			}
			usable, err := s.AuthClaim(context.Background(), "token", "SN-123")
			if err != nil || usable != tc.want {
				t.Fatalf("usable %v (%v), want %v", usable, err, tc.want)
			}
		})
	}
}
