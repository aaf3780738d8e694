package protocol_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/lockergate/lockergate/protocol"
)

// fuzzDecode checks, for any input, that Decode does not panic, fails only
// with its three sentinels and no value, that what it accepts survives
// Encode and Decode unchanged (value and bytes), and that the body
// DecodeBody returns (what the gateway stores) reads back as the same value
// with Decode (names exactly: plain json.Unmarshal would also read a member
// named as a field in another letter case, which the body keeps as an
// unknown field; and descriptive text, which Validate cuts, is whole in
// the body).
func fuzzDecode[T any, PT interface {
	*T
	protocol.Validator
}](f *testing.F, seeds ...[]byte) {
	for _, s := range seeds {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		v, err := protocol.Decode[T, PT](b)
		if err != nil {
			if v != nil {
				t.Fatalf("value %+v with error %v", v, err)
			}
			if !errors.Is(err, protocol.ErrTooLarge) && !errors.Is(err, protocol.ErrMalformed) && !errors.Is(err, protocol.ErrInvalid) {
				t.Fatalf("error %v is none of the sentinels", err)
			}
			return
		}
		_, body, err := protocol.DecodeBody[T, PT](b)
		if err != nil {
			t.Fatalf("DecodeBody of %q: %v, where Decode took it", b, err)
		}
		stored, err := protocol.Decode[T, PT](body)
		if err != nil || !sameWire(reflect.ValueOf(v), reflect.ValueOf(stored)) {
			t.Fatalf("stored body %s (from %q) reads as %+v, %v; want %+v", body, b, stored, err, v)
		}
		// A reader of the stored body that matches names as encoding/json
		// does reads the same, when no name could fold to another's and
		// every member fits its field (else it may read an ignored one).
		if !protocol.KeyMayFold(body) {
			plain := new(T)
			if err := json.Unmarshal(body, plain); err == nil {
				protocol.DropForeign(plain)
				_ = PT(plain).Validate() // cuts descriptive text as Decode did
				if !sameWire(reflect.ValueOf(v), reflect.ValueOf(plain)) {
					t.Fatalf("stored body %s (from %q) reads with encoding/json as %+v; want %+v", body, b, plain, v)
				}
			}
		}
		enc := protocol.Encode(v)
		v2, err := protocol.Decode[T, PT](enc)
		if len(enc) > protocol.MaxPayload {
			// Encoding can grow a payload (fields Decode defaulted are
			// written out); then the limit applies like to any other sender.
			if !errors.Is(err, protocol.ErrTooLarge) {
				t.Fatalf("%d-byte re-encoding: got %v, want ErrTooLarge", len(enc), err)
			}
			return
		}
		if err != nil {
			t.Fatalf("re-decode of %s (from %q): %v", enc, b, err)
		}
		if !sameWire(reflect.ValueOf(v), reflect.ValueOf(v2)) {
			t.Fatalf("re-decode of %s (from %q):\n got %+v\nwant %+v", enc, b, v2, v)
		}
		if enc2 := protocol.Encode(v2); !bytes.Equal(enc, enc2) {
			t.Fatalf("unstable encoding of %q:\n%s\n%s", b, enc, enc2)
		}
	})
}

// sameWire is reflect.DeepEqual except that a nil and an empty slice are
// equal (both are an absent or empty list on the wire, and Decode turns "[]"
// and "null" into one or the other) and unexported fields do not count.
func sameWire(a, b reflect.Value) bool {
	if a.Type() != b.Type() {
		return false
	}
	switch a.Kind() {
	case reflect.Pointer:
		if a.IsNil() || b.IsNil() {
			return a.IsNil() == b.IsNil()
		}
		return sameWire(a.Elem(), b.Elem())
	case reflect.Slice:
		if a.Len() != b.Len() {
			return false
		}
		for i := range a.Len() {
			if !sameWire(a.Index(i), b.Index(i)) {
				return false
			}
		}
		return true
	case reflect.Struct:
		if a.Type() == reflect.TypeFor[time.Time]() {
			return reflect.DeepEqual(a.Interface(), b.Interface())
		}
		for i := range a.NumField() {
			if !a.Type().Field(i).IsExported() {
				continue // not on the wire (CredsAck's noVersion)
			}
			if !sameWire(a.Field(i), b.Field(i)) {
				return false
			}
		}
		return true
	default:
		return reflect.DeepEqual(a.Interface(), b.Interface())
	}
}

