package postgres_test

import (
	"context"
	"errors"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/internal/testtool"
	"github.com/lockergate/lockergate/pickup"
	"github.com/lockergate/lockergate/postgres"
	"github.com/lockergate/lockergate/webhook"
)

// credEnv is a locker online with live pickups, for the credential tests.
type credEnv struct {
	t   *testing.T
	db  *postgres.DB
	id  string // the locker
	seq int
}

func newCredEnv(t *testing.T, serial string, compartments int) *credEnv {
	db := MustOpen(t)
	e := &credEnv{t: t, db: db, id: MustDevice(t, db, "s1", serial, compartments)}
	e.exec(`UPDATE devices SET online = true WHERE id = $1`, e.id)
	return e
}

func (e *credEnv) exec(sql string, args ...any) {
	e.t.Helper()
	if _, err := e.db.Pool().Exec(context.Background(), sql, args...); err != nil {
		e.t.Fatal(err)
	}
}

// allocate stages a pickup for an ambient M compartment at site s1 (safe
// from several goroutines).
func (e *credEnv) allocate(ref string) (*pickup.Pickup, error) {
	p := &pickup.Pickup{ID: "p-" + ref, Site: "s1", OrderRef: ref, Size: "M", Zone: "ambient",
		Recipient: pickup.Recipient{Kind: "customer"}, ExpiresAt: time.Now().Add(time.Hour), CreatedBy: "test", CreatedAt: time.Now()}
	return p, e.db.Allocate(context.Background(), p, time.Time{})
}

// pickup stages a pickup in the next free compartment and makes it ready.
func (e *credEnv) pickup(ref string) *pickup.Pickup {
	e.t.Helper()
	p, err := e.allocate(ref)
	if err != nil {
		e.t.Fatal(err)
	}
	e.transition(p.ID, pickup.Ready)
	return p
}

func (e *credEnv) transition(id, to string) *pickup.Pickup {
	e.t.Helper()
	p, err := e.db.Transition(context.Background(), id, []string{pickup.Staging, pickup.Ready}, to, "test", "", time.Now(), nil)
	if err != nil {
		e.t.Fatal(err)
	}
	return p
}

// mint makes credential cid (PIN MAC pin) for pickups ps.
func (e *credEnv) mint(cid, pin string, gen int, ps ...*pickup.Pickup) error {
	var ids []string
	var comps []int
	for _, p := range ps {
		ids, comps = append(ids, p.ID), append(comps, p.Compartment)
	}
	return e.db.MintCredential(context.Background(), &pickup.Credential{ID: cid, DeviceID: e.id, PINMAC: pin, QRMAC: "qr-" + pin,
		Compartments: comps, NotAfter: time.Now().Add(time.Hour), CreatedAt: time.Now(), KeyGen: gen}, ids, false, nil)
}

func (e *credEnv) mustMint(cid, pin string, ps ...*pickup.Pickup) {
	e.t.Helper()
	if err := e.mint(cid, pin, 1, ps...); err != nil {
		e.t.Fatal(err)
	}
}

func (e *credEnv) cred(cid string) (*pickup.Credential, string) {
	e.t.Helper()
	c, state, err := e.db.GetCredential(context.Background(), cid)
	if err != nil {
		e.t.Fatalf("credential %s: %v", cid, err)
	}
	return c, state
}

// uses counts the locker's credential.use audit entries.
func (e *credEnv) uses() (n int) {
	e.t.Helper()
	if err := e.db.Pool().QueryRow(context.Background(), `SELECT count(*) FROM audit WHERE locker = $1 AND action = 'credential.use'`, e.id).Scan(&n); err != nil {
		e.t.Fatal(err)
	}
	return n
}

// applied is the locker acknowledging its current credential set.
func (e *credEnv) applied() {
	e.t.Helper()
	e.exec(`UPDATE devices SET creds_acked = creds_version WHERE id = $1`, e.id)
}

func (e *credEnv) version() (v int64) {
	e.t.Helper()
	if err := e.db.Pool().QueryRow(context.Background(), `SELECT creds_version FROM devices WHERE id = $1`, e.id).Scan(&v); err != nil {
		e.t.Fatal(err)
	}
	return v
}

// TestRekeyCredentials: a credential made for a locker's old key is
// refused once the locker was re-provisioned, and re-keying gives the
// active credentials MACs for the current key and a new set version.
func TestRekeyCredentials(t *testing.T) {
	ctx := context.Background()
	e := newCredEnv(t, "SN-RK", 2)
	p := e.pickup("RK-1")
	e.mustMint("k-1", "mac-old", p)
	// Re-provisioned (what Register does to key_gen).
	e.exec(`UPDATE devices SET key_gen = 2 WHERE id = $1`, e.id)
	before := e.version()
	if err := e.mint("k-2", "mac-stale", 1, p); !errors.Is(err, pickup.ErrKeyChanged) {
		t.Fatalf("credential for the old key: %v, want ErrKeyChanged", err)
	}
	if _, _, err := e.db.GetCredential(ctx, "k-2"); !errors.Is(err, fleet.ErrNotFound) {
		t.Fatalf("the refused credential was stored: %v", err)
	}
	if e.version() != before {
		t.Fatal("a refused credential bumped the set version")
	}

	var gens []int
	n, err := e.db.RekeyCredentials(ctx, e.id, func(gen int, c *pickup.Credential) {
		gens = append(gens, gen)
		c.PINMAC, c.QRMAC = "mac-new", "" // the QR token dropped, to see "" stored as none
	})
	if err != nil || n != 1 || len(gens) != 1 || gens[0] != 2 {
		t.Fatalf("re-key: %d credentials, generations %v, %v; want 1 at generation 2", n, gens, err)
	}
	if c, state := e.cred("k-1"); state != "active" || c.PINMAC != "mac-new" || c.QRMAC != "" {
		t.Fatalf("after re-key: %+v %s", c, state)
	}
	if e.version() != before+1 {
		t.Fatal("re-key did not bump the set version: the locker would not get the new MACs")
	}
	if _, err := e.db.RekeyCredentials(ctx, "lk-none", func(int, *pickup.Credential) {}); !errors.Is(err, fleet.ErrNotFound) {
		t.Fatalf("unknown locker: %v, want ErrNotFound", err)
	}
}

// TestCredentialEndsWithItsOrders: a pickup that ends takes its
// compartment out of its credential (a combined code keeps opening the
// other orders' compartments only, until the first of them expires) and the
// last one revokes it; no credential is minted for a pickup that ended. A
// code never outlives its orders (TestRotateCredentials: a rotation also
// sweeps one left over).
func TestCredentialEndsWithItsOrders(t *testing.T) {
	ctx := context.Background()
	e := newCredEnv(t, "SN-END", 4)
	a, b, c := e.pickup("E-1"), e.pickup("E-2"), e.pickup("E-3")
	e.exec(`UPDATE pickups SET expires_at = now() + interval '10 minutes' WHERE id = $1`, a.ID)
	e.exec(`UPDATE pickups SET expires_at = date_trunc('second', now()) + interval '50 minutes' WHERE id = $1`, b.ID)
	e.mustMint("k-ab", "mac-ab", a, b)
	before := e.version()
	e.transition(a.ID, pickup.Cancelled)
	bNow, err := e.db.GetPickup(ctx, b.ID)
	if err != nil {
		t.Fatal(err)
	}
	if cr, state := e.cred("k-ab"); state != "active" || !slices.Equal(cr.Compartments, []int{b.Compartment}) || !cr.NotAfter.Equal(bNow.ExpiresAt) {
		t.Fatalf("combined credential after one order was cancelled: %+v %s; want active for compartment %d only, until %s",
			cr, state, b.Compartment, bNow.ExpiresAt)
	}
	if err := e.mint("k-late", "mac-late", 1, a, b); !errors.Is(err, fleet.ErrConflict) {
		t.Fatalf("a code for an ended pickup and a live one: %v, want ErrConflict", err)
	}
	if e.version() != before+1 {
		t.Fatal("narrowing the credential did not bump the set version")
	}
	e.transition(b.ID, pickup.Expired)
	if _, state := e.cred("k-ab"); state != "revoked" {
		t.Fatalf("credential after its last order expired: %s, want revoked", state)
	}

	e.mustMint("k-c", "mac-c", c)
	e.transition(c.ID, pickup.Cancelled)
	if _, state := e.cred("k-c"); state != "revoked" {
		t.Fatalf("credential of a cancelled pickup: %s, want revoked", state)
	}
}

