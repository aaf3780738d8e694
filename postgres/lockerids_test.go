package postgres_test

import (
	"context"
	"slices"
	"testing"
	"time"
)

// TestEnabledLockerIDs: the fleet in pages of ids, by id, without the
// disabled lockers, each page after the last id of the one before.
func TestEnabledLockerIDs(t *testing.T) {
	ctx := context.Background()
	db := MustOpen(t)
	seedFleet(t, db, 5)
	yes := true
	if _, err := db.UpdateLocker(ctx, "lk-2", &yes, nil); err != nil {
		t.Fatal(err)
	}
	var pages [][]string
	for after := ""; ; {
		ids, err := db.EnabledLockerIDs(ctx, after, 2)
		if err != nil {
			t.Fatal(err)
		}
		pages = append(pages, ids)
		if len(ids) < 2 {
			break
		}
		after = ids[len(ids)-1]
	}
	want := [][]string{{"lk-1", "lk-3"}, {"lk-4", "lk-5"}, nil}
	if !slices.EqualFunc(pages, want, slices.Equal) {
		t.Fatalf("pages %q, want %q", pages, want)
	}
}

// TestLockerIDsOlderThan: every locker registered before the age, disabled
// ones too, by id; one registered since is left out.
func TestLockerIDsOlderThan(t *testing.T) {
	ctx := context.Background()
	db := MustOpen(t)
	seedFleet(t, db, 3)
	yes := true
	if _, err := db.UpdateLocker(ctx, "lk-2", &yes, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Pool().Exec(ctx, `UPDATE devices SET created_at = now() - interval '2 minutes' WHERE id <> 'lk-3'`); err != nil {
		t.Fatal(err)
	}
	ids, err := db.LockerIDsOlderThan(ctx, time.Minute)
	if err != nil || !slices.Equal(ids, []string{"lk-1", "lk-2"}) {
		t.Fatalf("ids %q (%v), want lk-1 and lk-2 (lk-3 registered just now)", ids, err)
	}
}
