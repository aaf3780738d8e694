package firmware

import (
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/lockergate/lockergate/fleet"
)

func TestWaveSizes(t *testing.T) {
	for _, tc := range []struct {
		n      int
		pcts   []int
		minPer int
		want   []int
	}{
		{300, []int{1, 10, 50, 100}, 1, []int{3, 27, 120, 150}},
		{300, []int{1, 10, 50, 100}, 5, []int{5, 25, 120, 150}},
		{100, []int{1, 10, 50, 100}, 5, []int{5, 5, 40, 50}},
		{10000, []int{1, 10, 50, 100}, 5, []int{100, 900, 4000, 5000}},
		{7, []int{1, 10, 50, 100}, 5, []int{5, 2, 0, 0}},
		{3, []int{50, 100}, 1, []int{2, 1}},
		{1, []int{1, 10, 100}, 1, []int{1, 0, 0}},
		{5, []int{100}, 10, []int{5}},
		{101, []int{33, 66, 100}, 1, []int{34, 33, 34}},
	} {
		t.Run(fmt.Sprintf("%d_%v_min%d", tc.n, tc.pcts, tc.minPer), func(t *testing.T) {
			got := WaveSizes(tc.n, tc.pcts, tc.minPer)
			if !slices.Equal(got, tc.want) {
				t.Fatalf("got %v, want %v", got, tc.want)
			}
			sum := 0
			for _, s := range got {
				sum += s
			}
			if sum != tc.n {
				t.Fatalf("sizes %v sum to %d, want %d", got, sum, tc.n)
			}
		})
	}
}

func TestValidateWaves(t *testing.T) {
	for _, ok := range [][]int{{100}, {1, 10, 50, 100}, {50, 100}} {
		if err := ValidateWaves(ok); err != nil {
			t.Errorf("%v: %v", ok, err)
		}
	}
	for _, bad := range [][]int{nil, {}, {50}, {10, 10, 100}, {0, 100}, {50, 20, 100}, {10, 101}, {-1, 100}} {
		if err := ValidateWaves(bad); err == nil {
			t.Errorf("%v: accepted", bad)
		}
	}
}

func TestCrossed(t *testing.T) {
	for _, tc := range []struct {
		failed, size int
		pct          float64
		want         bool
	}{
		{0, 10, 0, false},
		{1, 10, 0, true},
		{1, 20, 5, false}, // exactly 5 % is within the threshold
		{2, 20, 5, true},
		{1, 5, 10, true}, // 20 % > 10 %
		{1, 100, 1, false},
		{0, 0, 5, false},
		{10, 10, 100, false},
	} {
		if got := Crossed(tc.failed, tc.size, tc.pct); got != tc.want {
			t.Errorf("Crossed(%d, %d, %g) = %v, want %v", tc.failed, tc.size, tc.pct, got, tc.want)
		}
	}
}

func TestOrderIsAPermutationStablePerRollout(t *testing.T) {
	ids := []string{"a", "b", "c", "d", "e", "f", "g", "h"}
	one, two := order("ro-1", ids), order("ro-1", ids)
	if !slices.Equal(one, two) {
		t.Fatalf("order differs between calls: %v, %v", one, two)
	}
	sorted := slices.Clone(one)
	slices.Sort(sorted)
	if !slices.Equal(sorted, ids) {
		t.Fatalf("order %v is not a permutation of %v", one, ids)
	}
	if other := order("ro-2", ids); slices.Equal(other, one) && slices.Equal(order("ro-3", ids), one) {
		t.Fatalf("order ignores the rollout id")
	}
}

