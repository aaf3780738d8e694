package postgres_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/internal/pgtest"
	"github.com/lockergate/lockergate/internal/testtool"
	"github.com/lockergate/lockergate/postgres"
	"github.com/lockergate/lockergate/protocol"
	"github.com/lockergate/lockergate/provisioning"
)

func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }

// MustOpen opens a migrated store on a fresh database.
func MustOpen(tb testing.TB) *postgres.DB {
	tb.Helper()
	return mustOpenWith(tb, postgres.Options{})
}

// mustOpenWith is MustOpen with options o (its DSN is the fresh database's).
func mustOpenWith(tb testing.TB, o postgres.Options) *postgres.DB {
	tb.Helper()
	o.DSN = pgtest.NewDB(tb)
	db, err := postgres.Open(context.Background(), o)
	if err != nil {
		tb.Fatalf("open: %v", err)
	}
	tb.Cleanup(db.Close)
	return db
}

// seedFleet adds site s1 and n lockers lk-1 … lk-n straight into the
// tables, for benchmarks and plan tests: provisioning is not what they
// measure.
func seedFleet(tb testing.TB, db *postgres.DB, n int) {
	tb.Helper()
	ctx := context.Background()
	if err := db.CreateSite(ctx, &fleet.Site{ID: "s1", Name: "s1", Timezone: "UTC"}); err != nil {
		tb.Fatal(err)
	}
	if _, err := db.Pool().Exec(ctx, `INSERT INTO devices (id, serial, site, model, fw, secret_hash)
		SELECT 'lk-' || i, 'SN-' || i, 's1', 'LX', '1.0.0', '\x00' FROM generate_series(1, $1) AS i`, n); err != nil {
		tb.Fatal(err)
	}
}

// countOf runs query, a count, and returns it.
func countOf(tb testing.TB, db *postgres.DB, query string, args ...any) int {
	tb.Helper()
	var n int
	if err := db.Pool().QueryRow(context.Background(), query, args...).Scan(&n); err != nil {
		tb.Fatalf("%s: %v", query, err)
	}
	return n
}

// markOffline ends one session of a locker.
func markOffline(db *postgres.DB, id, reason string, at time.Time) error {
	return db.MarkOfflineMany(context.Background(), []fleet.SessionEnd{{ID: id, Reason: reason, At: at}})
}

// createCommand stores a command that must be accepted.
func createCommand(tb testing.TB, db *postgres.DB, c *fleet.Command, a *fleet.AuditEntry) {
	tb.Helper()
	if _, created, err := db.CreateCommand(context.Background(), c, a, ""); err != nil || !created {
		tb.Fatalf("create command %s: created %v, %v", c.ID, created, err)
	}
}

func TestMigrate(t *testing.T) {
	t.Run("TwiceAndConcurrently", func(t *testing.T) {
		dsn := pgtest.NewDB(t)
		ctx := context.Background()
		var wg sync.WaitGroup
		errs := make([]error, 4)
		for i := range errs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				db, err := postgres.Open(ctx, postgres.Options{DSN: dsn})
				if err == nil {
					err = db.Migrate(ctx) // a second run applies nothing
					db.Close()
				}
				errs[i] = err
			}()
		}
		wg.Wait()
		for i, err := range errs {
			if err != nil {
				t.Errorf("instance %d: %v", i, err)
			}
		}
	})
	// A database a newer release migrated is refused, naming what this
	// build lacks and what to do, and left as it was.
	t.Run("RefusesANewerDatabase", func(t *testing.T) {
		dsn := pgtest.NewDB(t)
		ctx := context.Background()
		db, err := postgres.Open(ctx, postgres.Options{DSN: dsn})
		if err != nil {
			t.Fatal(err)
		}
		defer db.Close()
		if _, err := db.Pool().Exec(ctx, `INSERT INTO schema_migrations (version) VALUES ('999_from_a_newer_release')`); err != nil {
			t.Fatal(err)
		}
		err = db.Migrate(ctx)
		if !errors.Is(err, postgres.ErrNewerSchema) || !strings.Contains(err.Error(), "999_from_a_newer_release") ||
			!strings.Contains(err.Error(), "restore the backup") {
			t.Fatalf("migrate a newer database: %v, want ErrNewerSchema naming 999_from_a_newer_release and the backup", err)
		}
		if _, err := postgres.Open(ctx, postgres.Options{DSN: dsn}); !errors.Is(err, postgres.ErrNewerSchema) {
			t.Fatalf("open a newer database: %v, want ErrNewerSchema", err)
		}
		var n int
		if err := db.Pool().QueryRow(ctx, `SELECT count(*) FROM schema_migrations`).Scan(&n); err != nil || n < 36 {
			t.Fatalf("schema_migrations holds %d rows (%v) after the refusal", n, err)
		}
	})
}

// MustDevice registers a device with compartments 1..n at site via a claim.
func MustDevice(tb testing.TB, db *postgres.DB, site, serial string, n int) string {
	tb.Helper()
	ctx := context.Background()
	if err := db.CreateSite(ctx, &fleet.Site{ID: site, Name: site, Timezone: "UTC"}); err != nil && !errors.Is(err, fleet.ErrConflict) {
		tb.Fatal(err)
	}
	hash := provisioning.HashSecret("claim-" + serial)
	c := &provisioning.Claim{ID: "cl-" + serial, Site: site, MaxUses: 1, ExpiresAt: time.Now().Add(time.Hour), CreatedAt: time.Now()}
	if err := db.CreateClaim(ctx, c, hash); err != nil {
		tb.Fatal(err)
	}
	req := &protocol.ProvisionRequest{Serial: serial, Model: "LX", FW: "1.0.0"}
	for i := 1; i <= n; i++ {
		req.Compartments = append(req.Compartments, protocol.CompartmentSpec{N: i, Size: "M", Zone: "ambient"})
	}
	reg, err := db.Register(ctx, hash, provisioning.Registration{DeviceID: "lk-" + serial, SecretHash: provisioning.HashSecret("s"), Request: req, At: time.Now()})
	if err != nil {
		tb.Fatal(err)
	}
	return reg.DeviceID
}

// mustReregister provisions req's board, at site s1, with a fresh claim in
// place of locker want's, which must be replaceable (or the same board
// asking again); it fails unless the answer is a replacement of want.
func mustReregister(tb testing.TB, db *postgres.DB, want string, req *protocol.ProvisionRequest) *provisioning.Registered {
	tb.Helper()
	ctx := context.Background()
	n := time.Now()
	claim := provisioning.HashSecret("claim-" + req.Serial + n.String())
	if err := db.CreateClaim(ctx, &provisioning.Claim{ID: "cl-" + req.Serial + n.String(), Site: "s1", MaxUses: 1,
		ExpiresAt: n.Add(time.Hour), CreatedAt: n}, claim); err != nil {
		tb.Fatal(err)
	}
	r, err := db.Register(ctx, claim, provisioning.Registration{DeviceID: "lk-unused", SecretHash: provisioning.HashSecret("s2"),
		Request: req, At: n})
	if err != nil || !r.Replaced || r.DeviceID != want {
		tb.Fatalf("replacement of %s: %+v, %v", want, r, err)
	}
	return r
}

// openAlerts lists locker id's open alerts as "kind/compartment", sorted.
func openAlerts(tb testing.TB, db *postgres.DB, id string) []string {
	tb.Helper()
	as, err := db.QueryAlerts(context.Background(), fleet.AlertFilter{Locker: id, Open: new(true)})
	if err != nil {
		tb.Fatal(err)
	}
	var got []string
	for _, a := range as {
		got = append(got, fmt.Sprintf("%s/%d", a.Kind, a.Compartment))
	}
	slices.Sort(got)
	return got
}