// seeds reads golden files and adds variants of them: the doc's example
// with a field changed is a better start than random bytes.
func seeds(f *testing.F, files []string, extra ...string) [][]byte {
	var out [][]byte
	for _, name := range files {
		out = append(out, MustReadTestdata(f, name))
	}
	for _, s := range extra {
		out = append(out, []byte(s))
	}
	return out
}

func FuzzDecodePresence(f *testing.F) {
	fuzzDecode[protocol.Presence](f, seeds(f, []string{"presence_birth.json", "presence_will.json"},
		`{"online":true,"fw":"1","ts":"2026-11-24T22:30:00.123456+01:00"}`, `{"online":null}`)...)
}

func FuzzDecodeHealth(f *testing.F) {
	fuzzDecode[protocol.Health](f, seeds(f, []string{"health.json"},
		`{"ts":"2026-11-24T21:30:00Z","temp_c":-0,"door_faults":[]}`,
		`{"ts":"2026-11-24T21:30:00","seq":7.0,"temp_c":-0.0,"uptime_s":8.64e4,"Seq":7e0,"door_faults":[4.0]}`)...)
}

func FuzzDecodeEvent(f *testing.F) {
	fuzzDecode[protocol.Event](f, seeds(f, []string{"event.json"},
		`{"id":"e-1","ts":"2026-11-24T21:30:00.123Z","type":"door_opened","compartment":7,"by":"credential","credential":"k-1"}`,
		`{"id":"e-2","ts":"2026-11-24T21:30:00.123Z","type":"door_ajar","compartment":7,"open_s":180}`,
		`{"id":"e-3","ts":"2026-11-24T21:30:00.123Z","type":"code_accepted","credential":"k-1","compartments":[3,5]}`,
		`{"id":"e-4","ts":"2026-11-24T21:30:00.123Z","type":"code_rejected","reason":"locked_out"}`,
		`{"id":"e-5","ts":"2026-11-24T21:30:00.123Z","type":"tamper","detail":"case"}`,
		`{"id":"e-6","ts":"2026-11-24T21:30:00.123Z","type":"power","source":"battery"}`,
		`{"id":"e-7","ts":"2026-11-24T21:30:00.123Z","type":"reboot","reason":"watchdog"}`,
		`{"id":"e-9","ts":"2026-11-24T21:30:00.123Z","type":"tamper","detail":"`+strings.Repeat("lid ", 70)+`€"}`,
		`{"id":"e-8","ts":"2026-11-24 21:30:00.123","type":"door_closed","compartment":7.0,"occupied":false,"compartments":[1e0]}`)...)
}

func FuzzDecodeCommand(f *testing.F) {
	fuzzDecode[protocol.Command](f, seeds(f, []string{"command.json"},
		`{"id":"c-2","type":"set_service","compartment":3,"in_service":false,"expires_at":"2026-11-24T21:30:00Z"}`,
		`{"id":"c-3","type":"reboot","issued_at":null,"expires_at":"2026-11-24T21:30:00Z"}`)...)
}

func FuzzDecodeCommandResult(f *testing.F) {
	fuzzDecode[protocol.CommandResult](f, seeds(f, []string{"command_result_ok.json", "command_result_failed.json"},
		`{"id":"c-1","status":"failed","error":"`+strings.Repeat("jam ", 70)+`","ts":"2026-11-24T21:30:00.123Z"}`)...)
}

