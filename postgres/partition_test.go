package postgres_test

import (
	"context"
	"fmt"
	"testing"
	"time"
)

// TestPartitionDDLGivesWayToALongRead: creating or dropping a day's
// partition needs the parent table's exclusive lock, and every health and
// event write would queue behind it while it waits. With a long read of
// health holding the table, both give up (no error: the next hourly pass
// tries again) and leave the partition as it was; once the read ends they
// go through.
func TestPartitionDDLGivesWayToALongRead(t *testing.T) {
	ctx := context.Background()
	db := MustOpen(t)
	exists := func(name string) bool {
		t.Helper()
		return countOf(t, db, `SELECT count(*) FROM pg_class WHERE relname = $1`, name) == 1
	}
	future := time.Now().UTC().AddDate(0, 0, 30)
	name := fmt.Sprintf("health_%s", future.Format("20060102"))

	reader, err := db.Pool().Begin(ctx) // a long read (or a pg_dump)
	if err != nil {
		t.Fatal(err)
	}
	defer reader.Rollback(ctx)
	if _, err := reader.Exec(ctx, `LOCK TABLE health IN ACCESS SHARE MODE`); err != nil {
		t.Fatal(err)
	}
	// Bounded: a create that waited for the read would fail here.
	bounded, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := db.EnsurePartitions(bounded, future, 0); err != nil {
		t.Fatalf("create behind a read: %v, want nil (tried again later)", err)
	}
	if exists(name) {
		t.Fatalf("%s was created while health was locked", name)
	}
	if !exists(fmt.Sprintf("events_%s", future.Format("20060102"))) {
		t.Fatal("events' partition, whose table nobody locked, was not created")
	}
	if err := reader.Rollback(ctx); err != nil {
		t.Fatal(err)
	}
	if err := db.EnsurePartitions(ctx, future, 0); err != nil || !exists(name) {
		t.Fatalf("create after the read: %v (exists %v)", err, exists(name))
	}

	// Dropping it: the same.
	reader, err = db.Pool().Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer reader.Rollback(ctx)
	if _, err := reader.Exec(ctx, `LOCK TABLE health IN ACCESS SHARE MODE`); err != nil {
		t.Fatal(err)
	}
	cutoff := future.AddDate(0, 0, 2)
	dropped, err := db.DropPartitionsBefore(bounded, cutoff)
	if err != nil || !exists(name) {
		t.Fatalf("drop behind a read: %v %v (exists %v), want no error and %s kept", dropped, err, exists(name), name)
	}
	if err := reader.Rollback(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := db.DropPartitionsBefore(ctx, cutoff); err != nil || exists(name) {
		t.Fatalf("drop after the read: %v (exists %v)", err, exists(name))
	}
}
