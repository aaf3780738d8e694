package protocol_test

import (
	"strconv"
	"strings"
	"testing"

	"github.com/lockergate/lockergate/protocol"
)

// TestProvisionRequestCompartmentNumberBound: a number the gateway cannot
// store is refused with an error that names it and the bound.
func TestProvisionRequestCompartmentNumberBound(t *testing.T) {
	if strconv.IntSize < 64 {
		t.Skip("an int cannot hold a number past int32 on this architecture")
	}
	big := int64(1)<<32 + 3
	r := protocol.ProvisionRequest{Serial: "SN-1", Model: "LX", FW: "1.0",
		Compartments: []protocol.CompartmentSpec{{N: 1, Size: "M", Zone: "ambient"}, {N: int(big), Size: "M", Zone: "ambient"}}}
	err := r.Validate()
	if err == nil || !strings.Contains(err.Error(), "n=4294967299") || !strings.Contains(err.Error(), "2147483647") {
		t.Fatalf("Validate: %v, want the number and the bound named", err)
	}
	r.Compartments[1].N = protocol.MaxCompartmentNumber
	if err := r.Validate(); err != nil {
		t.Fatalf("Validate with n = MaxCompartmentNumber: %v", err)
	}
}
