package firmware

import "testing"

func TestCompareVersions(t *testing.T) {
	for _, tc := range []struct {
		a, b string
		want int
	}{
		{"1.4.2", "1.5.0", -1},
		{"1.5.0", "1.4.2", 1},
		{"1.5.0", "1.5.0", 0},
		{"v1.5.0", "1.5.0", 0},
		{"1.5", "1.5.0", 0},
		{"2", "1.99.99", 1},
		{"1.10.0", "1.9.0", 1}, // numeric, not textual
		{"1.0.0-alpha", "1.0.0", -1},
		{"1.0.0-alpha", "1.0.0-alpha.1", -1},
		{"1.0.0-alpha.1", "1.0.0-alpha.beta", -1},
		{"1.0.0-alpha.beta", "1.0.0-beta", -1},
		{"1.0.0-beta", "1.0.0-beta.2", -1},
		{"1.0.0-beta.2", "1.0.0-beta.11", -1},
		{"1.0.0-beta.11", "1.0.0-rc.1", -1},
		{"1.0.0-rc.1", "1.0.0", -1},
		{"1.0.0+build.5", "1.0.0+build.7", 0},
	} {
		got, err := CompareVersions(tc.a, tc.b)
		if err != nil {
			t.Fatalf("%s vs %s: %v", tc.a, tc.b, err)
		}
		if got != tc.want {
			t.Errorf("Compare(%s, %s) = %d, want %d", tc.a, tc.b, got, tc.want)
		}
		if back, _ := CompareVersions(tc.b, tc.a); back != -tc.want {
			t.Errorf("Compare(%s, %s) = %d, not the opposite of %d", tc.b, tc.a, back, tc.want)
		}
	}
}

func TestParseVersionErr(t *testing.T) {
	for _, s := range []string{"", "v", "1.2.3.4", "1..2", "01.2.3", "1.2.x", "1.2.3-", "1.2.3-01", "1.2.3+", "latest",
		"1.2.3-a..b", "99999999999999999999.0.0", " 1.2.3"} {
		if _, err := ParseVersion(s); err == nil {
			t.Errorf("ParseVersion(%q) accepted", s)
		}
	}
}
