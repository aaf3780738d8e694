package gateway_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/lockergate/lockergate/dashboards"
	"github.com/lockergate/lockergate/devicesim"
	"github.com/lockergate/lockergate/firmware"
	"github.com/lockergate/lockergate/internal/subproc"
	"github.com/lockergate/lockergate/internal/testtool"
	"github.com/lockergate/lockergate/pickup"
	"github.com/lockergate/lockergate/protocol"
)

// The metric catalogue (docs/metrics.md) against a running gateway, and the
// dashboards and alert rules (dashboards/) against a real Prometheus that
// scrapes a gateway driven by simulated lockers.

// needProgram finds a program of Debian's prometheus package, or skips the
// test loudly; with LOCKERGATE_REQUIRE_ALL=1 (CI) it fails instead.
func needProgram(t *testing.T, name, why string) string {
	t.Helper()
	return testtool.Program(t, name, why, "install Debian's prometheus package (apt-get install prometheus); .ci/run does")
}

func mustCatalogue(t *testing.T) dashboards.Catalogue {
	t.Helper()
	c, err := dashboards.ReadCatalogue("../docs/metrics.md")
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// probe is a collector describing one metric name; registering it fails
// exactly when a collector of that name is registered already.
type probe struct{ desc *prometheus.Desc }

func (p probe) Describe(ch chan<- *prometheus.Desc) { ch <- p.desc }
func (p probe) Collect(chan<- prometheus.Metric)    {}

// registered reports whether reg has a collector for the metric name, even
// one that has exposed no series yet.
func registered(reg *prometheus.Registry, name string) bool {
	p := probe{prometheus.NewDesc(name, "catalogue probe", nil, nil)}
	if err := reg.Register(p); err != nil {
		return true
	}
	reg.Unregister(p)
	return false
}

// checkCatalogue compares the gateway's registry with the catalogue: every
// exposed Lockergate metric is listed with its type, labels and label
// values; every listed metric is registered; nothing else but the Go and
// process collectors is exposed.
func checkCatalogue(t *testing.T, tg *TestGateway, cat dashboards.Catalogue) {
	t.Helper()
	mfs, err := tg.Registry().Gather()
	if err != nil {
		t.Fatalf("gather: %v", err)
	}
	for _, mf := range mfs {
		name := mf.GetName()
		typ := strings.ToLower(mf.GetType().String())
		e := cat[name]
		switch {
		case e != nil:
		case strings.HasPrefix(name, "go_") || strings.HasPrefix(name, "process_"):
			continue // the collectors' own; documented as a family
		case strings.HasPrefix(name, "lockergate_"):
			t.Errorf("%s (%s) is exposed but docs/metrics.md does not list it", name, typ)
			continue
		default:
			t.Errorf("%s is exposed: not lockergate_, go_ or process_", name)
			continue
		}
		if e.Type != typ {
			t.Errorf("%s: docs/metrics.md line %d says %s, the registry has a %s", name, e.Line, e.Type, typ)
		}
		for _, m := range mf.GetMetric() {
			var got []string
			for _, lp := range m.GetLabel() {
				got = append(got, lp.GetName())
				vals, ok := e.Labels[lp.GetName()]
				if ok && vals != nil && !slices.Contains(vals, lp.GetValue()) {
					t.Errorf("%s{%s=%q}: docs/metrics.md line %d does not list the value", name, lp.GetName(), lp.GetValue(), e.Line)
				}
			}
			var want []string
			for l := range e.Labels {
				want = append(want, l)
			}
			sort.Strings(got)
			sort.Strings(want)
			if !slices.Equal(got, want) {
				t.Errorf("%s: labels %v, docs/metrics.md line %d lists %v", name, got, e.Line, want)
				break
			}
		}
	}
	for _, name := range cat.Names() {
		if !registered(tg.Registry(), name) {
			t.Errorf("docs/metrics.md line %d lists %s, which the gateway does not register", cat[name].Line, name)
		}
	}
}

func scrapeText(t *testing.T, tg *TestGateway) []byte {
	t.Helper()
	resp, err := http.Get("http://" + tg.HTTPAddr() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("scrape: %s %v", resp.Status, err)
	}
	return b
}

// lintMetrics runs promtool's naming checks (client_golang's promlint) on a
// scrape of /metrics.
func lintMetrics(t *testing.T, tg *TestGateway) {
	t.Helper()
	bin := needProgram(t, "promtool", "to lint the metric names")
	cmd := exec.Command(bin, "check", "metrics")
	cmd.Stdin = bytes.NewReader(scrapeText(t, tg))
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Errorf("promtool check metrics on /metrics: %v\n%s", err, out)
	}
}

