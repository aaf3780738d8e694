package gateway_test

import (
	"bufio"
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/jackc/pgx/v5"

	"github.com/lockergate/lockergate/gateway"
	"github.com/lockergate/lockergate/internal/pgtest"
	"github.com/lockergate/lockergate/internal/subproc"
	"github.com/lockergate/lockergate/internal/testtool"
	"github.com/lockergate/lockergate/protocol"
)

// gatewayProcess is a lockergate process on the external broker, so that
// it can be killed as a crash kills it: no DISCONNECT, no drained queues,
// no acknowledgements after the fact.
type gatewayProcess struct {
	cmd    *exec.Cmd
	http   string
	exited <-chan struct{}
}

// buildLockergate builds cmd/lockergate once per test into a temp dir.
func buildLockergate(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "lockergate")
	goBin := filepath.Join(runtime.GOROOT(), "bin", "go")
	out, err := exec.Command(goBin, "build", "-o", bin, "github.com/lockergate/lockergate/cmd/lockergate").CombinedOutput()
	if err != nil {
		t.Fatalf("build lockergate: %v\n%s", err, out)
	}
	return bin
}

func startGatewayProcess(t *testing.T, bin string, args ...string) *gatewayProcess {
	t.Helper()
	return startGatewayCmd(t, exec.Command(bin, append([]string{"serve"}, args...)...))
}

// startGatewayCmd starts cmd, a lockergate serve, and waits until it is ready.
func startGatewayCmd(t *testing.T, cmd *exec.Cmd) *gatewayProcess {
	t.Helper()
	p := &gatewayProcess{cmd: cmd}
	p.cmd.SysProcAttr = subproc.DieWithParent(&syscall.SysProcAttr{}, syscall.SIGKILL)
	// A pipe of the test's own, not StdoutPipe: exec's Wait (in
	// testtool.Start) closes that one, possibly under the reader.
	stdout, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	p.cmd.Stdout = w
	logf, err := os.CreateTemp(t.TempDir(), "gateway-*.log")
	if err != nil {
		t.Fatal(err)
	}
	p.cmd.Stderr = logf
	p.exited, err = testtool.Start(p.cmd)
	w.Close() // the child has its copy; EOF once it exits
	if err != nil {
		stdout.Close()
		t.Fatal(err)
	}
	addr := make(chan string, 1)
	go func() {
		defer stdout.Close()
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			rest, ok := strings.CutPrefix(strings.TrimSpace(sc.Text()), "API:")
			if !ok {
				continue
			}
			u := strings.TrimPrefix(strings.TrimSpace(rest), "http://")
			if i := strings.Index(u, "/"); i > 0 {
				u = u[:i]
			}
			select {
			case addr <- u:
			default: // a later line: the first one counts
			}
		}
	}()
	t.Cleanup(func() {
		p.kill()
		if t.Failed() {
			b, _ := os.ReadFile(logf.Name())
			t.Logf("gateway process log:\n%s", tail(string(b), 40))
		}
	})
	select {
	case p.http = <-addr:
	case <-p.exited:
		b, _ := os.ReadFile(logf.Name())
		t.Fatalf("gateway process exited at start:\n%s", tail(string(b), 30))
	case <-time.After(60 * time.Second):
		t.Fatal("gateway process did not start within 60 s")
	}
	Eventually(t, 10*time.Second, "gateway process ready", func() error {
		resp, err := http.Get("http://" + p.http + "/readyz")
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			return fmt.Errorf("readyz %d", resp.StatusCode)
		}
		return nil
	})
	return p
}

// stop is a restart's first half: SIGTERM, then wait for the process to be
// gone.
func (p *gatewayProcess) stop(t *testing.T) {
	t.Helper()
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
	case <-time.After(60 * time.Second):
		t.Fatal("gateway process did not stop within 60 s of SIGTERM")
	}
}

// kill is the crash: SIGKILL, then wait for the process to be gone.
func (p *gatewayProcess) kill() {
	p.cmd.Process.Kill()
	<-p.exited
}

func (p *gatewayProcess) metric(series string) (float64, error) {
	v, _, err := scrapeSeries(p.http, series) // absent: nothing received on that channel yet
	return v, err
}

