package firmware

import (
	"fmt"
	"strconv"
	"strings"
)

// Version is a parsed firmware version: semantic versioning 2.0 with two
// leniencies firmware vendors rely on, a leading "v" and a missing minor or
// patch number ("1.5" is 1.5.0). Build metadata ("+...") is ignored.
type Version struct {
	Major, Minor, Patch uint64
	Pre                 []string // pre-release identifiers; none for a release
}

// ParseVersion parses s; it fails on anything that is not a version, so an
// ordering is never guessed.
func ParseVersion(s string) (Version, error) {
	var v Version
	core := strings.TrimPrefix(s, "v")
	if i := strings.IndexByte(core, '+'); i >= 0 {
		if !validIdents(core[i+1:], false) {
			return v, fmt.Errorf("version %q: bad build metadata", s)
		}
		core = core[:i]
	}
	if i := strings.IndexByte(core, '-'); i >= 0 {
		pre := core[i+1:]
		if !validIdents(pre, true) {
			return v, fmt.Errorf("version %q: bad pre-release", s)
		}
		v.Pre = strings.Split(pre, ".")
		core = core[:i]
	}
	parts := strings.Split(core, ".")
	if len(parts) > 3 {
		return v, fmt.Errorf("version %q: want MAJOR[.MINOR[.PATCH]]", s)
	}
	nums := []*uint64{&v.Major, &v.Minor, &v.Patch}
	for i, p := range parts {
		if !isNumeric(p) || (len(p) > 1 && p[0] == '0') {
			return v, fmt.Errorf("version %q: %q is not a number", s, p)
		}
		n, err := strconv.ParseUint(p, 10, 64)
		if err != nil {
			return v, fmt.Errorf("version %q: %q out of range", s, p)
		}
		*nums[i] = n
	}
	return v, nil
}

func isNumeric(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}

// validIdents checks dot-separated identifiers of [0-9A-Za-z-]; pre-release
// numeric identifiers must not have leading zeros.
func validIdents(s string, pre bool) bool {
	if s == "" {
		return false
	}
	for _, id := range strings.Split(s, ".") {
		if id == "" {
			return false
		}
		for i := 0; i < len(id); i++ {
			c := id[i]
			if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c == '-') {
				return false
			}
		}
		if pre && isNumeric(id) && len(id) > 1 && id[0] == '0' {
			return false
		}
	}
	return true
}

// Compare returns -1, 0 or +1 as v orders before, with or after w by
// semantic-versioning precedence.
func (v Version) Compare(w Version) int {
	for _, d := range [][2]uint64{{v.Major, w.Major}, {v.Minor, w.Minor}, {v.Patch, w.Patch}} {
		if d[0] != d[1] {
			if d[0] < d[1] {
				return -1
			}
			return 1
		}
	}
	switch {
	case len(v.Pre) == 0 && len(w.Pre) == 0:
		return 0
	case len(v.Pre) == 0:
		return 1 // a release follows its pre-releases
	case len(w.Pre) == 0:
		return -1
	}
	for i := 0; i < len(v.Pre) && i < len(w.Pre); i++ {
		if c := compareIdent(v.Pre[i], w.Pre[i]); c != 0 {
			return c
		}
	}
	switch {
	case len(v.Pre) < len(w.Pre):
		return -1
	case len(v.Pre) > len(w.Pre):
		return 1
	}
	return 0
}

func compareIdent(a, b string) int {
	an, bn := isNumeric(a), isNumeric(b)
	switch {
	case an && bn:
		// Equal-length digit strings without leading zeros order as text.
		if len(a) != len(b) {
			if len(a) < len(b) {
				return -1
			}
			return 1
		}
		return strings.Compare(a, b)
	case an:
		return -1 // numeric identifiers have lower precedence
	case bn:
		return 1
	}
	return strings.Compare(a, b)
}

// CompareVersions parses and compares two versions.
func CompareVersions(a, b string) (int, error) {
	va, err := ParseVersion(a)
	if err != nil {
		return 0, err
	}
	vb, err := ParseVersion(b)
	if err != nil {
		return 0, err
	}
	return va.Compare(vb), nil
}

// String renders v canonically: MAJOR.MINOR.PATCH[-PRE], without a leading
// "v" or build metadata (which has no precedence). Versions that compare
// equal render the same.
func (v Version) String() string {
	s := strconv.FormatUint(v.Major, 10) + "." + strconv.FormatUint(v.Minor, 10) + "." + strconv.FormatUint(v.Patch, 10)
	if len(v.Pre) > 0 {
		s += "-" + strings.Join(v.Pre, ".")
	}
	return s
}

// CanonicalVersion parses s and renders it canonically ("v1.5" is "1.5.0").
func CanonicalVersion(s string) (string, error) {
	v, err := ParseVersion(s)
	if err != nil {
		return "", err
	}
	return v.String(), nil
}

// SameVersion reports whether a locker's version a is the version b: equal
// as semantic versions ("v1.5" is 1.5.0), or as text when one of them does
// not parse. Lockers report their version as their image spells it, which
// need not be how it was uploaded.
func SameVersion(a, b string) bool {
	c, err := CompareVersions(a, b)
	if err != nil {
		return a == b
	}
	return c == 0
}
