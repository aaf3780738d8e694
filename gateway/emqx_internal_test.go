package gateway

import (
	"context"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lockergate/lockergate/internal/testtool"
)

type kickRecorder struct{ ids []string }

func (k *kickRecorder) Kick(id string) { k.ids = append(k.ids, id) }

// TestEMQXKicker: the local broker always forgets the secret; a disable
// ends the session now and once more later (a check in flight elsewhere
// may have let it back), retrying while EMQX does not confirm; a
// replacement ends it once. What EMQX answers decides what is logged.
func TestEMQXKicker(t *testing.T) {
	for _, c := range []struct {
		name    string
		status  int // 0: the API is down
		replace bool
		enabled bool  // the locker is enabled again before the follow-up
		calls   int32 // DELETEs EMQX sees
		log     string
	}{
		{"Ended", http.StatusNoContent, false, false, 2, "locker session ended on EMQX again: it had come back"},
		{"NotConnected", http.StatusNotFound, false, false, 2, ""},
		{"Refused", http.StatusUnauthorized, false, false, 3, "check --broker-api-key"},
		{"Down", 0, false, false, 0, "its API did not answer; tried again later, or end it by hand"},
		{"Replaced", http.StatusNoContent, true, false, 1, "locker session ended on EMQX"},
		{"EnabledSince", http.StatusNoContent, false, true, 1, "locker session ended on EMQX"},
	} {
		t.Run(c.name, func(t *testing.T) {
			var calls atomic.Int32
			var path atomic.Value
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				calls.Add(1)
				path.Store(r.Method + " " + r.URL.EscapedPath())
				w.WriteHeader(c.status)
			}))
			defer srv.Close()
			if c.status == 0 {
				srv.Close()
			}
			logs := &testtool.LockedBuffer{}
			local := &kickRecorder{}
			k, err := newEMQXKicker(Options{BrokerAPIURL: srv.URL + "/", BrokerAPIKey: "k:s",
				Logger: slog.New(slog.NewTextHandler(logs, nil))}, local)
			if err != nil {
				t.Fatal(err)
			}
			k.again = []time.Duration{time.Millisecond, time.Millisecond}
			k.disabled = func(context.Context, string) (bool, error) { return !c.enabled, nil }
			if c.replace {
				k.Replace("lk-a/b")
			} else {
				k.Kick("lk-a/b")
			}
			k.wg.Wait() // the follow-ups are done
			k.close()
			k.Kick("after-close") // sends no DELETE once closed: the calls below stay as they were
			k.wg.Wait()
			if len(local.ids) != 2 || local.ids[0] != "lk-a/b" {
				t.Errorf("local kicks %v", local.ids)
			}
			if got := calls.Load(); got != c.calls {
				t.Errorf("%d DELETEs, want %d", got, c.calls)
			}
			if c.status != 0 && path.Load() != "DELETE /api/v5/clients/lk-a%2Fb" {
				t.Errorf("request %q, want the client id escaped in the path", path.Load())
			}
			got := logs.String()
			if c.log == "" && got != "" || c.log != "" && !strings.Contains(got, c.log) {
				t.Errorf("log %q, want %q", got, c.log)
			}
		})
	}
}
