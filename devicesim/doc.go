// Package devicesim simulates locker units: each Locker is a real MQTT client
// (paho) that provisions itself by claim, connects as its own device and speaks
// protocol v1 (protocol/, docs/protocol.md) with doors, keypad, occupancy
// sensors and health reports. A Fleet runs many of them against a broker.
//
// Concurrency: every locker has one goroutine (run) that owns its connection
// life cycle and handles what arrives from the gateway. paho's handler only
// appends to the locker's inbox and never blocks, so paho keeps reading
// acknowledgements however busy the locker is, and the locker may wait for
// them (it waits for its birth to be acknowledged before it counts as
// connected). Device state lives under the locker's mutex, which is also held
// while a message is handed to paho, so messages leave in the order their
// state changes happened, whichever goroutine (the locker's own, a door
// timer, a caller of EnterCode) caused them.
//
// Determinism: every random device decision comes from per-locker
// math/rand/v2 sources seeded from (fleet seed, locker index, stream), so the
// same seed gives the same serials, models and decisions regardless of
// scheduling. Separate streams keep decisions (model, driver behaviour),
// sensor noise, each kind of fault and network back-off jitter from
// perturbing each other. Boot ids and event ids are deliberately not seeded:
// the gateway records each event id once, so a rerun with the same seed must
// not repeat them.
//
// Scenarios (scenario.go, docs/simulator.md) describe a fleet in JSON:
// sites, models, behaviour rates and faults (fault.go). Faults are planned
// in scenario time from Start (Options.TimeScale compresses it) on timers,
// not goroutines; every decision can be observed (Options.OnDecision,
// Decision) to compare runs.
package devicesim