// TestMetricCatalogue: docs/metrics.md lists exactly the metrics a running
// gateway registers, and their names pass promtool's lint.
func TestMetricCatalogue(t *testing.T) {
	cat := mustCatalogue(t)
	tg := MustStart(t)
	checkCatalogue(t, tg, cat)
	lintMetrics(t, tg)
}

// Prometheus is a real Prometheus on a loopback port with its own storage,
// scraping one gateway every second and evaluating the alert rules.
type Prometheus struct {
	URL string

	cmd    *exec.Cmd
	done   <-chan struct{}
	logMu  sync.Mutex
	logBuf bytes.Buffer
}

func (p *Prometheus) Write(b []byte) (int, error) {
	p.logMu.Lock()
	defer p.logMu.Unlock()
	return p.logBuf.Write(b)
}

func (p *Prometheus) log() string {
	p.logMu.Lock()
	defer p.logMu.Unlock()
	return tail(p.logBuf.String(), 40)
}

// MustPrometheus starts Prometheus scraping target (host:port) in job
// "lockergate" with rules loaded; it is killed in t.Cleanup.
func MustPrometheus(t *testing.T, bin, target, rules string) *Prometheus {
	t.Helper()
	for attempt := 0; ; attempt++ {
		p, err := startPrometheus(t, bin, target, rules)
		if err == nil {
			return p
		}
		if attempt == 2 {
			t.Fatalf("start prometheus: %v", err)
		}
		t.Logf("start prometheus (will retry on another port): %v", err)
	}
}

func startPrometheus(t *testing.T, bin, target, rules string) (*Prometheus, error) {
	dir := t.TempDir()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	addr := ln.Addr().String()
	ln.Close()
	conf := fmt.Sprintf(`global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - %q
scrape_configs:
  - job_name: lockergate
    static_configs:
      - targets: [%q]
`, rules, target)
	if err := os.WriteFile(filepath.Join(dir, "prometheus.yml"), []byte(conf), 0o600); err != nil {
		return nil, err
	}
	p := &Prometheus{URL: "http://" + addr}
	p.cmd = exec.Command(bin, "--config.file="+filepath.Join(dir, "prometheus.yml"),
		"--storage.tsdb.path="+filepath.Join(dir, "data"), "--web.listen-address="+addr, "--log.level=warn")
	p.cmd.Stdout, p.cmd.Stderr = p, p
	// Killed with this process, even when it dies without cleanups. The
	// signal is tied to the thread that forks, so that thread stays.
	p.cmd.SysProcAttr = subproc.DieWithParent(&syscall.SysProcAttr{}, syscall.SIGKILL)
	exited, err := testtool.Start(p.cmd)
	if err != nil {
		return nil, err
	}
	p.done = exited
	t.Cleanup(func() {
		p.cmd.Process.Kill()
		<-p.done
		if t.Failed() {
			t.Logf("prometheus log:\n%s", p.log())
		}
	})
	deadline := time.Now().Add(20 * time.Second)
	for {
		select {
		case <-p.done:
			return nil, fmt.Errorf("prometheus exited: %s", p.log())
		default:
		}
		if resp, err := http.Get(p.URL + "/-/ready"); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return p, nil
			}
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("not ready within 20 s: %s", p.log())
		}
		time.Sleep(50 * time.Millisecond) // polling interval of a condition wait
	}
}

