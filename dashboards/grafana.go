package dashboards

import (
	"bytes"
	"encoding/json"
)

// Dashboard is a Grafana dashboard: rows of panels over Prometheus, with
// the variables every Lockergate dashboard has (datasource, instance, site).
type Dashboard struct {
	UID         string
	File        string // file name under grafana/
	Title       string
	Description string
	Rows        []Row
}

// Row is a titled band of panels, laid out left to right, wrapping at the
// dashboard's width.
type Row struct {
	Title  string
	Panels []Panel
	// PanelWidth is the width of its time series without one of their own
	// (default 12: two per line).
	PanelWidth int
}

// Panel is one graph or number.
type Panel struct {
	Kind        PanelKind
	Title       string
	Description string
	Unit        string // Grafana unit id: "s", "percentunit", "short", "ops", "opm", "Bps", "bytes"
	Width       int    // of 24 columns; default 12 for time series, 4 for stats
	Height      int    // default 8 for time series, 4 for stats
	Targets     []Target
	// Thresholds colour stats and, for time series, draw dashed lines.
	Thresholds []Threshold
	Min, Max   *float64
	Stack      bool
	Decimals   *int
}

// PanelKind is the Grafana panel type.
type PanelKind string

// Panel kinds in use.
const (
	TimeSeries PanelKind = "timeseries"
	Stat       PanelKind = "stat"
)

// Target is one PromQL query of a panel.
type Target struct {
	Expr   string
	Legend string
}

// Threshold is a step of a panel's thresholds: from Value upwards, Color.
type Threshold struct {
	Value *float64 // nil: the base step
	Color string
}

// Datasource refers to the dashboard's datasource variable.
var datasource = map[string]string{"type": "prometheus", "uid": "${datasource}"}

// Grafana's JSON model, with keys in a fixed order so the files are stable.
type (
	jsonDashboard struct {
		UID           string          `json:"uid"`
		Title         string          `json:"title"`
		Description   string          `json:"description"`
		Tags          []string        `json:"tags"`
		Timezone      string          `json:"timezone"`
		Editable      bool            `json:"editable"`
		GraphTooltip  int             `json:"graphTooltip"`
		Refresh       string          `json:"refresh"`
		SchemaVersion int             `json:"schemaVersion"`
		Version       int             `json:"version"`
		Time          jsonTime        `json:"time"`
		Annotations   jsonList        `json:"annotations"`
		Links         []jsonLink      `json:"links"`
		Templating    jsonList        `json:"templating"`
		Panels        []jsonPanel     `json:"panels"`
		FiscalYear    int             `json:"fiscalYearStartMonth"`
		LiveNow       bool            `json:"liveNow"`
		WeekStart     string          `json:"weekStart"`
		Timepicker    json.RawMessage `json:"timepicker"`
	}
	jsonTime struct {
		From string `json:"from"`
		To   string `json:"to"`
	}
	jsonList struct {
		List []any `json:"list"`
	}
	jsonLink struct {
		Title       string   `json:"title"`
		Type        string   `json:"type"`
		Tags        []string `json:"tags"`
		AsDropdown  bool     `json:"asDropdown"`
		IncludeVars bool     `json:"includeVars"`
		KeepTime    bool     `json:"keepTime"`
		Icon        string   `json:"icon"`
		TargetBlank bool     `json:"targetBlank"`
	}
	jsonPanel struct {
		ID          int               `json:"id"`
		Type        string            `json:"type"`
		Title       string            `json:"title"`
		Description string            `json:"description,omitempty"`
		Datasource  map[string]string `json:"datasource,omitempty"`
		GridPos     jsonGridPos       `json:"gridPos"`
		Collapsed   *bool             `json:"collapsed,omitempty"`
		Panels      []jsonPanel       `json:"panels,omitempty"`
		FieldConfig *jsonFieldConfig  `json:"fieldConfig,omitempty"`
		Options     map[string]any    `json:"options,omitempty"`
		Targets     []jsonTarget      `json:"targets,omitempty"`
	}
	jsonGridPos struct {
		H int `json:"h"`
		W int `json:"w"`
		X int `json:"x"`
		Y int `json:"y"`
	}
	jsonFieldConfig struct {
		Defaults  jsonDefaults `json:"defaults"`
		Overrides []any        `json:"overrides"`
	}
	jsonDefaults struct {
		Unit       string         `json:"unit"`
		Min        *float64       `json:"min,omitempty"`
		Max        *float64       `json:"max,omitempty"`
		Decimals   *int           `json:"decimals,omitempty"`
		Color      map[string]any `json:"color"`
		Thresholds jsonThresholds `json:"thresholds"`
		Custom     map[string]any `json:"custom,omitempty"`
	}
	jsonThresholds struct {
		Mode  string          `json:"mode"`
		Steps []jsonThreshold `json:"steps"`
	}
	jsonThreshold struct {
		Color string   `json:"color"`
		Value *float64 `json:"value"`
	}
	jsonTarget struct {
		RefID        string            `json:"refId"`
		Datasource   map[string]string `json:"datasource"`
		Expr         string            `json:"expr"`
		LegendFormat string            `json:"legendFormat"`
		Range        bool              `json:"range"`
		Instant      bool              `json:"instant"`
		EditorMode   string            `json:"editorMode"`
	}
	jsonVariable struct {
		Name        string            `json:"name"`
		Label       string            `json:"label"`
		Description string            `json:"description"`
		Type        string            `json:"type"`
		Datasource  map[string]string `json:"datasource,omitempty"`
		Query       any               `json:"query"`
		Definition  string            `json:"definition,omitempty"`
		Regex       string            `json:"regex"`
		Refresh     int               `json:"refresh"`
		Sort        int               `json:"sort,omitempty"`
		IncludeAll  bool              `json:"includeAll"`
		AllValue    string            `json:"allValue,omitempty"`
		Multi       bool              `json:"multi"`
		Hide        int               `json:"hide"`
		Current     map[string]any    `json:"current"`
		Options     []any             `json:"options"`
	}
)