func TestRegister(t *testing.T) {
	ctx := context.Background()
	db := MustOpen(t)
	if err := db.CreateSite(ctx, &fleet.Site{ID: "s1", Name: "S1", Timezone: "UTC"}); err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	mkClaim := func(id string, uses int, exp time.Time, pattern string) []byte {
		h := provisioning.HashSecret(id)
		if err := db.CreateClaim(ctx, &provisioning.Claim{ID: id, Site: "s1", MaxUses: uses, SerialPattern: pattern, ExpiresAt: exp, CreatedAt: now}, h); err != nil {
			t.Fatal(err)
		}
		return h
	}
	req := func(serial string) *protocol.ProvisionRequest {
		return &protocol.ProvisionRequest{Serial: serial, Model: "LX", FW: "1.0", Compartments: []protocol.CompartmentSpec{{N: 1, Size: "S", Zone: "ambient"}}}
	}
	reg := func(h []byte, serial string) (*provisioning.Registered, error) {
		return db.Register(ctx, h, provisioning.Registration{DeviceID: "lk-" + serial, SecretHash: provisioning.HashSecret("x" + serial), Request: req(serial), At: time.Now()})
	}
	ok := mkClaim("ok", 2, now.Add(time.Hour), "")
	t.Run("OK", func(t *testing.T) {
		r, err := reg(ok, "SN-1")
		if err != nil || r.DeviceID != "lk-SN-1" || r.Replaced {
			t.Fatalf("got %+v, %v", r, err)
		}
		l, err := db.GetLocker(ctx, "lk-SN-1")
		if err != nil || len(l.Compartments) != 1 || l.Site != "s1" {
			t.Fatalf("locker %+v, %v", l, err)
		}
	})
	t.Run("RetryBeforeFirstConnect", func(t *testing.T) {
		// The first answer was lost: the same claim asks again for the
		// serial before it ever connected, and gets a new secret without
		// using the claim up.
		r, err := reg(ok, "SN-1")
		if err != nil || !r.Retried || r.Replaced || r.DeviceID != "lk-SN-1" || r.KeyGen != 2 {
			t.Fatalf("got %+v, %v", r, err)
		}
	})
	t.Run("NoRetryOnceDelivered", func(t *testing.T) {
		// The answer reached the locker (it acknowledged it): asking again
		// is serial_taken, though it has not connected yet, and a used-up
		// claim does not change that.
		if err := db.AnswerDelivered(ctx, "lk-SN-1", time.Now()); err != nil {
			t.Fatal(err)
		}
		if _, err := reg(ok, "SN-1"); !errors.Is(err, provisioning.ErrSerialTaken) {
			t.Fatalf("after the answer was delivered: %v, want ErrSerialTaken", err)
		}
		spent := mkClaim("spent", 1, now.Add(time.Hour), "")
		if _, err := reg(spent, "SN-SPENT"); err != nil {
			t.Fatal(err)
		}
		if err := db.AnswerDelivered(ctx, "lk-SN-SPENT", time.Now()); err != nil {
			t.Fatal(err)
		}
		if _, err := reg(spent, "SN-SPENT"); !errors.Is(err, provisioning.ErrSerialTaken) {
			t.Fatalf("a registered serial with a used-up claim: %v, want ErrSerialTaken", err)
		}
	})
	t.Run("ErrSerialTaken", func(t *testing.T) {
		if err := db.MarkOnline(ctx, "lk-SN-1", time.Now()); err != nil {
			t.Fatal(err)
		}
		if _, err := reg(ok, "SN-1"); !errors.Is(err, provisioning.ErrSerialTaken) {
			t.Fatalf("got %v, want ErrSerialTaken", err)
		}
	})
	t.Run("ErrClaimExhausted", func(t *testing.T) {
		// One use left after SN-1 (serial_taken does not use it up).
		if _, err := reg(ok, "SN-2"); err != nil {
			t.Fatal(err)
		}
		if _, err := reg(ok, "SN-3"); !errors.Is(err, provisioning.ErrClaimExhausted) {
			t.Fatalf("got %v, want ErrClaimExhausted", err)
		}
	})
	t.Run("ErrClaimExpired", func(t *testing.T) {
		h := mkClaim("old", 5, now.Add(-time.Second), "")
		if _, err := reg(h, "SN-4"); !errors.Is(err, provisioning.ErrClaimExpired) {
			t.Fatalf("got %v, want ErrClaimExpired", err)
		}
	})
	t.Run("ErrSerialRefused", func(t *testing.T) {
		h := mkClaim("pattern", 5, now.Add(time.Hour), "SN-9*")
		if _, err := reg(h, "SN-5"); !errors.Is(err, provisioning.ErrSerialRefused) {
			t.Fatalf("got %v, want ErrSerialRefused", err)
		}
		if _, err := reg(h, "SN-91"); err != nil {
			t.Fatalf("allowed serial: %v", err)
		}
	})
	t.Run("ErrUnknownClaim", func(t *testing.T) {
		h := mkClaim("revoked", 5, now.Add(time.Hour), "")
		if err := db.RevokeClaim(ctx, "revoked", "test", time.Now()); err != nil {
			t.Fatal(err)
		}
		if _, err := reg(h, "SN-6"); !errors.Is(err, provisioning.ErrUnknownClaim) {
			t.Fatalf("got %v, want ErrUnknownClaim", err)
		}
	})
	t.Run("Replace", func(t *testing.T) {
		h := mkClaim("replace", 5, now.Add(time.Hour), "")
		yes := true
		if _, err := db.UpdateLocker(ctx, "lk-SN-1", nil, &yes); err != nil {
			t.Fatal(err)
		}
		if _, err := db.UpdateLocker(ctx, "lk-none", &yes, nil); !errors.Is(err, fleet.ErrNotFound) {
			t.Fatalf("update of an unknown locker: %v, want ErrNotFound", err)
		}
		r, err := db.Register(ctx, h, provisioning.Registration{DeviceID: "lk-new", SecretHash: provisioning.HashSecret("new"), Request: req("SN-1"), At: time.Now()})
		if err != nil || !r.Replaced || r.DeviceID != "lk-SN-1" || r.KeyGen != 3 {
			t.Fatalf("got %+v, %v", r, err)
		}
		a, err := db.DeviceAuth(ctx, "lk-SN-1")
		if err != nil || string(a.SecretHash) != string(provisioning.HashSecret("new")) {
			t.Fatalf("secret not replaced: %v", err)
		}
		l, _ := db.GetLocker(ctx, "lk-SN-1")
		if l.Replaceable {
			t.Fatal("replaceable flag not cleared")
		}
	})
	t.Run("RetryOfTheLastUse", func(t *testing.T) {
		// The registration committed but its answer never reached the
		// locker (the gateway could not answer): the retry is granted
		// although the claim is used up, and even after it expired.
		h := mkClaim("single", 1, now.Add(time.Minute), "")
		at := func(d time.Duration) provisioning.Registration {
			return provisioning.Registration{DeviceID: "lk-single", SecretHash: provisioning.HashSecret("s"), Request: req("SN-SINGLE"), At: now.Add(d)}
		}
		if r, err := db.Register(ctx, h, at(0)); err != nil || r.Retried {
			t.Fatalf("first: %+v, %v", r, err)
		}
		if r, err := db.Register(ctx, h, at(10*time.Second)); err != nil || !r.Retried || r.KeyGen != 2 {
			t.Fatalf("retry of the claim's only use: %+v, %v; want a retried identity", r, err)
		}
		if r, err := db.Register(ctx, h, at(2*time.Minute)); err != nil || !r.Retried {
			t.Fatalf("retry after the claim expired: %+v, %v; want a retried identity", r, err)
		}
		// Another serial with the used-up claim is still refused.
		other := provisioning.Registration{DeviceID: "lk-other", SecretHash: provisioning.HashSecret("o"), Request: req("SN-OTHER"), At: now.Add(20 * time.Second)}
		if _, err := db.Register(ctx, h, other); !errors.Is(err, provisioning.ErrClaimExhausted) {
			t.Fatalf("another serial: %v, want ErrClaimExhausted", err)
		}
		// Once the identity has connected, or 10 minutes on, it is taken.
		if err := db.MarkOnline(ctx, "lk-single", now.Add(3*time.Minute)); err != nil {
			t.Fatal(err)
		}
		// The serial is taken: that comes before the claim's own
		// refusals (expired here), as the contract's serial_taken rule.
		if _, err := db.Register(ctx, h, at(4*time.Minute)); !errors.Is(err, provisioning.ErrSerialTaken) {
			t.Fatalf("after it connected: %v, want ErrSerialTaken", err)
		}
	})
	t.Run("RetryOfAReplacement", func(t *testing.T) {
		// A replacement whose answer was lost is granted again too; the
		// old hardware's last connection predates it.
		h := mkClaim("replace-retry", 1, now.Add(time.Hour), "")
		if err := db.MarkOnline(ctx, "lk-SN-2", now); err != nil {
			t.Fatal(err)
		}
		yes := true
		if _, err := db.UpdateLocker(ctx, "lk-SN-2", nil, &yes); err != nil {
			t.Fatal(err)
		}
		reg2 := provisioning.Registration{DeviceID: "lk-x", SecretHash: provisioning.HashSecret("r"), Request: req("SN-2"), At: now.Add(time.Second)}
		if r, err := db.Register(ctx, h, reg2); err != nil || !r.Replaced {
			t.Fatalf("replace: %+v, %v", r, err)
		}
		reg2.At = now.Add(5 * time.Second)
		if r, err := db.Register(ctx, h, reg2); err != nil || !r.Retried || r.DeviceID != "lk-SN-2" {
			t.Fatalf("retry of the replacement: %+v, %v; want a retried identity", r, err)
		}
	})
	t.Run("UsesRecorded", func(t *testing.T) {
		var n int
		if err := db.Pool().QueryRow(ctx, "SELECT count(*) FROM claim_uses WHERE claim_id = 'ok'").Scan(&n); err != nil {
			t.Fatal(err)
		}
		if got, want := n, 7; got != want { // ok, retry, delivered, serial_taken twice, ok, exhausted
			t.Fatalf("claim uses: got %d, want %d", got, want)
		}
	})
}

func TestCommands(t *testing.T) {
	ctx := context.Background()
	db := MustOpen(t)
	id := MustDevice(t, db, "s1", "SN-C", 4)
	now := time.Now().UTC().Truncate(time.Millisecond)
	mk := func(cid string, exp time.Time) {
		createCommand(t, db, &fleet.Command{ID: cid, DeviceID: id, Type: "unlock", Compartment: 1, Status: fleet.CmdPending, CreatedAt: now, ExpiresAt: exp}, nil)
	}
	mk("c1", now.Add(time.Minute))
	mk("c2", now.Add(-time.Second))
	mk("c3", now.Add(time.Second))
	t.Run("SentThenOK", func(t *testing.T) {
		if ok, err := db.MarkCommandSent(ctx, "c1", now); !ok || err != nil {
			t.Fatalf("mark sent: %v %v", ok, err)
		}
		if ok, _ := db.MarkCommandSent(ctx, "c1", now); ok {
			t.Fatal("second mark sent succeeded")
		}
		c, err := db.CompleteCommand(ctx, id, "c1", "ok", "", now)
		if err != nil || c.Status != "ok" || c.DoneAt == nil || c.LateAnswer {
			t.Fatalf("complete: %+v %v", c, err)
		}
		if _, err := db.CompleteCommand(ctx, id, "c1", "failed", "x", now); !errors.Is(err, fleet.ErrNotFound) {
			t.Fatalf("second answer: got %v, want ErrNotFound", err)
		}
	})
	t.Run("OtherDevicesAnswerIgnored", func(t *testing.T) {
		if _, err := db.CompleteCommand(ctx, "lk-other", "c3", "ok", "", now); !errors.Is(err, fleet.ErrNotFound) {
			t.Fatalf("got %v, want ErrNotFound", err)
		}
	})
	t.Run("Open", func(t *testing.T) {
		cs, err := db.OpenCommands(ctx, []string{id}, now)
		if err != nil || len(cs) != 1 || cs[0].ID != "c3" {
			t.Fatalf("open: %+v %v", cs, err)
		}
	})
	t.Run("Expire", func(t *testing.T) {
		cs, err := db.ExpireCommands(ctx, now, 5*time.Second)
		if err != nil || len(cs) != 1 || cs[0].ID != "c2" || cs[0].Status != fleet.CmdExpired {
			t.Fatalf("expire: %+v %v", cs, err)
		}
		db.MarkCommandSent(ctx, "c3", now)
		cs, err = db.ExpireCommands(ctx, now.Add(10*time.Second), 5*time.Second)
		if err != nil || len(cs) != 1 || cs[0].Status != fleet.CmdTimedOut {
			t.Fatalf("time out: %+v %v", cs, err)
		}
	})
	t.Run("NeverMarkedSentOnceExpired", func(t *testing.T) {
		mk("c4", now.Add(time.Second))
		if ok, err := db.MarkCommandSent(ctx, "c4", now.Add(time.Second)); ok || err != nil {
			t.Fatalf("mark sent at its expiry: %v %v, want false", ok, err)
		}
		if ok, err := db.MarkCommandSent(ctx, "c4", now); !ok || err != nil {
			t.Fatalf("mark sent before its expiry: %v %v", ok, err)
		}
	})
	t.Run("AnswerOverExpired", func(t *testing.T) {
		// c2 expired pending; a locker that ran it all the same (its sent
		// mark lost to a database crash) is believed, but an "expired"
		// answer changes nothing.
		if _, err := db.CompleteCommand(ctx, id, "c2", "expired", "", now); !errors.Is(err, fleet.ErrNotFound) {
			t.Fatalf("expired over expired: got %v, want ErrNotFound", err)
		}
		if c, err := db.CompleteCommand(ctx, id, "c2", "ok", "", now); err != nil || c.Status != "ok" || !c.LateAnswer {
			t.Fatalf("ok over expired: %+v %v, want a late answer", c, err)
		}
	})
	t.Run("Unanswered", func(t *testing.T) {
		mk("c5", now.Add(time.Minute))
		if ok, err := db.MarkCommandSent(ctx, "c5", now); !ok || err != nil {
			t.Fatalf("mark sent: %v %v", ok, err)
		}
		unanswered := func(at, sentBefore time.Time) []string {
			t.Helper()
			cs, err := db.UnansweredCommands(ctx, at, sentBefore, 10, nil)
			if err != nil {
				t.Fatal(err)
			}
			var ids []string
			for _, c := range cs {
				ids = append(ids, c.ID)
			}
			return ids
		}
		setLocker := func(online, disabled bool) {
			t.Helper()
			if _, err := db.Pool().Exec(ctx, `UPDATE devices SET online = $2, disabled = $3 WHERE id = $1`, id, online, disabled); err != nil {
				t.Fatal(err)
			}
		}
		setLocker(false, false)
		if got := unanswered(now.Add(5*time.Second), now); got != nil {
			t.Fatalf("offline locker: %v, want none", got)
		}
		setLocker(true, false)
		if got := unanswered(now.Add(5*time.Second), now); !slices.Equal(got, []string{"c5"}) {
			t.Fatalf("online locker: %v, want [c5]", got)
		}
		if got := unanswered(now, now.Add(-time.Second)); got != nil {
			t.Fatalf("sent after the cut-off: %v, want none", got)
		}
		if cs, err := db.UnansweredCommands(ctx, now.Add(5*time.Second), now, 10, []string{"c0", "c5"}); err != nil || len(cs) != 0 {
			t.Fatalf("skipped: %v %v, want none", cs, err)
		}
		if got := unanswered(now.Add(time.Minute), now); got != nil {
			t.Fatalf("expired: %v, want none", got)
		}
		setLocker(true, true)
		if got := unanswered(now.Add(5*time.Second), now); got != nil {
			t.Fatalf("disabled locker: %v, want none", got)
		}
		setLocker(true, false)
		if _, err := db.CompleteCommand(ctx, id, "c5", "ok", "", now); err != nil {
			t.Fatal(err)
		}
		if got := unanswered(now.Add(5*time.Second), now); got != nil {
			t.Fatalf("answered: %v, want none", got)
		}
		// Left pending while its locker is online (stored pending as the
		// locker came online): delivered too.
		mk("c6", now.Add(time.Minute))
		if got := unanswered(now.Add(5*time.Second), now); !slices.Equal(got, []string{"c6"}) {
			t.Fatalf("pending at an online locker: %v, want [c6]", got)
		}
		if got := unanswered(now, now.Add(-time.Second)); got != nil {
			t.Fatalf("created after the cut-off: %v, want none", got)
		}
		setLocker(false, false)
		if got := unanswered(now.Add(5*time.Second), now); got != nil {
			t.Fatalf("pending at an offline locker: %v, want none", got)
		}
	})
}