// apiError is an error Prometheus answered (bad query), not a transport one.
type apiError struct{ msg string }

func (e *apiError) Error() string { return e.msg }

// Query evaluates expr now and returns the number of series (or 1 for a
// scalar or string result).
func (p *Prometheus) Query(ctx context.Context, expr string) (int, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, p.URL+"/api/v1/query",
		strings.NewReader(url.Values{"query": {expr}}.Encode()))
	if err != nil {
		return 0, err
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	var out struct {
		Status    string `json:"status"`
		ErrorType string `json:"errorType"`
		Error     string `json:"error"`
		Data      struct {
			ResultType string          `json:"resultType"`
			Result     json.RawMessage `json:"result"`
		} `json:"data"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		return 0, fmt.Errorf("%s: %w", resp.Status, err)
	}
	if out.Status != "success" {
		return 0, &apiError{fmt.Sprintf("%s: %s", out.ErrorType, out.Error)}
	}
	if out.Data.ResultType != "vector" && out.Data.ResultType != "matrix" {
		return 1, nil
	}
	var series []json.RawMessage
	if err := json.Unmarshal(out.Data.Result, &series); err != nil {
		return 0, err
	}
	return len(series), nil
}

// promRule is a rule as GET /api/v1/rules reports it.
type promRule struct {
	Name           string    `json:"name"`
	Query          string    `json:"query"`
	Health         string    `json:"health"`
	LastError      string    `json:"lastError"`
	LastEvaluation time.Time `json:"lastEvaluation"`
	Type           string    `json:"type"`
}

// Rules returns the rules Prometheus loaded, with their health.
func (p *Prometheus) Rules(ctx context.Context) ([]promRule, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, p.URL+"/api/v1/rules", nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var out struct {
		Data struct {
			Groups []struct {
				Rules []promRule `json:"rules"`
			} `json:"groups"`
		} `json:"data"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		return nil, err
	}
	var rules []promRule
	for _, g := range out.Data.Groups {
		rules = append(rules, g.Rules...)
	}
	return rules, nil
}

// grafanaVars replaces what Grafana replaces before sending a query, with
// "All" picked in every variable.
var grafanaVars = strings.NewReplacer(
	"$__rate_interval", "1m", "$__range", "5m", "$__interval", "5s",
	"$instance", ".+", "$site", ".+",
)

var labelValues = regexp.MustCompile(`^label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*,\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)$`)

// promQL turns a dashboard query into PromQL that returns the series the
// panel (or the variable's dropdown) would show.
func promQL(q dashboards.Query) (string, error) {
	if !q.Variable {
		return grafanaVars.Replace(q.Expr), nil
	}
	m := labelValues.FindStringSubmatch(q.Expr)
	if m == nil {
		return "", fmt.Errorf("variable query %q: want label_values(METRIC, LABEL)", q.Expr)
	}
	return fmt.Sprintf("group by (%s) (%s{%s!=\"\"})", m[2], m[1], m[2]), nil
}

func loadDashboards(t *testing.T) []dashboards.Query {
	t.Helper()
	files, err := dashboards.ReadDashboards("../dashboards")
	if err != nil {
		t.Fatal(err)
	}
	qs, err := dashboards.LoadQueries(files)
	if err != nil {
		t.Fatal(err)
	}
	return qs
}

