package protocol

import (
	"errors"
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