// TestRotateCredentials: a rotation replaces each credential that opens
// live pickups (narrowed to them), revokes one that opens none, and a code
// the locker accepted from its old set is a use of the new credential. A
// rotation whose new PIN collides changes nothing (ErrPINTaken); an
// unknown locker is ErrNotFound.
func TestRotateCredentials(t *testing.T) {
	ctx := context.Background()
	e := newCredEnv(t, "SN-ROT", 4)
	a, b, c := e.pickup("R-1"), e.pickup("R-2"), e.pickup("R-3")
	e.mustMint("k-a", "mac-a", a)
	e.mustMint("k-bc", "mac-bc", b, c)
	// c ended without its compartment leaving the combined credential, and
	// an orphan: both as a race with a cancel would leave them.
	e.exec(`UPDATE pickups SET state = 'cancelled' WHERE id = $1`, c.ID)
	e.exec(`INSERT INTO credentials (id, device_id, pin_mac, compartments, not_after, state, created_at)
		VALUES ('k-orphan', $1, 'mac-orphan', '{4}', now() + interval '1 hour', 'active', now())`, e.id)

	var events []string
	rotate := func(device string, pin func(old *pickup.Credential) string) (int, error) {
		events = nil
		return e.db.RotateCredentials(ctx, device, time.Now(), func(gen int, old *pickup.Credential) *pickup.Credential {
			return &pickup.Credential{ID: "new-" + old.ID, DeviceID: device, PINMAC: pin(old), Compartments: old.Compartments,
				NotAfter: old.NotAfter, CreatedAt: time.Now(), KeyGen: gen}
		}, func(p *pickup.Pickup, c *pickup.Credential) *pickup.Event {
			events = append(events, p.ID+"="+c.ID)
			return &pickup.Event{ID: fleet.NewID("evt"), Type: pickup.EventCredentialChanged, CreatedAt: time.Now()}
		}, fleet.AuditEntry{Actor: "test", Action: "locker.rotate_codes", Locker: device, Site: "s1"})
	}
	// Both new PINs the same: the second insert collides.
	if _, err := rotate(e.id, func(*pickup.Credential) string { return "mac-same" }); !errors.Is(err, pickup.ErrPINTaken) {
		t.Fatalf("colliding rotation: %v, want ErrPINTaken", err)
	}
	for _, k := range []string{"k-a", "k-bc", "k-orphan"} {
		if _, state := e.cred(k); state != "active" {
			t.Fatalf("%s after a failed rotation: %s; want still active", k, state)
		}
	}
	before := e.version()
	if n, err := rotate(e.id, func(old *pickup.Credential) string { return old.PINMAC + "-2" }); err != nil || n != 2 {
		t.Fatalf("rotation: %d, %v; want 2 (the orphan is only revoked)", n, err)
	}
	slices.Sort(events)
	if want := []string{a.ID + "=new-k-a", b.ID + "=new-k-bc"}; !slices.Equal(events, want) {
		t.Fatalf("events %v, want %v", events, want)
	}
	for k, want := range map[string][]int{"k-a": {a.Compartment}, "k-bc": {b.Compartment}} {
		if _, state := e.cred(k); state != "revoked" {
			t.Fatalf("%s after the rotation: %s, want revoked", k, state)
		}
		if cr, state := e.cred("new-" + k); state != "active" || cr.PINMAC != "mac-"+k[2:]+"-2" || !slices.Equal(cr.Compartments, want) {
			t.Fatalf("new-%s: %+v %s; want active for %v", k, cr, state, want)
		}
	}
	if _, state := e.cred("k-orphan"); state != "revoked" {
		t.Fatalf("orphan after the rotation: %s, want revoked", state)
	}
	if _, _, err := e.db.GetCredential(ctx, "new-k-orphan"); !errors.Is(err, fleet.ErrNotFound) {
		t.Fatalf("a credential of no live pickup was re-minted: %v", err)
	}
	if e.version() != before+1 {
		t.Fatal("the rotation did not bump the set version once")
	}
	// The compartments the old codes opened that hold no live pickup wait
	// for the locker to apply the new set: c's and the orphan's are free,
	// and their codes still open them at the locker till then.
	rows, err := e.db.Pool().Query(ctx, `SELECT n FROM compartment_clears WHERE device_id = $1 AND version = $2 ORDER BY n`, e.id, before+1)
	if err != nil {
		t.Fatal(err)
	}
	cleared, err := pgx.CollectRows(rows, pgx.RowTo[int])
	want := []int{c.Compartment, 4}
	slices.Sort(want)
	if want = slices.Compact(want); err != nil || !slices.Equal(cleared, want) {
		t.Fatalf("compartments waiting for the rotation's set: %v %v, want %v", cleared, err, want)
	}

	// The locker had not got the new set: it accepts the old code of a.
	usedAt := time.Now()
	ps, err := e.db.UseCredential(ctx, e.id, "k-a", usedAt, nil)
	if err != nil || len(ps) != 1 || ps[0].ID != a.ID {
		t.Fatalf("old code used after the rotation: %+v, %v; want pickup %s", ps, err, a.ID)
	}
	if _, state := e.cred("new-k-a"); state != "used" {
		t.Fatalf("the replacement after the old code was used: %s, want used", state)
	}
	// The same use offered again (an event replayed): its pickups all the
	// same (the late-code step needs them), and nothing recorded twice.
	version := e.version()
	if ps, err := e.db.UseCredential(ctx, e.id, "k-a", usedAt, nil); err != nil || len(ps) != 1 || ps[0].ID != a.ID {
		t.Fatalf("the use replayed: %+v, %v; want pickup %s again", ps, err, a.ID)
	}
	if n := e.uses(); n != 1 || e.version() != version {
		t.Fatalf("after a replayed use: %d credential.use entries, version %d (was %d); want 1, unchanged", n, e.version(), version)
	}
	if _, err := e.db.UseCredential(ctx, e.id, "k-a", time.Now(), nil); !errors.Is(err, fleet.ErrNotFound) {
		t.Fatalf("the old code used twice: %v, want ErrNotFound", err)
	}
	if _, err := rotate("lk-none", func(*pickup.Credential) string { return "x" }); !errors.Is(err, fleet.ErrNotFound) {
		t.Fatalf("unknown locker: %v, want ErrNotFound", err)
	}
	var detail string
	if err := e.db.Pool().QueryRow(ctx, `SELECT detail->>'replaced_by' FROM audit WHERE locker = $1 AND action = 'credential.use'`,
		e.id).Scan(&detail); err != nil || detail != "new-k-a" {
		t.Fatalf("audit of the old code's use: replaced_by %q (%v), want new-k-a", detail, err)
	}

	// b's order is cancelled after the rotation: its old code, from the set
	// before, opens nothing any more.
	e.transition(b.ID, pickup.Cancelled)
	if _, err := e.db.UseCredential(ctx, e.id, "k-bc", time.Now(), nil); !errors.Is(err, fleet.ErrNotFound) {
		t.Fatalf("old code of a rotated, then cancelled order: %v, want ErrNotFound", err)
	}

	// A replacement that commits while the rotation runs: nothing changes,
	// ErrKeyChanged (the service tries again with the new key). (The
	// locker applied the sets so far: every compartment is free again.)
	e.applied()
	d := e.pickup("R-4")
	e.mustMint("k-d", "mac-d", d)
	_, err = rotate(e.id, func(old *pickup.Credential) string {
		e.exec(`UPDATE devices SET key_gen = key_gen + 1 WHERE id = $1`, e.id) // another connection
		return old.PINMAC + "-2"
	})
	if !errors.Is(err, pickup.ErrKeyChanged) {
		t.Fatalf("rotation across a replacement: %v, want ErrKeyChanged", err)
	}
	if _, state := e.cred("k-d"); state != "active" {
		t.Fatalf("k-d after the failed rotation: %s, want still active", state)
	}

	// Two rotations the locker missed: the code from before both still
	// counts, as a use of the latest replacement.
	for range 2 {
		if n, err := rotate(e.id, func(old *pickup.Credential) string { return old.PINMAC + "-2" }); err != nil || n != 1 {
			t.Fatalf("rotation of d's code: %d, %v; want 1", n, err)
		}
	}
	if ps, err := e.db.UseCredential(ctx, e.id, "k-d", time.Now(), nil); err != nil || len(ps) != 1 || ps[0].ID != d.ID {
		t.Fatalf("code from before two rotations: %+v, %v; want pickup %s", ps, err, d.ID)
	}
	if _, state := e.cred("new-new-k-d"); state != "used" {
		t.Fatalf("the latest replacement after the first code was used: %s, want used", state)
	}
}