func TestRate(t *testing.T) {
	t0 := time.Date(2026, 11, 24, 12, 0, 0, 0, time.UTC)
	tick := 100 * time.Millisecond
	t.Run("PacesAtRate", func(t *testing.T) {
		r := newRate(600, tick) // one job per 100 ms
		var tat time.Time
		sent := 0
		for now := t0; now.Before(t0.Add(time.Minute)); now = now.Add(tick) {
			n := r.budget(tat, now)
			tat = r.take(tat, now, n)
			sent += n
		}
		if sent < 599 || sent > 601 {
			t.Fatalf("sent %d jobs in a minute at 600/min", sent)
		}
	})
	t.Run("NoBurstAfterIdle", func(t *testing.T) {
		r := newRate(60, tick) // one job per second
		tat := t0
		if n := r.budget(tat, t0.Add(time.Hour)); n != 1 {
			t.Fatalf("budget after an idle hour = %d, want 1", n)
		}
	})
	t.Run("ZeroWhenAhead", func(t *testing.T) {
		r := newRate(60, tick)
		tat := r.take(time.Time{}, t0, 1)
		if n := r.budget(tat, t0.Add(500*time.Millisecond)); n != 0 {
			t.Fatalf("budget half an interval later = %d, want 0", n)
		}
		if n := r.budget(tat, t0.Add(time.Second)); n != 1 {
			t.Fatalf("budget one interval later = %d, want 1", n)
		}
	})
	t.Run("FastRatesBatchPerTick", func(t *testing.T) {
		r := newRate(60000, tick) // 1000/s
		var tat time.Time
		total := 0
		for now := t0; now.Before(t0.Add(10 * time.Second)); now = now.Add(tick) {
			n := r.budget(tat, now)
			tat = r.take(tat, now, n)
			total += n
		}
		if total < 9999 || total > 10101 {
			t.Fatalf("sent %d in 10 s at 1000/s", total)
		}
	})
}

func TestRetryable(t *testing.T) {
	now := time.Date(2026, 11, 24, 12, 0, 0, 0, time.UTC)
	past := now.Add(-time.Minute)
	r := &Rollout{Status: Running, Retries: 2, RetryOn: []string{KindDownload, KindTimeout}}
	for _, tc := range []struct {
		name    string
		r       Rollout
		kind    string
		attempt int
		want    bool
	}{
		{"OK", *r, KindDownload, 1, true},
		{"LastRetry", *r, KindTimeout, 2, true},
		{"Exhausted", *r, KindDownload, 3, false},
		{"KindNotListed", *r, KindBoot, 1, false},
		{"Paused", Rollout{Status: Paused, Retries: 2, RetryOn: r.RetryOn}, KindDownload, 1, false},
		{"PastDeadline", Rollout{Status: Running, Retries: 2, RetryOn: r.RetryOn, Deadline: &past}, KindDownload, 1, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := retryable(&tc.r, tc.kind, tc.attempt, now); got != tc.want {
				t.Fatalf("got %v, want %v", got, tc.want)
			}
		})
	}
}