// healthRowsOf counts the stored health rows of locker id.
func healthRowsOf(t *testing.T, db *postgres.DB, id string) (n int) {
	t.Helper()
	if err := db.Pool().QueryRow(context.Background(), `SELECT count(*) FROM health WHERE device_id = $1`, id).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// largeHealthBatch is 2,000 reports of locker id of ~3 KB each: one write
// of several megabytes, more than the pooled buffers keep.
func largeHealthBatch(id string, at time.Time) []fleet.HealthRecord {
	pad := strings.Repeat("x", 3000)
	var big []fleet.HealthRecord
	for seq := int64(1); seq <= 2000; seq++ {
		big = append(big, fleet.HealthRecord{DeviceID: id, ReceivedAt: at.Add(time.Duration(seq) * time.Microsecond),
			TS: at, Seq: seq, Body: json.RawMessage(fmt.Sprintf(`{"seq":%d,"pad":"%s"}`, seq, pad))})
	}
	return big
}

func TestIngest(t *testing.T) {
	ctx := context.Background()
	db := MustOpen(t)
	id := MustDevice(t, db, "s1", "SN-I", 4)
	now := time.Now().UTC()
	if err := db.EnsurePartitions(ctx, now.AddDate(0, 0, -1), 2); err != nil {
		t.Fatal(err)
	}
	t.Run("HealthLatestAndGaps", func(t *testing.T) {
		var batch []fleet.HealthRecord
		for _, seq := range []int64{1, 2, 5} {
			body := fmt.Sprintf(`{"ts":"2026-01-01T00:00:00.000Z","seq":%d,"uptime_s":1}`, seq)
			batch = append(batch, fleet.HealthRecord{DeviceID: id, ReceivedAt: now, TS: now, Seq: seq, Body: json.RawMessage(body)})
		}
		insert := func(recs []fleet.HealthRecord, latest []fleet.LatestHealth) {
			t.Helper()
			if err := db.InsertHealth(ctx, recs, latest); err != nil {
				t.Fatal(err)
			}
		}
		check := func(seq, gaps int64) {
			t.Helper()
			l, err := db.GetLocker(ctx, id)
			if err != nil {
				t.Fatal(err)
			}
			var h struct{ Seq int64 }
			if err := json.Unmarshal(l.Health, &h); err != nil {
				t.Fatalf("latest health %q: %v", l.Health, err)
			}
			if h.Seq != seq || l.HealthGaps != gaps {
				t.Fatalf("latest seq %d gaps %d, want %d and %d", h.Seq, l.HealthGaps, seq, gaps)
			}
		}
		insert(batch[:2], fleet.LatestOf(batch[:2]))
		insert(batch[2:], fleet.LatestOf(batch[2:]))
		check(5, 2) // 3 and 4 missing
		// Rows without a latest update; then one update standing for
		// 6, 9 and 10: 7 and 8 are missing inside the run.
		var run []fleet.HealthRecord
		for _, seq := range []int64{6, 9, 10} {
			body := fmt.Sprintf(`{"ts":"2026-01-01T00:00:00.000Z","seq":%d,"uptime_s":1}`, seq)
			run = append(run, fleet.HealthRecord{DeviceID: id, ReceivedAt: now.Add(time.Duration(seq) * time.Millisecond), TS: now, Seq: seq, Body: json.RawMessage(body)})
		}
		insert(run, nil)
		check(5, 2)
		latest := fleet.LatestOf(run)
		if len(latest) != 1 || latest[0].FirstSeq != 6 || latest[0].Seq != 10 || latest[0].Gaps != 2 {
			t.Fatalf("LatestOf: %+v", latest)
		}
		insert(nil, latest)
		check(10, 4)
		// An older latest (another instance's late batch) changes nothing.
		insert(nil, fleet.LatestOf(batch[:1]))
		check(10, 4)
		hs, err := db.ListHealth(ctx, id, fleet.Range{})
		if err != nil || len(hs) != 6 {
			t.Fatalf("list: %d %v", len(hs), err)
		}
		// Whatever seqs a locker sends, no sum overflows (a seq of 2^63-1
		// followed by another was 'bigint out of range' on every retry,
		// holding up every locker's health), and a leap past
		// fleet.MaxSeqGap is a counter that jumped, not messages lost.
		at := now.Add(time.Second)
		for _, c := range []struct{ seq, gaps int64 }{
			{math.MaxInt64, 4}, {1, 4}, {3, 5}, {3 + fleet.MaxSeqGap + 1, 5 + fleet.MaxSeqGap}, {3 + 2*fleet.MaxSeqGap + 3, 5 + fleet.MaxSeqGap},
		} {
			at = at.Add(time.Millisecond)
			one := []fleet.HealthRecord{{DeviceID: id, ReceivedAt: at, TS: at, Seq: c.seq,
				Body: json.RawMessage(fmt.Sprintf(`{"ts":"2026-01-01T00:00:00.000Z","seq":%d}`, c.seq))}}
			insert(one, fleet.LatestOf(one))
			check(c.seq, c.gaps)
		}
	})
	t.Run("PagingWithTies", func(t *testing.T) {
		// Five rows in one microsecond: pages of two see each exactly once.
		id := MustDevice(t, db, "s1", "SN-PAGE", 1)
		tie := now.Truncate(time.Microsecond)
		var batch []fleet.HealthRecord
		for seq := int64(10); seq < 15; seq++ {
			batch = append(batch, fleet.HealthRecord{DeviceID: id, ReceivedAt: tie, TS: tie, Seq: seq, Body: json.RawMessage(`{}`)})
		}
		if err := db.InsertHealth(ctx, batch, fleet.LatestOf(batch)); err != nil {
			t.Fatal(err)
		}
		var seen []int64
		r := fleet.Range{Since: tie, Limit: 2}
		for {
			page, err := db.ListHealth(ctx, id, r)
			if err != nil {
				t.Fatal(err)
			}
			for _, h := range page {
				seen = append(seen, h.Seq)
			}
			if len(page) < 2 {
				break
			}
			last := page[len(page)-1]
			r.AfterTS, r.AfterKey = last.ReceivedAt, fmt.Sprint(last.Seq)
		}
		if fmt.Sprint(seen) != "[10 11 12 13 14]" {
			t.Fatalf("pages gave %v", seen)
		}
	})
	t.Run("HealthCopyRoundTrip", func(t *testing.T) {
		// The binary COPY is encoded by hand (appendHealthCopy): every column
		// must read back as pgx would have written it. Times are truncated
		// to microseconds, also before PostgreSQL's epoch of 2000.
		at := now.Truncate(time.Second).Add(123456789 * time.Nanosecond)
		recs := []fleet.HealthRecord{
			{DeviceID: id, ReceivedAt: at, TS: time.Date(1999, 12, 31, 23, 59, 59, 999999500, time.UTC),
				Seq: 1 << 40, Body: json.RawMessage(`{"fw":"caf\u00e9 ✓","seq":1099511627776}`)},
			{DeviceID: id, ReceivedAt: at, TS: time.Date(2038, 1, 19, 3, 14, 8, 1000, time.UTC),
				Seq: 0, Body: json.RawMessage(` { "a" : [1, 2] } `)},
		}
		if err := db.InsertHealth(ctx, recs, nil); err != nil {
			t.Fatal(err)
		}
		rows, err := db.Pool().Query(ctx, `SELECT device_id, received_at, ts, seq, body::text FROM health
			WHERE device_id = $1 AND seq IN (0, 1099511627776) ORDER BY seq DESC`, id)
		if err != nil {
			t.Fatal(err)
		}
		var got []fleet.HealthRecord
		for rows.Next() {
			var h fleet.HealthRecord
			var body string
			if err := rows.Scan(&h.DeviceID, &h.ReceivedAt, &h.TS, &h.Seq, &body); err != nil {
				t.Fatal(err)
			}
			h.Body = json.RawMessage(body)
			got = append(got, h)
		}
		if err := rows.Err(); err != nil || len(got) != 2 {
			t.Fatalf("read back %d rows: %v", len(got), err)
		}
		for i, want := range recs {
			g := got[i]
			if g.DeviceID != want.DeviceID || !g.ReceivedAt.Equal(want.ReceivedAt.Truncate(time.Microsecond)) ||
				!g.TS.Equal(want.TS.Truncate(time.Microsecond)) || g.Seq != want.Seq || string(g.Body) != string(want.Body) {
				t.Errorf("row %d: got %+v (body %s), want %+v (body %s)", i, g, g.Body, want, want.Body)
			}
		}
	})
	t.Run("HealthCopyRefusesBadBodies", func(t *testing.T) {
		count := func() int { t.Helper(); return healthRowsOf(t, db, id) }
		before := count()
		ok := fleet.HealthRecord{DeviceID: id, ReceivedAt: now, TS: now, Seq: 77, Body: json.RawMessage(`{}`)}
		for _, body := range []string{"", "{", "nope"} {
			bad := ok
			bad.Seq, bad.Body = 78, json.RawMessage(body)
			if err := db.InsertHealth(ctx, []fleet.HealthRecord{ok, bad}, nil); err == nil {
				t.Errorf("body %q stored", body)
			}
		}
		if n := count(); n != before {
			t.Errorf("%d rows stored from failed batches", n-before)
		}
	})
	t.Run("HealthRowsAndLatestTogether", func(t *testing.T) {
		// Rows and latest health are one transaction in one round trip:
		// a failure in either statement stores neither, and the connection
		// is rolled back and kept, not closed.
		id := MustDevice(t, db, "s1", "SN-ATOMIC", 1)
		count := func() int { t.Helper(); return healthRowsOf(t, db, id) }
		latestSeq := func() int64 {
			t.Helper()
			l, err := db.GetLocker(ctx, id)
			if err != nil {
				t.Fatal(err)
			}
			var h struct{ Seq int64 }
			if len(l.Health) > 0 {
				if err := json.Unmarshal(l.Health, &h); err != nil {
					t.Fatalf("latest health %q: %v", l.Health, err)
				}
			}
			return h.Seq
		}
		rec := func(seq int64, body string) fleet.HealthRecord {
			return fleet.HealthRecord{DeviceID: id, ReceivedAt: now.Add(time.Duration(seq) * time.Millisecond), TS: now,
				Seq: seq, Body: json.RawMessage(body)}
		}
		good := []fleet.HealthRecord{rec(1, `{"seq":1}`), rec(2, `{"seq":2}`)}
		if err := db.InsertHealth(ctx, good, fleet.LatestOf(good)); err != nil {
			t.Fatal(err)
		}
		if n, seq := count(), latestSeq(); n != 2 || seq != 2 {
			t.Fatalf("stored %d rows, latest seq %d; want 2 and 2", n, seq)
		}
		// Connections the pool closed: a failed batch's must be rolled back
		// and kept.
		stat := db.Pool().Stat()
		closed0 := stat.NewConnsCount() - int64(stat.TotalConns())
		// The COPY fails: its bad row takes the good one with it.
		badRow := []fleet.HealthRecord{rec(3, `{"seq":3}`), rec(4, `{`)}
		if err := db.InsertHealth(ctx, badRow, fleet.LatestOf(badRow[:1])); !errors.Is(err, fleet.ErrInvalid) || !strings.Contains(err.Error(), "copy health") {
			t.Fatalf("bad row: got %v, want a copy health error", err)
		}
		// The UPDATE fails after the COPY succeeded: the rows go too.
		rows := []fleet.HealthRecord{rec(5, `{"seq":5}`)}
		badLatest := fleet.LatestOf(rows)
		badLatest[0].Body = json.RawMessage(`nope`)
		if err := db.InsertHealth(ctx, rows, badLatest); !errors.Is(err, fleet.ErrInvalid) || !strings.Contains(err.Error(), "update latest health") {
			t.Fatalf("bad latest: got %v, want an update latest health error", err)
		}
		if n, seq := count(), latestSeq(); n != 2 || seq != 2 {
			t.Fatalf("after the failures: %d rows, latest seq %d; want 2 and 2", n, seq)
		}
		stat = db.Pool().Stat()
		if closed := stat.NewConnsCount() - int64(stat.TotalConns()) - closed0; closed != 0 {
			t.Fatalf("%d connections closed after failed batches, want them rolled back and kept", closed)
		}
		// Every pooled connection is out of its transaction: a batch on each
		// of them, at once, stores everything.
		var wg sync.WaitGroup
		errs := make(chan error, 8)
		for i := range int64(8) {
			wg.Go(func() {
				b := []fleet.HealthRecord{rec(10+i, fmt.Sprintf(`{"seq":%d}`, 10+i))}
				errs <- db.InsertHealth(ctx, b, fleet.LatestOf(b))
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			if err != nil {
				t.Fatal(err)
			}
		}
		if n, seq := count(), latestSeq(); n != 10 || seq != 17 {
			t.Fatalf("after the retry: %d rows, latest seq %d; want 10 and 17", n, seq)
		}
		noneIdleInTransaction(t, db)
	})
	t.Run("HealthLargeBatchAndCancel", func(t *testing.T) {
		// A batch is one write of several megabytes (more than the pooled
		// buffers keep) while PostgreSQL answers; a cancelled caller stores
		// nothing (the pool refuses it a connection); one cancelled after
		// its batch was sent still learns that the batch was stored.
		id := MustDevice(t, db, "s1", "SN-LARGE", 1)
		count := func() int { t.Helper(); return healthRowsOf(t, db, id) }
		big := largeHealthBatch(id, now)
		if err := db.InsertHealth(ctx, big, fleet.LatestOf(big)); err != nil {
			t.Fatal(err)
		}
		if n := count(); n != len(big) {
			t.Fatalf("stored %d rows, want %d", n, len(big))
		}
		l, err := db.GetLocker(ctx, id)
		if err != nil || !strings.Contains(string(l.Health), `"seq":2000`) {
			t.Fatalf("latest health %.40q: %v", l.Health, err)
		}
		cctx, cancel := context.WithCancel(ctx)
		cancel()
		more := []fleet.HealthRecord{{DeviceID: id, ReceivedAt: now.Add(time.Second), TS: now, Seq: 2001, Body: json.RawMessage(`{}`)}}
		if err := db.InsertHealth(cctx, more, fleet.LatestOf(more)); !errors.Is(err, context.Canceled) {
			t.Fatalf("cancelled: got %v, want context.Canceled", err)
		}
		if err := db.InsertHealth(ctx, more, fleet.LatestOf(more)); err != nil {
			t.Fatal(err)
		}
		if n := count(); n != len(big)+1 {
			t.Fatalf("stored %d rows, want %d", n, len(big)+1)
		}
		// This locker's latest-health update now takes a second (a
		// trigger), far past the writer's deadline: the server has the
		// whole transaction, COMMIT included, and commits it.
		if _, err := db.Pool().Exec(ctx, `
			CREATE FUNCTION test_slow_update() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN PERFORM pg_sleep(1); RETURN NEW; END$$;
			CREATE TRIGGER test_slow BEFORE UPDATE ON devices FOR EACH ROW WHEN (NEW.serial = 'SN-LARGE')
				EXECUTE FUNCTION test_slow_update()`); err != nil {
			t.Fatal(err)
		}
		defer db.Pool().Exec(ctx, `DROP TRIGGER test_slow ON devices; DROP FUNCTION test_slow_update()`)
		dctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
		defer cancel()
		late := []fleet.HealthRecord{{DeviceID: id, ReceivedAt: now.Add(2 * time.Second), TS: now, Seq: 2002, Body: json.RawMessage(`{}`)}}
		if err := db.InsertHealth(dctx, late, fleet.LatestOf(late)); err != nil {
			t.Fatalf("deadline passed while PostgreSQL worked: got %v, want the batch reported stored", err)
		}
		if dctx.Err() == nil {
			t.Fatal("the update was not slow: the test proves nothing")
		}
		if n := count(); n != len(big)+2 {
			t.Fatalf("stored %d rows, want %d", n, len(big)+2)
		}
	})
	t.Run("HealthWriteCutOff", func(t *testing.T) {
		// PostgreSQL stops reading the stream: the COPY waits for a lock
		// another session holds. A writer whose deadline passes during
		// the write, and one whose backend is terminated while it waits
		// for the answer, both fail, store nothing, and leave the pool
		// usable once the lock is gone.
		id := MustDevice(t, db, "s1", "SN-CUT", 1)
		count := func() int { t.Helper(); return healthRowsOf(t, db, id) }
		big := largeHealthBatch(id, now)
		locker, err := db.Pool().Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer locker.Rollback(ctx)
		if _, err := locker.Exec(ctx, "LOCK TABLE health IN ACCESS EXCLUSIVE MODE"); err != nil {
			t.Fatal(err)
		}

		// Several megabytes against a server that reads none of them.
		dctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
		defer cancel()
		if err := db.InsertHealth(dctx, big, fleet.LatestOf(big)); !errors.Is(err, context.DeadlineExceeded) ||
			!strings.Contains(err.Error(), "send health batch") {
			t.Fatalf("write cut off: got %v, want a send error wrapping the deadline", err)
		}

		// That writer's backend still waits for the lock (it has not read
		// far enough to see its client go): end it first, so that the one
		// found below is the next writer's.
		waiting := func() ([]int, error) {
			rows, err := db.Pool().Query(ctx, `SELECT pid FROM pg_stat_activity
				WHERE wait_event_type = 'Lock' AND query LIKE '%COPY health%'`)
			if err != nil {
				return nil, err
			}
			return pgx.CollectRows(rows, pgx.RowTo[int])
		}
		testtool.Eventually(t, 10*time.Second, "no writer waiting for the lock", func() error {
			pids, err := waiting()
			if err == nil && len(pids) > 0 {
				_, err = db.Pool().Exec(ctx, "SELECT pg_terminate_backend(p) FROM unnest($1::int[]) AS p", pids)
				if err == nil {
					err = fmt.Errorf("%d waiting", len(pids))
				}
			}
			return err
		})

		// A small batch is sent whole; its backend dies while it waits.
		small := big[:1]
		done := make(chan error, 1)
		go func() { done <- db.InsertHealth(ctx, small, fleet.LatestOf(small)) }()
		var pid int
		testtool.Eventually(t, 10*time.Second, "the writer waiting for the lock", func() error {
			pids, err := waiting()
			if err == nil && len(pids) != 1 {
				err = fmt.Errorf("%d writers waiting, want 1", len(pids))
			}
			if err == nil {
				pid = pids[0]
			}
			return err
		})
		if _, err := db.Pool().Exec(ctx, "SELECT pg_terminate_backend($1)", pid); err != nil {
			t.Fatal(err)
		}
		if err := <-done; err == nil {
			t.Fatal("a batch whose backend was terminated was reported stored")
		}

		if err := locker.Rollback(ctx); err != nil {
			t.Fatal(err)
		}
		if n := count(); n != 0 {
			t.Fatalf("%d rows stored by the failed writers", n)
		}
		if err := db.InsertHealth(ctx, big, fleet.LatestOf(big)); err != nil {
			t.Fatal(err)
		}
		if n := count(); n != len(big) {
			t.Fatalf("stored %d rows, want %d", n, len(big))
		}
	})
	t.Run("EffectsOutbox", func(t *testing.T) {
		id := MustDevice(t, db, "s1", "SN-OUTBOX", 2) // its own events
		at := now.Add(time.Minute).Truncate(time.Microsecond)
		mk := func(eid string, pending bool) fleet.EventRecord {
			body, _ := json.Marshal(protocol.Event{ID: eid, TS: protocol.T(at), Type: "door_closed", Compartment: 1})
			return fleet.EventRecord{DeviceID: id, EventID: eid, ReceivedAt: at, TS: at, Type: "door_closed", Compartment: 1, Body: body, Pending: pending}
		}
		fresh, err := db.InsertEvents(ctx, []fleet.EventRecord{mk("o-1", true), mk("o-2", false), mk("o-3", true)})
		if err != nil || len(fresh) != 3 {
			t.Fatalf("insert: %d %v", len(fresh), err)
		}
		// A repeat is a duplicate: not queued again.
		if _, err := db.InsertEvents(ctx, []fleet.EventRecord{mk("o-1", true)}); err != nil {
			t.Fatal(err)
		}
		pending := func(before time.Time) []string {
			t.Helper()
			es, err := db.PendingEffects(ctx, before, 10, 0, true)
			if err != nil {
				t.Fatal(err)
			}
			var ids []string
			for _, e := range es {
				if !e.Pending || e.DeviceID != id || e.Compartment != 1 || len(e.Body) == 0 || !e.ReceivedAt.Equal(at) {
					t.Fatalf("pending effect %+v", e)
				}
				ids = append(ids, e.EventID)
			}
			return ids
		}
		if got := pending(at); got != nil {
			t.Fatalf("received at or after the cut-off: %v, want none", got)
		}
		// A claim holds the rows from other callers for its lease.
		claim := func(reclaim bool) int {
			t.Helper()
			es, err := db.PendingEffects(ctx, at.Add(time.Second), 10, time.Hour, reclaim)
			if err != nil {
				t.Fatal(err)
			}
			return len(es)
		}
		if n := claim(false); n != 2 {
			t.Fatalf("first claim: %d rows, want 2", n)
		}
		if n := claim(false); n != 0 {
			t.Fatalf("claimed again within the lease: %d rows, want none", n)
		}
		if got := pending(at.Add(time.Second)); !slices.Equal(got, []string{"o-1", "o-3"}) {
			t.Fatalf("pending: %v, want [o-1 o-3]", got)
		}
		if err := db.EffectsApplied(ctx, id, []string{"o-1"}); err != nil {
			t.Fatal(err)
		}
		if got := pending(at.Add(time.Second)); !slices.Equal(got, []string{"o-3"}) {
			t.Fatalf("pending after o-1 was applied: %v, want [o-3]", got)
		}
		if err := db.EffectsApplied(ctx, id, []string{"o-3"}); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("EventsOnce", func(t *testing.T) {
		occ := true
		body, _ := json.Marshal(protocol.Event{ID: "e-1", TS: protocol.T(now), Type: "door_closed", Compartment: 2, Occupied: &occ})
		e := fleet.EventRecord{DeviceID: id, EventID: "e-1", ReceivedAt: now, TS: now, Type: "door_closed", Compartment: 2, Body: body}
		fresh, err := db.InsertEvents(ctx, []fleet.EventRecord{e, e})
		if err != nil || len(fresh) != 1 {
			t.Fatalf("first: %d %v", len(fresh), err)
		}
		again := e
		again.ReceivedAt = now.Add(time.Second) // the locker sent it again
		fresh, err = db.InsertEvents(ctx, []fleet.EventRecord{again})
		if err != nil || len(fresh) != 0 {
			t.Fatalf("repeat: %d %v", len(fresh), err)
		}
		// The same message again (a retry of a call whose commit's answer
		// was lost): returned as stored, not stored or applied again.
		fresh, err = db.InsertEvents(ctx, []fleet.EventRecord{e})
		if err != nil || len(fresh) != 1 || fresh[0].EventID != "e-1" {
			t.Fatalf("the stored call tried again: %+v %v, want e-1 returned", fresh, err)
		}
		es, _ := db.ListEvents(ctx, id, fleet.Range{})
		if len(es) != 1 {
			t.Fatalf("stored %d events, want 1", len(es))
		}
		l, _ := db.GetLocker(ctx, id)
		if c := l.Compartments[1]; !c.Occupied || c.Door != "closed" {
			t.Fatalf("compartment 2: %+v", c)
		}
	})
	t.Run("EventAlerts", func(t *testing.T) {
		id := MustDevice(t, db, "s1", "SN-ALERTS", 2) // its own alerts
		at := now.Add(2 * time.Minute).Truncate(time.Microsecond)
		ev := func(eid, typ string, comp int, change *fleet.AlertChange) fleet.EventRecord {
			body, _ := json.Marshal(protocol.Event{ID: eid, TS: protocol.T(at), Type: typ, Compartment: comp})
			return fleet.EventRecord{DeviceID: id, EventID: eid, ReceivedAt: at, TS: at, Type: typ, Compartment: comp, Body: body, Alert: change}
		}
		raise := func(kind string, comp int) *fleet.AlertChange {
			return &fleet.AlertChange{Raise: &fleet.Alert{DeviceID: id, Kind: kind, Compartment: comp, RaisedAt: at}}
		}
		clearing := func(kind string, at int) *fleet.AlertChange {
			return &fleet.AlertChange{ClearKind: kind, ClearAt: at}
		}
		insert := func(es ...fleet.EventRecord) {
			t.Helper()
			if _, err := db.InsertEvents(ctx, es); err != nil {
				t.Fatal(err)
			}
		}
		open := func() []string {
			t.Helper()
			return openAlerts(t, db, id)
		}
		ajar, tamper := ev("a-1", "door_ajar", 1, raise(fleet.AlertDoorAjar, 1)), ev("a-2", "tamper", 0, raise(fleet.AlertTamper, 0))
		insert(ajar, tamper)
		if !ajar.Alert.Raised || !tamper.Alert.Raised {
			t.Fatalf("raised: ajar %v, tamper %v; want both", ajar.Alert.Raised, tamper.Alert.Raised)
		}
		// A repeated event is not stored again, so its alert is not raised
		// again; a new event of an open stateful kind raises none.
		again, ajar2 := ev("a-2", "tamper", 0, raise(fleet.AlertTamper, 0)), ev("a-3", "door_ajar", 1, raise(fleet.AlertDoorAjar, 1))
		ajar2.ReceivedAt = at.Add(time.Second) // not the same alert again: the open one holds it off
		ajar2.Alert.Raise.RaisedAt = ajar2.ReceivedAt
		insert(again, ajar2)
		if again.Alert.Raised || ajar2.Alert.Raised {
			t.Fatalf("raised again: tamper %v, ajar %v", again.Alert.Raised, ajar2.Alert.Raised)
		}
		if got := open(); !slices.Equal(got, []string{"door_ajar/1", "tamper/0"}) {
			t.Fatalf("open alerts %v", got)
		}
		// In one batch, in order: compartment 2 ajar then closed ends
		// cleared; compartment 1's closing clears its own alert only.
		insert(ev("a-4", "door_ajar", 2, raise(fleet.AlertDoorAjar, 2)), ev("a-5", "door_closed", 2, clearing(fleet.AlertDoorAjar, 2)))
		if got := open(); !slices.Equal(got, []string{"door_ajar/1", "tamper/0"}) {
			t.Fatalf("after compartment 2 opened and closed: %v", got)
		}
		insert(ev("a-6", "door_closed", 1, clearing(fleet.AlertDoorAjar, 1)))
		if got := open(); !slices.Equal(got, []string{"tamper/0"}) {
			t.Fatalf("after compartment 1 closed: %v", got)
		}
		// Compartments are the vendor's numbers: a closing clears its own.
		insert(ev("a-6a", "door_ajar", 1001, raise(fleet.AlertDoorAjar, 1001)), ev("a-6b", "door_ajar", 1002, raise(fleet.AlertDoorAjar, 1002)),
			ev("a-6c", "door_closed", 1001, clearing(fleet.AlertDoorAjar, 1001)))
		if got := open(); !slices.Equal(got, []string{"door_ajar/1002", "tamper/0"}) {
			t.Fatalf("after compartment 1001 closed: %v", got)
		}
		// The event and its alert are stored together or not at all.
		if _, err := db.Pool().Exec(ctx, fmt.Sprintf(`
			CREATE FUNCTION refuse_alert() RETURNS trigger LANGUAGE plpgsql AS $$
			BEGIN IF NEW.device_id = '%s' THEN RAISE EXCEPTION 'alerts refused'; END IF; RETURN NEW; END $$;
			CREATE TRIGGER refuse_alert BEFORE INSERT ON alerts FOR EACH ROW EXECUTE FUNCTION refuse_alert()`, id)); err != nil {
			t.Fatal(err)
		}
		lockout := ev("a-7", "code_rejected", 0, raise(fleet.AlertCodeLockout, 0))
		if _, err := db.InsertEvents(ctx, []fleet.EventRecord{lockout}); err == nil || !strings.Contains(err.Error(), "alerts refused") {
			t.Fatalf("insert with its alert refused: %v, want the trigger's error", err)
		}
		if es, _ := db.ListEvents(ctx, id, fleet.Range{}); len(es) != 9 {
			t.Fatalf("%d events stored after a refused alert, want 9", len(es))
		}
		if _, err := db.Pool().Exec(ctx, `DROP TRIGGER refuse_alert ON alerts; DROP FUNCTION refuse_alert()`); err != nil {
			t.Fatal(err)
		}
		fresh, err := db.InsertEvents(ctx, []fleet.EventRecord{lockout})
		if err != nil || len(fresh) != 1 || !lockout.Alert.Raised {
			t.Fatalf("insert again: %d fresh, raised %v, %v", len(fresh), lockout.Alert.Raised, err)
		}
		if got := open(); !slices.Equal(got, []string{"code_lockout/0", "door_ajar/1002", "tamper/0"}) {
			t.Fatalf("open alerts %v", got)
		}
	})
	t.Run("AlertRaisedAgain", func(t *testing.T) {
		// A step offered again raises the same alert (same locker, kind,
		// compartment and time): one row. Another time is another alert.
		id := MustDevice(t, db, "s1", "SN-ALERTS-2", 2)
		a := fleet.Alert{DeviceID: id, Kind: "pickup_removed", Compartment: 2, Detail: "gone", RaisedAt: now.Truncate(time.Microsecond)}
		for i, want := range []bool{true, false} {
			if raised, err := db.RaiseAlert(ctx, a); err != nil || raised != want {
				t.Fatalf("raise %d: %v %v, want %v", i+1, raised, err, want)
			}
		}
		a.RaisedAt = a.RaisedAt.Add(time.Second)
		if raised, err := db.RaiseAlert(ctx, a); err != nil || !raised {
			t.Fatalf("raise at another time: %v %v, want raised", raised, err)
		}
		if as, _ := db.QueryAlerts(ctx, fleet.AlertFilter{Locker: id, Open: new(true)}); len(as) != 2 {
			t.Fatalf("%d alerts, want 2", len(as))
		}
		// With an audit entry: written when the alert opens, not again.
		a.Kind, a.RaisedAt = "code_not_live", a.RaisedAt.Add(time.Second)
		a.Audit = &fleet.AuditEntry{Actor: "locker:" + id, Action: "credential.use", Locker: id, Detail: map[string]any{"state": "revoked"}}
		for i, want := range []bool{true, false} {
			if raised, err := db.RaiseAlert(ctx, a); err != nil || raised != want {
				t.Fatalf("raise audited %d: %v %v, want %v", i+1, raised, err, want)
			}
		}
		var n int
		if err := db.Pool().QueryRow(ctx, `SELECT count(*) FROM audit WHERE locker = $1 AND action = 'credential.use'`, id).Scan(&n); err != nil || n != 1 {
			t.Fatalf("%d audit entries (%v), want 1", n, err)
		}
		// An audit entry that cannot be written takes its alert with it.
		a.RaisedAt = a.RaisedAt.Add(time.Second)
		a.Audit.Detail = map[string]any{"bad": func() {}}
		if raised, err := db.RaiseAlert(ctx, a); err == nil || raised {
			t.Fatalf("raise with an unwritable audit entry: %v %v, want an error", raised, err)
		}
		if as, _ := db.QueryAlerts(ctx, fleet.AlertFilter{Locker: id, Kind: "code_not_live"}); len(as) != 1 {
			t.Fatalf("%d code_not_live alerts, want 1 (the failed one rolled back)", len(as))
		}
	})
	t.Run("DoorClosingsAfter", func(t *testing.T) {
		id := MustDevice(t, db, "s1", "SN-CLOSED", 2) // its own events
		base := now.Add(2 * time.Minute).Truncate(time.Microsecond)
		mk := func(eid, typ string, comp int, ts, at time.Time) fleet.EventRecord {
			body, _ := json.Marshal(protocol.Event{ID: eid, TS: protocol.T(ts), Type: typ, Compartment: comp})
			return fleet.EventRecord{DeviceID: id, EventID: eid, ReceivedAt: at, TS: ts, Type: typ, Compartment: comp, Body: body}
		}
		if _, err := db.InsertEvents(ctx, []fleet.EventRecord{
			mk("c-old", "door_closed", 1, base.Add(-time.Hour), base.Add(-time.Hour)), // received before since
			mk("c-1", "door_closed", 1, base.Add(2*time.Second), base),                // the second by the locker's clock,
			mk("c-2", "door_closed", 1, base.Add(time.Second), base.Add(time.Second)), // though received after c-1
			mk("c-other", "door_closed", 2, base.Add(5*time.Second), base),
			mk("o-1", "door_opened", 1, base.Add(6*time.Second), base),
		}); err != nil {
			t.Fatal(err)
		}
		ids := func(since, after time.Time, n int) []string {
			t.Helper()
			es, err := db.DoorClosingsAfter(ctx, id, n, since, after)
			if err != nil {
				t.Fatal(err)
			}
			var out []string
			for _, e := range es {
				if e.Compartment != n || len(e.Body) == 0 {
					t.Fatalf("closing %+v", e)
				}
				out = append(out, e.EventID)
			}
			return out
		}
		since := base.Add(-time.Minute)
		if got := ids(since, base, 1); !slices.Equal(got, []string{"c-2", "c-1"}) {
			t.Fatalf("closings after: %v, want c-2, c-1 (the locker's order)", got)
		}
		if got := ids(since, base.Add(time.Second+time.Millisecond), 1); !slices.Equal(got, []string{"c-1"}) {
			t.Fatalf("closings after c-2's ts: %v, want c-1", got)
		}
		// A closing in the code's millisecond counts as after it.
		if got := ids(since, base.Add(time.Second), 1); !slices.Equal(got, []string{"c-2", "c-1"}) {
			t.Fatalf("closings at and after c-2's ts: %v, want c-2, c-1", got)
		}
		if got := ids(since, base.Add(2*time.Second+time.Millisecond), 1); len(got) != 0 {
			t.Fatalf("closings after the last: %v, want none", got)
		}
		if got := ids(base.Add(-2*time.Hour), base.Add(-2*time.Hour), 1); !slices.Equal(got, []string{"c-old", "c-2", "c-1"}) {
			t.Fatalf("with the old one in range: %v", got)
		}
		if got := ids(base, base, 1); !slices.Equal(got, []string{"c-2"}) {
			t.Fatalf("received after c-1: %v, want c-2 (since is exclusive)", got)
		}
		if got := ids(since, base, 3); len(got) != 0 {
			t.Fatalf("compartment without closings: %v", got)
		}
	})
	t.Run("WithdrawAlert", func(t *testing.T) {
		id := MustDevice(t, db, "s1", "SN-WITHDRAW", 2)
		at := now.Add(3 * time.Minute).Truncate(time.Microsecond)
		a := fleet.Alert{DeviceID: id, Kind: "pickup_removed", Compartment: 1, Detail: "closed empty", RaisedAt: at}
		other := a
		other.Compartment = 2
		for _, x := range []fleet.Alert{a, other} {
			if raised, err := db.RaiseAlert(ctx, x); err != nil || !raised {
				t.Fatalf("raise: %v %v", raised, err)
			}
		}
		miss := a
		miss.RaisedAt = at.Add(time.Millisecond)
		if ok, err := db.WithdrawAlert(ctx, miss, "gateway", "test", now); err != nil || ok {
			t.Fatalf("withdraw of another time: %v %v, want nothing", ok, err)
		}
		gone, cancel := context.WithCancel(ctx)
		cancel()
		if ok, err := db.WithdrawAlert(gone, a, "gateway", "test", now); !errors.Is(err, context.Canceled) || ok {
			t.Fatalf("withdraw that cannot read the alert: %v %v, want the read's error", ok, err)
		}
		if ok, err := db.WithdrawAlert(ctx, a, "gateway", "test", now); err != nil || !ok {
			t.Fatalf("withdraw: %v %v", ok, err)
		}
		if ok, err := db.WithdrawAlert(ctx, a, "gateway", "test", now); err != nil || ok {
			t.Fatalf("withdraw again: %v %v, want nothing", ok, err)
		}
		open, err := db.QueryAlerts(ctx, fleet.AlertFilter{Locker: id, Open: new(true)})
		if err != nil || len(open) != 1 || open[0].Compartment != 2 {
			t.Fatalf("open alerts %+v %v, want compartment 2's only", open, err)
		}
		var n int
		if err := db.Pool().QueryRow(ctx, `SELECT count(*) FROM audit WHERE locker = $1 AND action = 'alert.clear' AND actor = 'gateway'
			AND detail->>'reason' = 'test'`, id).Scan(&n); err != nil || n != 1 {
			t.Fatalf("%d audit entries (%v), want 1", n, err)
		}
	})
	t.Run("Retention", func(t *testing.T) {
		dropped, err := db.DropPartitionsBefore(ctx, now.AddDate(0, 0, 1).Truncate(24*time.Hour))
		if err != nil {
			t.Fatal(err)
		}
		if len(dropped) != 4 { // health and events, yesterday and today
			t.Fatalf("dropped %v", dropped)
		}
		hs, _ := db.ListHealth(ctx, id, fleet.Range{})
		if len(hs) != 0 {
			t.Fatalf("%d health rows survived retention", len(hs))
		}
	})
}

func TestPresence(t *testing.T) {
	ctx := context.Background()
	db := MustOpen(t)
	id := MustDevice(t, db, "s1", "SN-P", 1)
	t0 := time.Now().UTC()
	if err := db.MarkOnline(ctx, id, t0); err != nil {
		t.Fatal(err)
	}
	// A takeover: the new session starts, then the old one's end arrives with
	// an earlier time. The locker stays online.
	if err := db.MarkOnline(ctx, id, t0.Add(time.Second)); err != nil {
		t.Fatal(err)
	}
	if err := markOffline(db, id, "takeover", t0.Add(500*time.Millisecond)); err != nil {
		t.Fatal(err)
	}
	l, _ := db.GetLocker(ctx, id)
	if !l.Online || l.ConnectCount != 2 {
		t.Fatalf("after takeover: online %v connects %d", l.Online, l.ConnectCount)
	}
	if err := markOffline(db, id, "keepalive", t0.Add(2*time.Second)); err != nil {
		t.Fatal(err)
	}
	l, _ = db.GetLocker(ctx, id)
	if l.Online || l.DisconnectReason != "keepalive" {
		t.Fatalf("after disconnect: %+v", l)
	}
}

func TestCommandAuditedAtomically(t *testing.T) {
	ctx := context.Background()
	db := MustOpen(t)
	id := MustDevice(t, db, "s1", "SN-CA", 2)
	now := time.Now().UTC().Truncate(time.Millisecond)
	audit := func(locker string) *fleet.AuditEntry {
		return &fleet.AuditEntry{Actor: "token:t1", Action: "unlock", Locker: locker, Detail: map[string]any{"command": "x"}}
	}
	cmd := func(cid, locker string, comp int) *fleet.Command {
		return &fleet.Command{ID: cid, DeviceID: locker, Type: "unlock", Compartment: comp, Status: fleet.CmdPending, CreatedAt: now, ExpiresAt: now.Add(time.Minute)}
	}
	ca1 := cmd("ca1", id, 1)
	tgt, created, err := db.CreateCommand(ctx, ca1, audit(id), "s1")
	if err != nil || !created {
		t.Fatalf("create: created %v, %v", created, err)
	}
	if want := (fleet.CommandTarget{Site: "s1", HasCompartment: true}); tgt != want || ca1.Status != fleet.CmdPending || ca1.SentAt != nil {
		t.Errorf("target %+v, status %s, sent_at %v; want %+v, pending, none (a new locker is offline)", tgt, ca1.Status, ca1.SentAt, want)
	}
	if _, err := db.GetCommand(ctx, id, "ca1"); err != nil {
		t.Fatalf("command not stored: %v", err)
	}
	// Refused: neither the command nor its audit entry is stored, and the
	// caller learns why from the target.
	if _, _, err := db.CreateCommand(ctx, cmd("ca2", "lk-missing", 1), audit("lk-missing"), ""); !errors.Is(err, fleet.ErrNotFound) {
		t.Fatalf("unknown locker: got %v, want ErrNotFound", err)
	}
	tgt, created, err = db.CreateCommand(ctx, cmd("ca3", id, 1), audit(id), "s2")
	if err != nil || created || tgt.Site != "s1" {
		t.Fatalf("another site's locker: target %+v, created %v, %v; want not created, site s1", tgt, created, err)
	}
	tgt, created, err = db.CreateCommand(ctx, cmd("ca4", id, 3), audit(id), "")
	if err != nil || created || tgt.HasCompartment {
		t.Fatalf("compartment 3 of 2: target %+v, created %v, %v; want not created, no compartment", tgt, created, err)
	}
	// A command without a compartment and without an audit entry.
	reboot := cmd("ca5", id, 0)
	reboot.Type = "reboot"
	if tgt, created, err := db.CreateCommand(ctx, reboot, nil, ""); err != nil || !created || !tgt.HasCompartment {
		t.Fatalf("reboot: target %+v, created %v, %v", tgt, created, err)
	}
	for _, cid := range []string{"ca3", "ca4"} {
		if _, err := db.GetCommand(ctx, id, cid); !errors.Is(err, fleet.ErrNotFound) {
			t.Errorf("refused command %s: %v, want not stored", cid, err)
		}
	}
	for _, tc := range []struct {
		locker string
		want   int
	}{{id, 1}, {"lk-missing", 0}} {
		es, err := db.ListAudit(ctx, fleet.AuditFilter{Locker: tc.locker})
		n := 0
		for _, e := range es {
			if e.Action == "unlock" {
				n++
				if e.Site != "s1" {
					t.Errorf("audit entry's site %q, want the locker's (s1)", e.Site)
				}
			}
		}
		if err != nil || n != tc.want {
			t.Fatalf("unlock audit entries of %s: %d (%v), want %d", tc.locker, n, err, tc.want)
		}
	}
	// To an online locker the command is stored as sent, at its creation.
	if err := db.MarkOnline(ctx, id, now); err != nil {
		t.Fatal(err)
	}
	ca6 := cmd("ca6", id, 2)
	if _, created, err := db.CreateCommand(ctx, ca6, audit(id), ""); err != nil || !created ||
		ca6.Status != fleet.CmdSent || ca6.SentAt == nil || !ca6.SentAt.Equal(ca6.CreatedAt) {
		t.Fatalf("online locker: created %v, %v, status %s, sent_at %v; want sent at %v", created, err, ca6.Status, ca6.SentAt, ca6.CreatedAt)
	}
	if got, err := db.GetCommand(ctx, id, "ca6"); err != nil || got.Status != fleet.CmdSent {
		t.Fatalf("stored: %+v, %v; want sent", got, err)
	}
}

func TestCommandChangesAreNotified(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	db := MustOpen(t)
	id := MustDevice(t, db, "s1", "SN-CN", 2)
	now := time.Now().UTC().Truncate(time.Millisecond)
	got := make(chan string, 16)
	go db.WatchCommands(ctx, func(cid string) { got <- cid })
	for _, c := range []struct {
		id  string
		exp time.Time
	}{{"cn-ok", now.Add(time.Minute)}, {"cn-exp", now.Add(-time.Second)}} {
		createCommand(t, db, &fleet.Command{ID: c.id, DeviceID: id, Type: "reboot", Status: fleet.CmdPending,
			CreatedAt: now, ExpiresAt: c.exp}, nil)
	}
	// WatchCommands listens asynchronously: complete commands until the
	// listener is seen to be up, then check what each change notifies.
	deadline := time.After(10 * time.Second)
	expect := func(want string) {
		t.Helper()
		for {
			select {
			case cid := <-got:
				if cid == want {
					return
				}
				if cid == "ready" {
					continue // a late probe of waitListening's
				}
				t.Fatalf("notified %q, want %q", cid, want)
			case <-deadline:
				t.Fatalf("no notification for %q", want)
			}
		}
	}
	if _, err := db.CompleteCommand(ctx, "lk-other", "cn-ok", "ok", "", now); !errors.Is(err, fleet.ErrNotFound) {
		t.Fatalf("other locker's answer: %v", err)
	}
	waitListening(t, db, got)
	if _, err := db.CompleteCommand(ctx, id, "cn-ok", "ok", "", now); err != nil {
		t.Fatal(err)
	}
	expect("cn-ok")
	if cs, err := db.ExpireCommands(ctx, now, time.Second); err != nil || len(cs) != 1 {
		t.Fatalf("expire: %v %v", cs, err)
	}
	expect("cn-exp")
	// A refused answer changes nothing and notifies nothing: the next
	// notification is the probe's, not cn-ok's.
	if _, err := db.CompleteCommand(ctx, id, "cn-ok", "failed", "x", now); !errors.Is(err, fleet.ErrNotFound) {
		t.Fatalf("second answer: %v", err)
	}
	if _, err := db.Pool().Exec(ctx, "SELECT pg_notify('lockergate_command', 'probe')"); err != nil {
		t.Fatal(err)
	}
	expect("probe")
}

// waitListening notifies probes until the watcher reports one, then drains.
func waitListening(t *testing.T, db *postgres.DB, got chan string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for time.Now().Before(deadline) {
		if _, err := db.Pool().Exec(context.Background(), "SELECT pg_notify('lockergate_command', 'ready')"); err != nil {
			t.Fatal(err)
		}
		select {
		case <-got:
			for {
				select {
				case <-got:
				case <-time.After(50 * time.Millisecond):
					return
				}
			}
		case <-tick.C:
		}
	}
	t.Fatal("WatchCommands never started listening")
}

// TestMarkOfflineMany: a batch of session ends is applied per locker with
// the same rules as one: a locker whose newer session began after the end
// stays online, one already offline is not logged twice.
func TestMarkOfflineMany(t *testing.T) {
	ctx := context.Background()
	db := MustOpen(t)
	t0 := time.Now().UTC().Truncate(time.Millisecond)
	a, b, c := MustDevice(t, db, "s1", "SN-MA", 1), MustDevice(t, db, "s1", "SN-MB", 1), MustDevice(t, db, "s1", "SN-MC", 1)
	for _, id := range []string{a, b} {
		if err := db.MarkOnline(ctx, id, t0); err != nil {
			t.Fatal(err)
		}
	}
	if err := db.MarkOnline(ctx, b, t0.Add(2*time.Second)); err != nil { // b reconnected after its end below
		t.Fatal(err)
	}
	end := t0.Add(time.Second)
	if err := db.MarkOfflineMany(ctx, []fleet.SessionEnd{
		{ID: a, Reason: "server_shutdown", At: end}, {ID: b, Reason: "server_shutdown", At: end}, {ID: c, Reason: "server_shutdown", At: end},
	}); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		id     string
		online bool
		reason string
	}{{a, false, "server_shutdown"}, {b, true, ""}, {c, false, ""}} {
		l, err := db.GetLocker(ctx, tc.id)
		if err != nil {
			t.Fatal(err)
		}
		if l.Online != tc.online || l.DisconnectReason != tc.reason {
			t.Errorf("%s: online %v reason %q, want %v %q", tc.id, l.Online, l.DisconnectReason, tc.online, tc.reason)
		}
	}
	var logged int
	if err := db.Pool().QueryRow(ctx, `SELECT count(*) FROM presence_log WHERE NOT online`).Scan(&logged); err != nil {
		t.Fatal(err)
	}
	if logged != 1 {
		t.Errorf("%d offline entries in the presence log, want 1 (a's)", logged)
	}
}

func TestIdempotencyClaims(t *testing.T) {
	ctx := context.Background()
	db := MustOpen(t)
	claim := func() bool {
		t.Helper()
		ok, err := db.ClaimIdempotent(ctx, "tok-1", "k", "POST /x", []byte{1})
		if err != nil {
			t.Fatal(err)
		}
		return ok
	}
	if !claim() {
		t.Fatal("first claim refused")
	}
	if claim() {
		t.Fatal("second claim of a running request granted")
	}
	if r, err := db.GetIdempotent(ctx, "tok-1", "k"); err != nil || r.Status != 0 {
		t.Fatalf("claimed key reads %+v %v, want status 0 (in progress)", r, err)
	}
	// A failed request gives the key back.
	if err := db.ReleaseIdempotent(ctx, "tok-1", "k"); err != nil {
		t.Fatal(err)
	}
	if !claim() {
		t.Fatal("claim after release refused")
	}
	if err := db.FinishIdempotent(ctx, "tok-1", "k", 201, []byte(`{"id":"c1"}`), []byte("sealed")); err != nil {
		t.Fatal(err)
	}
	if r, err := db.GetIdempotent(ctx, "tok-1", "k"); err != nil || r.Status != 201 || string(r.Response) != `{"id":"c1"}` || string(r.Sealed) != "sealed" {
		t.Fatalf("answered key reads %+v %v", r, err)
	}
	if claim() {
		t.Fatal("answered key claimed again")
	}
	if err := db.ReleaseIdempotent(ctx, "tok-1", "k"); err != nil {
		t.Fatal(err)
	}
	if r, err := db.GetIdempotent(ctx, "tok-1", "k"); err != nil || r.Status != 201 {
		t.Fatalf("release removed an answer: %+v %v", r, err)
	}
	// A claim whose request died with its gateway is taken over once old.
	if ok, err := db.ClaimIdempotent(ctx, "tok-1", "k2", "POST /x", []byte{1}); !ok || err != nil {
		t.Fatalf("claim k2: %v %v", ok, err)
	}
	if _, err := db.Pool().Exec(ctx, `UPDATE idempotency SET created_at = now() - interval '6 minutes' WHERE key = 'k2'`); err != nil {
		t.Fatal(err)
	}
	if ok, err := db.ClaimIdempotent(ctx, "tok-1", "k2", "POST /x", []byte{1}); !ok || err != nil {
		t.Fatalf("abandoned claim not taken over: %v %v", ok, err)
	}
}

// TestReplaySecretsExpire: an answer's sealed secrets are read back for
// fleet.ReplaySecretsFor and not after, when WipeReplaySecrets deletes
// them; the answer itself stays.
func TestReplaySecretsExpire(t *testing.T) {
	ctx := context.Background()
	db := MustOpen(t)
	for _, k := range []string{"young", "old", "none"} {
		if ok, err := db.ClaimIdempotent(ctx, "tok-1", k, "POST /v1/tokens", []byte{1}); !ok || err != nil {
			t.Fatalf("claim %s: %v %v", k, ok, err)
		}
		var sealed []byte
		if k != "none" {
			sealed = []byte("sealed-" + k)
		}
		if err := db.FinishIdempotent(ctx, "tok-1", k, 201, []byte(`{"id":"t-`+k+`"}`), sealed); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := db.Pool().Exec(ctx, `UPDATE idempotency SET created_at = now() - make_interval(secs => $1) - interval '1 second' WHERE key = 'old'`,
		fleet.ReplaySecretsFor.Seconds()); err != nil {
		t.Fatal(err)
	}
	sealed := func(k string) []byte {
		t.Helper()
		r, err := db.GetIdempotent(ctx, "tok-1", k)
		if err != nil || r.Status != 201 || string(r.Response) != `{"id":"t-`+k+`"}` {
			t.Fatalf("%s reads %+v %v", k, r, err)
		}
		return r.Sealed
	}
	if got := sealed("young"); string(got) != "sealed-young" {
		t.Errorf("young answer's secrets read %q", got)
	}
	if got := sealed("old"); got != nil {
		t.Errorf("secrets of an answer older than %v read %q, want none", fleet.ReplaySecretsFor, got)
	}
	if got := sealed("none"); got != nil {
		t.Errorf("an answer without secrets reads %q", got)
	}
	if n, err := db.WipeReplaySecrets(ctx); err != nil || n != 1 {
		t.Fatalf("WipeReplaySecrets = %d, %v; want 1 (the old answer's)", n, err)
	}
	var left int
	if err := db.Pool().QueryRow(ctx, `SELECT count(*) FROM idempotency WHERE sealed IS NOT NULL`).Scan(&left); err != nil || left != 1 {
		t.Fatalf("%d sealed answers left (%v), want the young one", left, err)
	}
	sealed("old") // the answer stays
}

// Retained is one batch with its own BEGIN and COMMIT: its answers, and a
// pool that still works after batches that found nothing or failed.
func TestRetained(t *testing.T) {
	ctx := context.Background()
	db := MustOpen(t)
	id := MustDevice(t, db, "s1", "SN-RT", 4)
	now := time.Now().UTC()
	if _, err := db.Pool().Exec(ctx, `UPDATE devices SET creds_version = 7, config_version = 3 WHERE id = $1`, id); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Pool().Exec(ctx, `INSERT INTO credentials (id, device_id, pin_mac, qr_mac, compartments, not_after, state, created_at) VALUES
		('cr-b', $1, 'pb', 'qb', '{2}', $2, 'active', $3),
		('cr-a', $1, 'pa', NULL, '{1,3}', $2, 'active', $3),
		('cr-old', $1, 'po', 'qo', '{4}', $3, 'active', $3),
		('cr-used', $1, 'pu', 'qu', '{4}', $2, 'used', $3)`, id, now.Add(time.Hour), now.Add(-time.Hour)); err != nil {
		t.Fatal(err)
	}
	r, err := db.Retained(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	if r.Config.Version != 3 || r.Creds.Version != 7 || r.FwJob != nil {
		t.Errorf("config v%d, creds v%d, fw job %+v; want 3, 7, none", r.Config.Version, r.Creds.Version, r.FwJob)
	}
	var got []string
	for _, c := range r.Creds.Creds {
		got = append(got, c.ID)
	}
	if want := []string{"cr-a.p", "cr-b.p", "cr-b.q"}; !slices.Equal(got, want) {
		t.Errorf("wire credentials %v, want %v (active and unexpired, by id; PIN and QR each)", got, want)
	}
	// More calls than the pool has connections: a batch that found no
	// locker must not leave its connection inside the transaction.
	for i := 0; i < 40; i++ {
		if _, err := db.Retained(ctx, "lk-missing"); !errors.Is(err, fleet.ErrNotFound) {
			t.Fatalf("unknown locker: %v, want ErrNotFound", err)
		}
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := db.Retained(cctx, id); err == nil {
		t.Fatal("Retained with a cancelled context succeeded")
	}
	for i := 0; i < 40; i++ {
		if r, err := db.Retained(ctx, id); err != nil || r.Creds.Version != 7 {
			t.Fatalf("after refusals: %+v, %v", r, err)
		}
	}
	noneIdleInTransaction(t, db)
}

// RetainedMany reads many lockers' state in one snapshot: each locker its
// own versions and credentials, none of another's.
func TestRetainedMany(t *testing.T) {
	ctx := context.Background()
	db := MustOpen(t)
	a := MustDevice(t, db, "s1", "SN-RMA", 2)
	b := MustDevice(t, db, "s1", "SN-RMB", 2)
	c := MustDevice(t, db, "s1", "SN-RMC", 2)
	now := time.Now().UTC()
	if _, err := db.Pool().Exec(ctx, `UPDATE devices SET creds_version = CASE id WHEN $1 THEN 4 ELSE 9 END,
		config_version = CASE id WHEN $1 THEN 2 ELSE 5 END WHERE id IN ($1, $2, $3)`, a, b, c); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Pool().Exec(ctx, `INSERT INTO credentials (id, device_id, pin_mac, qr_mac, compartments, not_after, state, created_at) VALUES
		('cr-a2', $1, 'pa2', NULL, '{2}', $3, 'active', $4),
		('cr-a1', $1, 'pa1', 'qa1', '{1}', $3, 'active', $4),
		('cr-b1', $2, 'pb1', NULL, '{1,2}', $3, 'active', $4)`, a, b, now.Add(time.Hour), now); err != nil {
		t.Fatal(err)
	}
	rs, err := db.RetainedMany(ctx, []string{a, b, c, "lk-missing"})
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]struct {
		cfg, creds int64
		ids        []string
		comps      [][]int
	}{
		a: {2, 4, []string{"cr-a1.p", "cr-a1.q", "cr-a2.p"}, [][]int{{1}, {1}, {2}}},
		b: {5, 9, []string{"cr-b1.p"}, [][]int{{1, 2}}},
		c: {5, 9, []string{}, [][]int{}},
	}
	for id, w := range want {
		r := rs[id]
		if r == nil {
			t.Fatalf("no retained state of %s", id)
		}
		ids, comps := []string{}, [][]int{}
		for _, cr := range r.Creds.Creds {
			ids, comps = append(ids, cr.ID), append(comps, cr.Compartments)
		}
		if r.Config.Version != w.cfg || r.Creds.Version != w.creds || !slices.Equal(ids, w.ids) ||
			!slices.EqualFunc(comps, w.comps, slices.Equal) || r.Creds.Creds == nil {
			t.Errorf("%s: config v%d, creds v%d %v %v; want v%d, v%d %v %v", id, r.Config.Version, r.Creds.Version, ids, comps,
				w.cfg, w.creds, w.ids, w.comps)
		}
	}
	if r, ok := rs["lk-missing"]; ok || len(rs) != 3 {
		t.Errorf("state of a locker that does not exist: %+v (%d lockers)", r, len(rs))
	}
	noneIdleInTransaction(t, db)
}

// RecordBirths writes each locker's own birth, in one statement, and clears
// the clock_skew alert of those it is told to.
func TestRecordBirths(t *testing.T) {
	ctx := context.Background()
	db := MustOpen(t)
	a := MustDevice(t, db, "s1", "SN-RBA", 2)
	b := MustDevice(t, db, "s1", "SN-RBB", 2)
	at := time.Now().UTC().Truncate(time.Millisecond)
	for _, id := range []string{a, b} {
		if _, err := db.RaiseAlert(ctx, fleet.Alert{DeviceID: id, Kind: fleet.AlertClockSkew, RaisedAt: at.Add(-time.Hour)}); err != nil {
			t.Fatal(err)
		}
	}
	var fwB string
	if err := db.Pool().QueryRow(ctx, `SELECT fw FROM devices WHERE id = $1`, b).Scan(&fwB); err != nil {
		t.Fatal(err)
	}
	err := db.RecordBirths(ctx, []fleet.BirthRecord{
		{ID: a, Presence: &protocol.Presence{Online: true, FW: "2.0.0", Model: "LX-9", BootID: "boot-a", TS: protocol.T(at.Add(-1500 * time.Millisecond))}, At: at, ClearSkew: true},
		{ID: b, Presence: &protocol.Presence{Online: true, BootID: "boot-b"}, At: at},
	})
	if err != nil {
		t.Fatal(err)
	}
	for id, w := range map[string]struct {
		fw, boot string
		off      *int64
		open     int
	}{a: {"2.0.0", "boot-a", ptr(int64(-1500)), 0}, b: {fwB, "boot-b", nil, 1}} {
		var fw, boot string
		var off *int64
		var open int
		if err := db.Pool().QueryRow(ctx, `SELECT fw, boot_id, clock_offset_ms,
			(SELECT count(*) FROM alerts WHERE device_id = d.id AND kind = 'clock_skew' AND cleared_at IS NULL)
			FROM devices d WHERE id = $1`, id).Scan(&fw, &boot, &off, &open); err != nil {
			t.Fatal(err)
		}
		if fw != w.fw || boot != w.boot || (off == nil) != (w.off == nil) || (off != nil && *off != *w.off) || open != w.open {
			t.Errorf("%s: fw %q boot %q offset %v, %d open clock_skew; want %q %q %v %d", id, fw, boot, off, open, w.fw, w.boot, w.off, w.open)
		}
	}
	// A value PostgreSQL refuses (a NUL in text) fails the whole batch as
	// ErrInvalid, for the fleet to record the others one by one.
	err = db.RecordBirths(ctx, []fleet.BirthRecord{
		{ID: a, Presence: &protocol.Presence{Online: true, BootID: "boot-a2"}, At: at},
		{ID: b, Presence: &protocol.Presence{Online: true, FW: "1.0\x00", BootID: "boot-b2"}, At: at},
	})
	if !errors.Is(err, fleet.ErrInvalid) {
		t.Fatalf("a birth with a NUL in its version: %v, want ErrInvalid", err)
	}
	var boot string
	if err := db.Pool().QueryRow(ctx, `SELECT boot_id FROM devices WHERE id = $1`, a).Scan(&boot); err != nil || boot != "boot-a" {
		t.Fatalf("the refused batch stored a's birth: boot %q (%v)", boot, err)
	}
}

func ptr[T any](v T) *T { return &v }

// MarkOnlineMany and AckCredsMany write each locker's own row, in one
// statement.
func TestSessionStartsAndAcksMany(t *testing.T) {
	ctx := context.Background()
	db := MustOpen(t)
	a := MustDevice(t, db, "s1", "SN-SMA", 2)
	b := MustDevice(t, db, "s1", "SN-SMB", 2)
	t0 := time.Now().UTC().Truncate(time.Millisecond)
	if err := db.MarkOnlineMany(ctx, []fleet.SessionStart{{ID: a, At: t0}, {ID: b, At: t0.Add(time.Second)}, {ID: "lk-missing", At: t0}}); err != nil {
		t.Fatal(err)
	}
	if err := db.MarkOnlineMany(ctx, []fleet.SessionStart{{ID: a, At: t0.Add(2 * time.Second)}}); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Pool().Exec(ctx, `UPDATE devices SET creds_version = 7 WHERE id = ANY($1)`, []string{a, b}); err != nil {
		t.Fatal(err)
	}
	if back, err := db.AckCredsMany(ctx, []fleet.CredsAck{{ID: a, Version: 3}, {ID: b, Version: 7}, {ID: "lk-missing", Version: 1}}); err != nil || len(back) != 0 {
		t.Fatalf("first acks: %v went back (%v), want none", back, err)
	}
	for id, w := range map[string]struct {
		at            time.Time
		count, starts int
		acked         int64
	}{a: {t0.Add(2 * time.Second), 2, 2, 3}, b: {t0.Add(time.Second), 1, 1, 7}} {
		var online bool
		var at time.Time
		var count, starts int
		var acked int64
		if err := db.Pool().QueryRow(ctx, `SELECT online, connected_at, connect_count, creds_acked,
			(SELECT count(*) FROM presence_log p WHERE p.device_id = d.id AND p.online) FROM devices d WHERE id = $1`, id).
			Scan(&online, &at, &count, &acked, &starts); err != nil {
			t.Fatal(err)
		}
		if !online || !at.Equal(w.at) || count != w.count || starts != w.starts || acked != w.acked {
			t.Errorf("%s: online %v at %v, %d connects, %d logged, creds %d acked; want at %v, %d, %d, %d",
				id, online, at, count, starts, acked, w.at, w.count, w.starts, w.acked)
		}
	}
}

// noneIdleInTransaction fails the test if a connection to db's database is
// left inside a transaction.
func noneIdleInTransaction(t *testing.T, db *postgres.DB) {
	t.Helper()
	var inTx int
	if err := db.Pool().QueryRow(context.Background(), `SELECT count(*) FROM pg_stat_activity
		WHERE datname = current_database() AND state LIKE 'idle in transaction%'`).Scan(&inTx); err != nil || inTx != 0 {
		t.Fatalf("%d connections idle in a transaction (%v), want 0", inTx, err)
	}
}

// TestRetainedMidBatchError: a statement of the Retained batch that fails
// after BEGIN (here: cancelled while it waits for a table another session
// has locked) fails the call, names the locker, and leaves no connection
// inside the aborted transaction.
func TestRetainedMidBatchError(t *testing.T) {
	ctx := context.Background()
	dsn := pgtest.NewDB(t)
	setup, err := postgres.Open(ctx, postgres.Options{DSN: dsn})
	if err != nil {
		t.Fatal(err)
	}
	defer setup.Close()
	// One connection: its statements are prepared by the first call, so
	// the next one runs BEGIN and the locker's row before it blocks.
	db, err := postgres.Open(ctx, postgres.Options{DSN: dsn, MaxConns: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	id := MustDevice(t, setup, "s1", "SN-RTE", 2)
	for _, table := range []string{"credentials", "fw_jobs"} {
		t.Run(table, func(t *testing.T) {
			if _, err := db.Retained(ctx, id); err != nil {
				t.Fatal(err)
			}
			tx, err := setup.Pool().Begin(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := tx.Exec(ctx, "LOCK TABLE "+table+" IN ACCESS EXCLUSIVE MODE"); err != nil {
				t.Fatal(err)
			}
			cctx, cancel := context.WithTimeout(ctx, time.Second)
			_, err = db.Retained(cctx, id)
			cancel()
			tx.Rollback(ctx)
			if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "retained state of "+id) {
				t.Fatalf("blocked on %s: %v, want the deadline, naming the locker", table, err)
			}
			for i := 0; i < 10; i++ {
				if _, err := db.Retained(ctx, id); err != nil {
					t.Fatalf("after the lock is gone: %v", err)
				}
			}
			noneIdleInTransaction(t, setup)
		})
	}
}

func TestSessionDefaults(t *testing.T) {
	ctx := context.Background()
	setting := func(db *postgres.DB, name string) string {
		t.Helper()
		var v string
		if err := db.Pool().QueryRow(ctx, "SELECT current_setting($1)", name).Scan(&v); err != nil {
			t.Fatal(err)
		}
		return v
	}
	t.Run("Applied", func(t *testing.T) {
		db := MustOpen(t)
		for k, want := range postgres.SessionDefaults {
			if got := setting(db, k); got != want {
				t.Errorf("%s = %q, want %q", k, got, want)
			}
		}
	})
	t.Run("URLWins", func(t *testing.T) {
		db, err := postgres.Open(ctx, postgres.Options{DSN: pgtest.NewDB(t) + " jit=on"})
		if err != nil {
			t.Fatal(err)
		}
		defer db.Close()
		if got := setting(db, "jit"); got != "on" {
			t.Errorf("jit = %q with jit=on in the database URL, want on", got)
		}
		if got := setting(db, "max_parallel_workers_per_gather"); got != "0" {
			t.Errorf("max_parallel_workers_per_gather = %q, want the default 0", got)
		}
	})
}

// With HealthAsyncCommit a health batch commits without waiting for the
// disk, whatever its shape, and only its own transaction does: the
// connection it used goes back to the pool with the session's setting.
// Without it (behind an external broker, which is acknowledged after the
// commit) every shape waits. The test cluster runs with synchronous_commit
// off for speed, so this database's sessions are set to on; triggers record
// the setting each write of health ran under.
func TestHealthCommitsWithoutWaitingForDisk(t *testing.T) {
	t.Run("Async", func(t *testing.T) { testHealthCommitSetting(t, true, "off") })
	t.Run("Sync", func(t *testing.T) { testHealthCommitSetting(t, false, "on") })
}

func testHealthCommitSetting(t *testing.T, async bool, want string) {
	ctx := context.Background()
	db, err := postgres.Open(ctx, postgres.Options{DSN: pgtest.NewDB(t) + " synchronous_commit=on", MaxConns: 1,
		HealthAsyncCommit: async})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	seedFleet(t, db, 2)
	now := time.Now().UTC()
	if err := db.EnsurePartitions(ctx, now.AddDate(0, 0, -1), 2); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Pool().Exec(ctx, `
		CREATE TABLE seen (what text, setting text);
		CREATE FUNCTION note_setting() RETURNS trigger LANGUAGE plpgsql AS $$
			BEGIN
				INSERT INTO seen VALUES (TG_TABLE_NAME, current_setting('synchronous_commit'));
				RETURN NULL;
			END $$;
		CREATE TRIGGER note AFTER INSERT ON health FOR EACH STATEMENT EXECUTE FUNCTION note_setting();
		CREATE TRIGGER note AFTER UPDATE ON devices FOR EACH STATEMENT EXECUTE FUNCTION note_setting();`); err != nil {
		t.Fatal(err)
	}
	setting := func() string {
		t.Helper()
		var v string
		if err := db.Pool().QueryRow(ctx, "SHOW synchronous_commit").Scan(&v); err != nil {
			t.Fatal(err)
		}
		return v
	}
	if got := setting(); got != "on" {
		t.Fatalf("the session's synchronous_commit is %q, want on", got)
	}
	rows := []fleet.HealthRecord{{DeviceID: "lk-1", ReceivedAt: now, TS: now, Seq: 1, Body: json.RawMessage(`{"seq":1}`)}}
	for _, c := range []struct {
		name   string
		rows   []fleet.HealthRecord
		latest []fleet.LatestHealth
		want   string // the tables written, in order
	}{
		{"rows and latest", rows, fleet.LatestOf(rows), "health devices"},
		{"rows", rows, nil, "health"},
		{"latest", nil, fleet.LatestOf(rows), "devices"},
	} {
		if _, err := db.Pool().Exec(ctx, "TRUNCATE seen"); err != nil {
			t.Fatal(err)
		}
		if err := db.InsertHealth(ctx, c.rows, c.latest); err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		r, _ := db.Pool().Query(ctx, "SELECT ARRAY[what, setting] FROM seen")
		seen, err := pgx.CollectRows(r, pgx.RowTo[[]string])
		if err != nil {
			t.Fatal(err)
		}
		var what []string
		for _, s := range seen {
			what = append(what, s[0])
			if s[1] != want {
				t.Errorf("%s: %s written with synchronous_commit %s, want %s", c.name, s[0], s[1], want)
			}
		}
		if got := strings.Join(what, " "); got != c.want {
			t.Errorf("%s: wrote %q, want %q", c.name, got, c.want)
		}
		// One connection in the pool: the batch's; its session is as it was.
		if got := setting(); got != "on" {
			t.Errorf("%s: the connection's synchronous_commit is %q after the batch, want on", c.name, got)
		}
	}
}

// TestCommandWatchAfterReconnect: once LISTEN is back after its connection
// ended, WatchCommands says that notifications may have been missed (fn
// with ""), and not at the first LISTEN; changes are notified again after.
func TestCommandWatchAfterReconnect(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	db := MustOpen(t)
	got := make(chan string, 64)
	watching := make(chan struct{})
	go func() { db.WatchCommands(ctx, func(cid string) { got <- cid }); close(watching) }()
	defer func() { cancel(); <-watching }() // before MustOpen's cleanup closes the pool
	waitListening(t, db, got)
	if _, err := db.Pool().Exec(ctx, `SELECT pg_terminate_backend(pid) FROM pg_stat_activity
		WHERE datname = current_database() AND query LIKE 'LISTEN%'`); err != nil {
		t.Fatal(err)
	}
	waitMissed(t, got, "after the listener's connection was ended")
	waitListening(t, db, got)
}

// waitMissed waits until the watcher says notifications may have been
// missed ("").
func waitMissed(t *testing.T, got chan string, when string) {
	t.Helper()
	deadline := time.After(20 * time.Second)
	for {
		select {
		case cid := <-got:
			if cid == "" {
				return
			}
		case <-deadline:
			t.Fatalf("%s: never told that notifications may have been missed", when)
		}
	}
}

// TestListenerReplacesAHalfOpenConnection: a listening connection that
// goes silent without closing (half-open, through a proxy that stops
// forwarding) is found out once it has been quiet a while and does not
// answer a probe: the listener starts again on a new connection, says what
// it may have missed, and hears changes again.
func TestListenerReplacesAHalfOpenConnection(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	dsn := pgtest.NewDB(t)
	proxy := pgtest.NewProxy(t)
	proxy.SetTarget(t, dsn)
	db, err := postgres.Open(ctx, postgres.Options{DSN: proxy.DSN(t, dsn), Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	db.SetListenQuiet(200 * time.Millisecond)
	got := make(chan string, 64)
	watching := make(chan struct{})
	go func() { db.WatchCommands(ctx, func(cid string) { got <- cid }); close(watching) }()
	defer func() {
		cancel()
		<-watching      // the pool's Close waits for the listener's connection
		proxy.DropAll() // frozen connections would each take the pool's close timeout
		db.Close()
	}()
	waitListening(t, db, got)
	proxy.Freeze() // the listener's connection, and the pool's, go silent
	db.Pool().Reset()
	waitMissed(t, got, "after the listener's connection went silent")
	waitListening(t, db, got)
}
