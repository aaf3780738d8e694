package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/lockergate/lockergate/devicesim"
	"github.com/lockergate/lockergate/devicesim/devicesimtest"
	"github.com/lockergate/lockergate/internal/pgtest"
	"github.com/lockergate/lockergate/internal/testtool"
	"github.com/lockergate/lockergate/protocol"
)

func noEnv(string) string { return "" }

// births counts online presence messages seen by the broker.
func births(env *devicesimtest.Env) int {
	n := 0
	for _, m := range env.All() {
		if _, ch, _ := protocol.ParseTopic(m.Topic); ch == protocol.ChanPresence {
			if p, err := protocol.Decode[protocol.Presence](m.Payload); err == nil && p.Online {
				n++
			}
		}
	}
	return n
}

// runUntil runs lockersim with args until cond holds, then interrupts it
// (as SIGINT would) and returns its exit code and output.
func runUntil(t *testing.T, env *devicesimtest.Env, args []string, getenv func(string) string, cond func(stderr string) bool) (int, string, string) {
	t.Helper()
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	var stdout, stderr testtool.LockedBuffer
	done := make(chan int, 1)
	go func() { done <- runArgs(ctx, args, getenv, &stdout, &stderr) }()
	env.Wait(t, "lockersim to get going", func() bool {
		select {
		case code := <-done:
			t.Fatalf("lockersim exited early with %d:\n%s", code, stderr.String())
		default:
		}
		return cond(stderr.String())
	})
	cancel()
	select {
	case code := <-done:
		return code, stdout.String(), stderr.String()
	case <-time.After(10 * time.Second):
		t.Fatal("lockersim did not stop after the interrupt")
	}
	return 0, "", ""
}

func TestRun(t *testing.T) {
	env := devicesimtest.Start(t, devicesimtest.Options{})
	idFile := filepath.Join(t.TempDir(), "ids.json")
	common := []string{"--lockers", "3", "--broker", env.URL, "--seed", "5", "--identities", idFile,
		"--summary-interval", "20ms", "--health-interval", "50ms", "--log-level", "warn"}

	t.Run("ProvisionsAndReportsJSON", func(t *testing.T) {
		args := append([]string{"run", "--claim", env.Claim, "-o", "json", "--api", "http://127.0.0.1:8080"}, common...)
		code, stdout, stderr := runUntil(t, env, args, noEnv, func(stderr string) bool {
			return births(env) == 3 && strings.Contains(stderr, "connected 3/3")
		})
		if code != 0 {
			t.Fatalf("exit %d:\n%s", code, stderr)
		}
		var rep report
		if err := json.Unmarshal([]byte(stdout), &rep); err != nil {
			t.Fatalf("stdout is not a JSON report: %v\n%s", err, stdout)
		}
		if rep.Lockers != 3 || rep.Seed != 5 || !rep.AllConnected || rep.Stats.Connected != 3 || rep.Stats.Provisioned != 3 ||
			rep.Stats.Published == 0 || rep.API != "http://127.0.0.1:8080" || rep.Errors != 0 {
			t.Errorf("report %+v", rep)
		}
		if !strings.Contains(stderr, "lockersim: 3 lockers (seed 5)") {
			t.Errorf("no final summary on stderr:\n%s", stderr)
		}
		st, err := os.Stat(idFile)
		if err != nil {
			t.Fatalf("identities file: %v", err)
		}
		if st.Mode().Perm() != 0o600 {
			t.Fatalf("identities file mode %v, want 0600", st.Mode())
		}
		ids, err := loadIdentities(idFile)
		if err != nil || len(ids) != 3 {
			t.Fatalf("identities: %v, %d saved", err, len(ids))
		}
		for serial, id := range ids {
			if gw, ok := env.Identity(serial); !ok || gw.DeviceID != id.DeviceID || !bytes.Equal(gw.CredKey, id.CredKey) {
				t.Errorf("%s saved as %+v", serial, id)
			}
		}
	})

	t.Run("ReusesIdentitiesWithoutSubcommand", func(t *testing.T) {
		before := births(env)
		// No claim token at all: the saved identities must do.
		code, stdout, stderr := runUntil(t, env, common, noEnv, func(string) bool { return births(env) == before+3 })
		if code != 0 || stdout != "" {
			t.Fatalf("exit %d, stdout %q:\n%s", code, stdout, stderr)
		}
		if env.Provisioned() != 3 {
			t.Errorf("provisioned again: %d identities at the gateway", env.Provisioned())
		}
	})

	t.Run("ClaimFromEnvironment", func(t *testing.T) {
		getenv := func(k string) string {
			if k == "LOCKERSIM_CLAIM" {
				return env.Claim
			}
			return ""
		}
		args := []string{"--lockers", "1", "--broker", env.URL, "--serial-prefix", "ENV", "--log-level", "warn"}
		code, _, stderr := runUntil(t, env, args, getenv, func(string) bool {
			id, ok := env.Identity("ENV-000000")
			if !ok {
				return false
			}
			_, online := env.Retained(protocol.Topic(id.DeviceID, protocol.ChanPresence))
			return online
		})
		if code != 0 {
			t.Fatalf("exit %d:\n%s", code, stderr)
		}
	})
}

