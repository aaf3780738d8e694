package devicesim

import (
	"fmt"

	"github.com/lockergate/lockergate/protocol"
)

// Model is a locker model: its name and compartment layout.
type Model struct {
	Name         string
	Compartments []protocol.CompartmentSpec
}

// Validate reports whether the model could be provisioned (protocol rules for
// names, sizes, zones and compartment numbers).
func (m Model) Validate() error {
	req := protocol.ProvisionRequest{Serial: "x", Model: m.Name, FW: "x", Compartments: m.Compartments}
	if err := req.Validate(); err != nil {
		return fmt.Errorf("model %q: %w", m.Name, err)
	}
	for i, c := range m.Compartments {
		if c.N != i+1 {
			return fmt.Errorf("model %q: compartments must be numbered 1..%d in order", m.Name, len(m.Compartments))
		}
	}
	return nil
}

// block is a run of compartments of one size and zone.
type block struct {
	count      int
	size, zone string
}

func layout(blocks ...block) []protocol.CompartmentSpec {
	var out []protocol.CompartmentSpec
	for _, b := range blocks {
		for range b.count {
			out = append(out, protocol.CompartmentSpec{N: len(out) + 1, Size: b.size, Zone: b.zone})
		}
	}
	return out
}

// DefaultModels are the models a fleet picks from unless Options.Models says
// otherwise: a 24-compartment unit mixing sizes with a chilled section, and an
// 8-compartment unit with heated compartments for hot food.
var DefaultModels = []Model{
	{Name: "LX-24", Compartments: layout(
		block{6, "S", "ambient"},
		block{6, "M", "ambient"},
		block{4, "L", "ambient"},
		block{2, "XL", "ambient"},
		block{3, "S", "chilled"},
		block{2, "M", "chilled"},
		block{1, "L", "chilled"},
	)},
	{Name: "LX-8", Compartments: layout(
		block{2, "S", "heated"},
		block{2, "M", "heated"},
		block{2, "M", "ambient"},
		block{1, "L", "ambient"},
		block{1, "XL", "ambient"},
	)},
}
