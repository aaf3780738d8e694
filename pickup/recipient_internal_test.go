package pickup

import (
	"errors"
	"testing"

	"github.com/lockergate/lockergate/fleet"
)

// One code for several pickups goes to one person: oneRecipient refuses
// pickups of different recipients, and customers' unless each names the
// same customer.
func TestOneRecipient(t *testing.T) {
	alice, bob, anon := Recipient{Kind: "customer", Name: "Alice"}, Recipient{Kind: "customer", Name: "Bob"}, Recipient{Kind: "customer"}
	drv, dave, eve := Recipient{Kind: "driver", Platform: "speedy"}, Recipient{Kind: "driver", Platform: "speedy", Name: "Dave"},
		Recipient{Kind: "driver", Platform: "speedy", Name: "Eve"}
	for _, c := range []struct {
		name string
		rs   []Recipient
		ok   bool
	}{
		{"one unnamed customer", []Recipient{anon}, true},
		{"one customer's two orders", []Recipient{alice, alice}, true},
		{"two customers", []Recipient{alice, bob}, false},
		{"two unnamed customers", []Recipient{anon, anon}, false},
		{"a named and an unnamed customer", []Recipient{alice, anon}, false},
		{"an unnamed and a named customer", []Recipient{anon, alice}, false},
		{"a customer and a driver", []Recipient{alice, drv}, false},
		{"a driver and a customer", []Recipient{drv, anon}, false},
		{"one platform's unnamed drivers", []Recipient{drv, drv, drv}, true},
		{"a named driver and unnamed", []Recipient{dave, drv, dave}, true},
		{"two named drivers", []Recipient{dave, eve}, false},
		{"two named drivers apart", []Recipient{drv, dave, drv, eve}, false},
	} {
		err := oneRecipient(c.rs)
		if c.ok != (err == nil) || err != nil && !errors.Is(err, fleet.ErrUnprocessable) {
			t.Errorf("%s: %v, want ok %v (else ErrUnprocessable)", c.name, err, c.ok)
		}
	}
}
