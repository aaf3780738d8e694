//go:build race

package mqtt

// raceBuild: the race detector's instrumentation makes frames larger and
// doubles the stack guard, so stack sizes measured under it are larger.
const raceBuild = true
