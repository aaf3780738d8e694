package devicesim

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"time"
)

// Duration is a time.Duration that JSON spells as a Go duration string
// ("90s", "1m30s", "2h"); a bare number is read as seconds.
type Duration time.Duration

// D returns d as a time.Duration.
func (d Duration) D() time.Duration { return time.Duration(d) }

// String implements fmt.Stringer.
func (d Duration) String() string { return time.Duration(d).String() }

// MarshalJSON implements json.Marshaler.
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(time.Duration(d).String()) }

// UnmarshalJSON implements json.Unmarshaler.
func (d *Duration) UnmarshalJSON(b []byte) error {
	if len(b) > 0 && b[0] == '"' {
		var s string
		if err := json.Unmarshal(b, &s); err != nil {
			return err
		}
		v, err := time.ParseDuration(s)
		if err != nil {
			return fmt.Errorf("duration %q: want e.g. \"90s\" or \"1m30s\"", s)
		}
		*d = Duration(v)
		return nil
	}
	var secs float64
	if err := json.Unmarshal(b, &secs); err != nil {
		return fmt.Errorf("duration %s: want a string like \"90s\" or a number of seconds", b)
	}
	*d = Duration(secs * float64(time.Second))
	return nil
}

// Range is a duration drawn uniformly from [Min, Max]. JSON spells it
// {"min":"10s","max":"1m"}, or as one duration for a fixed value.
type Range struct {
	Min Duration `json:"min"`
	Max Duration `json:"max"`
}

// Fixed returns the range holding only d.
func Fixed(d time.Duration) Range { return Range{Min: Duration(d), Max: Duration(d)} }

// Between returns the range [lo, hi].
func Between(lo, hi time.Duration) Range { return Range{Min: Duration(lo), Max: Duration(hi)} }

// IsZero reports whether the range holds only zero.
func (r Range) IsZero() bool { return r.Min == 0 && r.Max == 0 }

// UnmarshalJSON implements json.Unmarshaler.
func (r *Range) UnmarshalJSON(b []byte) error {
	if b = bytes.TrimSpace(b); len(b) > 0 && b[0] != '{' {
		var d Duration
		if err := d.UnmarshalJSON(b); err != nil {
			return err
		}
		*r = Range{Min: d, Max: d}
		return nil
	}
	type plain Range
	var p plain
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&p); err != nil {
		return err
	}
	*r = Range(p)
	return nil
}

func (r Range) validate(name string) error {
	if r.Min < 0 || r.Max < r.Min {
		return fmt.Errorf("%s: want 0 <= min <= max, got min %v max %v", name, r.Min, r.Max)
	}
	return nil
}

// draw takes exactly one number from rnd whatever the range, so changing a
// range never shifts the decisions drawn after it.
func (r Range) draw(rnd *rand.Rand) time.Duration {
	u := rnd.Float64()
	return r.Min.D() + time.Duration(u*float64(r.Max-r.Min))
}
