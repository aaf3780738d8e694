package devicesim

import (
	"errors"
	"strings"
	"testing"
)

func TestStartErrorGroupsPerLockerDetails(t *testing.T) {
	e := &StartError{Total: 3, Failed: map[string]error{
		"SIM-000001": errors.New("connect as lk-abc_1: dial tcp 127.0.0.2:40001->127.0.0.1:1883: socket: too many open files"),
		"SIM-000002": errors.New("connect as lk-Xyz-9: dial tcp 127.0.0.2:40002->127.0.0.1:1883: socket: too many open files"),
		"SIM-000003": errors.New("provision: no answer within 30s"),
	}}
	msg := e.Error()
	if !strings.Contains(msg, "2× connect as lk-*: dial tcp 127.0.0.2:*->127.0.0.1:1883: socket: too many open files (SIM-000001, SIM-000002)") ||
		!strings.Contains(msg, "1× provision: no answer within 30s") {
		t.Fatalf("not grouped by cause: %s", msg)
	}
}
