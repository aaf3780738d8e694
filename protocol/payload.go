package protocol

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"math/big"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode"
	"unicode/utf8"
)

// MaxPayload is the largest payload either side may send (16 KiB).
const MaxPayload = 16 * 1024

// TimeLayout is the wire format of timestamps: RFC 3339, UTC, milliseconds.
const TimeLayout = "2006-01-02T15:04:05.000Z07:00"

// FormatTime renders t in the wire format.
func FormatTime(t time.Time) string { return t.UTC().Format(TimeLayout) }

// ParseTime parses an RFC 3339 timestamp (any offset, any number of fractional
// digits) and returns it in UTC truncated to milliseconds, the wire precision,
// so that a parsed time survives FormatTime and ParseTime unchanged.
//
// It also takes the near misses that common libraries write for a UTC time
// (Python's isoformat() of a naive UTC datetime, str(datetime), strftime's
// %z): no offset, taken as UTC (the contract's timestamps are all UTC); a
// space or a lower-case t between date and time; a lower-case z; an offset
// without its colon (+0100). A device's event is not lost for its form.
func ParseTime(s string) (time.Time, error) {
	// time.Parse also takes a comma before the fraction and offsets of 24h or
	// more; RFC 3339 allows neither.
	if strings.IndexByte(s, ',') >= 0 {
		return time.Time{}, fmt.Errorf("timestamp %q: not RFC 3339", s)
	}
	v, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		if v, err = parseNearRFC3339(s); err != nil {
			return time.Time{}, fmt.Errorf("timestamp %q: not RFC 3339", s)
		}
	}
	if _, off := v.Zone(); off <= -24*3600 || off >= 24*3600 {
		return time.Time{}, fmt.Errorf("timestamp %q: offset out of range", s)
	}
	v = v.UTC().Truncate(time.Millisecond)
	// An offset can carry 0000-01-01 or 9999-12-31 outside the 4-digit years
	// FormatTime can write back.
	if y := v.Year(); y < 0 || y > 9999 {
		return time.Time{}, fmt.Errorf("timestamp %q: year out of range in UTC", s)
	}
	return v, nil
}

// parseNearRFC3339 parses s as ParseTime's near misses of RFC 3339: the
// date and time separated by a space or a lower-case t, a lower-case z, an
// offset of four digits without a colon, or none (UTC).
func parseNearRFC3339(s string) (time.Time, error) {
	if len(s) < len("2006-01-02T15:04:05") {
		return time.Time{}, errors.New("too short")
	}
	b := []byte(s)
	if b[10] == ' ' || b[10] == 't' {
		b[10] = 'T'
	}
	switch n := len(b); {
	case b[n-1] == 'z':
		b[n-1] = 'Z'
	case n >= 24 && (b[n-5] == '+' || b[n-5] == '-') && isDigits(b[n-4:]):
		b = append(b[:n-2:n-2], ':', b[n-2], b[n-1]) // +0100 → +01:00
	}
	if v, err := time.Parse(time.RFC3339Nano, string(b)); err == nil {
		return v, nil
	}
	// No offset: UTC. The layout's fraction is optional.
	return time.ParseInLocation("2006-01-02T15:04:05.999999999", string(b), time.UTC)
}

func isDigits(b []byte) bool {
	for _, c := range b {
		if c < '0' || c > '9' {
			return false
		}
	}
	return true
}

// Time is a timestamp that marshals in the wire format and accepts any RFC 3339
// time (see ParseTime); JSON null is the zero Time.
type Time struct{ time.Time }

// Now returns the current time truncated to milliseconds.
func Now() Time { return Time{time.Now().UTC().Truncate(time.Millisecond)} }

// T wraps t.
func T(t time.Time) Time { return Time{t.UTC()} }

// MarshalJSON implements json.Marshaler.
func (t Time) MarshalJSON() ([]byte, error) {
	if t.IsZero() {
		return []byte(`null`), nil
	}
	return []byte(`"` + FormatTime(t.Time) + `"`), nil
}

// UnmarshalJSON implements json.Unmarshaler.
func (t *Time) UnmarshalJSON(b []byte) error {
	if string(b) == "null" {
		t.Time = time.Time{}
		return nil
	}
	if len(b) == 0 || b[0] != '"' {
		return fmt.Errorf("timestamp %.20s: want an RFC 3339 string", b)
	}
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("timestamp: %w", err)
	}
	v, err := ParseTime(s)
	if err != nil {
		return err
	}
	t.Time = v
	return nil
}

// Errors returned by Decode; wrapped with detail. Reason maps them to metric labels.
var (
	ErrTooLarge  = errors.New("payload over 16 KiB")
	ErrMalformed = errors.New("malformed JSON")
	ErrInvalid   = errors.New("invalid payload")
)

// Reason returns a short, bounded label for a decode error ("too_large",
// "malformed", "invalid").
func Reason(err error) string {
	switch {
	case errors.Is(err, ErrTooLarge):
		return "too_large"
	case errors.Is(err, ErrMalformed):
		return "malformed"
	default:
		return "invalid"
	}
}

// Validator is implemented by every payload type.
type Validator interface{ Validate() error }

// Decode parses a payload into v and validates it. Unknown fields are ignored;
// oversize payloads are ErrTooLarge; invalid UTF-8, anything but one JSON object
// and trailing data are ErrMalformed; known fields of the wrong type, bad
// timestamps and failed validation are ErrInvalid.
func Decode[T any, PT interface {
	*T
	Validator
}](payload []byte) (*T, error) {
	v, _, err := decodeBody[T, PT](payload)
	return v, err
}

