package protocol

import (
	"errors"
	"reflect"
	"strconv"
	"testing"
)

// TestUnstorableTextInvalid: a NUL character or an unpaired surrogate,
// escaped in any string of a payload (an unknown field's too), makes it
// invalid: PostgreSQL could store neither, and a payload that fails every
// write would hold up the messages behind it. Text that only looks like
// one (an escaped backslash), and surrogate pairs, are fine.
func TestUnstorableTextInvalid(t *testing.T) {
	const head = `{"id":"e-1","ts":"2026-12-04T12:00:00Z","type":"tamper","detail":`
	for body, ok := range map[string]bool{
		`"ok"}`:                            true,
		`"caf\u00e9"}`:                     true,
		`"\ud83d\ude00 smile"}`:            true,
		`"\\u0000 is how NUL is written"}`: true,
		`"x\\\\"}`:                         true,
		`"a\u0000b"}`:                      false,
		`"ok","vendor":"\u0000"}`:          false,
		`"ok","\u0000":1}`:                 false,
		`"\ud800"}`:                        false,
		`"\udc00\ud800"}`:                  false,
		`"\uD83D x"}`:                      false,
		`"\ud83d\u0041"}`:                  false,
		`"\\\u0000"}`:                      false,
	} {
		_, err := Decode[Event]([]byte(head + body))
		if ok && err != nil {
			t.Errorf("%s: %v, want accepted", body, err)
		}
		if !ok && !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: %v, want ErrInvalid", body, err)
		}
	}
}

// TestEventCompartmentBounds: compartment numbers past what is stored (an
// int4) are invalid, in compartment and in compartments.
func TestEventCompartmentBounds(t *testing.T) {
	for body, ok := range map[string]bool{
		`"type":"door_opened","compartment":2147483647`:                       true,
		`"type":"door_opened","compartment":2147483648`:                       false,
		`"type":"door_opened","compartment":-1`:                               false,
		`"type":"code_accepted","credential":"k","compartments":[3]`:          true,
		`"type":"code_accepted","credential":"k","compartments":[3000000000]`: false,
		`"type":"code_accepted","credential":"k","compartments":[0]`:          false,
	} {
		_, err := Decode[Event]([]byte(`{"id":"e-1","ts":"2026-12-04T12:00:00Z",` + body + `}`))
		if ok != (err == nil) {
			t.Errorf("%s: %v, want ok %v", body, err, ok)
		}
	}
}

