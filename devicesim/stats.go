package devicesim

import "sync/atomic"

// Stats are fleet-wide counters since NewFleet (Connected is a gauge).
type Stats struct {
	Lockers         int    `json:"lockers"`
	Connected       int    `json:"connected"`
	Provisioned     uint64 `json:"provisioned"`
	Connects        uint64 `json:"connects"`
	ConnectFailures uint64 `json:"connect_failures"`
	ConnectionsLost uint64 `json:"connections_lost"` // unexpected losses, not Disconnect or reboot
	Published       uint64 `json:"published"`        // acknowledged (QoS 1) or written (QoS 0)
	PublishErrors   uint64 `json:"publish_errors"`
	Interrupted     uint64 `json:"interrupted"` // publishes cut off by a lost connection, resent
	// EventsInFlight counts events handed to the connection and not yet
	// acknowledged, nor failed: the ones a lost connection would make the
	// lockers send again.
	EventsInFlight   int    `json:"events_in_flight"`
	Received         uint64 `json:"received"`
	DecodeErrors     uint64 `json:"decode_errors"`
	CommandsAnswered uint64 `json:"commands_answered"` // results sent, repeats included
	CommandsRun      uint64 `json:"commands_run"`      // effects run (each command id at most once)
	CommandRepeats   uint64 `json:"command_repeats"`   // repeated ids answered from memory
	CodesAccepted    uint64 `json:"codes_accepted"`
	CodesRejected    uint64 `json:"codes_rejected"`
	Dropped          uint64 `json:"dropped"` // lost: offline queue or inbox full, or resends exhausted
	// Faults injected (Options.Faults, LoseNetwork, Tamper, LosePower).
	NetworkLosses   uint64 `json:"network_losses"`
	DoorJams        uint64 `json:"door_jams"`
	Tampers         uint64 `json:"tampers"`
	PowerCuts       uint64 `json:"power_cuts"`
	GatewayRestarts uint64 `json:"gateway_restarts"`
	RestartsSkipped uint64 `json:"gateway_restarts_skipped,omitempty"` // planned, but no GatewayRestart hook
	RestartErrors   uint64 `json:"gateway_restart_errors,omitempty"`
}

// Errors sums the counters that indicate trouble.
func (s Stats) Errors() uint64 {
	return s.ConnectFailures + s.ConnectionsLost + s.PublishErrors + s.DecodeErrors + s.Dropped + s.RestartErrors
}

// Pickups counts collections at the keypad: codes accepted.
func (s Stats) Pickups() uint64 { return s.CodesAccepted }

type counters struct {
	connected, eventsInFlight                               atomic.Int64
	provisioned, connects, connectFailures, connectionsLost atomic.Uint64
	published, publishErrors, received, decodeErrors        atomic.Uint64
	interrupted                                             atomic.Uint64
	commandsAnswered, commandsRun, commandRepeats           atomic.Uint64
	codesAccepted, codesRejected, dropped                   atomic.Uint64
	networkLosses, doorJams, tampers, powerCuts             atomic.Uint64
	gatewayRestarts, restartsSkipped, restartErrors         atomic.Uint64
}

func (c *counters) snapshot(lockers int) Stats {
	return Stats{
		Lockers:          lockers,
		Connected:        int(c.connected.Load()),
		Provisioned:      c.provisioned.Load(),
		Connects:         c.connects.Load(),
		ConnectFailures:  c.connectFailures.Load(),
		ConnectionsLost:  c.connectionsLost.Load(),
		Published:        c.published.Load(),
		PublishErrors:    c.publishErrors.Load(),
		Interrupted:      c.interrupted.Load(),
		EventsInFlight:   int(c.eventsInFlight.Load()),
		Received:         c.received.Load(),
		DecodeErrors:     c.decodeErrors.Load(),
		CommandsAnswered: c.commandsAnswered.Load(),
		CommandsRun:      c.commandsRun.Load(),
		CommandRepeats:   c.commandRepeats.Load(),
		CodesAccepted:    c.codesAccepted.Load(),
		CodesRejected:    c.codesRejected.Load(),
		Dropped:          c.dropped.Load(),
		NetworkLosses:    c.networkLosses.Load(),
		DoorJams:         c.doorJams.Load(),
		Tampers:          c.tampers.Load(),
		PowerCuts:        c.powerCuts.Load(),
		GatewayRestarts:  c.gatewayRestarts.Load(),
		RestartsSkipped:  c.restartsSkipped.Load(),
		RestartErrors:    c.restartErrors.Load(),
	}
}
