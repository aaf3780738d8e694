package postgres_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/pickup"
)

// TestRekeyCredentials: a credential made for a locker's old key is
// refused once the locker was re-provisioned, and re-keying gives the
// active credentials MACs for the current key and a new set version.
func TestRekeyCredentials(t *testing.T) {
	ctx := context.Background()
	db := MustOpen(t)
	id := MustDevice(t, db, "s1", "SN-RK", 2)
	cred := func(cid, pin string, gen int) *pickup.Credential {
		return &pickup.Credential{ID: cid, DeviceID: id, PINMAC: pin, QRMAC: "qr-" + pin, Compartments: []int{1},
			NotAfter: time.Now().Add(time.Hour), CreatedAt: time.Now(), KeyGen: gen}
	}
	version := func() (v int64) {
		t.Helper()
		if err := db.Pool().QueryRow(ctx, `SELECT creds_version FROM devices WHERE id = $1`, id).Scan(&v); err != nil {
			t.Fatal(err)
		}
		return v
	}
	if err := db.MintCredential(ctx, cred("k-1", "mac-old", 1), nil); err != nil {
		t.Fatal(err)
	}
	// Re-provisioned (what Register does to key_gen).
	if _, err := db.Pool().Exec(ctx, `UPDATE devices SET key_gen = 2 WHERE id = $1`, id); err != nil {
		t.Fatal(err)
	}
	before := version()
	if err := db.MintCredential(ctx, cred("k-2", "mac-stale", 1), nil); !errors.Is(err, pickup.ErrKeyChanged) {
		t.Fatalf("credential for the old key: %v, want ErrKeyChanged", err)
	}
	if _, _, err := db.GetCredential(ctx, "k-2"); !errors.Is(err, fleet.ErrNotFound) {
		t.Fatalf("the refused credential was stored: %v", err)
	}
	if version() != before {
		t.Fatal("a refused credential bumped the set version")
	}

	var gens []int
	n, err := db.RekeyCredentials(ctx, id, func(gen int, c *pickup.Credential) {
		gens = append(gens, gen)
		c.PINMAC, c.QRMAC = "mac-new", "" // the QR token dropped, to see "" stored as none
	})
	if err != nil || n != 1 || len(gens) != 1 || gens[0] != 2 {
		t.Fatalf("re-key: %d credentials, generations %v, %v; want 1 at generation 2", n, gens, err)
	}
	c, state, err := db.GetCredential(ctx, "k-1")
	if err != nil || state != "active" || c.PINMAC != "mac-new" || c.QRMAC != "" {
		t.Fatalf("after re-key: %+v %s %v", c, state, err)
	}
	if version() != before+1 {
		t.Fatal("re-key did not bump the set version: the locker would not get the new MACs")
	}
	if _, err := db.RekeyCredentials(ctx, "lk-none", func(int, *pickup.Credential) {}); !errors.Is(err, fleet.ErrNotFound) {
		t.Fatalf("unknown locker: %v, want ErrNotFound", err)
	}
}

// TestRotateCredentials: a rotation whose new PIN collides with another
// active one changes nothing and says so (ErrPINTaken); an unknown locker
// is ErrNotFound; a rotation replaces each active credential.
func TestRotateCredentials(t *testing.T) {
	ctx := context.Background()
	db := MustOpen(t)
	id := MustDevice(t, db, "s1", "SN-ROT", 2)
	for i, pin := range []string{"mac-a", "mac-b"} {
		if err := db.MintCredential(ctx, &pickup.Credential{ID: "k-" + pin, DeviceID: id, PINMAC: pin, Compartments: []int{i + 1},
			NotAfter: time.Now().Add(time.Hour), CreatedAt: time.Now(), KeyGen: 1}, nil); err != nil {
			t.Fatal(err)
		}
	}
	rotate := func(device string, pin func(old *pickup.Credential) string) (int, error) {
		return db.RotateCredentials(ctx, device, time.Now(), func(gen int, old *pickup.Credential) *pickup.Credential {
			return &pickup.Credential{ID: "new-" + old.ID, DeviceID: device, PINMAC: pin(old), Compartments: old.Compartments,
				NotAfter: old.NotAfter, CreatedAt: time.Now(), KeyGen: gen}
		}, func(*pickup.Pickup, *pickup.Credential) *pickup.Event { return nil },
			fleet.AuditEntry{Actor: "test", Action: "locker.rotate_codes", Locker: device, Site: "s1"})
	}
	// Both new PINs the same: the second insert collides.
	if _, err := rotate(id, func(*pickup.Credential) string { return "mac-same" }); !errors.Is(err, pickup.ErrPINTaken) {
		t.Fatalf("colliding rotation: %v, want ErrPINTaken", err)
	}
	for _, k := range []string{"k-mac-a", "k-mac-b"} {
		if _, state, err := db.GetCredential(ctx, k); err != nil || state != "active" {
			t.Fatalf("%s after a failed rotation: %s, %v; want still active", k, state, err)
		}
	}
	if n, err := rotate(id, func(old *pickup.Credential) string { return old.PINMAC + "-2" }); err != nil || n != 2 {
		t.Fatalf("rotation: %d, %v; want 2", n, err)
	}
	for _, k := range []string{"k-mac-a", "k-mac-b"} {
		if _, state, _ := db.GetCredential(ctx, k); state != "revoked" {
			t.Fatalf("%s after the rotation: %s, want revoked", k, state)
		}
		if c, state, err := db.GetCredential(ctx, "new-"+k); err != nil || state != "active" || c.PINMAC != k[2:]+"-2" {
			t.Fatalf("new-%s: %+v %s %v", k, c, state, err)
		}
	}
	if _, err := rotate("lk-none", func(*pickup.Credential) string { return "x" }); !errors.Is(err, fleet.ErrNotFound) {
		t.Fatalf("unknown locker: %v, want ErrNotFound", err)
	}
}
