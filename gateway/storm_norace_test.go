//go:build !race

package gateway_test

// stormRace reports that the race detector is on (it sizes TestReconnectStorm).
const stormRace = false
