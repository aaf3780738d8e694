// Package dashboards holds Lockergate's Grafana dashboards and Prometheus
// alert rules as Go values, and renders them into the files operators load:
// grafana/*.json, alerts.yml and its promtool unit tests alerts_test.yml.
// Run `go generate ./dashboards` after changing them; a test fails while the
// committed files differ from what the Go values render.
//
// It also reads the metric catalogue (docs/metrics.md) and pulls metric
// names out of PromQL, for the tests that tie dashboards, rules and the
// gateway's registry together.
package dashboards

//go:generate go run ./gen

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"sort"
)

// Files renders every generated file, keyed by its path relative to the
// dashboards directory.
func Files() (map[string][]byte, error) {
	out := map[string][]byte{}
	for _, d := range All() {
		b, err := d.JSON()
		if err != nil {
			return nil, fmt.Errorf("dashboard %s: %w", d.UID, err)
		}
		out[path.Join("grafana", d.File)] = b
	}
	rules, err := RulesYAML(Rules())
	if err != nil {
		return nil, err
	}
	out["alerts.yml"] = rules
	tests, err := RuleTestsYAML(Rules(), RuleTests())
	if err != nil {
		return nil, err
	}
	out["alerts_test.yml"] = tests
	return out, nil
}

// All returns the dashboards, in the order of their links.
func All() []*Dashboard {
	return []*Dashboard{FleetOverview(), Handoff(), FirmwareRollouts(), GatewayInternals()}
}

// Query is one PromQL expression of a dashboard, as Grafana would send it
// before variables are replaced.
type Query struct {
	Dashboard string // file name
	Panel     string // panel title, or "variable NAME"
	Expr      string
	// Variable is set for a variable's query (label_values(METRIC, LABEL)),
	// which is not PromQL.
	Variable bool
}

// ReadDashboards reads the committed dashboard files, grafana/*.json below
// dir (the dashboards directory), keyed by file name: what LoadQueries
// takes. A directory without dashboards is an error.
func ReadDashboards(dir string) (map[string][]byte, error) {
	grafana := filepath.Join(dir, "grafana")
	paths, err := filepath.Glob(filepath.Join(grafana, "*.json"))
	if err != nil {
		return nil, err
	}
	if len(paths) == 0 {
		return nil, fmt.Errorf("no dashboards in %s", grafana)
	}
	files := make(map[string][]byte, len(paths))
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			return nil, err
		}
		files[filepath.Base(p)] = b
	}
	return files, nil
}

// LoadQueries reads Grafana dashboard JSON files and returns every panel
// target's expression and every query variable's query. It reads the files
// as Grafana would, not the Go values they were made from.
func LoadQueries(files map[string][]byte) ([]Query, error) {
	names := make([]string, 0, len(files))
	for n := range files {
		names = append(names, n)
	}
	sort.Strings(names)
	var out []Query
	for _, n := range names {
		var d struct {
			Panels []struct {
				Title   string `json:"title"`
				Type    string `json:"type"`
				Targets []struct {
					Expr string `json:"expr"`
				} `json:"targets"`
			} `json:"panels"`
			Templating struct {
				List []struct {
					Name  string `json:"name"`
					Type  string `json:"type"`
					Query any    `json:"query"`
				} `json:"list"`
			} `json:"templating"`
		}
		dec := json.NewDecoder(bytes.NewReader(files[n]))
		if err := dec.Decode(&d); err != nil {
			return nil, fmt.Errorf("%s: %w", n, err)
		}
		for _, v := range d.Templating.List {
			if v.Type != "query" {
				continue
			}
			q, _ := v.Query.(map[string]any)
			s, _ := q["query"].(string)
			if s == "" {
				return nil, fmt.Errorf("%s: variable %s has no query", n, v.Name)
			}
			out = append(out, Query{Dashboard: n, Panel: "variable " + v.Name, Expr: s, Variable: true})
		}
		for _, p := range d.Panels {
			if p.Type == "row" {
				continue
			}
			if len(p.Targets) == 0 {
				return nil, fmt.Errorf("%s: panel %q has no query", n, p.Title)
			}
			for _, t := range p.Targets {
				if t.Expr == "" {
					return nil, fmt.Errorf("%s: panel %q has an empty query", n, p.Title)
				}
				out = append(out, Query{Dashboard: n, Panel: p.Title, Expr: t.Expr})
			}
		}
	}
	return out, nil
}