// TestDashboardsOnPrometheus is the proof that every panel shows data and
// every alert rule evaluates: a real Prometheus scrapes a gateway while
// simulated lockers go through pickups, commands, alerts and a firmware
// rollout; then every query of every panel and variable and every rule is
// evaluated through Prometheus' HTTP API.
func TestDashboardsOnPrometheus(t *testing.T) {
	bin := needProgram(t, "prometheus", "to evaluate every dashboard query and alert rule")
	cat := mustCatalogue(t)
	queries := loadDashboards(t)
	rules := dashboards.Rules()

	// Every metric the dashboards and rules name is in the catalogue.
	for _, q := range queries {
		for _, n := range dashboards.MetricNames(q.Expr) {
			if cat.Lookup(n) == nil {
				t.Errorf("%s, %s: %s is not in docs/metrics.md", q.Dashboard, q.Panel, n)
			}
		}
	}
	for _, r := range rules {
		for _, n := range dashboards.MetricNames(r.Expr) {
			if cat.Lookup(n) == nil {
				t.Errorf("alerts.yml, %s: %s is not in docs/metrics.md", r.Alert, n)
			}
		}
	}

	e := newPickupEnv(t, 3, 2)
	rulesFile, err := filepath.Abs("../dashboards/alerts.yml")
	if err != nil {
		t.Fatal(err)
	}
	prom := MustPrometheus(t, bin, e.tg.HTTPAddr(), rulesFile)
	ctx := context.Background()
	Eventually(t, 20*time.Second, "prometheus scrapes the gateway", func() error {
		n, err := prom.Query(ctx, `up{job="lockergate"} == 1`)
		if err == nil && n != 1 {
			err = fmt.Errorf("%d targets up", n)
		}
		return err
	})

	runScenario(t, e)

	// Every panel and variable shows series. Census and occupancy gauges
	// are refreshed every 15 s and rates need two scrapes, so wait for it.
	type result struct {
		q    dashboards.Query
		expr string
		err  error
	}
	deadline := time.Now().Add(45 * time.Second)
	for {
		var failing []result
		empty := 0
		for _, q := range queries {
			expr, err := promQL(q)
			if err == nil {
				var n int
				if n, err = prom.Query(ctx, expr); err == nil && n == 0 {
					err = errors.New("no series")
					empty++
				}
			}
			if err != nil {
				failing = append(failing, result{q, expr, err})
			}
		}
		// Query errors do not go away; empty results may, until the deadline.
		if empty == 0 || time.Now().After(deadline) {
			for _, f := range failing {
				t.Errorf("%s, panel %q: %v\n\t%s", f.q.Dashboard, f.q.Panel, f.err, f.expr)
			}
			t.Logf("%d of %d dashboard queries return series", len(queries)-len(failing), len(queries))
			break
		}
		time.Sleep(500 * time.Millisecond) // polling interval of a condition wait
	}

	// Every rule evaluates without error, by Prometheus itself (the rule
	// file it loaded) and as a query.
	for _, r := range rules {
		if _, err := prom.Query(ctx, r.Expr); err != nil {
			t.Errorf("alert %s: %v\n\t%s", r.Alert, err, r.Expr)
		}
	}
	var loaded []promRule
	Eventually(t, 10*time.Second, "every rule evaluated", func() error {
		var err error
		if loaded, err = prom.Rules(ctx); err != nil {
			return err
		}
		if len(loaded) != len(rules) {
			return fmt.Errorf("prometheus loaded %d rules, dashboards.Rules has %d", len(loaded), len(rules))
		}
		for _, r := range loaded {
			if r.LastEvaluation.IsZero() {
				return fmt.Errorf("%s not evaluated yet", r.Name)
			}
		}
		return nil
	})
	for _, r := range loaded {
		if r.Health != "ok" || r.LastError != "" {
			t.Errorf("alert %s: health %q, error %q", r.Name, r.Health, r.LastError)
		}
	}

	// With the scenario's label values present, the catalogue still holds.
	checkCatalogue(t, e.tg, cat)
}

