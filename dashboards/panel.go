package dashboards

import "fmt"

// sel is the selector every query applies: the gateways picked in the
// instance variable.
const sel = `instance=~"$instance"`

// rate is a per-second rate over Grafana's rate interval.
func rate(metric, matchers string) string {
	return fmt.Sprintf("rate(%s{%s}[$__rate_interval])", metric, join(sel, matchers))
}

// vec is a selector of metric with the instance matcher and more.
func vec(metric, matchers string) string {
	return fmt.Sprintf("%s{%s}", metric, join(sel, matchers))
}

func join(a, b string) string {
	if b == "" {
		return a
	}
	return a + ", " + b
}

// quantiles are p50, p90 and p99 of a histogram, split by the labels in by
// (a comma-separated list, or "").
func quantiles(metric, matchers, by string) []Target {
	var out []Target
	for _, q := range []struct {
		q      string
		legend string
	}{{"0.5", "p50"}, {"0.9", "p90"}, {"0.99", "p99"}} {
		group, legend := "le", q.legend
		if by != "" {
			group = by + ", le"
			legend = q.legend + " " + legendOf(by)
		}
		out = append(out, Target{
			Expr:   fmt.Sprintf("histogram_quantile(%s, sum by (%s) (%s))", q.q, group, rate(metric+"_bucket", matchers)),
			Legend: legend,
		})
	}
	return out
}

// legendOf turns "type, status" into "{{type}} {{status}}".
func legendOf(by string) string {
	var out string
	for i, l := range splitList(by) {
		if i > 0 {
			out += " "
		}
		out += "{{" + l + "}}"
	}
	return out
}

func splitList(s string) []string {
	var out []string
	cur := ""
	for _, r := range s {
		switch r {
		case ',':
			out = append(out, cur)
			cur = ""
		case ' ':
		default:
			cur += string(r)
		}
	}
	if cur != "" {
		out = append(out, cur)
	}
	return out
}

func ts(title, description, unit string, targets ...Target) Panel {
	return Panel{Kind: TimeSeries, Title: title, Description: description, Unit: unit, Targets: targets}
}

func stat(title, description, unit, expr string) Panel {
	return Panel{Kind: Stat, Title: title, Description: description, Unit: unit, Targets: []Target{{Expr: expr}}}
}

func q(expr, legend string) Target { return Target{Expr: expr, Legend: legend} }

// warnAt colours a stat or draws a line: green below warn, orange from warn,
// red from crit.
func warnAt(warn, crit float64) []Threshold {
	return []Threshold{{Color: "green"}, {Value: f(warn), Color: "orange"}, {Value: f(crit), Color: "red"}}
}

func width(p Panel, w int) Panel {
	p.Width = w
	return p
}

func withMin0(p Panel) Panel {
	p.Min = f(0)
	return p
}
