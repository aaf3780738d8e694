package protocol

import (
	"bytes"
	"slices"
	"strconv"
	"strings"
	"unsafe"
)

// DecodeHealth is Decode[Health]: the same result and the same errors for
// every input. Health is most of what a fleet sends, so the common shape of
// it is parsed here without reflection; anything else (unknown, repeated or
// differently cased keys, escapes, non-ASCII text, null, numbers Go's own
// parser might read differently, and every error) goes to Decode.
func DecodeHealth(payload []byte) (*Health, error) {
	h, _, err := DecodeHealthBody(payload)
	return h, err
}

// DecodeHealthBody is DecodeHealth that also returns the payload as read
// (DecodeBody): payload itself on the fast path, which takes integers
// written as integers only.
func DecodeHealthBody(payload []byte) (*Health, []byte, error) {
	if h := fastHealth(payload); h != nil {
		// Its ts as the wire format writes it, as lockers do: stored as
		// sent. Another spelling goes through utcTS (DecodeBody's).
		if !h.tsAsWritten {
			payload = utcTS(payload)
		}
		return &h.Health, payload, nil
	}
	return DecodeBody[Health](payload)
}

// fastReport is a report fastHealth decoded, with whether its top-level
// ts is written as FormatTime writes it (the common case, which needs no
// rewrite: utcTS).
type fastReport struct {
	Health
	tsAsWritten bool
}

// healthBox holds a report and what its pointer fields point at, so that a
// decoded report is one allocation.
type healthBox struct {
	h                   fastReport
	temp                float64
	battery, rssi, free int
}

// Health fields, as bits of a set.
const (
	hfTS = 1 << iota
	hfSeq
	hfFW
	hfUptime
	hfTemp
	hfPower
	hfBattery
	hfRSSI
	hfFree
	hfFaults
)

// healthKeys are Health's JSON keys.
var healthKeys = [...]string{"ts", "seq", "fw", "uptime_s", "temp_c", "power",
	"battery_pct", "rssi_dbm", "free_compartments", "door_faults"}

// fastHealth returns the decoded, valid report, or nil if payload is
// anything but plain valid JSON of known fields: the caller then asks Decode,
// whose answer is authoritative.
func fastHealth(payload []byte) *fastReport {
	if len(payload) > MaxPayload {
		return nil
	}
	p := scanner{b: payload}
	p.ws()
	if !p.eat('{') {
		return nil
	}
	box := new(healthBox)
	h := &box.h
	seen := 0
	ok := p.object(func(key []byte) bool {
		var bit int
		var ok bool
		switch string(key) {
		case "ts":
			bit, ok = hfTS, p.timeWritten(&h.TS, &h.tsAsWritten)
		case "seq":
			bit, ok = hfSeq, p.int64To(&h.Seq)
		case "fw":
			bit, ok = hfFW, p.strTo(&h.FW)
		case "uptime_s":
			bit, ok = hfUptime, p.int64To(&h.UptimeS)
		case "temp_c":
			bit, ok = hfTemp, p.floatTo(&box.temp)
			h.TempC = &box.temp
		case "power":
			bit, ok = hfPower, p.power(&h.Power)
		case "battery_pct":
			bit, ok = hfBattery, p.intTo(&box.battery)
			h.BatteryPct = &box.battery
		case "rssi_dbm":
			bit, ok = hfRSSI, p.intTo(&box.rssi)
			h.RSSIdBm = &box.rssi
		case "free_compartments":
			bit, ok = hfFree, p.intTo(&box.free)
			h.FreeCompartments = &box.free
		case "door_faults":
			bit = hfFaults
			h.DoorFaults, ok = p.ints()
		default:
			// A field's name in another case is an unknown field that
			// Decode leaves out (exactNames): it is asked.
			ok = !slices.ContainsFunc(healthKeys[:], func(k string) bool { return strings.EqualFold(string(key), k) }) &&
				p.skip(0)
		}
		if !ok || seen&bit != 0 {
			return false // a repeated key too: Decode knows which one wins
		}
		seen |= bit
		return true
	})
	if !ok {
		return nil
	}
	p.ws()
	if p.i != len(p.b) {
		return nil
	}
	if h.Validate() != nil {
		return nil
	}
	return h
}

// scanner reads the plain subset of JSON fastHealth accepts; each method
// reports false for anything outside it, valid JSON or not.
type scanner struct {
	b []byte
	i int
}

func (p *scanner) ws() {
	for p.i < len(p.b) {
		switch p.b[p.i] {
		case ' ', '\t', '\r', '\n':
			p.i++
		default:
			return
		}
	}
}

func (p *scanner) eat(c byte) bool {
	if p.i < len(p.b) && p.b[p.i] == c {
		p.i++
		return true
	}
	return false
}

// str reads a string of printable ASCII without escapes and returns its
// contents, which alias the input.
func (p *scanner) str() ([]byte, bool) {
	if !p.eat('"') {
		return nil, false
	}
	start := p.i
	for p.i < len(p.b) {
		c := p.b[p.i]
		switch {
		case c == '"':
			s := p.b[start:p.i]
			p.i++
			return s, true
		case c < 0x20 || c >= 0x80 || c == '\\':
			return nil, false
		}
		p.i++
	}
	return nil, false
}

func (p *scanner) strTo(dst *string) bool {
	s, ok := p.str()
	*dst = string(s)
	return ok
}