// runScenario drives the gateway through what the dashboards show: the
// handoff (ready, picked up, a wrong code, a no-show, a cancel), commands,
// a raw device's bad payload and alerts, and a firmware rollout with a
// failure threshold (its series, however it ends).
func runScenario(t *testing.T, e *pickupEnv) {
	t.Helper()
	ctx := context.Background()
	tg := e.tg

	// Handoff.
	noShow := e.create(t, "NS-1", "S", 3*time.Second)
	p := e.create(t, "A-1", "M", time.Hour)
	cancelled := e.create(t, "C-1", "S", time.Hour)
	if err := e.store.Post(ctx, "/v1/pickups/"+cancelled.ID+"/cancel", nil, nil); err != nil {
		t.Fatalf("cancel pickup: %v", err)
	}
	ready := e.waitState(t, p.ID, pickup.Ready)
	e.waitCreds(t, p.Locker)
	l := e.sim.Locker(p.Locker)
	if r := l.EnterCode("00000000"); r.Accepted {
		t.Fatalf("a wrong code opened: %+v", r)
	}
	if r := l.EnterCode(ready.Credential.Code); !r.Accepted {
		t.Fatalf("the right code did not open: %+v", r)
	}
	e.waitState(t, p.ID, pickup.PickedUp)
	e.waitState(t, noShow.ID, pickup.Expired)

	// Commands.
	lockers := e.sim.Lockers()
	for i, body := range []map[string]any{
		{"type": "unlock", "compartment": 1, "reason": "remote", "wait_s": 10},
		{"type": "set_service", "compartment": 2, "in_service": true, "wait_s": 10},
	} {
		var cmd struct {
			Status string `json:"status"`
		}
		if err := tg.Admin.Post(ctx, "/v1/lockers/"+lockers[i%len(lockers)].DeviceID()+"/commands", body, &cmd); err != nil || cmd.Status != "ok" {
			t.Fatalf("%s: status %q, %v", body["type"], cmd.Status, err)
		}
	}

	// A raw device on a second site: a payload that does not validate, a
	// door left ajar, tampering.
	claim := tg.MustSiteAndClaim(t, "store-043", 1)
	id := MustProvision(t, tg, claim, "SN-DASH-1")
	dev := MustConnect(t, tg.MQTTAddr(), id.DeviceID, id.DeviceID, id.Password)
	now := protocol.FormatTime(time.Now())
	for _, m := range []struct {
		ch      protocol.Channel
		payload string
	}{
		{protocol.ChanHealth, `{"seq":"one"}`},
		{protocol.ChanEvents, `{"id":"d-1","ts":"` + now + `","type":"door_ajar","compartment":2,"open_s":130}`},
		{protocol.ChanEvents, `{"id":"d-2","ts":"` + now + `","type":"tamper","detail":"housing opened"}`},
	} {
		MustPublish(t, dev, protocol.Topic(id.DeviceID, m.ch), false, m.payload)
	}
	Eventually(t, 10*time.Second, "alerts raised", func() error {
		for _, s := range []string{`lockergate_alerts_raised_total{kind="door_ajar"}`, `lockergate_alerts_raised_total{kind="tamper"}`,
			`lockergate_ingest_messages_dropped_total{channel="health",reason="invalid"}`} {
			if v, err := tg.Metric(s); err != nil || v < 1 {
				return fmt.Errorf("%s = %v (%v)", s, v, err)
			}
		}
		return nil
	})

	// A firmware rollout on lockers that fail to boot half the time, with a
	// threshold of 0 %: it pauses at the first failure, or finishes when all
	// four happen to boot (1 run in 16). Either way the rollout series the
	// dashboards query exist; pausing itself is tested in firmware_test.go
	// (TestFirmwareBootFailuresPauseAtTheCrossingWave).
	fwFleet(t, tg, "fw-dash", "LX-24", 4, func(o *devicesim.Options) { o.Faults.Firmware.BootFail = 0.5 })
	a := fwUpload(t, tg, "LX-24", "1.5.0", fwImage("1.5.0"))
	st := fwCreate(t, tg, map[string]any{"firmware": a.ID, "selector": map[string]any{"site": "fw-dash"},
		"waves": []int{100}, "max_failure_pct": 0, "rate_per_min": 60000})
	Eventually(t, 30*time.Second, "rollout stopped or done", func() error {
		s := fwStatus(t, tg, st.ID)
		if s.Status == firmware.Running {
			return fmt.Errorf("running, counts %v", s.Counts)
		}
		t.Logf("rollout %s: %v", s.Status, s.Counts)
		return nil
	})
}
