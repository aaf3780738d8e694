//go:build !race

package mqtt

// raceBuild: see lockergate_race_test.go.
const raceBuild = false
