package gateway

import (
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/lockergate/lockergate/internal/testtool"
)

type kickRecorder struct{ ids []string }

func (k *kickRecorder) Kick(id string) { k.ids = append(k.ids, id) }

// TestEMQXKicker: the local broker always forgets the secret; what EMQX
// answers decides what is logged, and an answer that means the session
// may still be live says what to do.
func TestEMQXKicker(t *testing.T) {
	for _, c := range []struct {
		name   string
		status int // 0: the API is down
		log    string
	}{
		{"Ended", http.StatusNoContent, "locker session ended on EMQX"},
		{"NotConnected", http.StatusNotFound, ""},
		{"Refused", http.StatusUnauthorized, "check --broker-api-key"},
		{"Down", 0, "its API did not answer; end it by hand"},
	} {
		t.Run(c.name, func(t *testing.T) {
			var path string
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				path = r.Method + " " + r.URL.EscapedPath()
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
			k.Kick("lk-a/b")
			if len(local.ids) != 1 || local.ids[0] != "lk-a/b" {
				t.Errorf("local kicks %v", local.ids)
			}
			if c.status != 0 && path != "DELETE /api/v5/clients/lk-a%2Fb" {
				t.Errorf("request %q, want the client id escaped in the path", path)
			}
			got := logs.String()
			if c.log == "" && got != "" || c.log != "" && !strings.Contains(got, c.log) {
				t.Errorf("log %q, want %q", got, c.log)
			}
		})
	}
}
