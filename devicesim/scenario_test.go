package devicesim_test

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/lockergate/lockergate/devicesim"
)

func TestShippedScenarios(t *testing.T) {
	names := devicesim.ScenarioNames()
	for _, want := range []string{"smoke", "rush-hour", "flaky-network", "bad-firmware", "storm"} {
		found := false
		for _, n := range names {
			found = found || n == want
		}
		if !found {
			t.Errorf("scenario %q does not ship (have %v)", want, names)
		}
	}
	for _, name := range names {
		t.Run(name, func(t *testing.T) {
			s, err := devicesim.LoadScenario(name)
			if err != nil {
				t.Fatal(err)
			}
			if s.Name != name || s.Description == "" || s.Lockers() == 0 {
				t.Errorf("name %q, description %q, %d lockers", s.Name, s.Description, s.Lockers())
			}
			o := s.Options()
			o.Broker, o.ClaimToken = "tcp://127.0.0.1:1", "x"
			f, err := devicesim.NewFleet(o)
			if err != nil {
				t.Fatalf("NewFleet: %v", err)
			}
			defer f.Close()
			if got := len(f.Lockers()); got != s.Lockers() {
				t.Errorf("%d lockers, want %d", got, s.Lockers())
			}
			for _, site := range s.Fleet.Sites {
				ls := f.LockersAt(site.ID)
				if len(ls) != site.Lockers {
					t.Errorf("site %s: %d lockers, want %d", site.ID, len(ls), site.Lockers)
				}
				for _, l := range ls {
					if len(site.Models) > 0 && !strings.Contains(strings.Join(site.Models, ","), l.Model().Name) {
						t.Errorf("site %s: locker of model %s, want one of %v", site.ID, l.Model().Name, site.Models)
					}
				}
			}
		})
	}
}

func TestScenarioFile(t *testing.T) {
	t.Run("OK", func(t *testing.T) {
		s, err := devicesim.ParseScenario([]byte(`{"name":"x","fleet":{"lockers":3,
			"models":[{"name":"M-2","compartments":[{"count":2,"size":"S","zone":"chilled"}]}]},
			"network":{"retry_max":"5s","connect_rate":10},
			"faults":{"drops":{"per_hour":2,"down":"30s"},"clock_skew":{"share":0.5,"max":90},
				"power_cuts":{"per_hour":0.5,"restore":{"min":"5m","max":"1h"}}}}`))
		if err != nil {
			t.Fatal(err)
		}
		o := s.Options()
		if o.Lockers != 3 || o.RetryMax != 5*time.Second || o.ConnectRate != 10 || len(o.Models) != 1 ||
			len(o.Models[0].Compartments) != 2 || o.Models[0].Compartments[1].N != 2 {
			t.Errorf("options %+v", o)
		}
		if o.Faults.Drops.Down != devicesim.Fixed(30*time.Second) || o.Faults.ClockSkew.Max.D() != 90*time.Second ||
			o.Faults.PowerCuts.PerHour != 0.5 || o.Faults.PowerCuts.Restore != devicesim.Between(5*time.Minute, time.Hour) {
			t.Errorf("faults %+v", o.Faults)
		}
	})
	for _, tc := range []struct{ name, json, want string }{
		{"UnknownField", `{"name":"x","fleet":{"lockers":1},"faults":{"drop":{"per_hour":1}}}`, "unknown field"},
		{"NoName", `{"fleet":{"lockers":1}}`, "name is required"},
		{"BadShare", `{"name":"x","fleet":{"lockers":1},"faults":{"flapping":{"share":2,"up":"1m","down":"1s"}}}`, "flapping.share"},
		{"BadDuration", `{"name":"x","fleet":{"lockers":1},"duration":"soon"}`, "duration"},
		{"BadPowerCuts", `{"name":"x","fleet":{"lockers":1},"faults":{"power_cuts":{"per_hour":-1}}}`, "power_cuts.per_hour"},
		{"BadRange", `{"name":"x","fleet":{"lockers":1},"faults":{"drops":{"per_hour":1,"down":{"min":"1m","max":"1s"}}}}`, "min <= max"},
		{"UnknownModel", `{"name":"x","fleet":{"sites":[{"id":"a","lockers":1,"models":["nope"]}]}}`, "no model"},
		{"BadLayout", `{"name":"x","fleet":{"lockers":1,"models":[{"name":"M","compartments":[{"count":1,"size":"XXL","zone":"ambient"}]}]}}`, "XXL"},
		{"LockersDisagree", `{"name":"x","fleet":{"lockers":3,"sites":[{"id":"a","lockers":1}]}}`, "sites hold"},
		{"Trailing", `{"name":"x","fleet":{"lockers":1}} {}`, "trailing"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := devicesim.ParseScenario([]byte(tc.json))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error about %q", err, tc.want)
			}
		})
	}
	t.Run("NotFound", func(t *testing.T) {
		if _, err := devicesim.LoadScenario("no-such"); err == nil || !strings.Contains(err.Error(), "smoke") {
			t.Fatalf("got %v, want the list of shipped scenarios", err)
		}
	})
}

func TestScenarioResize(t *testing.T) {
	s, err := devicesim.LoadScenario("rush-hour")
	if err != nil {
		t.Fatal(err)
	}
	before := s.Fleet.Sites[0].Lockers
	s.Resize(10000)
	if got := s.Lockers(); got != 10000 {
		t.Fatalf("%d lockers after Resize(10000)", got)
	}
	if got := s.Fleet.Sites[0].Lockers; got != before*20 {
		t.Errorf("first site %d lockers, want %d (proportional)", got, before*20)
	}
	s.Resize(7)
	if got := s.Lockers(); got != 7 {
		t.Fatalf("%d lockers after Resize(7)", got)
	}
}

func TestDurationJSON(t *testing.T) {
	var r struct {
		D devicesim.Duration `json:"d"`
		N devicesim.Duration `json:"n"`
		R devicesim.Range    `json:"r"`
	}
	if err := json.Unmarshal([]byte(`{"d":"1m30s","n":2.5,"r":{"min":"1s","max":"2s"}}`), &r); err != nil {
		t.Fatal(err)
	}
	if r.D.D() != 90*time.Second || r.N.D() != 2500*time.Millisecond || r.R != devicesim.Between(time.Second, 2*time.Second) {
		t.Fatalf("got %+v", r)
	}
	b, _ := json.Marshal(r)
	if want := `{"d":"1m30s","n":"2.5s","r":{"min":"1s","max":"2s"}}`; string(b) != want {
		t.Fatalf("marshal: %s, want %s", b, want)
	}
}

// TestCodeReportText: a code report reads back from its name (a flag's
// value), and an unknown name is an error that lists the known ones.
func TestCodeReportText(t *testing.T) {
	for _, r := range []devicesim.CodeReport{devicesim.CodeAcceptedFirst, devicesim.DoorOpenedFirst, devicesim.DoorOpenedOnly} {
		b, err := r.MarshalText()
		if err != nil {
			t.Fatal(err)
		}
		var got devicesim.CodeReport
		if err := got.UnmarshalText(b); err != nil || got != r {
			t.Fatalf("%s read back as %v (%v)", b, got, err)
		}
	}
	var r devicesim.CodeReport
	if err := r.UnmarshalText([]byte("door")); err == nil || !strings.Contains(err.Error(), "door_only") {
		t.Fatalf("unknown name: %v, want an error listing the names", err)
	}
	if _, err := devicesim.CodeReport(7).MarshalText(); err == nil {
		t.Fatal("an unknown report marshalled")
	}
}