func TestRunFailsWhenNothingConnects(t *testing.T) {
	env := devicesimtest.Start(t, devicesimtest.Options{})
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	var stdout, stderr testtool.LockedBuffer
	code := runArgs(ctx, []string{"--lockers", "2", "--broker", env.URL, "--claim", "wrong", "-o", "json"}, noEnv, &stdout, &stderr)
	if code != 1 || ctx.Err() != nil {
		t.Fatalf("exit %d (ctx %v), want a prompt 1:\n%s", code, ctx.Err(), stderr.String())
	}
	var rep report
	if err := json.Unmarshal([]byte(stdout.String()), &rep); err != nil || rep.AllConnected || !strings.Contains(rep.StartError, "refused") {
		t.Errorf("report %+v (%v)", rep, err)
	}
}

func TestUsage(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
		want int
		say  string // on stderr
	}{
		{"Help", []string{"help"}, 0, "Flags of run:"},
		{"HelpFlag", []string{"-h"}, 0, "-summary-interval"},
		{"UnknownCommand", []string{"fly"}, 2, `unknown command "fly"`},
		{"UnknownFlag", []string{"run", "--wings", "2"}, 2, "flag provided but not defined: -wings"},
		{"StrayArgument", []string{"run", "extra"}, 2, "unexpected arguments"},
		{"BadOutput", []string{"-o", "yaml"}, 2, `-o "yaml": want text or json`},
		{"BadOptions", []string{"--lockers", "-1", "--claim", "x"}, 2, "bad options"},
		{"BadBroker", []string{"--broker", "http://x", "--claim", "x"}, 2, "bad options"},
		{"ScenariosTwoNames", []string{"scenarios", "smoke", "storm"}, 2, "usage: lockersim scenarios [NAME]"},
		{"ScenariosUnknown", []string{"scenarios", "nope"}, 1, "nope"},

		{"BenchUsage", []string{"bench"}, 0, "usage: lockersim bench connect"},
		{"BenchHelp", []string{"bench", "help"}, 0, "-settle"},
		{"BenchHelpFlag", []string{"bench", "connect", "-h"}, 0, "-settle"},
		{"BenchUnknownCommand", []string{"bench", "fly"}, 2, "usage: lockersim bench connect"},
		{"BenchUnknownFlag", []string{"bench", "connect", "--wings"}, 2, "flag provided but not defined: -wings"},
		{"BenchStrayArgument", []string{"bench", "connect", "extra"}, 2, "bad arguments"},
		{"BenchBadOutput", []string{"bench", "connect", "-o", "yaml"}, 2, `-o "yaml"`},
		{"BenchBadSourceAddrs", []string{"bench", "connect", "--source-addrs", "127.0.0.9-127.0.0.2"}, 2, "source address range"},
		{"BenchNoLockers", []string{"bench", "connect", "--lockers", "0"}, 1, "--lockers must be positive"},
		{"BenchBrokerWithoutSecret", []string{"bench", "broker"}, 2, "LOCKERSIM_BENCH_SECRET is not set"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var out, errOut testtool.LockedBuffer
			if got := runArgs(t.Context(), tc.args, noEnv, &out, &errOut); got != tc.want || !strings.Contains(errOut.String(), tc.say) {
				t.Errorf("exit %d, want %d saying %q:\n%s", got, tc.want, tc.say, errOut.String())
			}
		})
	}
}

// TestMain lets the test binary stand in for lockersim when the bench
// spawns "lockersim bench broker" (os.Executable is the test binary).
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == "bench" {
		os.Exit(run())
	}
	os.Exit(pgtest.Main(m)) // TestRunPlacesTheScenarioOrders runs a gateway on PostgreSQL
}