// TestNamesDifferingInCase: JSON names are case-sensitive, so a member
// whose name matches a field only in another letter case is an unknown
// field, ignored as the contract ignores them: it neither overrides the
// field nor stands in for a missing one, at the top level or in a nested
// object, in every payload. The same name twice is the last, as always.
func TestNamesDifferingInCase(t *testing.T) {
	for body, want := range map[string]string{
		`"type":"door_closed","compartment":3,"occupied":true,"Compartment":4`:    "3",
		`"type":"door_closed","Compartment":3,"occupied":true`:                    "invalid",
		`"type":"door_closed","compartment":3,"occupied":true,"compartment":4`:    "4",
		`"type":"door_closed","compartment":3,"occupied":true,"COMPARTMENT":"A1"`: "3",
		`"type":"tamper","detail":"x","DETAIL":"y"`:                               "x",
		`"type":"tamper","detail":"x","note":{"a":1,"A":2}`:                       "x", // unknown, nested: not read
		`"type":"tamper","detail":"x","vendor":1,"Vendor":2`:                      "x",
		`"type":"tamper","detail":"x","Type":"vendor-subtype","ID":17`:            "x",
		`"type":"tamper","detail":"x","TS":"07/12/2026 09:00"`:                    "x",
		`"type":"power","source":"battery","ſource":"mains"`:                      "battery",
		`"type":"tamper","detail":"x","detaİl":"y"`:                               "x", // İ folds to no i: another name
	} {
		e, err := Decode[Event]([]byte(`{"id":"e-1","ts":"2026-12-04T12:00:00Z",` + body + `}`))
		if want == "invalid" {
			if !errors.Is(err, ErrInvalid) {
				t.Errorf("%s: %v, want invalid", body, err)
			}
			continue
		}
		if err != nil {
			t.Errorf("%s: %v", body, err)
			continue
		}
		if got := map[string]string{EventDoorClosed: strconv.Itoa(e.Compartment), EventTamper: e.Detail, EventPower: e.Source}[e.Type]; got != want || e.ID != "e-1" {
			t.Errorf("%s: read %q (id %s), want %q", body, got, e.ID, want)
		}
	}
	const ts = `"ts":"2026-12-04T12:00:00Z"`
	if r, err := Decode[CommandResult]([]byte(`{"id":"c-1","status":"failed","error":"door_jammed",` + ts + `,"Status":"ok"}`)); err != nil || r.Status != StatusFailed {
		t.Errorf("a result with Status beside status: %+v %v, want failed", r, err)
	}
	if r, err := Decode[CommandResult]([]byte(`{"id":"c-1","status":"ok",` + ts + `,"Status":"LATCH_OPEN"}`)); err != nil || r.Status != StatusOK {
		t.Errorf("a result with an unknown Status: %+v %v, want ok", r, err)
	}
	if s, err := Decode[FwStatus]([]byte(`{"job":"j-1","state":"failed","error":"checksum",` + ts + `,"State":"verifying"}`)); err != nil || s.State != "failed" {
		t.Errorf("fw/status with State beside state: %+v %v, want failed", s, err)
	}
	if a, err := Decode[CredsAck]([]byte(`{"version":0,"Version":7}`)); err != nil || a.Version != 0 {
		t.Errorf("an ack with Version beside version: %+v %v, want 0", a, err)
	}
	if _, err := Decode[CredsAck]([]byte(`{"Version":7}`)); !errors.Is(err, ErrInvalid) {
		t.Errorf("an ack with Version alone: %v, want invalid (version is required)", err)
	}
	if h, _, err := DecodeHealthBody([]byte(`{"seq":1,` + ts + `,"uptime_s":5,"Seq":2,"Power":"solar"}`)); err != nil || h.Seq != 1 || h.Power != "" {
		t.Errorf("health with Seq and Power: %+v %v, want seq 1, no power", h, err)
	}
	req := `{"serial":"SN-1","model":"LX","fw":"1.0.0","compartments":[{"n":1,"size":"S","zone":"ambient","Size":"XL","ZONE":1}]}`
	if r, err := Decode[ProvisionRequest]([]byte(req)); err != nil || len(r.Compartments) != 1 || r.Compartments[0].Size != "S" || r.Compartments[0].Zone != "ambient" {
		t.Errorf("a provisioning request with Size beside size in a compartment: %+v %v, want S, ambient", r, err)
	}
}

// TestKeyMayFold: the cheap check before exactNames' parse flags every
// payload with a member name that could fold to a field's without being
// it (at any depth, after spaces, escaped) and passes plain ones, whatever
// their values hold; a payload it passes has nothing for exactNames to
// remove.
func TestKeyMayFold(t *testing.T) {
	for payload, want := range map[string]bool{
		`{"id":"e-1","ts":"2026-12-04T12:00:00Z","type":"tamper","detail":"LID FORCED"}`: false,
		`{"status":"failed","error":"door_jammed","Status":"ok"}`:                        true,
		`{"seq":1,"x":{"Seq":2}}`:                  true,
		`{"seq":1,"Seq" :2}`:                       true,
		`{"ſource":"mains"}`:                       true,
		`{"t\u0073":"x"}`:                          true,
		`{"detail":"say \"Hi\": now","n":[1,"A"]}`: false,
		`{"detail":"é"}`:                           false,
		`["A":1]`:                                  true, // not an object: decoding says so
	} {
		if got := keyMayFold([]byte(payload)); got != want {
			t.Errorf("%s: %v, want %v", payload, got, want)
		}
		if !keyMayFold([]byte(payload)) {
			if _, changed := withoutCaseVariants([]byte(payload), reflect.TypeFor[Event](), true); changed {
				t.Errorf("%s: passed, but exactNames removes a member", payload)
			}
		}
	}
}

