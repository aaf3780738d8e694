package dashboards

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"regexp"
	"sort"
	"strings"
)

// Entry is a metric of the catalogue (docs/metrics.md): a table row whose
// first cell is the metric name in backquotes.
type Entry struct {
	Name string
	Type string // counter, gauge, histogram
	// Labels maps each label to its documented values; nil values mean an
	// open set described in words (checked by name only).
	Labels map[string][]string
	Unit   string
	Line   int
}

// Catalogue is the metric catalogue, by name.
type Catalogue map[string]*Entry

var (
	rowName   = regexp.MustCompile("^`([a-zA-Z_:][a-zA-Z0-9_:]*)`$")
	backquote = regexp.MustCompile("`([^`]*)`")
)

// ParseCatalogue reads the tables of docs/metrics.md. A metric row is
//
//	| `name` | type | labels | unit | meaning |
//
// where labels is "—" or entries separated by "<br>", each
// "`label`: `v1`, `v2`" (a closed set of values) or "`label`: words"
// (an open set, such as site ids).
func ParseCatalogue(doc []byte) (Catalogue, error) {
	c := Catalogue{}
	sc := bufio.NewScanner(bytes.NewReader(doc))
	n := 0
	for sc.Scan() {
		n++
		line := strings.TrimSpace(sc.Text())
		if !strings.HasPrefix(line, "|") {
			continue
		}
		cells := strings.Split(strings.Trim(line, "|"), "|")
		for i := range cells {
			cells[i] = strings.TrimSpace(cells[i])
		}
		m := rowName.FindStringSubmatch(cells[0])
		if m == nil {
			continue
		}
		if len(cells) != 5 {
			return nil, fmt.Errorf("line %d: metric row with %d cells, want 5 (name, type, labels, unit, meaning)", n, len(cells))
		}
		e := &Entry{Name: m[1], Type: cells[1], Unit: cells[3], Line: n, Labels: map[string][]string{}}
		switch e.Type {
		case "counter", "gauge", "histogram", "summary", "untyped":
		default:
			return nil, fmt.Errorf("line %d: %s: type %q", n, e.Name, e.Type)
		}
		if cells[4] == "" {
			return nil, fmt.Errorf("line %d: %s has no meaning", n, e.Name)
		}
		if err := parseLabels(e, cells[2]); err != nil {
			return nil, fmt.Errorf("line %d: %s: %w", n, e.Name, err)
		}
		if prev, ok := c[e.Name]; ok {
			return nil, fmt.Errorf("line %d: %s listed again (first on line %d)", n, e.Name, prev.Line)
		}
		c[e.Name] = e
	}
	return c, sc.Err()
}

// ReadCatalogue reads and parses the catalogue file (docs/metrics.md).
func ReadCatalogue(path string) (Catalogue, error) {
	doc, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	c, err := ParseCatalogue(doc)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return c, nil
}

func parseLabels(e *Entry, cell string) error {
	if cell == "—" || cell == "-" || cell == "" {
		return nil
	}
	for _, part := range strings.Split(cell, "<br>") {
		name, values, ok := strings.Cut(strings.TrimSpace(part), ":")
		if !ok {
			return fmt.Errorf("label entry %q: want `label`: values", part)
		}
		lm := rowName.FindStringSubmatch(strings.TrimSpace(name))
		if lm == nil {
			return fmt.Errorf("label entry %q: the label name must be in backquotes", part)
		}
		var vals []string
		for _, v := range backquote.FindAllStringSubmatch(values, -1) {
			vals = append(vals, v[1])
		}
		// Words outside backquotes make the set open.
		if rest := strings.Trim(backquote.ReplaceAllString(values, ""), " ,"); rest != "" || len(vals) == 0 {
			vals = nil
		}
		e.Labels[lm[1]] = vals
	}
	return nil
}

// Names returns the catalogue's metric names, sorted.
func (c Catalogue) Names() []string {
	out := make([]string, 0, len(c))
	for n := range c {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

// Lookup finds the catalogue entry of a series name: the metric itself, or
// a histogram's _bucket, _sum or _count series.
func (c Catalogue) Lookup(series string) *Entry {
	if e := c[series]; e != nil {
		return e
	}
	for _, suffix := range []string{"_bucket", "_sum", "_count"} {
		if base, ok := strings.CutSuffix(series, suffix); ok {
			if e := c[base]; e != nil && (e.Type == "histogram" || e.Type == "summary") {
				return e
			}
		}
	}
	return nil
}

// metricRef matches the metric names PromQL expressions here may use:
// Lockergate's own and the Go and process collectors'.
var metricRef = regexp.MustCompile(`\b(?:lockergate|go|process)_[a-zA-Z0-9_]+\b`)

// MetricNames returns the metric (series) names an expression uses, sorted.
// Label names never start with these prefixes, so a pattern suffices.
func MetricNames(expr string) []string {
	seen := map[string]bool{}
	for _, m := range metricRef.FindAllString(expr, -1) {
		seen[m] = true
	}
	out := make([]string, 0, len(seen))
	for n := range seen {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}
