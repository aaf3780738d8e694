//go:build !unix

package main

import "time"

func raiseFileLimit(uint64) error { return nil }

func cpuTime() time.Duration { return 0 }