// TestExternalCrash: two gateway instances share lockers' QoS 1 events and
// health through mosquitto. Storage stalls (a lock on the tables), so each
// instance holds messages it received but has not stored; instance A is
// then killed. Lockers keep publishing while it is away; A restarts with
// the same --instance-id. Every event is stored exactly once and no health
// message is lost: what A had not acknowledged, and its share of what came
// while it was away, were kept by mosquitto in A's session.
func TestExternalCrash(t *testing.T) {
	const lockers, perWave = 10, 20
	ctx := context.Background()
	mq := MustMosquitto(t)
	bin := buildLockergate(t)
	dsn := pgtest.NewDB(t)
	dataDir := t.TempDir()
	b := MustStart(t, onExternal(mq, "gw-b"), func(o *gateway.Options) {
		o.DataDir, o.DatabaseURL = dataDir, dsn
		o.Config.HealthIntervalS = 60
	})
	claim := b.MustSiteAndClaim(t, "s1", lockers)
	args := []string{"--data-dir", dataDir, "--database-url", dsn, "--mqtt-addr", "127.0.0.1:0", "--mqtts-addr", "",
		"--http-addr", "127.0.0.1:0", "--broker-url", "mqtt://" + mq.Addr, "--broker-user", "lgadmin",
		"--broker-password", mq.AdminPassword, "--instance-id", "gw-a", "--log-level", "warn"}
	a := startGatewayProcess(t, bin, args...)

	devs := make([]paho.Client, lockers)
	ids := make([]string, lockers)
	for i := range devs {
		r := MustProvision(t, b, claim, fmt.Sprintf("CRASH-%03d", i))
		ids[i] = r.DeviceID
		devs[i] = MustConnect(t, mq.Addr, r.DeviceID, r.DeviceID, r.Password)
	}
	defer func() {
		for _, d := range devs {
			d.Disconnect(0)
		}
	}()
	// wave publishes perWave events and health reports per locker at QoS 1
	// (acknowledged by mosquitto, whatever the gateways do).
	wave := func(w int) {
		t.Helper()
		now := protocol.FormatTime(time.Now())
		var toks []paho.Token
		for i, d := range devs {
			for k := 0; k < perWave; k++ {
				n := w*perWave + k + 1
				toks = append(toks,
					d.Publish(protocol.Topic(ids[i], protocol.ChanEvents), 1, false,
						fmt.Sprintf(`{"id":"crash-%d","ts":"%s","type":"door_closed","compartment":1,"occupied":false}`, n, now)),
					d.Publish(protocol.Topic(ids[i], protocol.ChanHealth), 1, false,
						fmt.Sprintf(`{"ts":"%s","seq":%d,"uptime_s":%d}`, now, n, n)))
			}
		}
		for _, tk := range toks {
			if !tk.WaitTimeout(10*time.Second) || tk.Error() != nil {
				t.Fatalf("locker publish: %v", tk.Error())
			}
		}
	}

	// Storage stalls: both instances receive and queue, nothing commits.
	stall, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer stall.Close(ctx)
	tx, err := stall.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, `LOCK TABLE health, events IN SHARE MODE`); err != nil {
		t.Fatal(err)
	}
	wave(0)
	Eventually(t, 20*time.Second, "instance A holds events and health it could not store", func() error {
		ev, err1 := a.metric(`lockergate_mqtt_messages_received_total{channel="events"}`)
		he, err2 := a.metric(`lockergate_mqtt_messages_received_total{channel="health"}`)
		if err1 != nil || err2 != nil || ev == 0 || he == 0 {
			return fmt.Errorf("A received %v events, %v health (%v %v)", ev, he, err1, err2)
		}
		return nil
	})
	a.kill()
	if err := tx.Rollback(ctx); err != nil {
		t.Fatal(err)
	}
	wave(1) // while A is away
	a = startGatewayProcess(t, bin, args...)
	wave(2)

	count := func(q string) int {
		var n int
		if err := b.DB().Pool().QueryRow(ctx, q).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	want := lockers * 3 * perWave
	Eventually(t, 60*time.Second, "every event and health report stored", func() error {
		ev := count(`SELECT count(*) FROM events WHERE event_id LIKE 'crash-%'`)
		he := count(`SELECT count(DISTINCT (device_id, seq)) FROM health`)
		if ev != want || he != want {
			return fmt.Errorf("%d of %d events, %d of %d health reports", ev, want, he, want)
		}
		return nil
	})
	if dup := count(`SELECT count(*) FROM health`) - want; dup != 0 {
		t.Logf("%d health reports stored twice (at least once: redelivered after a reconnect)", dup)
	}
	ha, _ := a.metric(`lockergate_mqtt_messages_received_total{channel="health"}`)
	t.Logf("restarted A received %v health reports (its share of waves 2 and 3 and what it held at the crash)", ha)
}
