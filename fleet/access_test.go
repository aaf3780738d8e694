package fleet

import (
	"strings"
	"testing"
)

func TestValidName(t *testing.T) {
	for _, tc := range []struct {
		name string
		ok   bool
	}{
		{"speedy", true},
		{"Speedy Eats", true},
		{"Café Rapide", true},
		{"front-desk.2", true},
		{strings.Repeat("n", MaxNameLen), true},
		{"", false},
		{strings.Repeat("n", MaxNameLen+1), false},
		{" speedy", false},
		{"speedy ", false},
		{"line\nbreak", false},
		{"nul\x00", false},
		{"bad\xffutf8", false},
		{"speedy\u200b", false}, // a zero-width space
		{"\u202espeedy", false}, // a bidi override
	} {
		if got := ValidName(tc.name); got != tc.ok {
			t.Errorf("ValidName(%q) = %v, want %v", tc.name, got, tc.ok)
		}
	}
}
