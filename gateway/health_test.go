package gateway_test

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/jackc/pgx/v5"

	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/gateway"
	"github.com/lockergate/lockergate/internal/pgtest"
	"github.com/lockergate/lockergate/protocol"
)

// healthLocker is a provisioned, connected locker that reports health.
type healthLocker struct {
	t   *testing.T
	tg  *TestGateway
	id  string
	dev paho.Client
}

func newHealthLocker(t *testing.T, tg *TestGateway, serial string) *healthLocker {
	t.Helper()
	id := MustProvision(t, tg, tg.MustSiteAndClaim(t, "s1", 1), serial)
	return &healthLocker{t: t, tg: tg, id: id.DeviceID, dev: MustConnect(t, tg.MQTTAddr(), id.DeviceID, id.DeviceID, id.Password)}
}

// pub publishes health reports with these sequence numbers at QoS 1.
func (l *healthLocker) pub(seqs ...int) {
	l.t.Helper()
	for _, seq := range seqs {
		payload := fmt.Sprintf(`{"seq":%d,"ts":"%s","uptime_s":%d}`, seq, protocol.FormatTime(time.Now()), seq)
		if tk := l.dev.Publish(protocol.Topic(l.id, protocol.ChanHealth), 1, false, payload); !tk.WaitTimeout(10*time.Second) || tk.Error() != nil {
			l.t.Fatalf("publish seq %d: %v", seq, tk.Error())
		}
	}
}

// rows waits until the locker has want health rows.
func (l *healthLocker) rows(want int) {
	l.t.Helper()
	Eventually(l.t, 10*time.Second, fmt.Sprintf("%d health rows", want), func() error {
		if n := l.tg.Count(l.t, `SELECT count(*) FROM health WHERE device_id = $1`, l.id); n != want {
			return fmt.Errorf("%d rows", n)
		}
		return nil
	})
}

// TestLatestHealthHeld: a locker's first report is its latest health as
// soon as its row is stored; reports right after it are stored as rows at
// once but held for the latest, and written as one update standing for the
// run (gaps inside it counted) when the interval is up, here at shutdown.
func TestLatestHealthHeld(t *testing.T) {
	ctx := context.Background()
	dsn := pgtest.NewDB(t)
	tg := MustStart(t, func(o *gateway.Options) {
		o.DatabaseURL = dsn
		o.LatestHealthEvery = time.Hour // held until shutdown, whatever the machine's pace
	})
	l := newHealthLocker(t, tg, "SN-LH-1")
	latest := func(q interface {
		QueryRow(context.Context, string, ...any) pgx.Row
	}) (seq, gaps int64) {
		t.Helper()
		var body []byte
		if err := q.QueryRow(ctx, `SELECT health, health_gaps FROM devices WHERE id = $1`, l.id).Scan(&body, &gaps); err != nil {
			t.Fatal(err)
		}
		var h struct{ Seq int64 }
		if err := json.Unmarshal(body, &h); err != nil {
			t.Fatalf("latest health %q: %v", body, err)
		}
		return h.Seq, gaps
	}

	l.pub(1)
	l.rows(1)
	// The first report's latest is written with its row, in one transaction.
	if seq, gaps := latest(tg.DB().Pool()); seq != 1 || gaps != 0 {
		t.Fatalf("after the first report: latest seq %d gaps %d, want 1 and 0", seq, gaps)
	}
	l.pub(2, 3, 6)
	l.rows(4)
	if seq, gaps := latest(tg.DB().Pool()); seq != 1 || gaps != 0 {
		t.Fatalf("reports within the interval were not held: latest seq %d gaps %d", seq, gaps)
	}
	// The API reads the same row.
	if api, want := lockerOf(t, tg, l.id).Health, `"seq":1`; !strings.Contains(string(api), want) {
		t.Fatalf("API health %s, want %s", api, want)
	}

	l.dev.Disconnect(0)
	tg.Stop(t)
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	if seq, gaps := latest(conn); seq != 6 || gaps != 2 {
		t.Fatalf("after shutdown: latest seq %d gaps %d, want 6 and 2 (4 and 5 missing)", seq, gaps)
	}
}

// TestLatestHealthWrittenThrough: with holding off (as instances sharing an
// external broker run), every report's row and latest health are written
// in one transaction.
func TestLatestHealthWrittenThrough(t *testing.T) {
	tg := MustStart(t, func(o *gateway.Options) { o.LatestHealthEvery = -1 })
	l := newHealthLocker(t, tg, "SN-LH-2")
	// The first report is written before the next two arrive, which a
	// throttle would hold; wait for the rows only: the latest must be
	// there with them.
	l.pub(1)
	l.rows(1)
	l.pub(2, 5)
	l.rows(3)
	var seq, gaps int64
	if err := tg.DB().Pool().QueryRow(context.Background(), `SELECT (health->>'seq')::bigint, health_gaps FROM devices WHERE id = $1`,
		l.id).Scan(&seq, &gaps); err != nil {
		t.Fatal(err)
	}
	if seq != 5 || gaps != 2 {
		t.Fatalf("latest seq %d gaps %d with every report written through, want 5 and 2", seq, gaps)
	}
}