func FuzzDecodeCredSet(f *testing.F) {
	fuzzDecode[protocol.CredSet](f, seeds(f, []string{"creds.json"},
		`{"version":1,"creds":[]}`, `{"version":1,"creds":null}`,
		`{"version":2,"creds":[{"id":"k-1","kind":"qr","mac":"x","compartments":[1]},{"id":"k-2","kind":"pin","mac":"y","compartments":[2,3]}]}`,
		`{"version":3,"creds":[{"id":"k-1.p","kind":"pin","mac":"x","compartments":[1],"group":1},{"id":"k-1.q","kind":"qr","mac":"y","compartments":[1],"group":1}]}`)...)
}

func FuzzDecodeCredsAck(f *testing.F) {
	fuzzDecode[protocol.CredsAck](f, seeds(f, []string{"creds_ack.json"}, `{}`)...)
}

func FuzzDecodeConfig(f *testing.F) {
	fuzzDecode[protocol.Config](f, seeds(f, []string{"config.json"})...)
}

func FuzzDecodeFwJob(f *testing.F) {
	fuzzDecode[protocol.FwJob](f, seeds(f, []string{"fw_job.json"})...)
}

func FuzzDecodeFwStatus(f *testing.F) {
	fuzzDecode[protocol.FwStatus](f, seeds(f, []string{"fw_status.json"},
		`{"job":"j-1","state":"failed","error":"boot","ts":"2026-11-24T21:30:00.123Z"}`,
		`{"job":"j-1","state":"failed","error":"`+strings.Repeat("disk ", 60)+`","ts":"2026-11-24T21:30:00.123Z"}`)...)
}

func FuzzDecodeProvisionRequest(f *testing.F) {
	fuzzDecode[protocol.ProvisionRequest](f, seeds(f, []string{"provision_request.json"})...)
}

func FuzzDecodeProvisionResponse(f *testing.F) {
	fuzzDecode[protocol.ProvisionResponse](f, seeds(f, []string{"provision_response_ok.json", "provision_response_error.json"})...)
}

// FuzzParseTopic checks that ParseTopic never panics, that what it accepts
// is exactly what Topic builds, and that the ACL agrees with it.
func FuzzParseTopic(f *testing.F) {
	for _, c := range protocol.Channels {
		f.Add(protocol.Topic("lk-1", c), "lk-1")
	}
	for _, s := range []string{"lockers/v1/+/cmd", "lockers/v1/lk-1/#", "$SYS/#", "lockers/v1//health",
		"lockers/v1/lk-1/cmd/result/x", "provision/v1/SN-1/request", "provision/v1/SN-1/response"} {
		f.Add(s, "lk-1")
	}
	f.Add(protocol.ProvisionRequestTopic("SN-1"), "SN-1")
	f.Fuzz(func(t *testing.T, topic, session string) {
		id, c, ok := protocol.ParseTopic(topic)
		if ok {
			if !protocol.ValidID(id) || !c.Valid() {
				t.Fatalf("ParseTopic(%q) = %q, %q: invalid parts", topic, id, c)
			}
			if got := protocol.Topic(id, c); got != topic {
				t.Fatalf("Topic(ParseTopic(%q)) = %q", topic, got)
			}
			if strings.ContainsAny(id, "+#/$") {
				t.Fatalf("id %q has a reserved character", id)
			}
		} else if id != "" || c != "" {
			t.Fatalf("rejected %q but returned %q, %q", topic, id, c)
		}

		pub, sub := protocol.DeviceMayPublish(session, topic), protocol.DeviceMaySubscribe(session, topic)
		if pub && (!ok || id != session) {
			t.Fatalf("%s may publish %q, not its own topic", session, topic)
		}
		if pub != (ok && id == session && c.DeviceToGateway()) {
			t.Fatalf("ACL of %s on %q: pub %v", session, topic, pub)
		}
		if wild := strings.ContainsAny(topic, "+#"); !wild && sub != (ok && id == session) {
			t.Fatalf("ACL of %s on literal %q: sub %v", session, topic, sub)
		}
		if sub {
			// A filter allowed matches an own topic and no other device's.
			own := false
			for _, ch := range protocol.Channels {
				own = own || protocol.TopicMatches(topic, protocol.Topic(session, ch))
				for _, other := range []string{"lk-other", session + "x", "x" + session} {
					if other != session && protocol.TopicMatches(topic, protocol.Topic(other, ch)) {
						t.Fatalf("%s may subscribe %q, which matches %s's %s", session, topic, other, ch)
					}
				}
			}
			if !own {
				t.Fatalf("%s may subscribe %q, which matches none of its topics", session, topic)
			}
		}

		ppub, psub := protocol.ProvisionerMayPublish(session, topic), protocol.ProvisionerMaySubscribe(session, topic)
		if ppub {
			if serial, ok := protocol.ParseProvisionRequestTopic(topic); !ok || serial != session {
				t.Fatalf("provisioner %q may publish %q", session, topic)
			}
		}
		if psub && topic != protocol.ProvisionResponseTopic(session) {
			t.Fatalf("provisioner %q may subscribe %q", session, topic)
		}
		if (ppub || psub) && strings.ContainsAny(topic, "+#") {
			t.Fatalf("provisioner %q may use wildcard %q", session, topic)
		}
	})
}

