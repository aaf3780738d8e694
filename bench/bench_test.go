package bench

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/lockergate/lockergate/devicesim"
	"github.com/lockergate/lockergate/protocol"
)

// TestAppendHealth: the generator's hand-built health message is what
// protocol.Encode makes of the same values, and it decodes and validates.
func TestAppendHealth(t *testing.T) {
	now := time.Date(2026, 5, 1, 12, 0, 0, 123e6, time.UTC)
	temp, battery, rssi, free := 21.4, 100, -61, 24
	want := protocol.Encode(protocol.Health{TS: protocol.T(now), Seq: 42, FW: devicesim.DefaultFW, UptimeS: 7, TempC: &temp,
		Power: protocol.PowerMains, BatteryPct: &battery, RSSIdBm: &rssi, FreeCompartments: &free})
	got := AppendHealth(nil, now, 42, 7)
	if !bytes.Equal(got, want) {
		t.Fatalf("got  %s\nwant %s", got, want)
	}
	if _, err := protocol.Decode[protocol.Health](got); err != nil {
		t.Fatal(err)
	}
}

func TestHistQuantile(t *testing.T) {
	m := Metrics{`x_bucket{le="0.1"}`: 50, `x_bucket{le="0.2"}`: 90, `x_bucket{le="+Inf"}`: 100}
	h := m.Hist("x")
	if v, over := h.Quantile(0.5); math.Abs(v-0.1) > 1e-9 || over {
		t.Errorf("p50 = %v %v, want 0.1", v, over)
	}
	if v, over := h.Quantile(0.7); math.Abs(v-0.15) > 1e-9 || over {
		t.Errorf("p70 = %v %v, want 0.15", v, over)
	}
	if v, over := h.Quantile(0.99); v != 0.2 || !over {
		t.Errorf("p99 = %v %v, want 0.2 and over", v, over)
	}
	base := Metrics{`x_bucket{le="0.1"}`: 10, `x_bucket{le="0.2"}`: 10, `x_bucket{le="+Inf"}`: 10}.Hist("x")
	if got := h.Sub(base).Total(); got != 90 {
		t.Errorf("total of difference = %v, want 90", got)
	}
}

func TestSpread(t *testing.T) {
	s := SpreadOf([]float64{3, 1, 2, math.NaN()})
	if s.Median != 2 || s.Min != 1 || s.Max != 3 || s.N != 3 {
		t.Fatalf("got %+v", s)
	}
	if got := s.Format(fInt); got != "2 (1–3)" {
		t.Fatalf("Format = %q", got)
	}
}

// TestLadder: a run climbs past the rates asked for while it is sustained
// (a baseline sustained at the top would give only an upper bound), retries
// a failed rung once, and stops at twice the top asked for.
func TestLadder(t *testing.T) {
	run := func(asked []float64, limit float64) []float64 {
		t.Helper()
		var res ingestRun
		var ran []float64
		err := res.climbLadder(asked, 0, func(rate float64) (ingestStep, error) {
			ran = append(ran, rate)
			if len(ran) > 100 {
				return ingestStep{}, errors.New("the ladder does not end")
			}
			return ingestStep{Target: rate, OK: rate <= limit}, nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if len(res.Steps) != len(ran) {
			t.Fatalf("%d steps recorded for %d run", len(res.Steps), len(ran))
		}
		return ran
	}
	for _, c := range []struct {
		asked []float64
		limit float64
		want  string
	}{
		{[]float64{10000, 20000, 40000}, 25000, "[10000 20000 40000 40000]"},
		{[]float64{10000, 40000}, 52000, "[10000 40000 45000 50000 55000 55000]"},
		{[]float64{1000}, 1e9, "[1000 2000]"},
		{[]float64{30000, 40000}, 1e9, "[30000 40000 45000 50000 55000 60000 65000 70000 75000 80000]"},
	} {
		if got := fmt.Sprint(run(c.asked, c.limit)); got != c.want {
			t.Errorf("ladder %v with limit %v ran %s, want %s", c.asked, c.limit, got, c.want)
		}
	}
}

// TestSmoke runs the ingest workload in miniature against the real gateway
// and the bare broker, each a separate process, so the tooling does not rot.
func TestSmoke(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the gateway: not under -short")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	wd, _ := os.Getwd()
	mod, err := FindModule(wd)
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	if testing.Verbose() {
		log = slog.New(slog.NewTextHandler(os.Stderr, nil))
	}
	r, err := NewRunner(ctx, mod, log, &out)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	useSelf(t, r)
	rep, err := r.Ingest(ctx, IngestOptions{Lockers: 50, Rates: []float64{300}, Step: time.Second, Runs: 1, Baseline: true})
	if err != nil {
		t.Fatal(err)
	}
	rep.Print(&out, ThisMachine())
	t.Log(out.String())
	for _, want := range []string{"sustained msgs/s", "lockergate", "bare mochi", "| lockergate  | 1    | 300"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("report lacks %q", want)
		}
	}
	if strings.Contains(out.String(), "no: lost") {
		t.Errorf("messages lost at 300/s:\n%s", out.String())
	}
	// The markers' poller found them: the step's publish → visible column
	// ends with how many ("… ms (20)").
	found := regexp.MustCompile(`(?m)^\| lockergate +\| 1 +\| 300 .* ms \((\d+)\)`).FindStringSubmatch(out.String())
	if found == nil {
		t.Errorf("no end-to-end marker found in the step (check Markers.poll's bounds in bench/markers.go and the gateway log):\n%s", out.String())
	}

	// The idle workload in miniature, its lockers reporting health while
	// held: both memory readings and the health sent are in the report.
	out.Reset()
	rep, err = r.Idle(ctx, IdleOptions{Lockers: 20, Hold: 12 * time.Second, Health: 2 * time.Second, Runs: 1})
	if err != nil {
		t.Fatal(err)
	}
	rep.Print(&out, ThisMachine())
	t.Log(out.String())
	for _, want := range []string{"memory per connection at the end of the hold", "each locker publishes health"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("idle report lacks %q", want)
		}
	}
	sent := regexp.MustCompile(`(?m)^\| health messages published while held +\| (\d+)`).FindStringSubmatch(out.String())
	if sent == nil || sent[1] == "0" {
		t.Errorf("no health published while the idle lockers were held:\n%s", out.String())
	}
}