// TestHealthSeqAtTheLimit: a locker whose seq reads 2^63-1 and then starts
// again (a black-box run found this) holds up no one: its reports and a
// second locker's are all stored, and the latest is current, written
// through and held alike.
func TestHealthSeqAtTheLimit(t *testing.T) {
	for _, every := range []time.Duration{-1, 0} {
		t.Run(fmt.Sprint("LatestHealthEvery=", every), func(t *testing.T) {
			tg := MustStart(t, func(o *gateway.Options) { o.LatestHealthEvery = every })
			claim := tg.MustSiteAndClaim(t, "s1", 2)
			locker := func(serial string) *healthLocker {
				id := MustProvision(t, tg, claim, serial)
				return &healthLocker{t: t, tg: tg, id: id.DeviceID, dev: MustConnect(t, tg.MQTTAddr(), id.DeviceID, id.DeviceID, id.Password)}
			}
			a, b := locker("SN-MAX-A"), locker("SN-MAX-B")
			a.pub(1)
			a.rows(1)
			payload := fmt.Sprintf(`{"seq":%d,"ts":"%s","uptime_s":1}`, int64(math.MaxInt64), protocol.FormatTime(time.Now()))
			if tk := a.dev.Publish(protocol.Topic(a.id, protocol.ChanHealth), 1, false, payload); !tk.WaitTimeout(10*time.Second) || tk.Error() != nil {
				t.Fatalf("publish: %v", tk.Error())
			}
			a.rows(2)
			a.pub(1, 2)
			b.pub(1, 2, 3)
			a.rows(4)
			b.rows(3)
			Eventually(t, 10*time.Second, "latest health current", func() error {
				var seqA, seqB int64
				if err := tg.DB().Pool().QueryRow(context.Background(), `SELECT
					(SELECT health_seq FROM devices WHERE id = $1), (SELECT health_seq FROM devices WHERE id = $2)`,
					a.id, b.id).Scan(&seqA, &seqB); err != nil {
					return err
				}
				if seqA != 2 || seqB != 3 {
					return fmt.Errorf("latest seq %d and %d, want 2 and 3", seqA, seqB)
				}
				return nil
			})
		})
	}
}

// TestHealthCommitWaitFollowsTheBroker: with the embedded broker, which
// acknowledges health when it is queued, health batches commit without
// waiting for the disk; behind an external broker, which is acknowledged
// only after the commit, they wait. The test cluster runs with
// synchronous_commit off, so these gateways' sessions are set to on, and a
// trigger records the setting each health write ran under.
func TestHealthCommitWaitFollowsTheBroker(t *testing.T) {
	syncByDefault := func(o *gateway.Options) { o.DatabaseURL += " synchronous_commit=on" }
	noteSetting := func(t *testing.T, tg *TestGateway) {
		t.Helper()
		if _, err := tg.DB().Pool().Exec(context.Background(), `
			CREATE TABLE seen (setting text);
			CREATE FUNCTION note_setting() RETURNS trigger LANGUAGE plpgsql AS $$
				BEGIN
					INSERT INTO seen VALUES (current_setting('synchronous_commit'));
					RETURN NULL;
				END $$;
			CREATE TRIGGER note AFTER INSERT ON health FOR EACH STATEMENT EXECUTE FUNCTION note_setting();`); err != nil {
			t.Fatal(err)
		}
	}
	wantSetting := func(t *testing.T, tg *TestGateway, want string) {
		t.Helper()
		if n := tg.Count(t, `SELECT count(*) FROM seen`); n == 0 {
			t.Fatal("no health write recorded")
		}
		if n := tg.Count(t, `SELECT count(*) FROM seen WHERE setting <> $1`, want); n != 0 {
			t.Fatalf("%d health writes ran without synchronous_commit %s", n, want)
		}
	}
	t.Run("Embedded", func(t *testing.T) {
		tg := MustStart(t, syncByDefault)
		noteSetting(t, tg)
		l := newHealthLocker(t, tg, "SN-HW-1")
		l.pub(1, 2)
		l.rows(2)
		wantSetting(t, tg, "off")
	})
	t.Run("External", func(t *testing.T) {
		tg := MustStart(t, onExternal(MustMosquitto(t), "gw-hw"), syncByDefault)
		noteSetting(t, tg)
		r := MustProvision(t, tg, tg.MustSiteAndClaim(t, "s1", 1), "SN-HW-2")
		now := time.Now().UTC()
		rows := []fleet.HealthRecord{{DeviceID: r.DeviceID, ReceivedAt: now, TS: now, Seq: 1, Body: json.RawMessage(`{"seq":1}`)}}
		if err := tg.DB().InsertHealth(context.Background(), rows, fleet.LatestOf(rows)); err != nil {
			t.Fatal(err)
		}
		wantSetting(t, tg, "on")
	})
}

// TestInvalidHealthStillHeard: a locker whose health the gateway rejects
// (its firmware writes a field wrong) is not silent: each such message
// moves last_seen (the stale judgement), as any other message does, while
// it is dropped and counted as invalid.
func TestInvalidHealthStillHeard(t *testing.T) {
	tg := MustStart(t)
	r, c := rawLocker(t, tg, "SN-BADHEALTH-1")
	publishBirthHandled(t, tg, c, r.DeviceID)
	const invalid = `lockergate_ingest_messages_dropped_total{channel="health",reason="invalid"}`
	was, _ := tg.Metric(invalid)
	// Whatever was heard before arrived before this (last_seen is the
	// arrival time of the last message).
	sent := time.Now().Truncate(time.Millisecond)
	MustPublish(t, c, protocol.Topic(r.DeviceID, protocol.ChanHealth), false, `{"ts":"yesterday","seq":1}`)
	tg.WaitMetric(t, 10*time.Second, invalid, was+1)
	Eventually(t, 10*time.Second, "last_seen moved by the invalid health", func() error {
		var seen time.Time
		if err := tg.DB().Pool().QueryRow(context.Background(), `SELECT last_seen FROM devices WHERE id = $1`, r.DeviceID).Scan(&seen); err != nil {
			return err
		}
		if seen.Before(sent) {
			return fmt.Errorf("last_seen %v, before the health was sent (%v)", seen, sent)
		}
		return nil
	})
}
