package bench

import (
	"bufio"
	"context"
	"fmt"
	"math"
	"net/http"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"
)

// Metrics is one scrape of a Prometheus text endpoint: value by series
// (name plus labels as exposed, e.g. `x_bucket{le="0.5"}`).
type Metrics map[string]float64

func scrape(ctx context.Context, url string) (Metrics, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, "GET", url, nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		return nil, fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	m := Metrics{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			continue
		}
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			continue
		}
		m[line[:i]] = v
	}
	return m, sc.Err()
}

// Sum adds every series of metric name whose labels contain all of match
// (each like `channel="health"`).
func (m Metrics) Sum(name string, match ...string) float64 {
	var s float64
	for k, v := range m {
		if seriesName(k) != name {
			continue
		}
		ok := true
		for _, l := range match {
			ok = ok && strings.Contains(k, l)
		}
		if ok {
			s += v
		}
	}
	return s
}

func seriesName(k string) string {
	if i := strings.IndexByte(k, '{'); i >= 0 {
		return k[:i]
	}
	return k
}

// Hist is a cumulative histogram: counts by upper bound, ascending.
type Hist struct {
	LE    []float64
	Count []float64
}

// Hist extracts histogram name (summing series that match) from m.
func (m Metrics) Hist(name string, match ...string) Hist {
	by := map[float64]float64{}
	for k, v := range m {
		if seriesName(k) != name+"_bucket" {
			continue
		}
		ok := true
		for _, l := range match {
			ok = ok && strings.Contains(k, l)
		}
		if !ok {
			continue
		}
		i := strings.Index(k, `le="`)
		if i < 0 {
			continue
		}
		rest := k[i+4:]
		le, err := strconv.ParseFloat(rest[:strings.IndexByte(rest, '"')], 64)
		if err != nil {
			continue
		}
		by[le] += v
	}
	var h Hist
	for le := range by {
		h.LE = append(h.LE, le)
	}
	sort.Float64s(h.LE)
	for _, le := range h.LE {
		h.Count = append(h.Count, by[le])
	}
	return h
}

// Sub is the histogram of observations made between base and h.
func (h Hist) Sub(base Hist) Hist {
	out := Hist{LE: slices.Clone(h.LE), Count: slices.Clone(h.Count)}
	for i, le := range out.LE {
		if j := slices.Index(base.LE, le); j >= 0 {
			out.Count[i] -= base.Count[j]
		}
	}
	return out
}

// Total is the number of observations.
func (h Hist) Total() float64 {
	if len(h.Count) == 0 {
		return 0
	}
	return h.Count[len(h.Count)-1]
}

// Quantile estimates quantile q as Prometheus' histogram_quantile does:
// linear within the bucket. Past the last finite bound it returns that
// bound and over=true.
func (h Hist) Quantile(q float64) (v float64, over bool) {
	n := h.Total()
	if n == 0 {
		return math.NaN(), false
	}
	rank := q * n
	prevLE, prevC := 0.0, 0.0
	for i, le := range h.LE {
		c := h.Count[i]
		if c >= rank {
			if math.IsInf(le, 1) {
				return prevLE, true
			}
			if c == prevC {
				return le, false
			}
			return prevLE + (le-prevLE)*(rank-prevC)/(c-prevC), false
		}
		prevLE, prevC = le, c
	}
	return prevLE, true
}