// TestReadyEventNamesTheCurrentCredential: the pickup.ready event names the
// pickup's credential as of its transition, not the one its caller minted
// (a rotation may have replaced it in between).
func TestReadyEventNamesTheCurrentCredential(t *testing.T) {
	ctx := context.Background()
	e := newCredEnv(t, "SN-EVT", 1)
	tok := &fleet.Token{ID: "t-ops", Role: fleet.RoleOperator, Name: "ops", CreatedAt: time.Now()}
	if err := e.db.CreateToken(ctx, tok, []byte("hash-ops")); err != nil {
		t.Fatal(err)
	}
	if err := e.db.CreateWebhook(ctx, &webhook.Webhook{ID: "wh-1", TokenID: tok.ID, Role: fleet.RoleOperator,
		URL: "https://example.com/hook", Events: []string{pickup.EventReady}, CreatedAt: time.Now()}, []byte("secret"), webhook.MaxPerToken); err != nil {
		t.Fatal(err)
	}
	p := &pickup.Pickup{ID: "p-evt", Site: "s1", OrderRef: "EVT-1", Size: "M", Zone: "ambient",
		Recipient: pickup.Recipient{Kind: "customer"}, ExpiresAt: time.Now().Add(time.Hour), CreatedBy: "test", CreatedAt: time.Now()}
	if err := e.db.Allocate(ctx, p, time.Time{}); err != nil {
		t.Fatal(err)
	}
	e.mustMint("k-minted", "mac-1", p)
	e.mustMint("k-current", "mac-2", p) // as a rotation would have
	ev := &pickup.Event{ID: "evt-1", Type: pickup.EventReady, CreatedAt: time.Now(), Data: map[string]any{"credential_id": "k-minted"}}
	if _, err := e.db.Transition(ctx, p.ID, []string{pickup.Staging}, pickup.Ready, "test", "", time.Now(), ev); err != nil {
		t.Fatal(err)
	}
	var cid string
	if err := e.db.Pool().QueryRow(ctx, `SELECT body::jsonb->'data'->>'credential_id' FROM webhook_deliveries WHERE event_id = 'evt-1'`).Scan(&cid); err != nil || cid != "k-current" {
		t.Fatalf("queued ready event names credential %q (%v), want k-current", cid, err)
	}
}

// TestMigrationRevokesOrphans: migration 009 revokes active credentials
// that open no live pickup (left by the races fixed in 008) and bumps their
// lockers' set versions; live ones stay.
func TestMigrationRevokesOrphans(t *testing.T) {
	sql, err := os.ReadFile("migrations/009_revoke_orphan_credentials.sql")
	if err != nil {
		t.Fatal(err)
	}
	e := newCredEnv(t, "SN-ORPH", 2)
	p := e.pickup("O-1")
	e.mustMint("k-live", "mac-live", p)
	e.exec(`INSERT INTO credentials (id, device_id, pin_mac, compartments, not_after, state, created_at)
		VALUES ('k-orphan', $1, 'mac-orphan', '{2}', now() + interval '1 hour', 'active', now())`, e.id)
	before := e.version()
	e.exec(string(sql))
	if _, state := e.cred("k-orphan"); state != "revoked" {
		t.Fatalf("orphan after the migration: %s, want revoked", state)
	}
	if _, state := e.cred("k-live"); state != "active" {
		t.Fatalf("live credential after the migration: %s, want active", state)
	}
	if e.version() != before+1 {
		t.Fatal("the migration did not bump the set version of the orphan's locker")
	}
}

// TestMintForPartOfCombinedCode: a new code for one pickup of a combined
// code takes that compartment out of the combined code, which keeps
// opening the others' (and lasts until the first of them expires); a new
// code for every pickup of it retires it.
func TestMintForPartOfCombinedCode(t *testing.T) {
	e := newCredEnv(t, "SN-PART", 3)
	a, b, c := e.pickup("PART-A"), e.pickup("PART-B"), e.pickup("PART-C")
	// C's order ends first of those left once A has its own code.
	e.exec(`UPDATE pickups SET expires_at = date_trunc('second', now()) + interval '40 minutes' WHERE id = $1`, c.ID)
	e.mustMint("k-abc", "mac-abc", a, b, c)
	before := e.version()
	e.mustMint("k-a", "mac-a", a)
	cNow, err := e.db.GetPickup(context.Background(), c.ID)
	if err != nil {
		t.Fatal(err)
	}
	abc, state := e.cred("k-abc")
	if state != "active" || !slices.Equal(abc.Compartments, []int{b.Compartment, c.Compartment}) || !abc.NotAfter.Equal(cNow.ExpiresAt) {
		t.Fatalf("combined code after a new code for A: %s, compartments %v until %s; want active for %d and %d until %s",
			state, abc.Compartments, abc.NotAfter, b.Compartment, c.Compartment, cNow.ExpiresAt)
	}
	if v := e.version(); v <= before {
		t.Fatalf("set version %d, was %d: the locker must fetch the narrowed set", v, before)
	}
	if ka, state := e.cred("k-a"); state != "active" || !slices.Equal(ka.Compartments, []int{a.Compartment}) {
		t.Fatalf("A's own code: %s %v", state, ka.Compartments)
	}
	e.mustMint("k-bc", "mac-bc", b, c)
	if _, state := e.cred("k-abc"); state != "revoked" {
		t.Fatalf("combined code with every pickup given a new one: %s, want revoked", state)
	}
	// A code for no pickup would open nothing and be held by none.
	if err := e.mint("k-none", "mac-none", 1); !errors.Is(err, fleet.ErrInvalid) {
		t.Fatalf("credential for no pickup: %v, want ErrInvalid", err)
	}
	if _, _, err := e.db.GetCredential(context.Background(), "k-none"); !errors.Is(err, fleet.ErrNotFound) {
		t.Fatalf("the refused credential was stored: %v", err)
	}
}

