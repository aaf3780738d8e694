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
// not what is kept. A start reports whether it bumped the version.
func TestLockerConfig(t *testing.T) {
	ctx := context.Background()
	def := protocol.Config{Version: 1, HealthIntervalS: 60, DoorAjarS: 120, Lockout: protocol.DefaultLockout}
	faster := def
	faster.HealthIntervalS, faster.Version = 30, 99
	for _, c := range []struct {
		name   string
		starts []protocol.Config
		want   []int64
		bumped []bool
	}{
		{"the default first", []protocol.Config{def, def, faster, faster, def}, []int64{1, 1, 2, 2, 3}, []bool{false, false, true, false, true}},
		{"another first", []protocol.Config{faster, faster, def, def, faster}, []int64{2, 2, 3, 3, 4}, []bool{true, false, true, false, true}},
	} {
		db := MustOpen(t)
		var got []int64
		var bumped []bool
		for _, cfg := range c.starts {
			v, b, err := db.LockerConfig(ctx, cfg, def)
			if err != nil {
				t.Fatal(err)
			}
			got, bumped = append(got, v), append(bumped, b)
		}
		if !slices.Equal(got, c.want) || !slices.Equal(bumped, c.bumped) {
			t.Errorf("%s: versions %v bumped %v, want %v bumped %v", c.name, got, bumped, c.want, c.bumped)
		}
	}
}