// DecodeBody is Decode that also returns the payload as it was read: the
// payload itself, or, when a whole number written as a float (7.0, 8.64e4)
// stood where an integer is expected, a copy with those numbers written as
// integers, and a top-level ts not written as RFC 3339 UTC written so
// (utcTS). Whoever stores or forwards the payload keeps that body, so
// everything that reads it later reads integers and UTC times.
func DecodeBody[T any, PT interface {
	*T
	Validator
}](payload []byte) (*T, []byte, error) {
	v, body, err := decodeBody[T, PT](payload)
	if err != nil {
		return nil, nil, err
	}
	return v, utcTS(body), nil
}

// decodeBody is DecodeBody without utcTS: what Decode, which keeps no
// body, needs.
func decodeBody[T any, PT interface {
	*T
	Validator
}](payload []byte) (*T, []byte, error) {
	if len(payload) > MaxPayload {
		return nil, nil, fmt.Errorf("%w: %d bytes", ErrTooLarge, len(payload))
	}
	if !utf8.Valid(payload) {
		return nil, nil, fmt.Errorf("%w: not UTF-8", ErrMalformed)
	}
	if err := CheckEscapes(payload); err != nil {
		return nil, nil, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	trimmed := bytes.TrimLeft(payload, " \t\r\n")
	if len(trimmed) == 0 || trimmed[0] != '{' {
		return nil, nil, fmt.Errorf("%w: not a JSON object", ErrMalformed)
	}
	v := new(T)
	// Unmarshal checks the syntax of the whole payload, trailing data
	// included, before it decodes anything, so a SyntaxError is the only
	// error about the JSON itself; the rest are about the values.
	decode := func(p []byte) error {
		err := json.Unmarshal(exactNames[T](p), v)
		if f, ok := any(v).(foreignFields); ok && err != nil {
			err = decodeIgnoringForeign(p, v, f, err)
		}
		return err
	}
	err := decode(payload)
	if err != nil {
		var se *json.SyntaxError
		if errors.As(err, &se) {
			return nil, nil, fmt.Errorf("%w: %v", ErrMalformed, err)
		}
		// A whole number written as a float (7.0, 7e0: what a JSON library
		// writes for a float that holds one) where an integer is expected
		// is taken as that integer; 7.5 is not.
		var te *json.UnmarshalTypeError
		if errors.As(err, &te) && strings.HasPrefix(te.Value, "number") {
			if whole, ok := wholeNumbers(payload); ok {
				v, payload = new(T), whole
				err = decode(payload)
			}
		}
		if err != nil {
			return nil, nil, typeError(err)
		}
	}
	if f, ok := any(v).(foreignFields); ok {
		f.dropForeign()
	}
	if err := PT(v).Validate(); err != nil {
		return nil, nil, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	return v, payload, nil
}

// foreignFields is a payload type whose fields depend on a kind it names
// (an event's type): the others are unknown fields for it, ignored
// whatever they hold.
type foreignFields interface {
	// foreign reports whether the top-level member name is not a field of
	// the kind that members (the payload's) name.
	foreign(members map[string]json.RawMessage, name string) bool
	// dropForeign clears, once decoded, the values of fields foreign to
	// its kind that its checks would refuse.
	dropForeign()
}

// decodeIgnoringForeign decodes payload into v again, without each
// top-level member of a type v cannot hold (err, the first attempt's
// error, names it) that is foreign to v's kind; it returns the error that
// stands, err when it was no such member's.
func decodeIgnoringForeign[T any](payload []byte, v *T, f foreignFields, err error) error {
	var members map[string]json.RawMessage
	if json.Unmarshal(payload, &members) != nil {
		return err
	}
	for len(members) > 0 {
		var te *json.UnmarshalTypeError
		if !errors.As(err, &te) || te.Field == "" || strings.Contains(te.Field, ".") || !f.foreign(members, te.Field) {
			return err
		}
		delete(members, te.Field)
		if payload, err = json.Marshal(members); err != nil {
			return err
		}
		*v = *new(T)
		if err = json.Unmarshal(exactNames[T](payload), v); err == nil {
			return nil
		}
	}
	return err
}

// exactNames returns payload (a JSON object, to be decoded into a T)
// without the members whose names match a field of T, or of a struct
// within it, only as encoding/json matches names: equal under Unicode
// simple case folding, but not equal ("Status" beside "status"). JSON
// names are case-sensitive, so such a member is an unknown field, which
// the contract ignores, where encoding/json would take it for the field
// (the last of the two winning). Payload itself when it has none (or does
// not parse: the decoding reports that); otherwise a copy, rewritten, that
// is only decoded. A body kept as read keeps them (unknown fields), and
// every reader of it that matches names exactly (PostgreSQL's ->>, this
// package's Decode) reads what was applied (descriptive text that Validate
// cuts is whole in the body). It costs a parse of the
// members only when keyMayFold finds a name that could fold (health's
// plain reports never get here: DecodeHealth).
func exactNames[T any](payload []byte) []byte {
	if !keyMayFold(payload) {
		return payload
	}
	out, changed := withoutCaseVariants(payload, reflect.TypeFor[T](), true)
	if !changed {
		return payload
	}
	return out
}

// keyMayFold reports whether a member name of payload (any string followed
// by a colon, at any depth) holds an upper-case ASCII letter, a non-ASCII
// byte or an escape: what a name needs to fold to a field's name (all
// lower-case ASCII) without being it. One pass, no allocation: the plain
// messages lockers send skip the members' parse.
func keyMayFold(payload []byte) bool {
	inString, suspect := false, false
	for i := 0; i < len(payload); i++ {
		c := payload[i]
		if inString {
			switch {
			case c == '\\':
				suspect = true
				i++ // the escaped byte
			case c == '"':
				inString = false
				j := i + 1
				for j < len(payload) && (payload[j] == ' ' || payload[j] == '\t' || payload[j] == '\r' || payload[j] == '\n') {
					j++
				}
				if suspect && j < len(payload) && payload[j] == ':' {
					return true
				}
			case c >= 'A' && c <= 'Z', c >= 0x80:
				suspect = true
			}
			continue
		}
		if c == '"' {
			inString, suspect = true, false
		}
	}
	return false
}

// withoutCaseVariants is exactNames for a JSON value raw read as a t: an
// object for a struct (top: whatever its own UnmarshalJSON, which reads
// the same names), a list of them for a slice or array; nested structs
// with their own UnmarshalJSON (Time) are left as they are. It reports
// whether it removed anything.
func withoutCaseVariants(raw []byte, t reflect.Type, top bool) ([]byte, bool) {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	switch t.Kind() {
	case reflect.Struct:
		if !top && reflect.PointerTo(t).Implements(reflect.TypeFor[json.Unmarshaler]()) {
			return raw, false
		}
		var members map[string]json.RawMessage
		if json.Unmarshal(raw, &members) != nil || members == nil {
			return raw, false
		}
		fs := jsonFieldsOf(t)
		changed := false
		for name, v := range members {
			if ft, ok := fs.exact[name]; ok {
				if nv, c := withoutCaseVariants(v, ft, false); c {
					members[name], changed = nv, true
				}
			} else if fs.folded[foldName(name)] {
				delete(members, name)
				changed = true
			}
		}
		return rewritten(raw, changed, members)
	case reflect.Slice, reflect.Array:
		if t.Elem().Kind() != reflect.Struct && t.Elem().Kind() != reflect.Pointer {
			return raw, false
		}
		var items []json.RawMessage
		if json.Unmarshal(raw, &items) != nil {
			return raw, false
		}
		changed := false
		for i, v := range items {
			if nv, c := withoutCaseVariants(v, t.Elem(), false); c {
				items[i], changed = nv, true
			}
		}
		return rewritten(raw, changed, items)
	}
	return raw, false
}

// rewritten is v (raw's members or items, some replaced or removed)
// written again when changed, and raw otherwise.
func rewritten(raw []byte, changed bool, v any) ([]byte, bool) {
	if !changed {
		return raw, false
	}
	out, err := json.Marshal(v)
	if err != nil {
		return raw, false
	}
	return out, true
}

// jsonFields are a struct type's JSON member names: exact, with each
// field's type, and folded (foldName).
type jsonFields struct {
	exact  map[string]reflect.Type
	folded map[string]bool
}

// jsonFieldCache holds jsonFields by struct type.
var jsonFieldCache sync.Map

// jsonFieldsOf returns t's JSON member names: its exported fields' (the
// tag's name, or the field's name), not those tagged "-".
func jsonFieldsOf(t reflect.Type) jsonFields {
	if fs, ok := jsonFieldCache.Load(t); ok {
		return fs.(jsonFields)
	}
	fs := jsonFields{exact: map[string]reflect.Type{}, folded: map[string]bool{}}
	for i := range t.NumField() {
		f := t.Field(i)
		if !f.IsExported() {
			continue
		}
		name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		if name == "-" {
			continue
		}
		if name == "" {
			name = f.Name
		}
		fs.exact[name] = f.Type
		fs.folded[foldName(name)] = true
	}
	jsonFieldCache.Store(t, fs)
	return fs
}

// foldName maps each rune of s to the smallest of its simple case folding
// orbit: two names fold alike exactly when strings.EqualFold holds, which
// is how encoding/json matches a name to a field.
func foldName(s string) string {
	var b strings.Builder
	for _, r := range s {
		m := r
		for f := unicode.SimpleFold(r); f != r; f = unicode.SimpleFold(f) {
			m = min(m, f)
		}
		b.WriteRune(m)
	}
	return b.String()
}

// utcTS rewrites, in a copy of payload (a JSON object that decoded), each
// top-level "ts" string that ParseTime takes but that is not RFC 3339 in
// UTC (a near miss, another offset) as the UTC time ParseTime read, and
// leaves every other byte as it was; payload itself when there is none.
// What the gateway stores, and the API and webhooks show, is then RFC 3339
// UTC, as the contract says its times are.
func utcTS(payload []byte) []byte {
	if !mayHoldTS(payload) {
		return payload
	}
	d := json.NewDecoder(bytes.NewReader(payload))
	d.UseNumber() // a number past float64 (1e400) is no error here either
	var out []byte
	last, depth, keyEnd := 0, 0, 0
	key, isTS := false, false
	for {
		tok, err := d.Token()
		if err != nil {
			break // io.EOF: the payload decoded before
		}
		if delim, ok := tok.(json.Delim); ok {
			switch delim {
			case '{', '[':
				depth++
			default:
				depth--
			}
			key = depth == 1 // in the top-level object, a key comes next
			continue
		}
		if depth != 1 {
			continue
		}
		if key {
			// The name exactly, as decoding reads it (exactNames); an
			// escape in it is read by the decoder.
			k, _ := tok.(string)
			isTS, key, keyEnd = k == "ts", false, int(d.InputOffset())
			continue
		}
		key = true
		s, ok := tok.(string)
		if !isTS || !ok || isUTC(s) {
			continue
		}
		t, err := ParseTime(s)
		if err != nil {
			continue
		}
		start := keyEnd + bytes.IndexByte(payload[keyEnd:], '"')
		out = append(append(append(append(out, payload[last:start]...), '"'), FormatTime(t)...), '"')
		last = int(d.InputOffset())
	}
	if out == nil {
		return payload
	}
	return append(out, payload[last:]...)
}

// mayHoldTS reports whether payload may have a "ts" key, as written or
// spelled with an escape.
func mayHoldTS(payload []byte) bool {
	return bytes.Contains(payload, []byte(`"ts"`)) || bytes.IndexByte(payload, '\\') >= 0
}

// isUTC reports whether s is an RFC 3339 time in UTC as written (with Z).
func isUTC(s string) bool {
	if len(s) == 0 || s[len(s)-1] != 'Z' {
		return false
	}
	_, err := time.Parse(time.RFC3339Nano, s)
	return err == nil
}

// typeError is Decode's ErrInvalid for json.Unmarshal's err: the field and
// the type it wants, when it says.
func typeError(err error) error {
	var te *json.UnmarshalTypeError
	if errors.As(err, &te) && te.Field != "" {
		return fmt.Errorf("%w: field %q: want %s", ErrInvalid, te.Field, te.Type)
	}
	return fmt.Errorf("%w: %v", ErrInvalid, err)
}

// wholeNumbers rewrites, in a copy of payload (valid JSON), every number
// literal that is a whole number within int64 but written with a fraction
// or an exponent (7.0, 7e0, 1.5e1) as that integer, and leaves every other
// byte as it was: keys, their order and duplicates, strings, other numbers.
// ok is false when there is none. Decode asks for it only when a number
// did not fit an integer field.
func wholeNumbers(payload []byte) (out []byte, ok bool) {
	d := json.NewDecoder(bytes.NewReader(payload))
	d.UseNumber()
	last := 0 // payload[last:] is not copied yet
	for {
		tok, err := d.Token()
		if err != nil {
			break // io.EOF at the end; the payload parsed before, so nothing else
		}
		n, isNum := tok.(json.Number)
		if !isNum || !strings.ContainsAny(string(n), ".eE") {
			continue
		}
		whole, isWhole := wholeNumber(string(n))
		if !isWhole {
			continue
		}
		end := int(d.InputOffset())
		start := end - len(n)
		out = append(append(out, payload[last:start]...), whole...)
		last = end
	}
	if out == nil {
		return nil, false
	}
	return append(out, payload[last:]...), true
}

// wholeNumber returns literal n (a JSON number with a fraction or an
// exponent) as an integer literal when it is a whole number within int64.
func wholeNumber(n string) (string, bool) {
	// An exponent past 10^±40 makes no int64 (and big.Rat would spell out
	// 1e999999999 digit by digit).
	if i := strings.IndexAny(n, "eE"); i >= 0 {
		if e, err := strconv.Atoi(n[i+1:]); err != nil || e > 40 || e < -40 {
			return "", false
		}
	}
	r, ok := new(big.Rat).SetString(n)
	if !ok || !r.IsInt() || !r.Num().IsInt64() {
		return "", false
	}
	if r.Sign() == 0 && n[0] == '-' {
		return "-0", true // a float field keeps its sign
	}
	return r.Num().String(), true
}

// Encode marshals v; it is the inverse of Decode for well-formed values. A
// nil *FwJob encodes as the empty payload, which on fw/job means "no job". It
// panics on values JSON cannot carry (NaN or infinite floats), which Validate
// rejects.
func Encode(v any) []byte {
	// An empty credential set goes out as "creds": [], not null: it is a list
	// on the wire and firmware should not have to special-case null.
	switch s := v.(type) {
	case *FwJob:
		if s == nil {
			return []byte{}
		}
	case CredSet:
		if s.Creds == nil {
			s.Creds = []Credential{}
			v = s
		}
	case *CredSet:
		if s != nil && s.Creds == nil {
			c := *s
			c.Creds = []Credential{}
			v = &c
		}
	case Event:
		// A code_accepted that opened no compartment (its door jammed)
		// says so with an empty list: left out, it means all of them.
		if s.Type == EventCodeAccepted && s.Compartments != nil && len(s.Compartments) == 0 {
			type plain Event
			v = struct {
				plain
				Compartments []int `json:"compartments"`
			}{plain(s), s.Compartments}
		}
	}
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	// No \u003c for '<', '>' and '&': payloads are not HTML, and escaping
	// could push a payload near the limit over 16 KiB when it is re-sent.
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		panic(fmt.Sprintf("protocol: encode %T: %v", v, err)) // only our own types reach here
	}
	return bytes.TrimSuffix(buf.Bytes(), []byte("\n"))
}

// Presence is the birth message (online) or Last Will (offline).
type Presence struct {
	Online bool   `json:"online"`
	TS     Time   `json:"ts,omitzero"`
	FW     string `json:"fw,omitempty"`
	Model  string `json:"model,omitempty"`
	BootID string `json:"boot_id,omitempty"`
}

// Validate implements Validator. Every field but online is optional
// (protocol v1 shows them but does not require them): a birth without fw
// still starts the session's work (open commands), and the version known
// before is kept.
func (p *Presence) Validate() error {
	return checkLens("fw", p.FW, "model", p.Model, "boot_id", p.BootID)
}

// Power sources.
const (
	PowerMains   = "mains"
	PowerBattery = "battery"
)

// Health is the periodic health message.
type Health struct {
	TS               Time     `json:"ts"`
	Seq              int64    `json:"seq"`
	FW               string   `json:"fw,omitempty"`
	UptimeS          int64    `json:"uptime_s"`
	TempC            *float64 `json:"temp_c,omitempty"`
	Power            string   `json:"power,omitempty"`
	BatteryPct       *int     `json:"battery_pct,omitempty"`
	RSSIdBm          *int     `json:"rssi_dbm,omitempty"`
	FreeCompartments *int     `json:"free_compartments,omitempty"`
	DoorFaults       []int    `json:"door_faults,omitempty"`
}

// Validate implements Validator.
func (h *Health) Validate() error {
	if h.TS.IsZero() {
		return errors.New("ts is required")
	}
	if h.Seq < 0 || h.UptimeS < 0 {
		return errors.New("seq and uptime_s must not be negative")
	}
	if h.Power != "" && h.Power != PowerMains && h.Power != PowerBattery {
		return fmt.Errorf("power %q: want mains or battery", h.Power)
	}
	if h.BatteryPct != nil && (*h.BatteryPct < 0 || *h.BatteryPct > 100) {
		return errors.New("battery_pct out of 0..100")
	}
	if h.TempC != nil && (math.IsNaN(*h.TempC) || math.IsInf(*h.TempC, 0)) {
		return errors.New("temp_c must be a finite number")
	}
	if h.FreeCompartments != nil && *h.FreeCompartments < 0 {
		return errors.New("free_compartments must not be negative")
	}
	for _, n := range h.DoorFaults {
		if n < 1 || n > MaxCompartmentNumber {
			return fmt.Errorf("door_faults: compartment %d: want 1 to %d", n, MaxCompartmentNumber)
		}
	}
	return checkLens("fw", h.FW)
}

// Event types.
const (
	EventDoorOpened   = "door_opened"
	EventDoorClosed   = "door_closed"
	EventDoorAjar     = "door_ajar"
	EventCodeAccepted = "code_accepted"
	EventCodeRejected = "code_rejected"
	EventTamper       = "tamper"
	EventPower        = "power"
	EventReboot       = "reboot"
)

// Door opened by.
const (
	ByCredential = "credential"
	ByCommand    = "command"
	ByManual     = "manual"
)

// Code rejection reasons.
const (
	RejectUnknown   = "unknown"
	RejectExpired   = "expired"
	RejectUsed      = "used"
	RejectLockedOut = "locked_out"
)

// Event is a device event. Fields beyond ID, TS and Type depend on Type.
type Event struct {
	ID           string `json:"id"`
	TS           Time   `json:"ts"`
	Type         string `json:"type"`
	Compartment  int    `json:"compartment,omitempty"`
	Occupied     *bool  `json:"occupied,omitempty"`
	By           string `json:"by,omitempty"`
	Credential   string `json:"credential,omitempty"`
	Command      string `json:"command,omitempty"`
	OpenS        int    `json:"open_s,omitempty"`
	Compartments []int  `json:"compartments,omitempty"`
	Reason       string `json:"reason,omitempty"`
	Detail       string `json:"detail,omitempty"`
	Source       string `json:"source,omitempty"`
}

// eventFields are the fields of each event type beyond id, ts and type
// (protocol-v1, Events): the others are unknown fields for it.
var eventFields = map[string][]string{
	EventDoorOpened:   {"compartment", "by", "credential", "command"},
	EventDoorClosed:   {"compartment", "occupied"},
	EventDoorAjar:     {"compartment", "open_s"},
	EventCodeAccepted: {"credential", "compartments"},
	EventCodeRejected: {"reason"},
	EventTamper:       {"detail"},
	EventPower:        {"source"},
	EventReboot:       {"reason"},
}

// foreign implements foreignFields: name is not a field of the event's
// type (an event of no known type has none: Validate refuses it).
func (e *Event) foreign(members map[string]json.RawMessage, name string) bool {
	if name == "id" || name == "ts" || name == "type" {
		return false
	}
	var typ string
	if json.Unmarshal(members["type"], &typ) != nil {
		return false
	}
	fields, known := eventFields[typ]
	return known && !slices.Contains(fields, name)
}

// dropForeign implements foreignFields: a field of another event type
// that this one's checks would refuse or cut (a tamper's compartment -1,
// a door's 300-byte credential, a reboot's 300-byte detail) is cleared,
// as an unknown field is ignored; one that passes them is kept (a
// tamper's compartment, for its alert).
func (e *Event) dropForeign() {
	fields, known := eventFields[e.Type]
	if !known {
		return
	}
	uses := func(name string) bool { return slices.Contains(fields, name) }
	if !uses("compartment") && (e.Compartment < 0 || e.Compartment > MaxCompartmentNumber) {
		e.Compartment = 0
	}
	if !uses("compartments") && slices.ContainsFunc(e.Compartments, func(n int) bool { return n < 1 || n > MaxCompartmentNumber }) {
		e.Compartments = nil
	}
	if !uses("open_s") && e.OpenS < 0 {
		e.OpenS = 0
	}
	for name, f := range map[string]*string{"credential": &e.Credential, "command": &e.Command, "reason": &e.Reason, "detail": &e.Detail} {
		if !uses(name) && len(*f) > maxField {
			*f = ""
		}
	}
}

// Validate implements Validator.
func (e *Event) Validate() error {
	if !ValidEventID(e.ID) {
		return fmt.Errorf("id %q: want 1-%d bytes of printable UTF-8", e.ID, MaxEventIDLen)
	}
	if e.TS.IsZero() {
		return errors.New("ts is required")
	}
	if e.Compartment < 0 || e.Compartment > MaxCompartmentNumber {
		return fmt.Errorf("compartment %d: want 1 to %d", e.Compartment, MaxCompartmentNumber)
	}
	for _, n := range e.Compartments {
		if n < 1 || n > MaxCompartmentNumber {
			return fmt.Errorf("compartments: %d: want 1 to %d", n, MaxCompartmentNumber)
		}
	}
	needComp := func() error {
		if e.Compartment < 1 {
			return fmt.Errorf("%s needs compartment >= 1", e.Type)
		}
		return nil
	}
	switch e.Type {
	case EventDoorOpened:
		if err := needComp(); err != nil {
			return err
		}
		switch e.By {
		case ByCredential, ByCommand, ByManual, "":
		default:
			return fmt.Errorf("by %q: want credential, command or manual", e.By)
		}
	case EventDoorClosed:
		if err := needComp(); err != nil {
			return err
		}
		if e.Occupied == nil {
			return errors.New("door_closed needs occupied")
		}
	case EventDoorAjar:
		if err := needComp(); err != nil {
			return err
		}
		if e.OpenS < 0 {
			return errors.New("open_s must not be negative")
		}
	case EventCodeAccepted:
		if e.Credential == "" {
			return errors.New("code_accepted needs credential")
		}
	case EventCodeRejected:
		switch e.Reason {
		case RejectUnknown, RejectExpired, RejectUsed, RejectLockedOut:
		default:
			return fmt.Errorf("reason %q: want unknown, expired, used or locked_out", e.Reason)
		}
	case EventPower:
		if e.Source != PowerMains && e.Source != PowerBattery {
			return fmt.Errorf("source %q: want mains or battery", e.Source)
		}
	case EventTamper, EventReboot:
	default:
		return fmt.Errorf("unknown event type %q", e.Type)
	}
	for _, n := range e.Compartments {
		if n < 1 {
			return errors.New("compartments: numbers start at 1")
		}
	}
	// A tamper's detail and a reboot's reason describe; the event counts
	// (a tamper raises its alert). Ids are refused when too long.
	e.Detail, e.Reason = clip(e.Detail), clip(e.Reason)
	return checkLens("credential", e.Credential, "command", e.Command)
}

// Command types.
const (
	CmdUnlock     = "unlock"
	CmdSetService = "set_service"
	CmdReboot     = "reboot"
)

// Unlock reasons.
const (
	ReasonStaging = "staging"
	ReasonPickup  = "pickup"
	ReasonRemote  = "remote"
	ReasonService = "service"
)

// Command is sent by the gateway on cmd.
type Command struct {
	ID          string `json:"id"`
	Type        string `json:"type"`
	Compartment int    `json:"compartment,omitempty"`
	Reason      string `json:"reason,omitempty"`
	InService   *bool  `json:"in_service,omitempty"`
	IssuedAt    Time   `json:"issued_at"`
	ExpiresAt   Time   `json:"expires_at"`
}

// Validate implements Validator. Unknown types are valid on the wire: the
// device answers them with status rejected.
func (c *Command) Validate() error {
	if !ValidID(c.ID) {
		return fmt.Errorf("id %q: want 1-64 of [A-Za-z0-9._:-]", c.ID)
	}
	if c.Type == "" {
		return errors.New("type is required")
	}
	if c.ExpiresAt.IsZero() {
		return errors.New("expires_at is required")
	}
	return nil
}

// Command result statuses.
const (
	StatusOK       = "ok"
	StatusFailed   = "failed"
	StatusRejected = "rejected"
	StatusExpired  = "expired"
)

// CommandResult is the device's single answer to a command.
type CommandResult struct {
	ID     string `json:"id"`
	Status string `json:"status"`
	Error  string `json:"error,omitempty"`
	TS     Time   `json:"ts,omitzero"`
}

// Validate implements Validator.
func (r *CommandResult) Validate() error {
	if !ValidID(r.ID) {
		return fmt.Errorf("id %q: want 1-64 of [A-Za-z0-9._:-]", r.ID)
	}
	switch r.Status {
	case StatusOK, StatusFailed, StatusRejected, StatusExpired:
	default:
		return fmt.Errorf("status %q: want ok, failed, rejected or expired", r.Status)
	}
	r.Error = clip(r.Error) // the answer counts, whatever it says of itself
	return nil
}

// Credential kinds.
const (
	KindPIN = "pin"
	KindQR  = "qr"
)

// Credential is one offline-valid pickup credential as the locker sees it.
type Credential struct {
	ID           string `json:"id"`
	Kind         string `json:"kind"`
	MAC          string `json:"mac"`
	Compartments []int  `json:"compartments"`
	NotAfter     Time   `json:"not_after"`
	// Group (an extension of v1) joins the entries of one set that are
	// forms of one credential: the gateway hands a pickup's code out as a
	// PIN and as a QR token, two entries with the same group number (1 and
	// up, meaningful within the set; 0 or absent: none). Using one uses
	// all; a locker that ignores the field keeps each entry single use on
	// its own.
	Group int `json:"group,omitempty"`
}

// CredSet is the full set of credentials valid at a locker (retained on creds).
type CredSet struct {
	Version int64        `json:"version"`
	TS      Time         `json:"ts"`
	Creds   []Credential `json:"creds"`
}

// Validate implements Validator.
func (s *CredSet) Validate() error {
	if s.Version < 0 {
		return errors.New("version must not be negative")
	}
	for i, c := range s.Creds {
		if !ValidID(c.ID) || (c.Kind != KindPIN && c.Kind != KindQR) || c.MAC == "" || len(c.Compartments) == 0 {
			return fmt.Errorf("creds[%d]: want id, kind pin|qr, mac and compartments", i)
		}
		if c.Group < 0 {
			return fmt.Errorf("creds[%d]: group must not be negative", i)
		}
		for _, n := range c.Compartments {
			if n < 1 {
				return fmt.Errorf("creds[%d]: compartment numbers start at 1", i)
			}
		}
	}
	return nil
}

// CredsAck tells which credential-set version the device applied.
type CredsAck struct {
	Version int64 `json:"version"`
	// noVersion: decoded from an ack without "version" (or null), which
	// says nothing of which set the locker applied.
	noVersion bool
}

// UnmarshalJSON implements json.Unmarshaler: it notes an ack without its
// version, which Validate refuses (read as 0 it would mark the locker
// behind on a set it may hold).
func (a *CredsAck) UnmarshalJSON(b []byte) error {
	var raw struct {
		Version *int64 `json:"version"`
	}
	if err := json.Unmarshal(b, &raw); err != nil {
		return err
	}
	*a = CredsAck{noVersion: raw.Version == nil}
	if raw.Version != nil {
		a.Version = *raw.Version
	}
	return nil
}

// Validate implements Validator.
func (a *CredsAck) Validate() error {
	if a.noVersion {
		return errors.New("version is required")
	}
	if a.Version < 0 {
		return errors.New("version must not be negative")
	}
	return nil
}

// Lockout is the keypad lockout policy.
type Lockout struct {
	MaxFailures int `json:"max_failures"`
	WindowS     int `json:"window_s"`
	LockS       int `json:"lock_s"`
}

// DefaultLockout is the protocol's default: 5 failures in 5 minutes lock for 5 minutes.
var DefaultLockout = Lockout{MaxFailures: 5, WindowS: 300, LockS: 300}

// Config is the desired configuration (retained on config).
type Config struct {
	Version         int64   `json:"version"`
	HealthIntervalS int     `json:"health_interval_s"`
	DoorAjarS       int     `json:"door_ajar_s"`
	Lockout         Lockout `json:"lockout"`
}

// Validate implements Validator.
func (c *Config) Validate() error {
	if c.Version < 0 || c.HealthIntervalS < 1 || c.DoorAjarS < 1 {
		return errors.New("want version >= 0, health_interval_s >= 1, door_ajar_s >= 1")
	}
	if c.Lockout.MaxFailures < 1 || c.Lockout.WindowS < 1 || c.Lockout.LockS < 0 {
		return errors.New("lockout: want max_failures >= 1, window_s >= 1, lock_s >= 0")
	}
	return nil
}

// FwJob is the firmware job retained on fw/job.
type FwJob struct {
	Job      string `json:"job"`
	Version  string `json:"version"`
	URL      string `json:"url"`
	Size     int64  `json:"size"`
	SHA256   string `json:"sha256"`
	Sig      string `json:"sig"`
	Deadline Time   `json:"deadline,omitzero"`
	// Lockergate extensions (docs/protocol.md, "Firmware job"): install only
	// inside [InstallAfter, InstallBefore), a window that repeats every 24 h;
	// Downgrade marks a downgrade an operator forced.
	InstallAfter  Time `json:"install_after,omitzero"`
	InstallBefore Time `json:"install_before,omitzero"`
	Downgrade     bool `json:"downgrade,omitempty"`
}

// Validate implements Validator.
func (j *FwJob) Validate() error {
	if !ValidID(j.Job) || j.Version == "" || j.URL == "" || j.Size <= 0 || len(j.SHA256) != 64 || j.Sig == "" {
		return errors.New("want job, version, url, size > 0, sha256 (64 hex) and sig")
	}
	if _, err := hex.DecodeString(j.SHA256); err != nil {
		return errors.New("sha256: want 64 hex digits")
	}
	if j.InstallAfter.IsZero() != j.InstallBefore.IsZero() || (!j.InstallAfter.IsZero() && !j.InstallBefore.After(j.InstallAfter.Time)) {
		return errors.New("install_after and install_before: want both, the second later, or neither")
	}
	return checkLens("version", j.Version)
}

// Firmware job states.
const (
	FwDownloading = "downloading"
	FwVerifying   = "verifying"
	FwInstalling  = "installing"
	FwRebooting   = "rebooting"
	FwSucceeded   = "succeeded"
	FwFailed      = "failed"
	FwRejected    = "rejected"
)

// FwStatus reports firmware job progress.
type FwStatus struct {
	Job      string   `json:"job"`
	State    string   `json:"state"`
	Progress *float64 `json:"progress,omitempty"`
	Error    string   `json:"error,omitempty"`
	TS       Time     `json:"ts,omitzero"`
}

// Validate implements Validator.
func (s *FwStatus) Validate() error {
	if !ValidID(s.Job) {
		return fmt.Errorf("job %q: want 1-64 of [A-Za-z0-9._:-]", s.Job)
	}
	switch s.State {
	// A failure whose error is missing or none of the contract's kinds
	// (download, checksum, signature, install, boot, deadline) is still
	// the attempt's end: taken, not dropped (the job would wait for its
	// step timeout). The engine records it as sent, or "unknown".
	case FwDownloading, FwVerifying, FwInstalling, FwRebooting, FwSucceeded, FwRejected, FwFailed:
	default:
		return fmt.Errorf("state %q is not a firmware job state", s.State)
	}
	// Written so that NaN fails too.
	if s.Progress != nil && !(*s.Progress >= 0 && *s.Progress <= 1) {
		return errors.New("progress out of 0..1")
	}
	s.Error = clip(s.Error) // the report counts: a failure ends its attempt
	return nil
}

// Compartment sizes, smallest first.
var Sizes = []string{"S", "M", "L", "XL"}

// SizeRank returns the order of size (S=0 … XL=3) or -1.
func SizeRank(size string) int {
	for i, s := range Sizes {
		if s == size {
			return i
		}
	}
	return -1
}

// Zones a compartment can be in.
var Zones = []string{"ambient", "chilled", "heated"}

// ValidZone reports whether z is a zone.
func ValidZone(z string) bool {
	for _, v := range Zones {
		if v == z {
			return true
		}
	}
	return false
}

// CompartmentSpec describes one compartment of a locker model.
type CompartmentSpec struct {
	N    int    `json:"n"`
	Size string `json:"size"`
	Zone string `json:"zone"`
}

// MaxCompartments bounds the compartments of one locker.
const MaxCompartments = 256

// MaxCompartmentNumber is the largest compartment number: the largest the
// gateway stores (a PostgreSQL integer). Numbers are the vendor's own, not
// 1 to the count, so they are not bounded by MaxCompartments.
const MaxCompartmentNumber = math.MaxInt32

// ProvisionRequest is what a new locker publishes on provision/v1/{serial}/request.
type ProvisionRequest struct {
	Serial       string            `json:"serial"`
	Model        string            `json:"model"`
	FW           string            `json:"fw"`
	Compartments []CompartmentSpec `json:"compartments"`
}

// Validate implements Validator.
func (r *ProvisionRequest) Validate() error {
	if !ValidSerial(r.Serial) {
		return fmt.Errorf("serial %q: want 1-64 of [A-Za-z0-9._:-]", r.Serial)
	}
	if r.Model == "" || r.FW == "" {
		return errors.New("model and fw are required")
	}
	if len(r.Compartments) == 0 || len(r.Compartments) > MaxCompartments {
		return fmt.Errorf("want 1-%d compartments", MaxCompartments)
	}
	seen := make(map[int]bool, len(r.Compartments))
	for _, c := range r.Compartments {
		if c.N < 1 || c.N > MaxCompartmentNumber || seen[c.N] {
			return fmt.Errorf("compartment n=%d: want unique numbers from 1 to %d", c.N, MaxCompartmentNumber)
		}
		seen[c.N] = true
		if SizeRank(c.Size) < 0 {
			return fmt.Errorf("compartment %d: size %q: want S, M, L or XL", c.N, c.Size)
		}
		if !ValidZone(c.Zone) {
			return fmt.Errorf("compartment %d: zone %q: want ambient, chilled or heated", c.N, c.Zone)
		}
	}
	return checkLens("model", r.Model, "fw", r.FW)
}

// Provisioning error codes.
const (
	ProvClaimExpired   = "claim_expired"
	ProvClaimExhausted = "claim_exhausted"
	ProvSerialTaken    = "serial_taken"
	ProvInvalid        = "invalid"
)

// ProvisionResponse is the gateway's answer on provision/v1/{serial}/response.
type ProvisionResponse struct {
	Status   string `json:"status"`
	Error    string `json:"error,omitempty"`
	DeviceID string `json:"device_id,omitempty"`
	Password string `json:"password,omitempty"`
	CredKey  string `json:"cred_key,omitempty"`
	FwPubkey string `json:"fw_pubkey,omitempty"`
	Broker   string `json:"broker,omitempty"`
}

// Validate implements Validator.
func (r *ProvisionResponse) Validate() error {
	switch r.Status {
	case "ok":
		if !ValidID(r.DeviceID) || r.Password == "" || r.CredKey == "" {
			return errors.New("ok answer needs device_id, password and cred_key")
		}
	case "error":
		if r.Error == "" {
			return errors.New("error answer needs error")
		}
	default:
		return fmt.Errorf("status %q: want ok or error", r.Status)
	}
	return nil
}

const maxField = 256

// clip cuts descriptive free text (a tamper's detail, a reboot's reason, a
// command's or a firmware job's error) to maxField bytes at a character
// boundary, where an id or a version over it is refused: the message it
// is in is kept (an alert, a command's end, a job's failure), its text
// cut. A body kept as read keeps the whole text (at most MaxPayload).
func clip(s string) string {
	if len(s) <= maxField {
		return s
	}
	cut := maxField
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut]
}

// checkLens takes name, value pairs and checks each value fits in maxField bytes.
func checkLens(pairs ...string) error {
	for i := 0; i+1 < len(pairs); i += 2 {
		if len(pairs[i+1]) > maxField {
			return fmt.Errorf("%s longer than %d bytes", pairs[i], maxField)
		}
	}
	return nil
}

// MaxEventIDLen bounds the ids devices mint for their events.
const MaxEventIDLen = 128

// ValidEventID reports whether s can be a device-minted event id. The
// protocol puts no alphabet on these (devices may use base64, UUIDs, ...),
// so any printable UTF-8 up to MaxEventIDLen bytes is accepted; only the
// gateway's own ids use the narrower ValidID alphabet.
func ValidEventID(s string) bool {
	if len(s) == 0 || len(s) > MaxEventIDLen || !utf8.ValidString(s) {
		return false
	}
	for _, r := range s {
		if unicode.IsControl(r) {
			return false
		}
	}
	return true
}
