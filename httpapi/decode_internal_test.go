package httpapi

import (
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

// TestDecodeTruncatesTimes: every time a request gives, however deep, is
// cut to microseconds (what PostgreSQL keeps), and nothing else changes.
func TestDecodeTruncatesTimes(t *testing.T) {
	type inner struct {
		At time.Time `json:"at"`
	}
	var v struct {
		A     time.Time  `json:"a"`
		B     *time.Time `json:"b"`
		C     []inner    `json:"c"`
		D     *inner     `json:"d"`
		E     any        `json:"e"`
		Name  string     `json:"name"`
		empty *time.Time
	}
	const ns = "2026-12-06T10:00:00.123456789Z"
	body := `{"a":"` + ns + `","b":"` + ns + `","c":[{"at":"` + ns + `"}],"d":{"at":"` + ns + `"},"e":"` + ns + `","name":"` + ns + `"}`
	if err := decode(httptest.NewRequest("POST", "/", strings.NewReader(body)), &v); err != nil {
		t.Fatal(err)
	}
	want := time.Date(2026, 12, 6, 10, 0, 0, 123456000, time.UTC)
	for name, got := range map[string]time.Time{"a": v.A, "b": *v.B, "c": v.C[0].At, "d": v.D.At} {
		if !got.Equal(want) {
			t.Errorf("%s = %v, want %v", name, got, want)
		}
	}
	if v.E != ns || v.Name != ns || v.empty != nil {
		t.Errorf("untimed fields changed: e %v, name %q", v.E, v.Name)
	}
}
