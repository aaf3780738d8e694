package devicesim

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
)

// Site is a store with lockers.
type Site struct {
	// ID is the gateway's site id; the site's claim token ties its lockers to it.
	ID string `json:"id"`
	// Lockers is how many lockers stand at the site.
	Lockers int `json:"lockers"`
	// Models names the models found at the site (from Options.Models), one
	// picked per locker uniformly from the seed; empty means every model.
	Models []string `json:"models,omitempty"`
	// ClaimToken provisions the site's lockers; empty: Options.ClaimToken.
	// Tokens are secrets and never come from scenario files.
	ClaimToken string `json:"-"`
}

// placement is where the fleet's lockers stand: site i holds local indexes
// [start[i], start[i+1]).
type placement struct {
	sites  []Site
	start  []int
	models [][]Model // per site
}

func sitesTotal(sites []Site) int {
	n := 0
	for _, s := range sites {
		n += s.Lockers
	}
	return n
}

func (o *Options) validateSites() []error {
	if len(o.Sites) == 0 {
		return nil
	}
	var errs []error
	seen := map[string]bool{}
	for _, s := range o.Sites {
		switch {
		case s.ID == "":
			errs = append(errs, errors.New("site without id"))
		case seen[s.ID]:
			errs = append(errs, fmt.Errorf("site %q given twice", s.ID))
		}
		seen[s.ID] = true
		if s.Lockers < 0 {
			errs = append(errs, fmt.Errorf("site %q: lockers must not be negative", s.ID))
		}
		for _, name := range s.Models {
			if !slices.ContainsFunc(o.Models, func(m Model) bool { return m.Name == name }) {
				errs = append(errs, fmt.Errorf("site %q: no model %q", s.ID, name))
			}
		}
	}
	if n := sitesTotal(o.Sites); n != o.Lockers {
		errs = append(errs, fmt.Errorf("sites hold %d lockers but lockers is %d", n, o.Lockers))
	}
	return errs
}

func newPlacement(o *Options) *placement {
	sites := o.Sites
	if len(sites) == 0 {
		sites = []Site{{Lockers: o.Lockers}}
	}
	p := &placement{sites: sites}
	n := 0
	for _, s := range sites {
		p.start = append(p.start, n)
		n += s.Lockers
		var ms []Model
		for _, m := range o.Models {
			if len(s.Models) == 0 || slices.Contains(s.Models, m.Name) {
				ms = append(ms, m)
			}
		}
		p.models = append(p.models, ms)
	}
	return p
}

// site returns the site number of local index i.
func (p *placement) site(i int) int {
	k, found := slices.BinarySearch(p.start, i)
	if !found {
		k--
	}
	// Sites with no lockers share their start with the next one: skip them.
	for k+1 < len(p.start) && p.start[k+1] == i {
		k++
	}
	return k
}

// pickModel chooses the model of the locker with fleet index index: one
// draw from its decision stream, among its site's models.
func (f *Fleet) pickModel(index int, decide *rand.Rand) Model {
	ms := f.place.models[f.place.site(index-f.opts.FirstIndex)]
	return ms[decide.IntN(len(ms))]
}

// Site returns the id of the locker's site ("" when the fleet has no sites).
func (l *Locker) Site() string { return l.x.site }

// claimToken is the claim token the locker provisions with.
func (l *Locker) claimToken() string {
	if l.x.claim != "" {
		return l.x.claim
	}
	return l.f.opts.ClaimToken
}
