package postgres_test

import (
	"context"
	"slices"
	"testing"

	"github.com/lockergate/lockergate/protocol"
)

// TestLockerConfig: the lockers' configuration keeps its version while it
// stays the same, and a start with another one bumps it (back to an earlier
// one included). The first kept takes the default's version when it is the
// default (what lockers had), the next when it is not. A Version given is
// not what is kept.
func TestLockerConfig(t *testing.T) {
	ctx := context.Background()
	def := protocol.Config{Version: 1, HealthIntervalS: 60, DoorAjarS: 120, Lockout: protocol.DefaultLockout}
	faster := def
	faster.HealthIntervalS, faster.Version = 30, 99
	for _, c := range []struct {
		name   string
		starts []protocol.Config
		want   []int64
	}{
		{"the default first", []protocol.Config{def, def, faster, faster, def}, []int64{1, 1, 2, 2, 3}},
		{"another first", []protocol.Config{faster, faster, def, def, faster}, []int64{2, 2, 3, 3, 4}},
	} {
		db := MustOpen(t)
		var got []int64
		for _, cfg := range c.starts {
			v, err := db.LockerConfig(ctx, cfg, def)
			if err != nil {
				t.Fatal(err)
			}
			got = append(got, v)
		}
		if !slices.Equal(got, c.want) {
			t.Errorf("%s: versions %v, want %v", c.name, got, c.want)
		}
	}
}
