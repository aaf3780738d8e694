package pickup

import (
	"bytes"
	"context"
	"errors"
	"testing"
	"time"

	"github.com/lockergate/lockergate/protocol"
)

// mintStore answers KeyGen and MintCredential from scripts; the rest of
// Store is not used by mint.
type mintStore struct {
	Store
	gens    []int   // KeyGen answers, in turn (the last repeats)
	results []error // MintCredential answers, in turn (then nil)
	keyGens int
	minted  []*Credential
	// KeyGen fails with keyGenEr after keyGenErFrom calls (0: at once).
	keyGenEr     error
	keyGenErFrom int
}

func (m *mintStore) KeyGen(context.Context, string) (int, error) {
	m.keyGens++
	if m.keyGenEr != nil && m.keyGens > m.keyGenErFrom {
		return 0, m.keyGenEr
	}
	return m.gens[min(m.keyGens-1, len(m.gens)-1)], nil
}

func (m *mintStore) MintCredential(_ context.Context, c *Credential, _ []string, _ bool, _ func(*Pickup, *Credential) *Event) error {
	cp := *c
	m.minted = append(m.minted, &cp)
	if len(m.minted) <= len(m.results) {
		return m.results[len(m.minted)-1]
	}
	return nil
}

type noFleet struct{ Fleet }

func newMintService(t *testing.T, st *mintStore) *Service {
	t.Helper()
	s, err := New(Options{Store: st, Fleet: noFleet{}, MasterKey: bytes.Repeat([]byte{7}, 32)})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// TestMintRetries: mint tries another credential id when the PIN collides,
// MACs again for the new key when the locker was re-provisioned meanwhile,
// gives up after 8 collisions, and passes any other error on at once.
func TestMintRetries(t *testing.T) {
	ctx := context.Background()
	until := time.Now().Add(time.Hour)
	mint := func(st *mintStore, kind string) (*Credential, error) {
		return newMintService(t, st).mint(ctx, "lk-1", []int{3}, until, []string{"p-1"}, kind, false, nil, nil)
	}

	t.Run("PINTaken", func(t *testing.T) {
		st := &mintStore{gens: []int{1}, results: []error{ErrPINTaken, ErrPINTaken}}
		c, err := mint(st, "")
		if err != nil || len(st.minted) != 3 {
			t.Fatalf("got %v after %d tries, want success on the third", err, len(st.minted))
		}
		ids := map[string]bool{}
		pins := map[string]bool{}
		for _, m := range st.minted {
			ids[m.ID], pins[m.PINMAC] = true, true
		}
		if len(ids) != 3 || len(pins) != 3 {
			t.Fatalf("retries reused an id or a PIN: %d ids, %d PIN MACs", len(ids), len(pins))
		}
		if c.ID != st.minted[2].ID || c.PINMAC == "" || c.QRMAC == "" {
			t.Fatalf("returned %+v, want the stored third, with PIN and QR", c)
		}
	})
	t.Run("KeyChanged", func(t *testing.T) {
		st := &mintStore{gens: []int{1, 2}, results: []error{ErrKeyChanged}}
		c, err := mint(st, protocol.KindPIN)
		if err != nil || st.keyGens != 2 {
			t.Fatalf("got %v with %d key lookups, want success after 2", err, st.keyGens)
		}
		if st.minted[0].KeyGen != 1 || c.KeyGen != 2 || c.QRMAC != "" || c.PINMAC == "" {
			t.Fatalf("first try key %d, stored key %d, QR %q: want 1, 2 and a PIN only", st.minted[0].KeyGen, c.KeyGen, c.QRMAC)
		}
		// The same id under another key gives another MAC.
		again := *st.minted[0]
		newMintService(t, st).setMACs(&again, 2, true, false)
		if again.PINMAC == st.minted[0].PINMAC {
			t.Fatal("MAC did not change with the key")
		}
	})
	t.Run("GivesUp", func(t *testing.T) {
		errs := make([]error, 8)
		for i := range errs {
			errs[i] = ErrPINTaken
		}
		st := &mintStore{gens: []int{1}, results: errs}
		if _, err := mint(st, ""); err == nil || len(st.minted) != 8 {
			t.Fatalf("got %v after %d tries, want an error after 8", err, len(st.minted))
		}
	})
	t.Run("OtherErrors", func(t *testing.T) {
		boom := errors.New("database down")
		st := &mintStore{gens: []int{1}, results: []error{boom}}
		if _, err := mint(st, ""); !errors.Is(err, boom) || len(st.minted) != 1 {
			t.Fatalf("got %v after %d tries, want the error at once", err, len(st.minted))
		}
		st = &mintStore{keyGenEr: boom}
		if _, err := mint(st, ""); !errors.Is(err, boom) || len(st.minted) != 0 {
			t.Fatalf("key lookup failing: %v after %d tries", err, len(st.minted))
		}
		// The new key cannot be read after a re-provisioning: no second try
		// with MACs of the old key.
		st = &mintStore{gens: []int{1}, results: []error{ErrKeyChanged}, keyGenEr: boom, keyGenErFrom: 1}
		if _, err := mint(st, ""); !errors.Is(err, boom) || len(st.minted) != 1 || st.keyGens != 2 {
			t.Fatalf("key lookup failing after a key change: %v after %d tries and %d lookups, want the error after 1 and 2",
				err, len(st.minted), st.keyGens)
		}
	})
}