// queryVariable is a multi-value variable over a label, with "All" matching
// any value (variables are used as label=~"$name").
func queryVariable(name, label, description, metric string) jsonVariable {
	def := "label_values(" + metric + ", " + name + ")"
	return jsonVariable{
		Name: name, Label: label, Description: description, Type: "query", Datasource: datasource,
		Query:      map[string]any{"query": def, "refId": "PrometheusVariableQueryEditor-VariableQuery", "qryType": 1},
		Definition: def, Refresh: 2, Sort: 1, IncludeAll: true, AllValue: ".+", Multi: true,
		Current: map[string]any{"selected": true, "text": []string{"All"}, "value": []string{"$__all"}},
		Options: []any{},
	}
}

// JSON renders the dashboard as Grafana's JSON model.
func (d *Dashboard) JSON() ([]byte, error) {
	out := jsonDashboard{
		UID: d.UID, Title: d.Title, Description: d.Description, Tags: []string{"lockergate"},
		Timezone: "browser", Editable: true, GraphTooltip: 1, Refresh: "30s", SchemaVersion: 39, Version: 1,
		Time:       jsonTime{From: "now-6h", To: "now"},
		WeekStart:  "",
		Timepicker: json.RawMessage("{}"),
		Annotations: jsonList{List: []any{map[string]any{
			"builtIn": 1, "datasource": map[string]string{"type": "grafana", "uid": "-- Grafana --"},
			"enable": true, "hide": true, "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts", "type": "dashboard",
		}}},
		Links: []jsonLink{{Title: "Lockergate", Type: "dashboards", Tags: []string{"lockergate"}, AsDropdown: true,
			IncludeVars: true, KeepTime: true, Icon: "external link"}},
		Templating: jsonList{List: []any{
			jsonVariable{Name: "datasource", Label: "Data source", Description: "The Prometheus that scrapes the gateways.",
				Type: "datasource", Query: "prometheus", Refresh: 1, Current: map[string]any{}, Options: []any{}},
			queryVariable("instance", "Gateway", "Gateway instances (host:port of /metrics).", "lockergate_devices_online"),
			queryVariable("site", "Site", "Sites, for the per-site occupancy panels: only occupancy carries a site label "+
				"(at most 200 sites, then \"other\"); the other metrics are fleet-wide by design.", "lockergate_compartments"),
		}},
	}
	id, y := 1, 0
	for _, r := range d.Rows {
		out.Panels = append(out.Panels, jsonPanel{ID: id, Type: "row", Title: r.Title, Collapsed: new(bool),
			GridPos: jsonGridPos{H: 1, W: 24, X: 0, Y: y}, Panels: []jsonPanel{}})
		id++
		y++
		x, rowH := 0, 0
		for _, p := range r.Panels {
			if p.Kind == TimeSeries && p.Width == 0 && r.PanelWidth > 0 {
				p.Width = r.PanelWidth
			}
			w, h := p.size()
			if x+w > 24 {
				x, y, rowH = 0, y+rowH, 0
			}
			jp := p.json(id)
			jp.GridPos = jsonGridPos{H: h, W: w, X: x, Y: y}
			out.Panels = append(out.Panels, jp)
			id++
			x += w
			rowH = max(rowH, h)
		}
		y += rowH
	}
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	enc.SetIndent("", "  ")
	if err := enc.Encode(out); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

func (p *Panel) size() (w, h int) {
	w, h = 12, 8
	if p.Kind == Stat {
		w, h = 4, 4
	}
	if p.Width > 0 {
		w = p.Width
	}
	if p.Height > 0 {
		h = p.Height
	}
	return w, h
}

func (p *Panel) json(id int) jsonPanel {
	unit := p.Unit
	if unit == "" {
		unit = "short"
	}
	steps := []jsonThreshold{{Color: "green"}}
	if len(p.Thresholds) > 0 {
		steps = steps[:0]
		for _, t := range p.Thresholds {
			steps = append(steps, jsonThreshold{Color: t.Color, Value: t.Value})
		}
	}
	jp := jsonPanel{
		ID: id, Type: string(p.Kind), Title: p.Title, Description: p.Description, Datasource: datasource,
		FieldConfig: &jsonFieldConfig{Defaults: jsonDefaults{
			Unit: unit, Min: p.Min, Max: p.Max, Decimals: p.Decimals,
			Thresholds: jsonThresholds{Mode: "absolute", Steps: steps},
		}, Overrides: []any{}},
	}
	for i, t := range p.Targets {
		jt := jsonTarget{RefID: string(rune('A' + i)), Datasource: datasource, Expr: t.Expr,
			LegendFormat: t.Legend, EditorMode: "code"}
		if jt.LegendFormat == "" {
			jt.LegendFormat = "__auto"
		}
		if p.Kind == Stat {
			jt.Instant = true
		} else {
			jt.Range = true
		}
		jp.Targets = append(jp.Targets, jt)
	}
	switch p.Kind {
	case Stat:
		jp.FieldConfig.Defaults.Color = map[string]any{"mode": "thresholds"}
		jp.Options = map[string]any{
			"reduceOptions": map[string]any{"calcs": []string{"lastNotNull"}, "fields": "", "values": false},
			"colorMode":     "value", "graphMode": "none", "justifyMode": "auto", "orientation": "auto",
			"textMode": "auto", "showPercentChange": false, "wideLayout": true,
		}
	case TimeSeries:
		jp.FieldConfig.Defaults.Color = map[string]any{"mode": "palette-classic"}
		thresholdStyle := "off"
		if len(p.Thresholds) > 0 {
			thresholdStyle = "dashed"
		}
		stacking := "none"
		if p.Stack {
			stacking = "normal"
		}
		jp.FieldConfig.Defaults.Custom = map[string]any{
			"drawStyle": "line", "lineInterpolation": "linear", "lineWidth": 1, "fillOpacity": 10,
			"gradientMode": "none", "showPoints": "never", "spanNulls": false, "axisPlacement": "auto",
			"stacking":        map[string]any{"mode": stacking, "group": "A"},
			"thresholdsStyle": map[string]any{"mode": thresholdStyle},
		}
		jp.Options = map[string]any{
			"legend":  map[string]any{"displayMode": "table", "placement": "bottom", "showLegend": true, "calcs": []string{"lastNotNull", "max"}},
			"tooltip": map[string]any{"mode": "multi", "sort": "desc"},
		}
	}
	return jp
}

// f returns a pointer to v, for optional panel settings.
func f(v float64) *float64 { return &v }
