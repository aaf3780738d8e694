package devicesim

import (
	"bytes"
	"embed"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"slices"
	"strings"
	"time"
)

// Scenario is a simulation plan read from a JSON file (docs/simulator.md):
// the fleet, how people behave and which faults happen. Scenario.Options
// turns it into fleet Options; the broker, claim tokens and logger come
// from the caller.
type Scenario struct {
	Name        string `json:"name"`
	Description string `json:"description,omitempty"`
	// Seed is the default seed (lockersim --seed overrides it).
	Seed int64 `json:"seed,omitempty"`
	// Duration is how long lockersim runs it by default, in scenario time
	// (0: until stopped).
	Duration Duration `json:"duration,omitempty"`
	// TimeScale speeds up fault and behaviour schedules (Options.TimeScale).
	TimeScale float64         `json:"time_scale,omitempty"`
	Fleet     ScenarioFleet   `json:"fleet"`
	Network   ScenarioNetwork `json:"network,omitzero"`
	Behavior  Behavior        `json:"behavior,omitzero"`
	Faults    Faults          `json:"faults,omitzero"`
	Expect    ScenarioExpect  `json:"expect,omitzero"`
	// Notes are free text for people reading the file.
	Notes []string `json:"notes,omitempty"`
}

// ScenarioFleet is the fleet of a scenario.
type ScenarioFleet struct {
	// FW is the firmware version lockers report (default 1.4.2).
	FW string `json:"fw,omitempty"`
	// SerialPrefix prefixes serials (default SIM).
	SerialPrefix string `json:"serial_prefix,omitempty"`
	// Models are the locker models (default: DefaultModels).
	Models []ScenarioModel `json:"models,omitempty"`
	// Sites place the lockers; or give Lockers for one site without an id.
	Sites   []Site `json:"sites,omitempty"`
	Lockers int    `json:"lockers,omitempty"`
}

// ScenarioModel is a locker model with its compartment layout, given as
// runs of compartments of one size and zone, numbered from 1 in order.
type ScenarioModel struct {
	Name         string           `json:"name"`
	Compartments []CompartmentRun `json:"compartments"`
}

// CompartmentRun is Count compartments of one size (S, M, L, XL) and zone
// (ambient, chilled, heated).
type CompartmentRun struct {
	Count int    `json:"count"`
	Size  string `json:"size"`
	Zone  string `json:"zone"`
}

// ScenarioNetwork sets the lockers' connection behaviour; zero fields keep
// the defaults of Options.
type ScenarioNetwork struct {
	HealthInterval Duration `json:"health_interval,omitempty"`
	HealthQoS      byte     `json:"health_qos,omitempty"`
	KeepAlive      Duration `json:"keepalive,omitempty"`
	ConnectRate    float64  `json:"connect_rate,omitempty"`
	ConnectTimeout Duration `json:"connect_timeout,omitempty"`
	RetryBase      Duration `json:"retry_base,omitempty"`
	RetryMax       Duration `json:"retry_max,omitempty"`
	OfflineQueue   int      `json:"offline_queue,omitempty"`
	DoorCloseDelay Duration `json:"door_close_delay,omitempty"`
}

// ScenarioExpect is what a run of the scenario should show; lockersim
// checks it in the final report (exit status 1 when it does not hold).
type ScenarioExpect struct {
	// AllConnected: every locker connected at start.
	AllConnected bool `json:"all_connected,omitempty"`
	// MaxErrors bounds Stats.Errors (nil: not checked).
	MaxErrors *uint64 `json:"max_errors,omitempty"`
	// MaxDropped bounds Stats.Dropped (nil: not checked).
	MaxDropped *uint64 `json:"max_dropped,omitempty"`
}

//go:embed scenarios/*.json
var scenarioFS embed.FS

// ScenarioNames lists the scenarios that ship with the simulator.
func ScenarioNames() []string {
	ents, err := fs.ReadDir(scenarioFS, "scenarios")
	if err != nil {
		return nil
	}
	var names []string
	for _, e := range ents {
		names = append(names, strings.TrimSuffix(e.Name(), ".json"))
	}
	return names
}

// LoadScenario returns the shipped scenario called name, or else reads the
// scenario file at name.
func LoadScenario(name string) (*Scenario, error) {
	b, err := scenarioFS.ReadFile(path.Join("scenarios", name+".json"))
	if err != nil {
		if !strings.ContainsAny(name, "/.") {
			return nil, fmt.Errorf("devicesim: no scenario %q (shipped: %s; or give a file path)", name, strings.Join(ScenarioNames(), ", "))
		}
		if b, err = os.ReadFile(name); err != nil {
			return nil, fmt.Errorf("devicesim: scenario: %w", err)
		}
	}
	s, err := ParseScenario(b)
	if err != nil {
		return nil, fmt.Errorf("devicesim: scenario %s: %w", name, err)
	}
	return s, nil
}