// timeWritten reads a timestamp as Time.UnmarshalJSON does, and reports
// in written whether it is written as FormatTime writes it.
func (p *scanner) timeWritten(dst *Time, written *bool) bool {
	s, ok := p.str()
	if !ok {
		return false
	}
	// ParseTime keeps no part of its argument but in an error, which is
	// dropped here.
	t, err := ParseTime(unsafe.String(unsafe.SliceData(s), len(s)))
	dst.Time = t
	if err == nil {
		var b [len(TimeLayout)]byte // longer than any UTC time it writes
		*written = bytes.Equal(t.UTC().AppendFormat(b[:0], TimeLayout), s)
	}
	return err == nil
}

// power reads one of the two valid power sources, without allocating.
func (p *scanner) power(dst *string) bool {
	s, ok := p.str()
	switch {
	case ok && string(s) == PowerMains:
		*dst = PowerMains
	case ok && string(s) == PowerBattery:
		*dst = PowerBattery
	default:
		return false // invalid: Decode says why
	}
	return true
}

func (p *scanner) int64To(dst *int64) bool {
	n, ok := p.int()
	*dst = n
	return ok
}

// intTo reads an integer into a Go int, which encoding/json refuses (and
// so declines here) when it does not fit: on 32-bit platforms.
func (p *scanner) intTo(dst *int) bool {
	n, ok := p.int()
	*dst = int(n)
	return ok && int64(*dst) == n
}

func (p *scanner) floatTo(dst *float64) bool {
	f, ok := p.float()
	*dst = f
	return ok
}

// int reads an integer of at most 18 digits (so it cannot overflow) in
// JSON's grammar: an optional minus, no leading zeros, no fraction or
// exponent.
func (p *scanner) int() (int64, bool) {
	neg := p.eat('-')
	start := p.i
	var n int64
	for p.i < len(p.b) && p.b[p.i] >= '0' && p.b[p.i] <= '9' {
		n = n*10 + int64(p.b[p.i]-'0')
		p.i++
	}
	digits := p.i - start
	if digits == 0 || digits > 18 || (digits > 1 && p.b[start] == '0') {
		return 0, false
	}
	if p.i < len(p.b) {
		switch p.b[p.i] {
		case '.', 'e', 'E':
			return 0, false
		}
	}
	if neg {
		n = -n
	}
	return n, true
}

// float reads a number in JSON's grammar and parses it as encoding/json
// does, with strconv.ParseFloat.
func (p *scanner) float() (float64, bool) {
	start := p.i
	p.eat('-')
	if !p.digits(true) {
		return 0, false
	}
	if p.eat('.') && !p.digits(false) {
		return 0, false
	}
	if p.eat('e') || p.eat('E') {
		if !p.eat('+') {
			p.eat('-')
		}
		if !p.digits(false) {
			return 0, false
		}
	}
	lit := p.b[start:p.i]
	f, err := strconv.ParseFloat(unsafe.String(unsafe.SliceData(lit), len(lit)), 64)
	return f, err == nil
}

// digits reads one or more digits; with integer, JSON's integer part (no
// leading zeros).
func (p *scanner) digits(integer bool) bool {
	start := p.i
	for p.i < len(p.b) && p.b[p.i] >= '0' && p.b[p.i] <= '9' {
		p.i++
	}
	n := p.i - start
	return n > 0 && !(integer && n > 1 && p.b[start] == '0')
}

// ints reads an array of integers; "[]" is an empty, non-nil slice, as
// encoding/json decodes it.
func (p *scanner) ints() ([]int, bool) {
	out := []int{}
	ok := p.eat('[') && p.elements(']', func() bool {
		var n int
		ok := p.intTo(&n)
		out = append(out, n)
		return ok
	})
	return out, ok
}

// elements reads the rest of an array or object whose opening bracket was
// read: elements, each read by elem, separated by commas, up to close.
func (p *scanner) elements(close byte, elem func() bool) bool {
	p.ws()
	if p.eat(close) {
		return true
	}
	for {
		if !elem() {
			return false
		}
		p.ws()
		if p.eat(close) {
			return true
		}
		if !p.eat(',') {
			return false
		}
		p.ws()
	}
}

// object reads the rest of an object whose '{' was read; value reads the
// value of each key.
func (p *scanner) object(value func(key []byte) bool) bool {
	return p.elements('}', func() bool {
		key, ok := p.str()
		if !ok {
			return false
		}
		p.ws()
		if !p.eat(':') {
			return false
		}
		p.ws()
		return value(key)
	})
}

// maxSkipDepth bounds the nesting of an unknown field's value that skip
// reads; deeper values go to Decode.
const maxSkipDepth = 16

// skip reads and discards one value of the plain subset: a string, a
// number, true, false, null, or an array or object of those.
func (p *scanner) skip(depth int) bool {
	if p.i >= len(p.b) || depth > maxSkipDepth {
		return false
	}
	switch c := p.b[p.i]; {
	case c == '"':
		_, ok := p.str()
		return ok
	case c == '-' || (c >= '0' && c <= '9'):
		_, ok := p.float()
		return ok
	case c == 't':
		return p.word("true")
	case c == 'f':
		return p.word("false")
	case c == 'n':
		return p.word("null")
	case c == '[':
		p.i++
		return p.elements(']', func() bool { return p.skip(depth + 1) })
	case c == '{':
		p.i++
		return p.object(func([]byte) bool { return p.skip(depth + 1) })
	}
	return false
}

func (p *scanner) word(w string) bool {
	if len(p.b)-p.i >= len(w) && string(p.b[p.i:p.i+len(w)]) == w {
		p.i += len(w)
		return true
	}
	return false
}
