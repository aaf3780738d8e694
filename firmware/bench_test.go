package firmware_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/lockergate/lockergate/firmware"
)

// The control-plane benchmarks of docs/firmware.md: the engine on a real
// PostgreSQL, with fake lockers that answer each fw/job at once (zero-cost
// installs) through four ordered workers, as the fleet manager's control
// shards feed it. Run with -benchtime=1x; each iteration is one rollout.

const benchLockers = 10000

func benchHarness(b *testing.B) *harness {
	h := newHarness(b, hopt{tick: 100 * time.Millisecond}) // the production tick
	h.addLockers("lk-", "LX-24", "1.0.0", benchLockers)
	return h
}

// BenchmarkRollout10k is the time from creating a rollout to its
// completion, for 10,000 lockers in waves 1, 10, 50, 100 %.
func BenchmarkRollout10k(b *testing.B) {
	h := benchHarness(b)
	var total time.Duration
	for i := 0; i < b.N; i++ {
		a := h.upload("LX-24", fmt.Sprintf("1.%d.0", i+1))
		start := time.Now()
		st := h.create(firmware.Spec{Firmware: a.ID, RatePerMin: 600000, MaxFailurePct: ptr(5.0)})
		st = h.waitStatus(st.ID, firmware.Completed, 10*time.Minute)
		took := time.Since(start)
		total += took
		if st.Counts[firmware.StateSucceeded] != benchLockers {
			b.Fatalf("counts %v", st.Counts)
		}
		b.Logf("rollout %d: %d lockers in %v (%.0f jobs/s)", i+1, benchLockers, took.Round(time.Millisecond), benchLockers/took.Seconds())
	}
	b.ReportMetric(total.Seconds()/float64(b.N), "s/rollout")
	b.ReportMetric(float64(benchLockers*b.N)/total.Seconds(), "jobs/s")
}

// BenchmarkGateStop is the time from receiving the failure report that
// crosses a wave's threshold to the rollout paused (committed), under the
// load of a 10,000-locker rollout where 10 % of lockers fail to boot.
func BenchmarkGateStop(b *testing.B) {
	h := benchHarness(b)
	h.devs.outcome = func(id string, _ int) string {
		var n int
		fmt.Sscanf(id, "lk-%d", &n)
		if n%10 == 0 {
			return outBoot
		}
		return outOK
	}
	var worst float64
	for i := 0; i < b.N; i++ {
		a := h.upload("LX-24", fmt.Sprintf("1.%d.0", i+1))
		sum0, n0 := gateStops(b, h)
		st := h.create(firmware.Spec{Firmware: a.ID, RatePerMin: 600000, MaxFailurePct: ptr(5.0), Waves: []int{10, 100}})
		st = h.waitStatus(st.ID, firmware.Paused, 10*time.Minute)
		sum, n := gateStops(b, h)
		if n != n0+1 {
			b.Fatalf("%d gate stops in one rollout", n-n0)
		}
		worst = max(worst, sum-sum0)
		b.Logf("rollout %d: stopped %.1f ms after the crossing report: %s", i+1, (sum-sum0)*1000, st.Reason)
		// Later rollouts start from the versions this one left.
		if _, err := h.eng.Cancel(context.Background(), st.ID, "bench"); err != nil {
			b.Fatal(err)
		}
	}
	sum, n := gateStops(b, h)
	b.ReportMetric(sum/float64(n)*1000, "ms/stop")
	b.ReportMetric(worst*1000, "ms-worst/stop")
}

func gateStops(tb testing.TB, h *harness) (sum float64, n uint64) {
	mfs, err := h.reg.Gather()
	if err != nil {
		tb.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == "lockergate_firmware_gate_stop_seconds" {
			hist := mf.GetMetric()[0].GetHistogram()
			return hist.GetSampleSum(), hist.GetSampleCount()
		}
	}
	return 0, 0
}
