package protocol_test

import (
	"bytes"
	"errors"
	"math"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/lockergate/lockergate/protocol"
)

// goldens are the JSON examples of protocol-v1.md, verbatim but for real
// timestamps and real base64/hex values, with what they must decode to.
func goldens(tb testing.TB) []struct {
	file   string
	decode decoder
	want   any
} {
	ts := func(s string) protocol.Time { return MustTime(tb, s) }
	return []struct {
		file   string
		decode decoder
		want   any
	}{
		{"presence_birth.json", decPresence, &protocol.Presence{
			Online: true, TS: ts("2026-11-24T21:30:00.123Z"), FW: "1.4.2", Model: "LX-24", BootID: "b7c1...",
		}},
		{"presence_will.json", decPresence, &protocol.Presence{Online: false}},
		{"health.json", decHealth, &protocol.Health{
			TS: ts("2026-11-24T21:31:00.456Z"), Seq: 1234, FW: "1.4.2", UptimeS: 86400, TempC: ptr(21.5),
			Power: protocol.PowerMains, BatteryPct: ptr(100), RSSIdBm: ptr(-61),
			FreeCompartments: ptr(12), DoorFaults: []int{4},
		}},
		{"event.json", decEvent, &protocol.Event{
			ID: "e-8f2c...", TS: ts("2026-11-24T21:32:10.007Z"), Type: protocol.EventDoorClosed,
			Compartment: 7, Occupied: ptr(false),
		}},
		{"command.json", decCommand, &protocol.Command{
			ID: "c-01J...", Type: protocol.CmdUnlock, Compartment: 7, Reason: protocol.ReasonStaging,
			IssuedAt: ts("2026-11-24T21:30:00.000Z"), ExpiresAt: ts("2026-11-24T21:30:30.000Z"),
		}},
		{"command_result_ok.json", decCommandResult, &protocol.CommandResult{
			ID: "c-01J...", Status: protocol.StatusOK, TS: ts("2026-11-24T21:30:01.250Z"),
		}},
		{"command_result_failed.json", decCommandResult, &protocol.CommandResult{
			ID: "c-01J...", Status: protocol.StatusFailed, Error: "door_jammed", TS: ts("2026-11-24T21:30:01.999Z"),
		}},
		{"creds.json", decCredSet, &protocol.CredSet{
			Version: 42, TS: ts("2026-11-24T21:30:00.123Z"), Creds: []protocol.Credential{{
				ID: "k-91a...", Kind: protocol.KindPIN, MAC: "wccpWH4Yk4YI/Pfzq9w/u82RfoBB/M67+z8PmruBOtU=",
				Compartments: []int{3, 5}, NotAfter: ts("2026-11-26T21:30:00.000Z"),
			}},
		}},
		{"creds_ack.json", decCredsAck, &protocol.CredsAck{Version: 42}},
		{"config.json", decConfig, &protocol.Config{
			Version: 7, HealthIntervalS: 60, DoorAjarS: 120, Lockout: protocol.DefaultLockout,
		}},
		{"fw_job.json", decFwJob, &protocol.FwJob{
			Job: "j-5d1...", Version: "1.5.0", URL: "https://gw.example/v1/firmware/a-77/blob", Size: 8388608,
			SHA256:   "2daeb1f36095b44b318410b3f4e8b5d989dcc7bb023d1426c492dab0a3053e74",
			Sig:      "XT0AU3pAw7ysSNvBWnkGpN7FJ1NYW5ZHMuWEJXR3r1E0khYvDIVqkT6XxhvBQNd+sCV6LAtIP1OKiIwlKY05CA==",
			Deadline: ts("2026-12-01T00:00:00.000Z"),
		}},
		{"fw_status.json", decFwStatus, &protocol.FwStatus{
			Job: "j-5d1...", State: protocol.FwDownloading, Progress: ptr(0.42), TS: ts("2026-11-24T21:35:12.345Z"),
		}},
		{"provision_request.json", decProvisionRequest, &protocol.ProvisionRequest{
			Serial: "SN-00042", Model: "LX-24", FW: "1.4.2", Compartments: []protocol.CompartmentSpec{
				{N: 1, Size: "M", Zone: "ambient"}, {N: 2, Size: "L", Zone: "chilled"},
			},
		}},
		{"provision_response_ok.json", decProvisionResponse, &protocol.ProvisionResponse{
			Status: "ok", DeviceID: "lk-...", Password: "...", CredKey: "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
			FwPubkey: "IVL40Zt5HSRFMkLhXy6rbLfP+ntqXtMAl5YOBpiB2xI=", Broker: "mqtts://gw.example:8883",
		}},
		{"provision_response_error.json", decProvisionResponse, &protocol.ProvisionResponse{
			Status: "error", Error: protocol.ProvClaimExpired,
		}},
	}
}

