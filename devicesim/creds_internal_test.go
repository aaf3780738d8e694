package devicesim

import (
	"testing"

	"github.com/lockergate/lockergate/protocol"
)

// TestHasCredential: a locker holds a credential when its set has an entry
// of that id or one of its forms (id.p, id.q), and not for an id that only
// starts like one of them.
func TestHasCredential(t *testing.T) {
	l := &Locker{}
	l.creds = protocol.CredSet{Version: 3, Creds: []protocol.Credential{{ID: "k-10.p"}, {ID: "k-10.q"}, {ID: "k-2"}}}
	for id, want := range map[string]bool{"k-10": true, "k-2": true, "k-1": false, "k-10.p": true, "k": false, "k-20": false, "": false} {
		if got := l.HasCredential(id); got != want {
			t.Errorf("HasCredential(%q) = %v, want %v", id, got, want)
		}
	}
}
