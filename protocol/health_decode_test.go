package protocol

import (
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// healthCorpus is health as lockers send it (with the protocol's example,
// healthExample), and the shapes around it that the fast path must decline
// or get exactly right.
var healthCorpus = []struct {
	payload string
	fast    bool // the fast path decodes it (else Decode does)
}{
	{`{"ts":"2026-11-24T21:30:00Z"}`, true},
	{` {"ts":"2026-11-24T21:30:00+01:00","seq":0,"uptime_s":0,"temp_c":-0,"door_faults":[]} `, true},
	{`{"ts":"2026-11-24T21:30:00.123456789Z","temp_c":1e3,"door_faults":[1, 2 ,3]}`, true},
	{`{"ts":"2026-11-24T21:30:00Z","temp_c":-1.5E-2,"rssi_dbm":-0}`, true},
	{"{\"ts\":\"2026-11-24T21:30:00Z\",\r\n\t\"seq\":1}", true},
	// Unknown fields are skipped, whatever their value.
	{`{"ts":"2026-11-24T21:30:00Z","vendor":{"a":[1,true,false,null,"x",{"b":-2.5e+3}]},"x":null}`, true},
	{`{"vendor_extra":1,"ts":"2026-11-24T21:30:00Z"}`, true},

	// Valid, but for Decode.
	{`{"TS":"2026-11-24T21:30:00Z"}`, false},                                  // keys match without case
	{`{"ts":"2026-11-24T21:30:00Z","Seq":5}`, false},                          // ... every key
	{`{"ts":"2026-11-24T21:30:00Z","seq":1,"seq":2}`, false},                  // the last one wins
	{`{"ts":"2026-11-24T21:30:00Z","fw":"caf\u00e9"}`, false},                 // escapes
	{`{"ts":"2026-11-24T21:30:00Z","fw":"café"}`, false},                      // non-ASCII
	{`{"ts":"2026-11-24T21:30:00Z","temp_c":null,"door_faults":null}`, false}, // null
	{`{"ts":"2026-11-24T21:30:00Z","seq":1234567890123456789}`, false},        // 19 digits
	{`{"ts":"2026-11-24T21:30:00Z","x":` + strings.Repeat("[", 20) + strings.Repeat("]", 20) + `}`, false},
	{`{"ts":"2026-11-24T21:30:00Z","ſeq":1}`, false}, // folds to "seq" in encoding/json

	// Errors, all from Decode.
	{``, false},
	{`[]`, false},
	{`{}`, false},
	{`{"ts":"2026-11-24T21:30:00Z",}`, false},
	{`{"ts":"2026-11-24T21:30:00Z"} x`, false},
	{`{"ts":"2026-11-24T21:30:00Z","seq":1.0}`, false},
	{`{"ts":"2026-11-24T21:30:00Z","seq":1e2}`, false},
	{`{"ts":"2026-11-24T21:30:00Z","seq":01}`, false},
	{`{"ts":"2026-11-24T21:30:00Z","seq":-}`, false},
	{`{"ts":"2026-11-24T21:30:00Z","seq":99999999999999999999}`, false},
	// Past 32 bits: Go's int on 32-bit platforms cannot hold them
	// (GOARCH=386 in CI), where Decode refuses them.
	{`{"ts":"2026-11-24T21:30:00Z","rssi_dbm":4294967295,"door_faults":[2147483647]}`, strconv.IntSize == 64},
	{`{"ts":"2026-11-24T21:30:00Z","door_faults":[4294967297]}`, false}, // past what is stored: invalid
	{`{"ts":"2026-11-24T21:30:00Z","free_compartments":4294967297}`, strconv.IntSize == 64},
	{`{"ts":"2026-11-24T21:30:00Z","seq":-1}`, false},
	{`{"ts":"2026-11-24T21:30:00Z","temp_c":1e400}`, false},
	{`{"ts":"2026-11-24T21:30:00Z","temp_c":.5}`, false},
	{`{"ts":"2026-11-24T21:30:00Z","power":"solar"}`, false},
	{`{"ts":"2026-11-24T21:30:00Z","battery_pct":101}`, false},
	{`{"ts":"2026-11-24T21:30:00Z","door_faults":[0]}`, false},
	{`{"ts":"2026-11-24T21:30:00Z","door_faults":[1,]}`, false},
	{`{"ts":"2026-11-24 21:30:00Z"}`, true}, // a near miss of RFC 3339 (ParseTime)
	{`{"ts":"2026-11-24 21:30"}`, false},
	{`{"ts":1}`, false},
	{`{"ts":"2026-11-24T21:30:00Z","fw":"` + strings.Repeat("x", 257) + `"}`, false},
	{`{"ts":"2026-11-24T21:30:00Z","x":tru}`, false},
	{"{\"ts\":\"2026-11-24T21:30:00Z\",\"fw\":\"a\x01\"}", false},
	{`{"ts":"2026-11-24T21:30:00Z","x":"` + strings.Repeat("x", MaxPayload) + `"}`, false},
}

// healthExample is the protocol's example report, testdata/health.json.
func healthExample(tb testing.TB) []byte {
	tb.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", "health.json"))
	if err != nil {
		tb.Fatal(err)
	}
	return b
}

// TestHealthKeys: the fast path knows every field of Health. One it did
// not know would be skipped as unknown, and the report accepted without it.
func TestHealthKeys(t *testing.T) {
	var tags []string
	ht := reflect.TypeFor[Health]()
	for i := range ht.NumField() {
		name, _, _ := strings.Cut(ht.Field(i).Tag.Get("json"), ",")
		tags = append(tags, name)
	}
	if !slices.Equal(tags, healthKeys[:]) {
		t.Fatalf("Health's JSON keys are %v, the fast path's %v", tags, healthKeys)
	}
}

func TestDecodeHealthFastPath(t *testing.T) {
	if fastHealth(healthExample(t)) == nil {
		t.Error("fast path declined the protocol's example")
	}
	checkSameAsDecode(t, healthExample(t))
	for _, c := range healthCorpus {
		got := fastHealth([]byte(c.payload)) != nil
		if got != c.fast {
			t.Errorf("fast path took %.60q: %v, want %v", c.payload, got, c.fast)
		}
		checkSameAsDecode(t, []byte(c.payload))
	}
}

// checkSameAsDecode fails unless DecodeHealth and Decode agree on b: equal
// values (nil and empty slices told apart), or the same error.
func checkSameAsDecode(t *testing.T, b []byte) {
	t.Helper()
	want, wantErr := Decode[Health](b)
	got, err := DecodeHealth(b)
	if (err == nil) != (wantErr == nil) || (err != nil && err.Error() != wantErr.Error()) {
		t.Fatalf("DecodeHealth(%q): error %v, Decode: %v", b, err, wantErr)
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("DecodeHealth(%q):\n got %+v\nwant %+v", b, got, want)
	}
}

// FuzzDecodeHealthFast checks the fast path against Decode on any input.
func FuzzDecodeHealthFast(f *testing.F) {
	f.Add(healthExample(f))
	for _, c := range healthCorpus {
		f.Add([]byte(c.payload))
	}
	f.Fuzz(checkSameAsDecode)
}

func BenchmarkDecodeHealth(b *testing.B) {
	payload := healthExample(b)
	b.Run("fast", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := DecodeHealth(payload); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("fast-body", func(b *testing.B) { // what ingest calls: the body to store too
		b.ReportAllocs()
		for b.Loop() {
			if _, _, err := DecodeHealthBody(payload); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("encoding-json", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := Decode[Health](payload); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkDecodeMessages decodes the other messages a locker sends, as
// the contract's examples write them: what each costs, the members' parse
// that reads names exactly (exactNames) included.
func BenchmarkDecodeMessages(b *testing.B) {
	const ts = `"ts":"2026-11-24T21:30:00.123Z"`
	for _, c := range []struct {
		name    string
		payload string
		decode  func([]byte) error
	}{
		{"event", `{"id":"e-8f2c","` + ts[1:] + `,"type":"door_closed","compartment":7,"occupied":false}`,
			func(p []byte) error { _, _, err := DecodeBody[Event](p); return err }},
		{"result", `{"id":"c-01J","status":"failed","error":"door_jammed",` + ts + `}`,
			func(p []byte) error { _, err := Decode[CommandResult](p); return err }},
		{"birth", `{"online":true,` + ts + `,"fw":"1.4.2","model":"LX-24","boot_id":"b-1"}`,
			func(p []byte) error { _, err := Decode[Presence](p); return err }},
		{"ack", `{"version":42}`, func(p []byte) error { _, err := Decode[CredsAck](p); return err }},
	} {
		b.Run(c.name, func(b *testing.B) {
			b.ReportAllocs()
			p := []byte(c.payload)
			for b.Loop() {
				if err := c.decode(p); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// TestFastHealthTSAsWritten: the fast path keeps a report's body as sent
// when its own top-level ts is written as FormatTime writes it, and
// rewrites it (utcTS) otherwise, whatever a nested member holds (a nested
// "ts" in the wire format once passed for the top-level one).
func TestFastHealthTSAsWritten(t *testing.T) {
	for _, c := range []struct{ in, want string }{
		{`{"ts":"2026-11-24T21:30:00.123Z","seq":1}`, `{"ts":"2026-11-24T21:30:00.123Z","seq":1}`},
		{`{"ts":"2026-11-24T22:30:00.123+01:00","seq":1,"x":{"ts":"2026-11-24T21:30:00.123Z"}}`,
			`{"ts":"2026-11-24T21:30:00.123Z","seq":1,"x":{"ts":"2026-11-24T21:30:00.123Z"}}`},
	} {
		h := fastHealth([]byte(c.in))
		if h == nil {
			t.Fatalf("%s: not on the fast path", c.in)
		}
		if _, body, err := DecodeHealthBody([]byte(c.in)); err != nil || string(body) != c.want {
			t.Errorf("DecodeHealthBody(%s) = %s, %v; want %s", c.in, body, err, c.want)
		}
	}
	if h := fastHealth([]byte(`{"ts":"2026-11-24T21:30:00.123Z","seq":1}`)); h == nil || !h.tsAsWritten {
		t.Fatal("a report in the wire format not taken as written")
	}
}