func TestRunScenario(t *testing.T) {
	env := devicesimtest.Start(t, devicesimtest.Options{})
	dir := t.TempDir()
	decisions := filepath.Join(dir, "decisions.jsonl")
	args := []string{"run", "--scenario", "smoke", "--broker", env.URL, "--claim", env.Claim, "--site-claim", "store-002=" + env.Claim,
		"--lockers", "4", "--summary-interval", "20ms", "--log-level", "warn", "-o", "json", "--decisions", decisions}
	code, stdout, stderr := runUntil(t, env, args, noEnv, func(stderr string) bool {
		return births(env) == 4 && strings.Contains(stderr, "connected 4/4") && strings.Contains(stderr, "pickups 0")
	})
	if code != 0 {
		t.Fatalf("exit %d:\n%s", code, stderr)
	}
	var rep report
	if err := json.Unmarshal([]byte(stdout), &rep); err != nil {
		t.Fatalf("stdout is not a JSON report: %v\n%s", err, stdout)
	}
	if rep.Scenario != "smoke" || rep.Lockers != 4 || rep.Seed != 1 || !rep.AllConnected || len(rep.Unmet) != 0 {
		t.Errorf("report %+v", rep)
	}
	if !strings.Contains(stderr, "scenario smoke, 4 lockers (seed 1)") {
		t.Errorf("final summary does not name the scenario:\n%s", stderr)
	}
	b, err := os.ReadFile(decisions)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) != 4 || !strings.Contains(lines[0], `"kind":"setup"`) {
		t.Errorf("decisions file:\n%s", b)
	}
	for _, serial := range []string{"SMOKE-000000", "SMOKE-000001", "SMOKE-000002", "SMOKE-000003"} {
		if _, ok := env.Identity(serial); !ok {
			t.Errorf("%s not provisioned", serial)
		}
	}
}

func TestRunScenarioErrors(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"Unknown", []string{"--scenario", "nope"}, "shipped"},
		{"BadFile", []string{"--scenario", "./missing.json"}, "no such file"},
		{"UnknownSiteClaim", []string{"--scenario", "smoke", "--site-claim", "elsewhere=x"}, "no such site"},
		{"BadSiteClaim", []string{"--scenario", "smoke", "--site-claim", "store-001"}, "SITE=TOKEN"},
		{"BadSourceAddrs", []string{"--source-addrs", "127.0.0.9-127.0.0.2"}, "range"},
		{"BootstrapWithoutAPI", []string{"--scenario", "smoke", "--bootstrap"}, "--api"},
		{"BadCodeReport", []string{"--code-report", "door"}, "want code_accepted, door_first or door_only"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var out, errOut testtool.LockedBuffer
			if code := runArgs(t.Context(), tc.args, noEnv, &out, &errOut); code != 2 || !strings.Contains(errOut.String(), tc.want) {
				t.Errorf("exit %d, want 2 mentioning %q:\n%s", code, tc.want, errOut.String())
			}
		})
	}
}

func TestScenariosCommand(t *testing.T) {
	var out, errOut testtool.LockedBuffer
	if code := runArgs(t.Context(), []string{"scenarios"}, noEnv, &out, &errOut); code != 0 {
		t.Fatalf("exit %d: %s", code, errOut.String())
	}
	for _, name := range []string{"smoke", "rush-hour", "flaky-network", "bad-firmware", "storm"} {
		if !strings.Contains(out.String(), name) {
			t.Errorf("scenarios does not list %s:\n%s", name, out.String())
		}
	}
	out = testtool.LockedBuffer{}
	if code := runArgs(t.Context(), []string{"scenarios", "storm"}, noEnv, &out, &errOut); code != 0 {
		t.Fatalf("exit %d: %s", code, errOut.String())
	}
	if _, err := devicesim.ParseScenario([]byte(out.String())); err != nil {
		t.Errorf("printed scenario does not parse back: %v\n%s", err, out.String())
	}
}

func TestParseSourceAddrs(t *testing.T) {
	got, err := parseSourceAddrs("127.0.0.2-127.0.0.4, 10.0.0.1")
	if want := []string{"127.0.0.2", "127.0.0.3", "127.0.0.4", "10.0.0.1"}; err != nil || !slices.Equal(got, want) {
		t.Fatalf("got %v, %v; want %v", got, err, want)
	}
	if _, err := parseSourceAddrs("127.0.0.1-127.0.255.255"); err == nil {
		t.Fatal("65k source addresses accepted")
	}
}

