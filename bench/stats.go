package bench

import (
	"fmt"
	"math"
	"slices"
	"time"
)

// Percentile returns the p-th percentile (0..100) of xs by nearest rank.
func Percentile(xs []float64, p float64) float64 {
	if len(xs) == 0 {
		return math.NaN()
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	i := int(math.Ceil(p/100*float64(len(s)))) - 1
	return s[min(max(i, 0), len(s)-1)]
}

// Durations turns durations into seconds.
func Durations(ds []time.Duration) []float64 {
	out := make([]float64, len(ds))
	for i, d := range ds {
		out[i] = d.Seconds()
	}
	return out
}

// Spread is the median and range of one figure over several runs.
type Spread struct {
	Median, Min, Max float64
	N                int
}

// SpreadOf summarises runs, ignoring NaNs.
func SpreadOf(xs []float64) Spread {
	var v []float64
	for _, x := range xs {
		if !math.IsNaN(x) {
			v = append(v, x)
		}
	}
	if len(v) == 0 {
		return Spread{Median: math.NaN(), Min: math.NaN(), Max: math.NaN()}
	}
	slices.Sort(v)
	m := v[len(v)/2]
	if len(v)%2 == 0 {
		m = (v[len(v)/2-1] + v[len(v)/2]) / 2
	}
	return Spread{Median: m, Min: v[0], Max: v[len(v)-1], N: len(v)}
}

// Format prints the median with the range when there are several runs.
func (s Spread) Format(f func(float64) string) string {
	if math.IsNaN(s.Median) {
		return "n/a"
	}
	if s.N <= 1 || s.Min == s.Max {
		return f(s.Median)
	}
	return fmt.Sprintf("%s (%s–%s)", f(s.Median), f(s.Min), f(s.Max))
}

// Number formats.
func fInt(v float64) string  { return fmt.Sprintf("%.0f", v) }
func fF1(v float64) string   { return fmt.Sprintf("%.1f", v) }
func fF2(v float64) string   { return fmt.Sprintf("%.2f", v) }
func fF3(v float64) string   { return fmt.Sprintf("%.3f", v) }
func fMs(v float64) string   { return fmt.Sprintf("%.2f ms", v*1000) }
func fMiB(v float64) string  { return fmt.Sprintf("%.0f MiB", v/(1<<20)) }
func fKiB(v float64) string  { return fmt.Sprintf("%.1f KiB", v/1024) }
func fSec(v float64) string  { return fmt.Sprintf("%.1f s", v) }
func fPct(v float64) string  { return fmt.Sprintf("%.0f%%", v*100) }
func fRate(v float64) string { return fmt.Sprintf("%.0f/s", v) }