func TestSpecNormalize(t *testing.T) {
	now := time.Now()
	t.Run("Defaults", func(t *testing.T) {
		s := Spec{Firmware: "fw-1", Retries: 2}
		if err := s.normalize(now); err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(s.Waves, DefaultWaves) || *s.MaxFailurePct != 5 || s.MinPerWave != 1 || s.RatePerMin != 600 ||
			s.StepTimeoutS != 600 || s.FailureAction != ActionPause || !slices.Equal(s.RetryOn, DefaultRetryOn) {
			t.Fatalf("defaults: %+v", s)
		}
	})
	zero := 0.0
	past := now.Add(-time.Hour)
	for name, s := range map[string]Spec{
		"NoFirmware":     {},
		"BadWaves":       {Firmware: "f", Waves: []int{10, 50}},
		"BadPct":         {Firmware: "f", MaxFailurePct: func() *float64 { v := 101.0; return &v }()},
		"BadAction":      {Firmware: "f", FailureAction: "explode"},
		"TooManyRetries": {Firmware: "f", Retries: 11},
		"BadRetryKind":   {Firmware: "f", Retries: 1, RetryOn: []string{"deadline"}},
		"BadWindow":      {Firmware: "f", Window: "25:00-26:00"},
		"PastDeadline":   {Firmware: "f", Deadline: &past},
		"NegativeRate":   {Firmware: "f", RatePerMin: -1},
	} {
		t.Run("Err"+name, func(t *testing.T) {
			if err := s.normalize(now); err == nil {
				t.Fatalf("accepted %+v", s)
			}
		})
	}
	// From JSON: a field left out (or null) takes its default; one written
	// as 0 (waves as []) is refused, as any value out of range is.
	for _, body := range []string{`{"firmware":"f"}`, `{"firmware":"f","rate_per_min":null,"waves":null}`} {
		var s Spec
		if err := json.Unmarshal([]byte(body), &s); err != nil {
			t.Fatal(err)
		}
		if err := s.normalize(now); err != nil || s.RatePerMin != DefaultRatePerMin || !slices.Equal(s.Waves, DefaultWaves) {
			t.Fatalf("%s: %v, rate %d, waves %v; want the defaults", body, err, s.RatePerMin, s.Waves)
		}
	}
	for _, c := range []struct{ body, want string }{
		{`{"firmware":"f","rate_per_min":0}`, "rate_per_min must be 1 or more"},
		{`{"firmware":"f","step_timeout_s":0}`, "step_timeout_s must be 1 or more"},
		{`{"firmware":"f","min_per_wave":0}`, "min_per_wave must be 1 or more"},
		{`{"firmware":"f","waves":[]}`, "waves must not be empty"},
		{`{"firmware":"f","Rate_Per_Min":0}`, "rate_per_min must be 1 or more"}, // encoding/json folds case
	} {
		var s Spec
		if err := json.Unmarshal([]byte(c.body), &s); err != nil {
			t.Fatal(err)
		}
		if err := s.normalize(now); err == nil || !errors.Is(err, fleet.ErrInvalid) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want invalid: %s", c.body, err, c.want)
		}
	}
	t.Run("ZeroThresholdKept", func(t *testing.T) {
		s := Spec{Firmware: "f", MaxFailurePct: &zero}
		if err := s.normalize(now); err != nil || *s.MaxFailurePct != 0 {
			t.Fatalf("max_failure_pct 0: %v, %v", err, *s.MaxFailurePct)
		}
	})
}

// TestGateReasons: a stopped rollout's reason shows one gate reason per
// wave crossed, the latest first, before what an operator paused it for;
// a wave's is replaced as its counts change; wave 1 is not wave 11.
func TestGateReasons(t *testing.T) {
	r := &Rollout{MaxFailurePct: 5}
	w1a, w1b := gateReason(r, 0, 2, 0, 2), gateReason(r, 0, 3, 0, 4)
	w2, w11 := gateReason(r, 1, 1, 0, 18), gateReason(r, 10, 3, 0, 40)
	reason := withGate("paused by operator", 0, w1a)
	if want := w1a + " while paused by operator"; reason != want {
		t.Fatalf("first gate: %q, want %q", reason, want)
	}
	reason = withGate(reason, 1, w2)
	if want := w2 + "; " + w1a + " while paused by operator"; reason != want {
		t.Fatalf("second wave: %q, want %q", reason, want)
	}
	reason = withGate(reason, 0, w1b)
	if want := w2 + "; " + w1b + " while paused by operator"; reason != want {
		t.Fatalf("wave 1 again: %q, want %q", reason, want)
	}
	for _, c := range []struct {
		reason string
		wave   int
		want   string
	}{
		{reason, 0, w1b},
		{reason, 1, w2},
		{reason, 2, ""},
		{"paused by operator", 0, ""},
		{w11, 0, ""},
		{w11, 10, w11},
		{withGate("", 0, w1a), 0, w1a},
	} {
		if got := shownGate(c.reason, c.wave); got != c.want {
			t.Errorf("shownGate(%q, wave %d) = %q, want %q", c.reason, c.wave+1, got, c.want)
		}
	}
}