// FuzzKeyMayFold: for any input, a payload keyMayFold passes has no
// member that exactNames would remove, for any of the messages lockers
// send.
func FuzzKeyMayFold(f *testing.F) {
	for _, s := range []string{`{"status":"ok","Status":"failed"}`, `{"a":{"Seq":1}}`, `{"t\u0073":1}`, `{"x":"\"Y\":"}`, `{"compartments":[{"Size":"S"}]}`} {
		f.Add([]byte(s))
	}
	types := []reflect.Type{reflect.TypeFor[Event](), reflect.TypeFor[Health](), reflect.TypeFor[CommandResult](),
		reflect.TypeFor[CredsAck](), reflect.TypeFor[Presence](), reflect.TypeFor[FwStatus](), reflect.TypeFor[ProvisionRequest]()}
	f.Fuzz(func(t *testing.T, b []byte) {
		if keyMayFold(b) {
			return
		}
		for _, typ := range types {
			if out, changed := withoutCaseVariants(b, typ, true); changed {
				t.Fatalf("%q passed the check, but %s's exact names make it %s", b, typ, out)
			}
		}
	})
}

// TestForeignEventFields: a field of another event type is an unknown
// field for this one, ignored whatever it holds: of a type the field
// cannot hold, or a value the type's checks refuse, it is left out; a
// value they pass is kept (a tamper's compartment, for its alert).
func TestForeignEventFields(t *testing.T) {
	const head = `{"id":"e-1","ts":"2026-12-04T12:00:00Z",`
	for body, want := range map[string]Event{
		`"type":"tamper","detail":"door forced","compartment":"left"}`:             {Type: EventTamper, Detail: "door forced"},
		`"type":"tamper","detail":"x","compartment":3,"occupied":"maybe"}`:         {Type: EventTamper, Detail: "x", Compartment: 3},
		`"type":"code_rejected","reason":"unknown","compartments":["A"]}`:          {Type: EventCodeRejected, Reason: RejectUnknown},
		`"type":"code_accepted","credential":"k-1","compartments":[1],"reason":5}`: {Type: EventCodeAccepted, Credential: "k-1", Compartments: []int{1}},
		`"type":"reboot","reason":"watchdog","compartment":-4,"open_s":-1}`:        {Type: EventReboot, Reason: "watchdog"},
		// With a whole number written as a float, in either order.
		`"type":"door_ajar","compartment":3.0,"open_s":7,"occupied":"x"}`:                 {Type: EventDoorAjar, Compartment: 3, OpenS: 7},
		`"type":"door_ajar","occupied":"x","compartment":3.0,"open_s":7}`:                 {Type: EventDoorAjar, Compartment: 3, OpenS: 7},
		`"type":"code_accepted","credential":"k","compartments":[3.0],"compartment":"x"}`: {Type: EventCodeAccepted, Credential: "k", Compartments: []int{3}},
		`"type":"door_closed","compartment":7.0,"occupied":true,"credential":5}`:          {Type: EventDoorClosed, Compartment: 7, Occupied: ptrTo(true)},
	} {
		e, err := Decode[Event]([]byte(head + body))
		if err != nil {
			t.Errorf("%s: %v", body, err)
			continue
		}
		want.ID, want.TS = "e-1", e.TS
		if !reflect.DeepEqual(*e, want) {
			t.Errorf("%s: %+v, want %+v", body, *e, want)
		}
	}
	// Its own fields are checked as before.
	for _, body := range []string{
		`"type":"door_closed","compartment":"left","occupied":true}`,
		`"type":"code_accepted","credential":"k-1","compartments":["A"]}`,
		`"type":"door_ajar","compartment":2,"open_s":-1}`,
	} {
		if _, err := Decode[Event]([]byte(head + body)); !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: %v, want invalid", body, err)
		}
	}
}

func ptrTo[T any](v T) *T { return &v }
