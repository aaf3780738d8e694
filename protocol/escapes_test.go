package protocol

import (
	"errors"
	"strings"
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

// TestEventNamesDifferingInCase: an event with two names that differ only
// in letter case is invalid (which one was applied would not be what the
// stored body shows); one name in another case is read, and the same name
// twice is the last, as before. Other payloads are not asked.
func TestEventNamesDifferingInCase(t *testing.T) {
	for body, want := range map[string]string{
		`"type":"door_closed","compartment":3,"occupied":true,"Compartment":4`: `fields "Compartment" and "compartment" differ only in letter case`,
		`"type":"door_closed","Compartment":3,"occupied":true`:                 "",
		`"type":"door_closed","compartment":3,"occupied":true,"compartment":4`: "",
		`"type":"tamper","detail":"x","DETAIL":"y"`:                            `fields "DETAIL" and "detail" differ only in letter case`,
		`"type":"tamper","detail":"x","note":{"a":1,"A":2}`:                    "", // unknown, nested: not read
		`"type":"tamper","detail":"x","vendor":1,"Vendor":2`:                   "", // unknown: ignored
		`"type":"power","source":"battery","ſource":"mains"`:                   `fields "source" and "ſource" differ only in letter case`,
		`"type":"tamper","detail":"x","detaİl":"y"`:                            "", // İ folds to no i: another name`
	} {
		e, err := Decode[Event]([]byte(`{"id":"e-1","ts":"2026-12-04T12:00:00Z",` + body + `}`))
		switch {
		case want == "" && err != nil:
			t.Errorf("%s: %v", body, err)
		case want != "" && (err == nil || !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), want)):
			t.Errorf("%s: %v, want invalid: %s", body, err, want)
		case want == "" && e.Type == EventDoorClosed && e.Compartment == 0:
			t.Errorf("%s: compartment not read", body)
		}
	}
	if _, err := Decode[Health]([]byte(`{"seq":1,"ts":"2026-12-04T12:00:00Z","uptime_s":5,"Seq":2}`)); err != nil {
		t.Errorf("health with a name in two cases: %v, want read (not asked)", err)
	}
}