// TestExpiryWaitsForCollection: a pickup whose code opened its compartment
// is being collected for pickup.CollectGrace: not due, and its transition
// to expired refused, even past expires_at; past the grace it expires.
func TestExpiryWaitsForCollection(t *testing.T) {
	ctx := context.Background()
	e := newCredEnv(t, "SN-COLLECT", 2)
	a, b := e.pickup("C-1"), e.pickup("C-2")
	e.mustMint("k-a", "mac-a", a)
	e.mustMint("k-b", "mac-b", b)
	used := time.Now()
	if _, err := e.db.UseCredential(ctx, e.id, "k-a", used, nil); err != nil {
		t.Fatal(err)
	}
	e.exec(`UPDATE pickups SET expires_at = $2 WHERE id = ANY($1)`, []string{a.ID, b.ID}, used.Add(-time.Second))

	due, err := e.db.DuePickups(ctx, used.Add(time.Minute), 10)
	if err != nil || len(due) != 1 || due[0].ID != b.ID {
		t.Fatalf("due a minute after the code was used: %+v %v; want only %s", due, err, b.ID)
	}
	// The sweep found a due a moment before its code was used.
	_, err = e.db.Transition(ctx, a.ID, []string{pickup.Staging, pickup.Ready}, pickup.Expired, "system:expiry", "", used.Add(time.Minute), nil)
	if !errors.Is(err, fleet.ErrConflict) {
		t.Fatalf("expire while being collected: %v, want ErrConflict", err)
	}
	past := used.Add(pickup.CollectGrace + time.Minute)
	if due, err := e.db.DuePickups(ctx, past, 10); err != nil || len(due) != 2 {
		t.Fatalf("due past the grace: %+v %v; want both", due, err)
	}
	if p, err := e.db.Transition(ctx, a.ID, []string{pickup.Staging, pickup.Ready}, pickup.Expired, "system:expiry", "", past, nil); err != nil || p.State != pickup.Expired {
		t.Fatalf("expire past the grace: %+v %v", p, err)
	}
}

