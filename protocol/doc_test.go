package protocol_test

import (
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"testing"
)

// TestDocExamples checks that every JSON example in docs/protocol.md is one of
// the golden files, and every golden file is shown there, so the page for
// device makers shows exactly the payloads these tests decode.
func TestDocExamples(t *testing.T) {
	doc, err := os.ReadFile(filepath.Join("..", "docs", "protocol.md"))
	if err != nil {
		t.Fatal(err)
	}
	blocks := regexp.MustCompile("(?s)```json\n(.*?)```").FindAllSubmatch(doc, -1)
	if len(blocks) == 0 {
		t.Fatal("no ```json blocks in docs/protocol.md")
	}
	files, err := filepath.Glob(filepath.Join("testdata", "*.json"))
	if err != nil {
		t.Fatal(err)
	}
	golden := map[string]any{}
	for _, f := range files {
		golden[filepath.Base(f)] = MustGeneric(t, MustReadTestdata(t, filepath.Base(f)))
	}
	shown := map[string]bool{}
	for _, b := range blocks {
		var v any
		if err := json.Unmarshal(b[1], &v); err != nil {
			t.Errorf("docs example is not JSON: %v\n%s", err, b[1])
			continue
		}
		found := false
		for name, g := range golden {
			if reflect.DeepEqual(v, g) {
				shown[name], found = true, true
			}
		}
		if !found {
			t.Errorf("docs example matches no testdata/*.json:\n%s", b[1])
		}
	}
	for name := range golden {
		if !shown[name] {
			t.Errorf("testdata/%s is not shown in docs/protocol.md", name)
		}
	}
}
