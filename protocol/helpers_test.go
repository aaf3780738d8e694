package protocol_test

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/lockergate/lockergate/protocol"
)

// decoder is protocol.Decode for one payload type, with a nil interface (not a
// typed nil pointer) on error.
type decoder func([]byte) (any, error)

func dec[T any, PT interface {
	*T
	protocol.Validator
}]() decoder {
	return func(b []byte) (any, error) {
		v, err := protocol.Decode[T, PT](b)
		if err != nil {
			if v != nil {
				return v, err
			}
			return nil, err
		}
		return v, nil
	}
}

// One decoder per payload type, named like the golden files they read.
var (
	decPresence          = dec[protocol.Presence]()
	decHealth            = dec[protocol.Health]()
	decEvent             = dec[protocol.Event]()
	decCommand           = dec[protocol.Command]()
	decCommandResult     = dec[protocol.CommandResult]()
	decCredSet           = dec[protocol.CredSet]()
	decCredsAck          = dec[protocol.CredsAck]()
	decConfig            = dec[protocol.Config]()
	decFwJob             = dec[protocol.FwJob]()
	decFwStatus          = dec[protocol.FwStatus]()
	decProvisionRequest  = dec[protocol.ProvisionRequest]()
	decProvisionResponse = dec[protocol.ProvisionResponse]()
)

// MustReadTestdata returns the contents of testdata/name.
func MustReadTestdata(tb testing.TB, name string) []byte {
	tb.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", name))
	if err != nil {
		tb.Fatal(err)
	}
	return b
}

// MustMutate decodes golden file name into a generic object, lets edit change
// it and returns the result as JSON: a golden example with one thing wrong.
func MustMutate(tb testing.TB, name string, edit func(m map[string]any)) []byte {
	tb.Helper()
	var m map[string]any
	if err := json.Unmarshal(MustReadTestdata(tb, name), &m); err != nil {
		tb.Fatalf("%s: %v", name, err)
	}
	edit(m)
	b, err := json.Marshal(m)
	if err != nil {
		tb.Fatal(err)
	}
	return b
}

// MustGeneric unmarshals b into a generic JSON value.
func MustGeneric(tb testing.TB, b []byte) any {
	tb.Helper()
	var v any
	if err := json.Unmarshal(b, &v); err != nil {
		tb.Fatalf("%s: %v", b, err)
	}
	return v
}

// MustTime parses a wire timestamp.
func MustTime(tb testing.TB, s string) protocol.Time {
	tb.Helper()
	v, err := protocol.ParseTime(s)
	if err != nil {
		tb.Fatal(err)
	}
	return protocol.Time{Time: v}
}

func ptr[T any](v T) *T { return &v }