// TestUseExpiredCredential: a code that opened, before their expiry, the
// compartments of pickups the gateway expired meanwhile (their locker was
// offline) marks them collected (their credential stays revoked, and reads
// as used) once: the same
// use offered again changes nothing, even once they are picked up. The
// use's time is the locker's clock less its offset at the last birth.
// Not such a use: one after the expiry, by a clock behind, by a locker of
// unknown offset, from before the pickups were ready, one that opened a
// cancelled pickup's compartment or a compartment the code was not for,
// and an unknown code. The compartment's closing finds the collected
// pickup until it is judged or a later pickup took the compartment.
func TestUseExpiredCredential(t *testing.T) {
	ctx := context.Background()
	e := newCredEnv(t, "SN-LATE", 3)
	a, b, c := e.pickup("L-1"), e.pickup("L-2"), e.pickup("L-3")
	e.mustMint("k-ab", "mac-ab", a, b) // a combined code
	e.mustMint("k-c", "mac-c", c)
	used := time.Now().Truncate(time.Millisecond) // after ready
	at := used.Add(10 * time.Second)              // when the locker's report arrives
	e.exec(`UPDATE pickups SET expires_at = $2 WHERE id = ANY($1)`, []string{a.ID, b.ID, c.ID}, used.Add(time.Second))
	e.transition(a.ID, pickup.Expired)
	e.transition(b.ID, pickup.Expired)
	e.transition(c.ID, pickup.Cancelled)
	if _, state := e.cred("k-ab"); state != "revoked" {
		t.Fatalf("combined code of two expired pickups: %s, want revoked", state)
	}
	offset := func(ms *int64) { e.exec(`UPDATE devices SET clock_offset_ms = $2 WHERE id = $1`, e.id, ms) }
	zero, behind := int64(0), int64(-2000)
	for _, tc := range []struct {
		name   string
		cred   string
		used   time.Time
		comps  []int
		offset *int64
	}{
		{"cancelled", "k-c", used, nil, &zero},
		{"after expiry", "k-ab", used.Add(2 * time.Second), nil, &zero},
		{"clock 2 s behind", "k-ab", used, nil, &behind},
		{"offset unknown", "k-ab", used, nil, nil},
		{"before ready", "k-ab", used.Add(-time.Hour), nil, &zero},
		{"another compartment", "k-ab", used, []int{a.Compartment, c.Compartment}, &zero},
		{"unknown", "k-none", used, nil, &zero},
	} {
		offset(tc.offset)
		if ps, err := e.db.UseExpiredCredential(ctx, e.id, tc.cred, tc.used, at, tc.comps); !errors.Is(err, fleet.ErrNotFound) {
			t.Fatalf("%s: %+v %v, want ErrNotFound", tc.name, ps, err)
		}
	}
	if n := e.uses(); n != 0 {
		t.Fatalf("%d credential.use entries after the refused uses, want 0", n)
	}
	ahead := int64(5000) // a clock 5 s ahead: the use, after the expiry as it reads, was before it
	offset(&ahead)
	for range 2 { // the event offered again
		ps, err := e.db.UseExpiredCredential(ctx, e.id, "k-ab", used.Add(5*time.Second), at, []int{a.Compartment, b.Compartment})
		if err != nil || len(ps) != 2 || ps[0].ID != a.ID || ps[1].ID != b.ID {
			t.Fatalf("use before expiry: %+v %v, want %s and %s", ps, err, a.ID, b.ID)
		}
	}
	if n := e.uses(); n != 1 {
		t.Fatalf("%d credential.use entries, want 1", n)
	}
	if _, state := e.cred("k-ab"); state != "revoked" {
		t.Fatalf("the code used late: %s, want revoked still (UseCredential must not take its use for its own)", state)
	}
	if ps, err := e.db.UseCredential(ctx, e.id, "k-ab", at, nil); !errors.Is(err, fleet.ErrNotFound) {
		t.Fatalf("UseCredential of the use offered again: %+v %v, want ErrNotFound (then judged here again)", ps, err)
	}
	if state, err := e.db.CredentialState(ctx, e.id, "k-ab"); err != nil || state != "used" {
		t.Fatalf("the late-used code's state for code_not_live: %q %v, want used", state, err)
	}
	if ps, err := e.db.UseExpiredCredential(ctx, e.id, "k-ab", used, at.Add(time.Second), nil); !errors.Is(err, fleet.ErrNotFound) {
		t.Fatalf("another use of the spent code: %+v %v, want ErrNotFound", ps, err)
	}

	if p, ts, err := e.db.LateCollectionAt(ctx, e.id, a.Compartment, at); err != nil || p.ID != a.ID || !ts.Equal(used.Add(5*time.Second)) {
		t.Fatalf("closing after the use: %+v %v %v, want %s used at the locker's %v", p, ts, err, a.ID, used.Add(5*time.Second))
	}
	// A closing that arrived before the use (applied by another instance,
	// out of the locker's order) finds it too: which closing is the
	// driver's is the workflow's to judge, by the locker's clock.
	if p, _, err := e.db.LateCollectionAt(ctx, e.id, a.Compartment, at.Add(-time.Millisecond)); err != nil || p.ID != a.ID {
		t.Fatalf("closing that arrived before the use: %+v %v, want %s", p, err, a.ID)
	}
	if p, _, err := e.db.LateCollectionAt(ctx, e.id, c.Compartment, at); !errors.Is(err, fleet.ErrNotFound) {
		t.Fatalf("closing of the cancelled pickup's compartment: %+v %v, want ErrNotFound", p, err)
	}
	// b's first closing after the use was judged not its driver's: no
	// closing is, after that, and the use offered again is still this use.
	if err := e.db.JudgeLateCollection(ctx, b.ID); err != nil {
		t.Fatal(err)
	}
	if p, _, err := e.db.LateCollectionAt(ctx, e.id, b.Compartment, at.Add(time.Minute)); !errors.Is(err, fleet.ErrNotFound) {
		t.Fatalf("closing after the judged one: %+v %v, want ErrNotFound", p, err)
	}
	if ps, err := e.db.UseExpiredCredential(ctx, e.id, "k-ab", used.Add(5*time.Second), at, nil); err != nil || len(ps) != 2 {
		t.Fatalf("the use offered again once judged: %+v %v", ps, err)
	}
	if p, _, err := e.db.LateCollectionAt(ctx, e.id, b.Compartment, at.Add(time.Minute)); !errors.Is(err, fleet.ErrNotFound) {
		t.Fatalf("closing after the judged one, the use offered again: %+v %v, want ErrNotFound", p, err)
	}
	// A later pickup in a's compartment: its closings are its own.
	e.exec(`UPDATE compartments SET occupied = false, door = 'closed' WHERE device_id = $1`, e.id)
	e.applied()
	d := e.pickup("L-4")
	if d.Compartment != a.Compartment {
		t.Fatalf("the next pickup took compartment %d, want a's %d", d.Compartment, a.Compartment)
	}
	e.exec(`UPDATE pickups SET created_at = $2 WHERE id = $1`, d.ID, at.Add(time.Minute))
	if p, _, err := e.db.LateCollectionAt(ctx, e.id, a.Compartment, at.Add(2*time.Minute)); !errors.Is(err, fleet.ErrNotFound) {
		t.Fatalf("closing after a later pickup: %+v %v, want ErrNotFound", p, err)
	}
	if p, _, err := e.db.LateCollectionAt(ctx, e.id, a.Compartment, at); err != nil || p.ID != a.ID {
		t.Fatalf("closing from before the later pickup: %+v %v, want %s", p, err, a.ID)
	}
	// By its id, whatever pickup came after it.
	if p, when, err := e.db.LateCollectionOf(ctx, a.ID); err != nil || p.ID != a.ID || when.IsZero() {
		t.Fatalf("LateCollectionOf(%s): %+v %v %v", a.ID, p, when, err)
	}
	if p, _, err := e.db.LateCollectionOf(ctx, d.ID); !errors.Is(err, fleet.ErrNotFound) {
		t.Fatalf("LateCollectionOf a pickup not collected late: %+v %v, want ErrNotFound", p, err)
	}
	// Picked up by its closing; the use offered again after that (a stop
	// before its event left the outbox) is still this use.
	if _, err := e.db.Transition(ctx, a.ID, []string{pickup.Expired}, pickup.PickedUp, "test", "", time.Now(), nil); err != nil {
		t.Fatal(err)
	}
	if ps, err := e.db.UseExpiredCredential(ctx, e.id, "k-ab", used.Add(5*time.Second), at, nil); err != nil || len(ps) != 2 || ps[0].State != pickup.PickedUp {
		t.Fatalf("the use offered again once picked up: %+v %v", ps, err)
	}
	if p, _, err := e.db.LateCollectionAt(ctx, e.id, a.Compartment, at); !errors.Is(err, fleet.ErrNotFound) {
		t.Fatalf("closing of the pickup picked up: %+v %v, want ErrNotFound", p, err)
	}
	if p, _, err := e.db.LateCollectionOf(ctx, a.ID); !errors.Is(err, fleet.ErrNotFound) {
		t.Fatalf("LateCollectionOf the pickup picked up: %+v %v, want ErrNotFound", p, err)
	}
	if n := e.uses(); n != 1 {
		t.Fatalf("%d credential.use entries, want 1", n)
	}
}

// TestExpiryRaisesItsAlert: a pickup's expiry and its pickup_expired alert
// (raised at the expiry's time, by which a late collection withdraws it)
// are one transaction, as are a cancel and its pickup_cancelled alert
// (naming who cancelled); other transitions raise none.
func TestExpiryRaisesItsAlert(t *testing.T) {
	ctx := context.Background()
	e := newCredEnv(t, "SN-EXPALERT", 2)
	a, b := e.pickup("X-1"), e.pickup("X-2")
	expired := e.transition(a.ID, pickup.Expired)
	cancelled := e.transition(b.ID, pickup.Cancelled)
	rows, err := e.db.Pool().Query(ctx, `SELECT kind, compartment, raised_at, detail FROM alerts WHERE device_id = $1 ORDER BY id`, e.id)
	if err != nil {
		t.Fatal(err)
	}
	type alert struct {
		kind   string
		comp   int
		raised time.Time
		detail string
	}
	alerts, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (alert, error) {
		var a alert
		return a, r.Scan(&a.kind, &a.comp, &a.raised, &a.detail)
	})
	if err != nil || len(alerts) != 2 {
		t.Fatalf("alerts %+v (%v), want the expiry's and the cancel's alone", alerts, err)
	}
	for i, w := range []struct {
		kind   string
		p      *pickup.Pickup
		detail string
	}{{fleet.AlertPickupExpired, expired, "expired"}, {pickup.AlertCancelled, cancelled, "cancelled by test"}} {
		if got := alerts[i]; got.kind != w.kind || got.comp != w.p.Compartment || w.p.DoneAt == nil || !got.raised.Equal(*w.p.DoneAt) ||
			!strings.Contains(got.detail, w.detail) {
			t.Errorf("alert %+v; want %s on %d raised at the transition %v, %q", got, w.kind, w.p.Compartment, w.p.DoneAt, w.detail)
		}
	}
}