func TestGolden(t *testing.T) {
	for _, tt := range goldens(t) {
		t.Run(tt.file, func(t *testing.T) {
			raw := MustReadTestdata(t, tt.file)
			got, err := tt.decode(raw)
			if err != nil {
				t.Fatalf("decode: %v", err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("decode:\n got %+v\nwant %+v", got, tt.want)
			}

			enc := protocol.Encode(got)
			again, err := tt.decode(enc)
			if err != nil {
				t.Fatalf("decode %s: %v", enc, err)
			}
			if !reflect.DeepEqual(again, got) {
				t.Fatalf("re-decode of %s:\n got %+v\nwant %+v", enc, again, got)
			}
			// The re-encoded payload says exactly what the doc's example says:
			// no field lost, renamed or added.
			if g, w := MustGeneric(t, enc), MustGeneric(t, raw); !reflect.DeepEqual(g, w) {
				t.Fatalf("encode:\n got %s\nwant %s", enc, raw)
			}
		})
	}
}

func TestGolden_UnknownFieldsIgnored(t *testing.T) {
	for _, tt := range goldens(t) {
		t.Run(tt.file, func(t *testing.T) {
			b := MustMutate(t, tt.file, func(m map[string]any) {
				m["x_vendor"] = map[string]any{"nested": []any{1, "two", nil}}
				m["zz"] = 3.5
			})
			got, err := tt.decode(b)
			if err != nil {
				t.Fatalf("decode %s: %v", b, err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("got %+v, want %+v", got, tt.want)
			}
		})
	}
}

func TestEncode(t *testing.T) {
	t.Run("Will", func(t *testing.T) {
		// The Last Will is fixed in CONNECT; its bytes are the contract's.
		if got, want := string(protocol.Encode(protocol.Presence{Online: false})), `{"online":false}`; got != want {
			t.Fatalf("got %s, want %s", got, want)
		}
	})
	t.Run("EmptyCredSetIsList", func(t *testing.T) {
		for _, v := range []any{protocol.CredSet{Version: 3}, &protocol.CredSet{Version: 3}} {
			got := string(protocol.Encode(v))
			if !strings.Contains(got, `"creds":[]`) {
				t.Fatalf("%T: got %s, want \"creds\":[]", v, got)
			}
		}
		var nilSet *protocol.CredSet
		if got := string(protocol.Encode(nilSet)); got != "null" {
			t.Fatalf("nil *CredSet: got %s, want null", got)
		}
	})
	t.Run("CodeAcceptedOpenedNone", func(t *testing.T) {
		// An empty list says no compartment opened; left out, all did.
		ts := protocol.T(time.Date(2026, 12, 7, 10, 0, 0, 0, time.UTC))
		for _, c := range []struct {
			e    protocol.Event
			want string
		}{
			{protocol.Event{ID: "e-1", Type: protocol.EventCodeAccepted, Credential: "k-1", Compartments: []int{}}, `"compartments":[]`},
			{protocol.Event{ID: "e-1", Type: protocol.EventCodeAccepted, Credential: "k-1", Compartments: []int{3}}, `"compartments":[3]`},
			{protocol.Event{ID: "e-1", Type: protocol.EventCodeAccepted, Credential: "k-1"}, ""},
			{protocol.Event{ID: "e-1", Type: protocol.EventDoorOpened, Compartment: 2, Compartments: []int{}}, ""},
		} {
			c.e.TS = ts
			got := string(protocol.Encode(c.e))
			if c.want == "" && strings.Contains(got, "compartments") || c.want != "" && !strings.Contains(got, c.want) {
				t.Fatalf("%+v: got %s, want %q", c.e, got, c.want)
			}
			back, err := protocol.Decode[protocol.Event](protocol.Encode(c.e))
			if err != nil || back.Credential != c.e.Credential || (back.Compartments == nil) != (c.want == "") {
				t.Fatalf("%s read back as %+v (%v)", got, back, err)
			}
		}
	})
	t.Run("NoHTMLEscaping", func(t *testing.T) {
		got := string(protocol.Encode(protocol.CommandResult{ID: "c-1", Status: "failed", Error: "a<b>&c"}))
		if want := `{"id":"c-1","status":"failed","error":"a<b>&c"}`; got != want {
			t.Fatalf("got %s, want %s", got, want)
		}
	})
	t.Run("NoTrailingNewline", func(t *testing.T) {
		if got := protocol.Encode(protocol.CredsAck{Version: 1}); bytes.HasSuffix(got, []byte("\n")) {
			t.Fatalf("got %q", got)
		}
	})
	t.Run("ZeroTimeIsNull", func(t *testing.T) {
		got := string(protocol.Encode(protocol.Command{ID: "c-1", Type: "reboot"}))
		if want := `{"id":"c-1","type":"reboot","issued_at":null,"expires_at":null}`; got != want {
			t.Fatalf("got %s, want %s", got, want)
		}
	})
}

func TestProvisionResponse_ErrorCodes(t *testing.T) {
	for _, code := range []string{protocol.ProvClaimExpired, protocol.ProvClaimExhausted, protocol.ProvSerialTaken, protocol.ProvInvalid} {
		t.Run(code, func(t *testing.T) {
			got, err := protocol.Decode[protocol.ProvisionResponse]([]byte(`{"status": "error", "error": "` + code + `"}`))
			if err != nil {
				t.Fatal(err)
			}
			if got.Status != "error" || got.Error != code {
				t.Fatalf("got %+v", got)
			}
		})
	}
}

func TestDecode_TooLarge(t *testing.T) {
	// pad builds a valid presence payload of exactly n bytes.
	pad := func(n int) []byte {
		head, tail := `{"online":false,"pad":"`, `"}`
		return []byte(head + strings.Repeat("x", n-len(head)-len(tail)) + tail)
	}
	t.Run("OK", func(t *testing.T) {
		b := pad(protocol.MaxPayload)
		if _, err := protocol.Decode[protocol.Presence](b); err != nil {
			t.Fatalf("%d bytes: %v", len(b), err)
		}
	})
	t.Run("ErrTooLarge", func(t *testing.T) {
		for _, b := range [][]byte{pad(protocol.MaxPayload + 1), bytes.Repeat([]byte("{"), 1<<20)} {
			_, err := protocol.Decode[protocol.Presence](b)
			if !errors.Is(err, protocol.ErrTooLarge) {
				t.Fatalf("%d bytes: got %v, want ErrTooLarge", len(b), err)
			}
			if got, want := protocol.Reason(err), "too_large"; got != want {
				t.Fatalf("Reason: got %q, want %q", got, want)
			}
		}
	})
	if got, want := protocol.MaxPayload, 16384; got != want {
		t.Fatalf("MaxPayload: got %d, want %d", got, want)
	}
}

func TestDecode_Malformed(t *testing.T) {
	for name, payload := range map[string]string{
		"Empty":            ``,
		"Blank":            " \n\t ",
		"Null":             `null`,
		"Array":            `[{"online":false}]`,
		"String":           `"online"`,
		"Number":           `42`,
		"True":             `true`,
		"Truncated":        `{"online":false`,
		"Broken":           `{"online":}`,
		"SingleQuotes":     `{'online':false}`,
		"TrailingComma":    `{"online":false,}`,
		"TrailingObject":   `{"online":false} {"online":true}`,
		"TrailingGarbage":  `{"online":false} x`,
		"TrailingBrace":    `{"online":false}}`,
		"TrailingBracket":  `{"online":false}]`,
		"InvalidUTF8":      "{\"online\":false,\"model\":\"\xff\xfe\"}",
		"InvalidUTF8InKey": "{\"\xc3\":1,\"online\":false}",
		"NUL":              "{\"online\":false}\x00",
	} {
		t.Run(name, func(t *testing.T) {
			v, err := protocol.Decode[protocol.Presence]([]byte(payload))
			if !errors.Is(err, protocol.ErrMalformed) {
				t.Fatalf("got %+v, %v; want ErrMalformed", v, err)
			}
			if v != nil {
				t.Fatalf("got value %+v with error", v)
			}
			if got, want := protocol.Reason(err), "malformed"; got != want {
				t.Fatalf("Reason: got %q, want %q", got, want)
			}
		})
	}
	t.Run("OK/Whitespace", func(t *testing.T) {
		if _, err := protocol.Decode[protocol.Presence]([]byte(" \r\n\t{\"online\":false} \n")); err != nil {
			t.Fatal(err)
		}
	})
}

func TestDecode_WrongTypes(t *testing.T) {
	set := func(k string, v any) func(map[string]any) { return func(m map[string]any) { m[k] = v } }
	for _, tt := range []struct {
		name   string
		decode decoder
		file   string
		edit   func(map[string]any)
	}{
		{"Health/SeqString", decHealth, "health.json", set("seq", "x")},
		{"Health/SeqFloat", decHealth, "health.json", set("seq", 1.5)},
		{"Health/SeqOverflow", decHealth, "health.json", set("seq", 1e30)},
		{"Health/TempString", decHealth, "health.json", set("temp_c", "21.5")},
		{"Health/DoorFaultsObject", decHealth, "health.json", set("door_faults", map[string]any{"4": true})},
		{"Health/TSNumber", decHealth, "health.json", set("ts", 1732483800)},
		{"Health/TSNotRFC3339", decHealth, "health.json", set("ts", "yesterday")},
		{"Presence/OnlineString", decPresence, "presence_birth.json", set("online", "true")},
		{"Presence/FWNumber", decPresence, "presence_birth.json", set("fw", 142)},
		{"Event/OccupiedString", decEvent, "event.json", set("occupied", "false")},
		{"Event/CompartmentString", decEvent, "event.json", set("compartment", "7")},
		{"Command/InServiceNumber", decCommand, "command.json", set("in_service", 1)},
		{"Command/ExpiresAtObject", decCommand, "command.json", set("expires_at", map[string]any{})},
		{"CredSet/CredsObject", decCredSet, "creds.json", set("creds", map[string]any{})},
		{"CredSet/VersionString", decCredSet, "creds.json", set("version", "42")},
		{"CredsAck/VersionFloat", decCredsAck, "creds_ack.json", set("version", 42.5)},
		{"Config/LockoutArray", decConfig, "config.json", set("lockout", []any{5, 300, 300})},
		{"FwJob/SizeString", decFwJob, "fw_job.json", set("size", "8388608")},
		{"FwStatus/ProgressString", decFwStatus, "fw_status.json", set("progress", "42%")},
		{"ProvisionRequest/CompartmentsNumber", decProvisionRequest, "provision_request.json", set("compartments", 2)},
		{"ProvisionResponse/StatusBool", decProvisionResponse, "provision_response_ok.json", set("status", true)},
	} {
		t.Run(tt.name, func(t *testing.T) {
			b := MustMutate(t, tt.file, tt.edit)
			v, err := tt.decode(b)
			if !errors.Is(err, protocol.ErrInvalid) {
				t.Fatalf("%s: got %+v, %v; want ErrInvalid", b, v, err)
			}
			if got, want := protocol.Reason(err), "invalid"; got != want {
				t.Fatalf("Reason: got %q, want %q", got, want)
			}
		})
	}
}

func TestReason(t *testing.T) {
	for _, tt := range []struct {
		err  error
		want string
	}{
		{protocol.ErrTooLarge, "too_large"},
		{protocol.ErrMalformed, "malformed"},
		{protocol.ErrInvalid, "invalid"},
		{errors.Join(errors.New("x"), protocol.ErrMalformed), "malformed"},
	} {
		if got := protocol.Reason(tt.err); got != tt.want {
			t.Errorf("Reason(%v): got %q, want %q", tt.err, got, tt.want)
		}
	}
}

// TestDecode_WholeNumbers: a whole number written as a float (what JSON
// libraries write for a float that holds one: 7.0, 8.64e4) is taken where
// an integer is expected; a fraction, or a number past int64, is not.
func TestDecode_WholeNumbers(t *testing.T) {
	h, err := protocol.Decode[protocol.Health]([]byte(`{"ts":"2026-11-24T21:31:00.456Z","seq":1234.0,"uptime_s":8.64e4,
		"temp_c":21.0,"battery_pct":100.0,"rssi_dbm":-61.0,"free_compartments":1.2e1,"door_faults":[4.0,5]}`))
	if err != nil {
		t.Fatal(err)
	}
	if h.Seq != 1234 || h.UptimeS != 86400 || *h.TempC != 21 || *h.BatteryPct != 100 || *h.RSSIdBm != -61 ||
		*h.FreeCompartments != 12 || !slices.Equal(h.DoorFaults, []int{4, 5}) {
		t.Fatalf("decoded %+v", h)
	}
	if dh, err := protocol.DecodeHealth([]byte(`{"ts":"2026-11-24T21:31:00.456Z","seq":7.0}`)); err != nil || dh.Seq != 7 {
		t.Fatalf("DecodeHealth: %+v, %v", dh, err)
	}
	e, err := protocol.Decode[protocol.Event]([]byte(`{"id":"e-1","ts":"2026-11-24T21:31:00.456Z","type":"code_accepted",
		"credential":"k-1","compartments":[3.0,5e0]}`))
	if err != nil || !slices.Equal(e.Compartments, []int{3, 5}) {
		t.Fatalf("event: %+v, %v", e, err)
	}
	// The body as read has the numbers as integers and every other byte
	// as sent: key order, duplicates (the last one wins, as Decode reads
	// them), floats, a negative zero.
	in := `{"ts":"2026-11-24T21:31:00.456Z", "seq":7.0,"temp_c":-0.0,"uptime_s":1.5e1, "seq":8E0 ,"fw":"7.0"}`
	h, body, err := protocol.DecodeHealthBody([]byte(in))
	if want := `{"ts":"2026-11-24T21:31:00.456Z", "seq":7,"temp_c":-0,"uptime_s":15, "seq":8 ,"fw":"7.0"}`; err != nil ||
		string(body) != want || h.Seq != 8 || h.UptimeS != 15 || !math.Signbit(*h.TempC) {
		t.Fatalf("DecodeHealthBody: %+v, %s, %v; want %s", h, body, err, want)
	}
	plain := []byte(`{"ts":"2026-11-24T21:31:00.456Z","seq":7,"temp_c":21.5}`)
	if _, body, err := protocol.DecodeBody[protocol.Health](plain); err != nil || &body[0] != &plain[0] {
		t.Fatalf("a payload of integers: %v, body %s not the payload itself", err, body)
	}
	for _, p := range []string{
		`{"ts":"2026-11-24T21:31:00.456Z","seq":7.0,"seq":-1}`, // the last key wins: -1, refused
		`{"ts":"2026-11-24T21:31:00.456Z","seq":1234.5}`,
		`{"ts":"2026-11-24T21:31:00.456Z","seq":9.3e18}`,       // past int64
		`{"ts":"2026-11-24T21:31:00.456Z","seq":1e999999999}`,  // not spelled out
		`{"ts":"2026-11-24T21:31:00.456Z","seq":"7"}`,          // a string is not a number
		`{"ts":"2026-11-24T21:31:00.456Z","seq":7.0,"fw":1.0}`, // fw is a string
		`{"ts":"2026-11-24T21:31:00.456Z","battery_pct":1e-3}`, // a fraction
	} {
		if h, err := protocol.Decode[protocol.Health]([]byte(p)); !errors.Is(err, protocol.ErrInvalid) {
			t.Errorf("%s: got %+v, %v; want ErrInvalid", p, h, err)
		}
	}
}

// TestStoredTSInUTC: a top-level ts that ParseTime takes but that is not
// RFC 3339 in UTC is stored as the UTC time read, every other byte as
// sent; one already in UTC, a nested ts and a "ts" inside a string are
// left alone, and the fast health decoder does the same.
func TestStoredTSInUTC(t *testing.T) {
	for _, c := range []struct{ in, want string }{
		{`{"id":"e-1","ts":"2026-11-24 21:30:00.5","type":"tamper","detail":"\"ts\":\"x\""}`,
			`{"id":"e-1","ts":"2026-11-24T21:30:00.500Z","type":"tamper","detail":"\"ts\":\"x\""}`},
		{`{"id":"e-1", "ts" : "2026-11-24T22:30:00.123+01:00" ,"type":"tamper","x":{"ts":"2026-11-24 21:30:00"}}`,
			`{"id":"e-1", "ts" : "2026-11-24T21:30:00.123Z" ,"type":"tamper","x":{"ts":"2026-11-24 21:30:00"}}`},
		{`{"id":"e-1","ts":"2026-11-24T21:30:00Z","type":"tamper"}`, `{"id":"e-1","ts":"2026-11-24T21:30:00Z","type":"tamper"}`},
		{`{"id":"e-1","x":[{"a":1}],"ts":"2026-11-24t21:30:00.1z","type":"tamper"}`,
			`{"id":"e-1","x":[{"a":1}],"ts":"2026-11-24T21:30:00.100Z","type":"tamper"}`},
		// A number past float64 before it, or the key spelled with an
		// escape: still found.
		{`{"id":"e-1","x":1e400,"ts":"2026-11-24 21:30:00","type":"tamper"}`,
			`{"id":"e-1","x":1e400,"ts":"2026-11-24T21:30:00.000Z","type":"tamper"}`},
		// Another case is another name (an unknown field): left as sent.
		{`{"id":"e-1","ts":"2026-11-24 21:30:00","TS":"2026-11-24 21:30:00","type":"tamper"}`,
			`{"id":"e-1","ts":"2026-11-24T21:30:00.000Z","TS":"2026-11-24 21:30:00","type":"tamper"}`},
		{`{"id":"e-1","t\u0073":"2026-11-24 21:30:00","type":"tamper"}`, `{"id":"e-1","t\u0073":"2026-11-24T21:30:00.000Z","type":"tamper"}`},
	} {
		_, body, err := protocol.DecodeBody[protocol.Event]([]byte(c.in))
		if err != nil || string(body) != c.want {
			t.Errorf("DecodeBody(%s) = %s, %v; want %s", c.in, body, err, c.want)
		}
	}
	for _, c := range []struct{ in, want string }{
		{`{"ts":"2026-11-24T21:30:00.123Z","seq":1}`, `{"ts":"2026-11-24T21:30:00.123Z","seq":1}`},
		{`{"ts":"2026-11-24T21:30:00.123","seq":1}`, `{"ts":"2026-11-24T21:30:00.123Z","seq":1}`},
		{`{"ts":"2026-11-24T22:30:00.123+0100","seq":1}`, `{"ts":"2026-11-24T21:30:00.123Z","seq":1}`},
		// Another field holding the UTC spelling does not pass for the ts.
		{`{"ts":"2026-11-24T22:30:00.123+01:00","seq":1,"x":"2026-11-24T21:30:00.123Z"}`,
			`{"ts":"2026-11-24T21:30:00.123Z","seq":1,"x":"2026-11-24T21:30:00.123Z"}`},
	} {
		_, body, err := protocol.DecodeHealthBody([]byte(c.in))
		if err != nil || string(body) != c.want {
			t.Errorf("DecodeHealthBody(%s) = %s, %v; want %s", c.in, body, err, c.want)
		}
	}
}

// TestCredsAckNeedsItsVersion: an ack without its version (or with null)
// says nothing of which set the locker applied: invalid, not version 0.
func TestCredsAckNeedsItsVersion(t *testing.T) {
	for _, in := range []string{`{}`, `{"version":null}`, `{"v":3}`} {
		if _, err := protocol.Decode[protocol.CredsAck]([]byte(in)); !errors.Is(err, protocol.ErrInvalid) || !strings.Contains(err.Error(), "version is required") {
			t.Errorf("Decode(%s): %v, want invalid: version is required", in, err)
		}
	}
	for in, want := range map[string]int64{`{"version":0}`: 0, `{"version":3.0}`: 3, `{"version":7,"x":1}`: 7} {
		if a, err := protocol.Decode[protocol.CredsAck]([]byte(in)); err != nil || a.Version != want {
			t.Errorf("Decode(%s) = %+v, %v; want version %d", in, a, err, want)
		}
	}
}

// TestHealthBodyAllocations: the fast health path costs no allocation for
// checking a ts written in the wire format.
func TestHealthBodyAllocations(t *testing.T) {
	payload := []byte(`{"ts":"2026-11-24T21:30:00.123Z","seq":1234,"fw":"1.4.2","uptime_s":86400}`)
	plain := testing.AllocsPerRun(100, func() { _, _ = protocol.DecodeHealth(payload) })
	body := testing.AllocsPerRun(100, func() { _, _, _ = protocol.DecodeHealthBody(payload) })
	if body != plain {
		t.Errorf("DecodeHealthBody allocates %v times, DecodeHealth %v", body, plain)
	}
}
