package postgres

import (
	"encoding/json"
	"fmt"
	"testing"
	"time"

	"github.com/lockergate/lockergate/fleet"
)

// The stream is sized before it is encoded, so that a buffer is allocated
// once: the size must be exact for every shape of batch.
func TestHealthTxSize(t *testing.T) {
	now := time.Now()
	var rows []fleet.HealthRecord
	for i := range 5 {
		rows = append(rows, fleet.HealthRecord{DeviceID: fmt.Sprintf("lk-%d", i), ReceivedAt: now, TS: now,
			Seq: int64(i), Body: json.RawMessage(fmt.Sprintf(`{"seq":%d,"pad":"%*s"}`, i, i*7, ""))})
	}
	latest := fleet.LatestOf(rows)
	for _, c := range []struct {
		name   string
		rows   []fleet.HealthRecord
		latest []fleet.LatestHealth
	}{
		{"rows", rows, nil},
		{"latest", nil, latest},
		{"both", rows, latest},
		{"one of each", rows[:1], latest[:1]},
	} {
		for _, async := range []bool{false, true} {
			b, err := appendHealthTx(nil, c.rows, c.latest, async)
			if err != nil {
				t.Fatalf("%s: %v", c.name, err)
			}
			if want := healthTxSize(c.rows, c.latest, async); len(b) != want {
				t.Errorf("%s (async %v): encoded %d bytes, sized %d", c.name, async, len(b), want)
			}
		}
	}
	if _, err := appendHealthTx(nil, nil, nil, true); err == nil {
		t.Error("an empty transaction was encoded")
	}
}
