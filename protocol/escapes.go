package protocol

import (
	"bytes"
	"errors"
)

// CheckEscapes refuses a JSON text whose strings (values or keys, known
// fields or not) hold a NUL character (\u0000) or a UTF-16 surrogate escape
// that is not half of a pair (\ud800 alone). Both are valid JSON, but
// PostgreSQL stores neither (text columns refuse NUL, jsonb both), so a
// payload with one would fail every time it is written: it is invalid here,
// counted and dropped, instead of holding up the messages queued behind it
// (and an HTTP body with one is a 400, not a 500). Raw NUL bytes and
// invalid UTF-8 are malformed already.
func CheckEscapes(b []byte) error {
	if bytes.IndexByte(b, '\\') < 0 {
		return nil
	}
	for i := 0; i < len(b); i++ {
		if b[i] != '\\' {
			continue
		}
		if i+1 < len(b) && b[i+1] != 'u' {
			i++ // an escaped character, a backslash included
			continue
		}
		r := hex4(b, i+2)
		switch {
		case r < 0:
			return nil // a syntax error, which the decoder reports
		case r == 0:
			return errors.New(`a string holds a NUL character (\u0000)`)
		case r >= 0xdc00 && r < 0xe000:
			return errors.New("a string holds an unpaired UTF-16 surrogate escape")
		case r >= 0xd800 && r < 0xdc00:
			if i+7 >= len(b) || b[i+6] != '\\' || b[i+7] != 'u' {
				return errors.New("a string holds an unpaired UTF-16 surrogate escape")
			}
			if lo := hex4(b, i+8); lo < 0xdc00 || lo >= 0xe000 {
				return errors.New("a string holds an unpaired UTF-16 surrogate escape")
			}
			i += 6 // the low half
		}
		i += 5
	}
	return nil
}

// hex4 is the value of the four hex digits of b at i, or -1.
func hex4(b []byte, i int) int {
	if i+4 > len(b) {
		return -1
	}
	v := 0
	for _, c := range b[i : i+4] {
		switch {
		case c >= '0' && c <= '9':
			c -= '0'
		case c >= 'a' && c <= 'f':
			c -= 'a' - 10
		case c >= 'A' && c <= 'F':
			c -= 'A' - 10
		default:
			return -1
		}
		v = v<<4 | int(c)
	}
	return v
}