// TestSpentCodeIsNoLateCollection: a code the gateway recorded used (its
// driver opened the compartment in time and left the order) whose pickup
// expired past the grace, used again (its other form, on a locker that
// does not honour group), is not a late collection: code_not_live decides.
func TestSpentCodeIsNoLateCollection(t *testing.T) {
	ctx := context.Background()
	e := newCredEnv(t, "SN-SPENT", 1)
	offset := int64(0)
	e.exec(`UPDATE devices SET clock_offset_ms = $2 WHERE id = $1`, e.id, offset)
	p := e.pickup("S-1")
	e.mustMint("k-s", "mac-s", p)
	used := time.Now().Truncate(time.Millisecond)
	if _, err := e.db.UseCredential(ctx, e.id, "k-s", used, nil); err != nil {
		t.Fatal(err)
	}
	past := used.Add(pickup.CollectGrace + time.Minute)
	e.exec(`UPDATE pickups SET expires_at = $2 WHERE id = $1`, p.ID, used.Add(time.Second))
	if _, err := e.db.Transition(ctx, p.ID, []string{pickup.Ready}, pickup.Expired, "system:expiry", "", past, nil); err != nil {
		t.Fatal(err)
	}
	if ps, err := e.db.UseExpiredCredential(ctx, e.id, "k-s", used.Add(500*time.Millisecond), past, nil); !errors.Is(err, fleet.ErrNotFound) {
		t.Fatalf("a second use of a spent code: %+v %v, want ErrNotFound", ps, err)
	}
	// Nor is the use that spent it, offered again once its pickup expired:
	// the pickup was live then, its use UseCredential's.
	if ps, err := e.db.UseExpiredCredential(ctx, e.id, "k-s", used.Add(-500*time.Millisecond), used, []int{p.Compartment}); !errors.Is(err, fleet.ErrNotFound) {
		t.Fatalf("the spending use offered again after its pickup expired: %+v %v, want ErrNotFound", ps, err)
	}
}

// TestCombinedCodeSpentByItsUse: a combined code that a locker used
// offline for a live pickup and one that expired meanwhile (the code
// narrowed to the live one) is spent by UseCredential for the live one;
// the same use, judged for the expired one's compartment, marks it
// collected. The live one's compartment is not judged, then or when the
// use is offered again after that pickup expired too.
func TestCombinedCodeSpentByItsUse(t *testing.T) {
	ctx := context.Background()
	e := newCredEnv(t, "SN-COMBO", 2)
	e.exec(`UPDATE devices SET clock_offset_ms = 0 WHERE id = $1`, e.id)
	live, gone := e.pickup("CB-1"), e.pickup("CB-2")
	e.mustMint("k-cb", "mac-cb", live, gone)
	used := time.Now().Truncate(time.Millisecond)
	at := used.Add(2 * time.Second)
	e.exec(`UPDATE pickups SET expires_at = $2 WHERE id = $1`, gone.ID, used.Add(time.Second))
	e.transition(gone.ID, pickup.Expired) // narrows k-cb to live
	if ps, err := e.db.UseCredential(ctx, e.id, "k-cb", at, nil); err != nil || len(ps) != 1 || ps[0].ID != live.ID {
		t.Fatalf("the combined code's live pickup: %+v %v", ps, err)
	}
	both := []int{live.Compartment, gone.Compartment}
	if ps, err := e.db.UseExpiredCredential(ctx, e.id, "k-cb", used, at, both); err != nil || len(ps) != 1 || ps[0].ID != gone.ID {
		t.Fatalf("the expired pickup of the same use: %+v %v, want %s", ps, err, gone.ID)
	}
	if ps, err := e.db.UseExpiredCredential(ctx, e.id, "k-cb", used, at, []int{live.Compartment}); !errors.Is(err, fleet.ErrNotFound) {
		t.Fatalf("the live pickup's compartment alone: %+v %v, want ErrNotFound", ps, err)
	}
	// The live one expires past the grace; the use offered again judges
	// the expired one only, as the first time.
	e.exec(`UPDATE pickups SET expires_at = $2 WHERE id = $1`, live.ID, used.Add(time.Second))
	if _, err := e.db.Transition(ctx, live.ID, []string{pickup.Ready}, pickup.Expired, "system:expiry", "", at.Add(pickup.CollectGrace+time.Minute), nil); err != nil {
		t.Fatal(err)
	}
	if ps, err := e.db.UseExpiredCredential(ctx, e.id, "k-cb", used, at, both); err != nil || len(ps) != 1 || ps[0].ID != gone.ID {
		t.Fatalf("the use offered again: %+v %v, want %s only", ps, err, gone.ID)
	}
	if ps, err := e.db.UseExpiredCredential(ctx, e.id, "k-cb", used, at, nil); err != nil || len(ps) != 1 || ps[0].ID != gone.ID {
		t.Fatalf("the use offered again, its compartments not listed: %+v %v, want %s only", ps, err, gone.ID)
	}
}