func TestSameWire(t *testing.T) {
	ts := protocol.Now()
	for _, tt := range []struct {
		a, b *protocol.Health
		want bool
	}{
		{&protocol.Health{TS: ts}, &protocol.Health{TS: ts}, true},
		{&protocol.Health{TS: ts, DoorFaults: []int{}}, &protocol.Health{TS: ts}, true},
		{&protocol.Health{TS: ts, DoorFaults: []int{1}}, &protocol.Health{TS: ts}, false},
		{&protocol.Health{TS: ts, DoorFaults: []int{1}}, &protocol.Health{TS: ts, DoorFaults: []int{2}}, false},
		{&protocol.Health{TS: ts, TempC: ptr(1.0)}, &protocol.Health{TS: ts, TempC: ptr(1.0)}, true},
		{&protocol.Health{TS: ts, TempC: ptr(1.0)}, &protocol.Health{TS: ts}, false},
		{&protocol.Health{TS: ts}, &protocol.Health{TS: protocol.T(ts.Add(time.Millisecond))}, false},
		{&protocol.Health{TS: ts, Seq: 1}, &protocol.Health{TS: ts}, false},
	} {
		if got := sameWire(reflect.ValueOf(tt.a), reflect.ValueOf(tt.b)); got != tt.want {
			t.Errorf("sameWire(%+v, %+v): got %v, want %v", tt.a, tt.b, got, tt.want)
		}
	}
}

// FuzzParseTime: whatever ParseTime takes (RFC 3339 and its near misses)
// comes out in UTC at millisecond precision, and survives FormatTime and
// ParseTime unchanged.
func FuzzParseTime(f *testing.F) {
	for _, s := range []string{"2026-11-24T21:30:00.123Z", "2026-11-24T22:30:00.123456+01:00", "2026-11-24T21:30:00",
		"2026-11-24 21:30:00.123", "2026-11-24t21:30:00z", "2026-11-24T22:30:00.123+0100", "0000-01-01T00:30:00+01:00"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		v, err := protocol.ParseTime(s)
		if err != nil {
			return
		}
		if v.Location() != time.UTC || !v.Equal(v.Truncate(time.Millisecond)) {
			t.Fatalf("%q: %v is not UTC at millisecond precision", s, v)
		}
		again, err := protocol.ParseTime(protocol.FormatTime(v))
		if err != nil || !again.Equal(v) {
			t.Fatalf("%q: %v formats as %s, which parses as %v, %v", s, v, protocol.FormatTime(v), again, err)
		}
	})
}
