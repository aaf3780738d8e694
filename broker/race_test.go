//go:build race

package broker

// raceEnabled reports that the race detector is on: it changes frame sizes
// (TestParkedStacksShrink).
const raceEnabled = true