// ParseScenario reads a scenario from JSON; unknown fields are errors (a
// typo must not silently drop a fault), and the scenario is validated.
func ParseScenario(b []byte) (*Scenario, error) {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var s Scenario
	if err := dec.Decode(&s); err != nil {
		return nil, err
	}
	if dec.More() {
		return nil, errors.New("trailing data after the scenario object")
	}
	if err := s.Validate(); err != nil {
		return nil, err
	}
	return &s, nil
}

// Validate checks the scenario as NewFleet would check its Options.
func (s *Scenario) Validate() error {
	var errs []error
	if s.Name == "" {
		errs = append(errs, errors.New("name is required"))
	}
	if s.Duration < 0 {
		errs = append(errs, errors.New("duration must not be negative"))
	}
	if len(s.Fleet.Sites) > 0 && s.Fleet.Lockers != 0 && s.Fleet.Lockers != sitesTotal(s.Fleet.Sites) {
		errs = append(errs, fmt.Errorf("fleet.lockers is %d but the sites hold %d", s.Fleet.Lockers, sitesTotal(s.Fleet.Sites)))
	}
	for _, m := range s.Fleet.Models {
		for _, r := range m.Compartments {
			if r.Count < 1 {
				errs = append(errs, fmt.Errorf("model %q: compartment count must be at least 1", m.Name))
			}
		}
	}
	o := s.Options()
	o.Broker = "tcp://127.0.0.1:1883"
	o.setDefaults()
	if err := o.validate(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// Options returns fleet Options for the scenario. Set Broker, claim tokens
// (ClaimToken or Site.ClaimToken) and Logger before NewFleet.
func (s *Scenario) Options() Options {
	n := s.Network
	o := Options{
		Lockers:        s.Fleet.Lockers,
		Seed:           s.Seed,
		SerialPrefix:   s.Fleet.SerialPrefix,
		FW:             s.Fleet.FW,
		HealthInterval: n.HealthInterval.D(),
		HealthQoS:      n.HealthQoS,
		KeepAlive:      n.KeepAlive.D(),
		ConnectRate:    n.ConnectRate,
		ConnectTimeout: n.ConnectTimeout.D(),
		RetryBase:      n.RetryBase.D(),
		RetryMax:       n.RetryMax.D(),
		OfflineQueue:   n.OfflineQueue,
		DoorCloseDelay: n.DoorCloseDelay.D(),
		Behavior:       s.Behavior,
		Sites:          slices.Clone(s.Fleet.Sites),
		TimeScale:      s.TimeScale,
	}
	o.Faults = s.Faults
	o.Faults.Outages = slices.Clone(s.Faults.Outages)
	o.Faults.GatewayRestarts = slices.Clone(s.Faults.GatewayRestarts)
	if len(o.Sites) > 0 {
		o.Lockers = sitesTotal(o.Sites)
	}
	for _, m := range s.Fleet.Models {
		var blocks []block
		for _, r := range m.Compartments {
			blocks = append(blocks, block{count: r.Count, size: r.Size, zone: r.Zone})
		}
		o.Models = append(o.Models, Model{Name: m.Name, Compartments: layout(blocks...)})
	}
	return o
}

// Resize sets the fleet to n lockers, spreading them over the sites in
// proportion to their sizes (largest remainders first, ties to the
// earlier site), so `--lockers 10000` scales any scenario.
func (s *Scenario) Resize(n int) {
	sites := s.Fleet.Sites
	total := sitesTotal(sites)
	if len(sites) == 0 || total == 0 {
		s.Fleet.Lockers = n
		if len(sites) > 0 {
			sites[0].Lockers = n
		}
		return
	}
	type rem struct {
		i int
		r int64
	}
	rems := make([]rem, len(sites))
	given := 0
	for i := range sites {
		exact := int64(sites[i].Lockers) * int64(n)
		sites[i].Lockers = int(exact / int64(total))
		given += sites[i].Lockers
		rems[i] = rem{i, exact % int64(total)}
	}
	slices.SortStableFunc(rems, func(a, b rem) int {
		switch {
		case a.r > b.r:
			return -1
		case a.r < b.r:
			return 1
		}
		return 0
	})
	for k := 0; given < n; k++ {
		sites[rems[k%len(rems)].i].Lockers++
		given++
	}
	s.Fleet.Lockers = 0
}

// Lockers is the scenario's fleet size.
func (s *Scenario) Lockers() int {
	if len(s.Fleet.Sites) > 0 {
		return sitesTotal(s.Fleet.Sites)
	}
	return s.Fleet.Lockers
}

// ReconnectBound is how long n lockers that all lost their connection at
// the same moment take at most to be connected again, when every attempt
// gets through: each waits out one back-off (at most RetryMax), the
// connect rate admits them one by one (n / ConnectRate), and the last
// handshake takes at most ConnectTimeout. The storm test derives its
// deadline from it; a margin for the gateway's own bookkeeping is the
// caller's.
func (o Options) ReconnectBound(n int) time.Duration {
	o.setDefaults()
	b := o.RetryMax + o.ConnectTimeout
	if o.ConnectRate > 0 {
		b += time.Duration(float64(n) / o.ConnectRate * float64(time.Second))
	}
	return b
}