func TestBench(t *testing.T) {
	for _, mode := range []string{"--in-process", "--in-process=false"} {
		t.Run(mode, func(t *testing.T) {
			var out, errOut testtool.LockedBuffer
			args := []string{"bench", "connect", "--lockers", "20", "--settle", "200ms", "--health-interval", "50ms", "--connect-rate", "-1", mode, "-o", "json"}
			if code := runArgs(t.Context(), args, noEnv, &out, &errOut); code != 0 {
				t.Fatalf("exit %d:\n%s", code, errOut.String())
			}
			var rep benchReport
			if err := json.Unmarshal([]byte(out.String()), &rep); err != nil {
				t.Fatalf("%v\n%s", err, out.String())
			}
			if rep.Lockers != 20 || rep.Stats.Connected != 20 || rep.GoroutinesPerLocker < 1 || rep.GoKiBPerLocker <= 0 ||
				rep.MsgsPerS <= 0 || rep.Errors != 0 || rep.GoroutinesAfterClose > rep.GoroutinesBaseline {
				t.Errorf("report %+v", rep)
			}
		})
	}
}

func TestRunScenarioFileForItsDuration(t *testing.T) {
	// An hour of scenario at 3600× is a second of wall-clock time, from
	// before provisioning and connecting: tampers often enough that the
	// part of it left on a loaded machine still sees some.
	runScenarioFor(t, `{"name":"an-hour","duration":"1h","time_scale":3600,"seed":9,"fleet":{"lockers":2},
		"faults":{"tamper":{"per_hour":120}},"expect":{"all_connected":true,"max_errors":0}}`, func(rep report) bool {
		return rep.Scenario == "an-hour" && rep.Seed == 9 && rep.Stats.Tampers > 0 && rep.DurationS <= 20
	})
}

// TestRunScenarioWithoutTimeScale: a scenario that leaves time_scale out
// (as every shipped one does) runs at 1 and ends at its duration, not at a
// signal.
func TestRunScenarioWithoutTimeScale(t *testing.T) {
	runScenarioFor(t, `{"name":"two-seconds","duration":"2s","seed":9,"fleet":{"lockers":1},"expect":{"all_connected":true}}`,
		func(rep report) bool {
			return rep.Scenario == "two-seconds" && rep.DurationS >= 1.5 && rep.DurationS <= 20
		})
}

// runScenarioFor runs scenario sc (JSON) against a test gateway, which
// must end by itself within 30 s with a report ok accepts.
func runScenarioFor(t *testing.T, sc string, ok func(report) bool) {
	t.Helper()
	env := devicesimtest.Start(t, devicesimtest.Options{})
	file := filepath.Join(t.TempDir(), "scenario.json")
	if err := os.WriteFile(file, []byte(sc), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	var stdout, stderr testtool.LockedBuffer
	code := runArgs(ctx, []string{"--scenario", file, "--broker", env.URL, "--claim", env.Claim, "-o", "json", "--log-level", "warn"}, noEnv, &stdout, &stderr)
	if code != 0 || ctx.Err() != nil {
		t.Fatalf("exit %d (ctx %v):\n%s", code, ctx.Err(), stderr.String())
	}
	var rep report
	if err := json.Unmarshal([]byte(stdout.String()), &rep); err != nil {
		t.Fatal(err)
	}
	if !ok(rep) {
		t.Errorf("report %+v", rep)
	}
}

// TestStartHint: a start whose lockers were refused as serial_taken says
// how to go on (identities, another prefix, re-provisioning); other
// failures get no hint.
func TestStartHint(t *testing.T) {
	taken := &devicesim.StartError{Total: 3, Failed: map[string]error{
		"SIM-000000": fmt.Errorf("provision: %w", &devicesim.ProvisionError{Code: "serial_taken"}),
		"SIM-000001": &devicesim.ProvisionError{Code: "serial_taken"},
		"SIM-000002": errors.New("i/o timeout"),
	}}
	hint := startHint(taken)
	for _, want := range []string{"2 lockers' serials", "--identities FILE", "--serial-prefix", "lockerctl lockers replaceable ID"} {
		if !strings.Contains(hint, want) {
			t.Errorf("hint %q lacks %q", hint, want)
		}
	}
	for _, err := range []error{
		&devicesim.StartError{Total: 1, Failed: map[string]error{"SIM-000000": &devicesim.ProvisionError{Code: "claim_expired"}}},
		errors.New("context deadline exceeded"),
	} {
		if hint := startHint(err); hint != "" {
			t.Errorf("startHint(%v) = %q, want none", err, hint)
		}
	}
}
