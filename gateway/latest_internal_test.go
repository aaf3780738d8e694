package gateway

import (
	"testing"
	"time"
)

func TestLatestHealthEvery(t *testing.T) {
	for _, c := range []struct {
		set      time.Duration
		external bool
		want     time.Duration
	}{
		{0, false, 0}, // the fleet manager's default: held up to a second
		{0, true, -1}, // written through: each instance sees some reports
		{time.Second, true, time.Second},
		{-1, false, -1},
		{5 * time.Second, false, 5 * time.Second},
	} {
		if got := latestHealthEvery(c.set, c.external); got != c.want {
			t.Errorf("latestHealthEvery(%v, external %v) = %v, want %v", c.set, c.external, got, c.want)
		}
	}
}