// TestStagingUnlockWithdrawnWithItsPickup: a pickup's staging unlock is
// made only while the pickup is live, and recorded on it (CreateCommand
// with Pickup); a pickup that ends takes it back when unanswered (pending:
// expired; sent: timed_out, with the reason); a compartment with an unlock
// that may still fire (unanswered or withdrawn, not expired) is not
// allocated.
func TestStagingUnlockWithdrawnWithItsPickup(t *testing.T) {
	ctx := context.Background()
	e := newCredEnv(t, "SN-WD", 2)
	now := time.Now()
	unlock := func(id string, p *pickup.Pickup) (fleet.CommandTarget, bool) {
		t.Helper()
		c := &fleet.Command{ID: id, DeviceID: e.id, Type: "unlock", Compartment: p.Compartment, Reason: "staging",
			Actor: "test", CreatedAt: now, ExpiresAt: now.Add(time.Minute), Pickup: p.ID}
		tg, created, err := e.db.CreateCommand(ctx, c, nil, "")
		if err != nil {
			t.Fatal(err)
		}
		return tg, created
	}
	command := func(id string) *fleet.Command {
		t.Helper()
		c, err := e.db.GetCommand(ctx, e.id, id)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	a, err := e.allocate("WD-A")
	if err != nil {
		t.Fatal(err)
	}
	if tg, created := unlock("c-a", a); !created || tg.PickupEnded {
		t.Fatalf("the live pickup's unlock: created %v, pickup ended %v", created, tg.PickupEnded)
	}
	if c := command("c-a"); c.Status != fleet.CmdSent {
		t.Fatalf("the live pickup's unlock is %s, want sent (the locker is online)", c.Status)
	}
	if p, err := e.db.GetPickup(ctx, a.ID); err != nil || p.CommandID != "c-a" {
		t.Fatalf("the pickup's staging command: %q (%v), want c-a", p.CommandID, err)
	}
	listener, err := e.db.Pool().Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer listener.Release()
	if _, err := listener.Exec(ctx, "LISTEN lockergate_command"); err != nil {
		t.Fatal(err)
	}
	e.transition(a.ID, pickup.Cancelled)
	if c := command("c-a"); c.Status != fleet.CmdTimedOut || c.Error != "withdrawn: pickup cancelled" || c.DoneAt == nil {
		t.Fatalf("the cancelled pickup's sent unlock: %s %q, want timed_out, withdrawn", c.Status, c.Error)
	}
	// Every instance hears of it (a wait_s on it ends).
	wctx, cancelWait := context.WithTimeout(ctx, 10*time.Second)
	n, err := listener.Conn().WaitForNotification(wctx)
	cancelWait()
	if err != nil || n.Payload != "c-a" {
		t.Fatalf("notification %+v (%v), want c-a", n, err)
	}
	if _, err := listener.Exec(ctx, "UNLISTEN *"); err != nil {
		t.Fatal(err)
	}
	// Withdrawn, it may still fire until it expires: A's compartment is
	// not given out; B gets the other one, C none.
	b, err := e.allocate("WD-B")
	if err != nil || b.Compartment == a.Compartment {
		t.Fatalf("B: compartment %d (%v), want the one without an unlock in flight", b.Compartment, err)
	}
	if _, err := e.allocate("WD-C"); !errors.Is(err, pickup.ErrNoCompartment) {
		t.Fatalf("C: %v, want no compartment", err)
	}
	// B ended before its unlock was made: none is made.
	e.transition(b.ID, pickup.Cancelled)
	if tg, created := unlock("c-b", b); created || !tg.PickupEnded {
		t.Fatalf("the ended pickup's unlock: created %v, pickup ended %v; want none made", created, tg.PickupEnded)
	}
	if _, err := e.db.GetCommand(ctx, e.id, "c-b"); !errors.Is(err, fleet.ErrNotFound) {
		t.Fatalf("the ended pickup's unlock is stored: %v", err)
	}
	// B's compartment is free; A's, once its unlock has expired.
	if d, err := e.allocate("WD-D"); err != nil || d.Compartment != b.Compartment {
		t.Fatalf("D: compartment %d (%v), want %d", d.Compartment, err, b.Compartment)
	}
	e.exec(`UPDATE commands SET expires_at = $2 WHERE id = $1`, "c-a", now.Add(-time.Second))
	f, err := e.allocate("WD-F")
	if err != nil || f.Compartment != a.Compartment {
		t.Fatalf("F: compartment %d (%v), want %d (its unlock expired)", f.Compartment, err, a.Compartment)
	}
	// A pending unlock withdrawn is expired: never sent.
	e.exec(`UPDATE devices SET online = false WHERE id = $1`, e.id)
	if _, created := unlock("c-f", f); !created {
		t.Fatal("F's unlock not made")
	}
	e.transition(f.ID, pickup.Cancelled)
	if c := command("c-f"); c.Status != fleet.CmdExpired || c.Error != "withdrawn: pickup cancelled" {
		t.Fatalf("the cancelled pickup's pending unlock: %s %q, want expired, withdrawn", c.Status, c.Error)
	}

	// A cancel in progress (the pickup's row locked) when the unlock is
	// made: the unlock waits for it, and then makes nothing.
	e.exec(`UPDATE devices SET online = true WHERE id = $1`, e.id)
	g, err := e.allocate("WD-G")
	if err != nil {
		t.Fatal(err)
	}
	tx, err := e.db.Pool().Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(ctx)
	if _, err := tx.Exec(ctx, `SELECT 1 FROM pickups WHERE id = $1 FOR UPDATE`, g.ID); err != nil {
		t.Fatal(err)
	}
	type made struct {
		tg      fleet.CommandTarget
		created bool
	}
	done := make(chan made, 1)
	go func() {
		tg, created := unlock("c-g", g)
		done <- made{tg, created}
	}()
	testtool.Eventually(t, 10*time.Second, "the unlock waiting for the pickup's row", func() error {
		var waiting bool
		err := e.db.Pool().QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_stat_activity
			WHERE wait_event_type = 'Lock' AND query LIKE '%INSERT INTO commands%')`).Scan(&waiting)
		if err == nil && !waiting {
			err = errors.New("not waiting")
		}
		return err
	})
	if _, err := tx.Exec(ctx, `UPDATE pickups SET state = 'cancelled' WHERE id = $1`, g.ID); err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	if m := <-done; m.created || !m.tg.PickupEnded {
		t.Fatalf("the unlock made while the pickup was being cancelled: created %v, pickup ended %v; want none made", m.created, m.tg.PickupEnded)
	}
}

// TestDoorReportedUse: a door's opening by a code spends it (once: a
// replay of the same opening reads its pickups again, any other use is
// not found); the code_accepted that follows reports that use, with the
// opening's times (again when replayed), and no other does: a second one,
// or one of a code that code_accepted spent. A code from before a rotation
// counts as its replacement's, reported by either id.
func TestDoorReportedUse(t *testing.T) {
	ctx := context.Background()
	e := newCredEnv(t, "SN-DOOR", 3)
	p, q := e.pickup("DR-1"), e.pickup("DR-2")
	e.mustMint("k-door", "mac-door", p)
	e.mustMint("k-code", "mac-code", q)
	at := time.Now().Truncate(time.Microsecond)
	opened := at.Add(-2 * time.Second).Truncate(time.Millisecond) // the locker's clock
	version := e.version()
	for range 2 {
		if ps, err := e.db.UseCredentialByDoor(ctx, e.id, "k-door", at, opened, 1); err != nil || len(ps) != 1 || ps[0].ID != p.ID {
			t.Fatalf("the door's opening: %+v %v, want pickup %s", ps, err, p.ID)
		}
	}
	if _, state := e.cred("k-door"); state != "used" || e.uses() != 1 || e.version() != version+1 {
		t.Fatalf("after the opening and its replay: %s, %d credential.use entries, version %d (was %d); want used, 1, bumped once",
			state, e.uses(), e.version(), version)
	}
	if _, err := e.db.UseCredential(ctx, e.id, "k-door", at, nil); !errors.Is(err, fleet.ErrNotFound) {
		t.Fatalf("code_accepted arriving with the opening: %v, want ErrNotFound (not the opening's replay)", err)
	}
	if _, err := e.db.UseCredentialByDoor(ctx, e.id, "k-door", at.Add(time.Second), opened, 1); !errors.Is(err, fleet.ErrNotFound) {
		t.Fatalf("another opening by the spent code: %v, want ErrNotFound", err)
	}
	reported := at.Add(time.Second)
	for range 2 {
		if u, err := e.db.ReportDoorUse(ctx, e.id, "k-door", reported); err != nil || u == nil || !u.At.Equal(at) || !u.Opened.Equal(opened) ||
			len(u.Ready) != 1 || u.Ready[0].ID != p.ID {
			t.Fatalf("the code_accepted of the opening's use: %+v %v, want at %v, opened %v, ready pickup %s", u, err, at, opened, p.ID)
		}
	}
	if u, err := e.db.ReportDoorUse(ctx, e.id, "k-door", reported.Add(time.Second)); err != nil || u != nil {
		t.Fatalf("a second code_accepted: %+v %v, want none", u, err)
	}
	if _, err := e.db.UseCredential(ctx, e.id, "k-code", at, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := e.db.UseCredentialByDoor(ctx, e.id, "k-code", at.Add(time.Second), opened, 1); !errors.Is(err, fleet.ErrNotFound) {
		t.Fatalf("the door's opening after code_accepted: %v, want ErrNotFound", err)
	}
	if u, err := e.db.ReportDoorUse(ctx, e.id, "k-code", at.Add(2*time.Second)); err != nil || u != nil {
		t.Fatalf("a code_accepted of a code code_accepted spent: %+v %v, want none", u, err)
	}

	// A rotation the locker missed: the old code's opening spends the
	// replacement, and its code_accepted reports that use by the old id.
	r := e.pickup("DR-3")
	e.mustMint("k-old", "mac-old", r)
	rotated, err := e.db.RotateCredentials(ctx, e.id, at, func(gen int, old *pickup.Credential) *pickup.Credential {
		return &pickup.Credential{ID: "new-" + old.ID, DeviceID: e.id, PINMAC: old.PINMAC + "-2", Compartments: old.Compartments,
			NotAfter: old.NotAfter, CreatedAt: at, KeyGen: gen}
	}, func(*pickup.Pickup, *pickup.Credential) *pickup.Event {
		return &pickup.Event{ID: fleet.NewID("evt"), Type: pickup.EventCredentialChanged, CreatedAt: at}
	}, fleet.AuditEntry{Actor: "test", Action: "locker.rotate_codes", Locker: e.id})
	if err != nil || rotated != 1 {
		t.Fatalf("rotation: %d, %v", rotated, err)
	}
	if ps, err := e.db.UseCredentialByDoor(ctx, e.id, "k-old", at, opened, 1); err != nil || len(ps) != 1 || ps[0].ID != r.ID {
		t.Fatalf("the old code's opening: %+v %v, want pickup %s", ps, err, r.ID)
	}
	if _, state := e.cred("new-k-old"); state != "used" {
		t.Fatalf("the replacement after the old code's opening: %s, want used", state)
	}
	if u, err := e.db.ReportDoorUse(ctx, e.id, "k-old", reported); err != nil || u == nil || !u.At.Equal(at) || len(u.Ready) != 1 || u.Ready[0].ID != r.ID {
		t.Fatalf("the old code's code_accepted: %+v %v, want the opening's use, of ready pickup %s", u, err, r.ID)
	}
	// Once its pickup ended, the use has no ready pickup left.
	e.transition(r.ID, pickup.PickedUp)
	if u, err := e.db.ReportDoorUse(ctx, e.id, "k-old", reported); err != nil || u == nil || len(u.Ready) != 0 {
		t.Fatalf("the old code's code_accepted again, its pickup picked up: %+v %v, want the use with no ready pickup", u, err)
	}
}

// TestAllocationWaitsForTheClearingSet: an order that ends while its
// locker has not acknowledged the current credential set (its code may
// still open the compartment there) leaves its compartment out of
// allocation until the locker acknowledges the set that dropped the code;
// one that ends while the locker holds the current set records nothing.
func TestAllocationWaitsForTheClearingSet(t *testing.T) {
	ctx := context.Background()
	e := newCredEnv(t, "SN-CLR", 2)
	a := e.pickup("CLR-A")
	e.mustMint("k-clr-a", "mac-clr-a", a)
	e.transition(a.ID, pickup.Cancelled) // revokes k-clr-a: a new set
	v := e.version()
	next := func(ref string) *pickup.Pickup {
		e.t.Helper()
		p, err := e.allocate(ref)
		if err != nil {
			e.t.Fatalf("allocate %s: %v", ref, err)
		}
		return p
	}
	if b := next("CLR-B"); b.Compartment == a.Compartment {
		t.Fatalf("CLR-B got compartment %d, whose last code the locker may hold (set %d not acknowledged)", b.Compartment, v)
	}
	if _, err := e.allocate("CLR-C"); !errors.Is(err, pickup.ErrNoCompartment) {
		t.Fatalf("CLR-C with one compartment live and the other waiting: %v, want ErrNoCompartment", err)
	}
	e.exec(`UPDATE devices SET creds_acked = $2 - 1 WHERE id = $1`, e.id, v) // an older set: still waits
	if _, err := e.allocate("CLR-C"); !errors.Is(err, pickup.ErrNoCompartment) {
		t.Fatalf("CLR-C with the set before the revoking one acknowledged: %v, want ErrNoCompartment", err)
	}
	e.exec(`UPDATE devices SET creds_acked = $2 WHERE id = $1`, e.id, v)
	c := next("CLR-C")
	if c.Compartment != a.Compartment {
		t.Fatalf("CLR-C got compartment %d, want %d once the locker acknowledged the set without CLR-A's code", c.Compartment, a.Compartment)
	}
	// c's code is used at the locker, which applies the set without it:
	// after c's end its compartment is free at once...
	e.mustMint("k-clr-c", "mac-clr-c", c)
	if _, err := e.db.UseCredential(ctx, e.id, "k-clr-c", time.Now(), nil); err != nil {
		t.Fatal(err)
	}
	e.applied()
	e.transition(c.ID, pickup.PickedUp)
	w := e.version()
	// ...unless the locker goes back to a set that held c's code (a stale
	// copy applied last), which takes the code again.
	e.exec(`UPDATE devices SET creds_acked = $2 WHERE id = $1`, e.id, w-1)
	if _, err := e.allocate("CLR-D"); !errors.Is(err, pickup.ErrNoCompartment) {
		t.Fatalf("CLR-D with a set that holds CLR-C's code acknowledged last: %v, want ErrNoCompartment", err)
	}
	e.applied()
	d := next("CLR-D")
	if d.Compartment != a.Compartment {
		t.Fatalf("CLR-D got compartment %d, want %d", d.Compartment, a.Compartment)
	}
	// d's code ends with it (expired); once the locker applied that set, a
	// late collection of d changes no code and leaves nothing to wait for;
	// nor does the end of g, never given a code.
	e.mustMint("k-clr-d", "mac-clr-d", d)
	e.transition(d.ID, pickup.Expired)
	e.applied()
	w = e.version()
	e.exec(`UPDATE devices SET creds_version = creds_version + 1 WHERE id = $1`, e.id) // a set the locker has not acked
	if _, err := e.db.Transition(ctx, d.ID, []string{pickup.Expired}, pickup.PickedUp, "test", "collected before expiry", time.Now(), nil); err != nil {
		t.Fatal(err)
	}
	g := next("CLR-G")
	e.transition(g.ID, pickup.Cancelled)
	if n := countOf(t, e.db, `SELECT count(*) FROM compartment_clears WHERE device_id = $1 AND version > $2`, e.id, w); n != 0 {
		t.Fatalf("%d compartments wait for a set that changed no code of theirs", n)
	}
	if f := next("CLR-F"); f.Compartment != a.Compartment {
		t.Fatalf("CLR-F got compartment %d, want %d", f.Compartment, a.Compartment)
	}
}

// TestClearingCredsNotAppliedReleasesCompartments: a person who clears a
// locker's creds_not_applied alert vouches that it holds its set: its
// compartments waiting for one are released, and the audit says how many.
func TestClearingCredsNotAppliedReleasesCompartments(t *testing.T) {
	ctx := context.Background()
	e := newCredEnv(t, "SN-REL", 1)
	a := e.pickup("REL-A")
	e.mustMint("k-rel-a", "mac-rel-a", a)
	e.transition(a.ID, pickup.Cancelled)
	if _, err := e.allocate("REL-B"); !errors.Is(err, pickup.ErrNoCompartment) {
		t.Fatalf("REL-B, the only compartment waiting for a set: %v, want ErrNoCompartment", err)
	}
	var id int64
	if err := e.db.Pool().QueryRow(ctx, `INSERT INTO alerts (device_id, kind, detail) VALUES ($1, 'creds_not_applied', 'test') RETURNING id`,
		e.id).Scan(&id); err != nil {
		t.Fatal(err)
	}
	if _, err := e.db.ClearAlert(ctx, id, "operator:ops", time.Now()); err != nil {
		t.Fatal(err)
	}
	if b, err := e.allocate("REL-B"); err != nil || b.Compartment != a.Compartment {
		t.Fatalf("REL-B after the alert was cleared by hand: %+v %v, want compartment %d", b, err, a.Compartment)
	}
	var released int
	if err := e.db.Pool().QueryRow(ctx, `SELECT (detail->>'compartments_released')::int FROM audit WHERE action = 'alert.clear' AND locker = $1`,
		e.id).Scan(&released); err != nil || released != 1 {
		t.Fatalf("audit of the clear: compartments_released %d (%v), want 1", released, err)
	}
}
