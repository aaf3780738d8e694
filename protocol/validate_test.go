package protocol_test

import (
	"errors"
	"math"
	"strings"
	"testing"

	"github.com/lockergate/lockergate/protocol"
)

// edit is one change to a golden example.
type edit func(m map[string]any)

func set(k string, v any) edit { return func(m map[string]any) { m[k] = v } }
func del(k string) edit        { return func(m map[string]any) { delete(m, k) } }
func edits(es ...edit) edit {
	return func(m map[string]any) {
		for _, e := range es {
			e(m)
		}
	}
}
func long(n int) string { return strings.Repeat("a", n) }
func nums(n int) []any {
	s := make([]any, n)
	for i := range s {
		s[i] = i + 1
	}
	return s
}
func specs(n int) []any {
	s := make([]any, n)
	for i := range s {
		s[i] = map[string]any{"n": i + 1, "size": "S", "zone": "ambient"}
	}
	return s
}

// cred edits the first credential of creds.json.
func cred(k string, v any) edit {
	return func(m map[string]any) {
		c := m["creds"].([]any)[0].(map[string]any)
		if v == nil {
			delete(c, k)
		} else {
			c[k] = v
		}
	}
}

// lockout edits the lockout object of config.json.
func lockout(k string, v any) edit {
	return func(m map[string]any) { m["lockout"].(map[string]any)[k] = v }
}

// compartment edits compartment i of provision_request.json.
func compartment(i int, k string, v any) edit {
	return func(m map[string]any) { m["compartments"].([]any)[i].(map[string]any)[k] = v }
}

var ts = "2026-11-24T21:30:00.123Z"

// validationCases are golden examples with one rule broken (ErrInvalid) or
// stretched to its limit (OK).
var validationCases = []struct {
	name   string
	decode decoder
	file   string
	edit   edit
	ok     bool
}{
	// Presence.
	{"Presence/BirthWithoutFW", decPresence, "presence_birth.json", del("fw"), true},
	{"Presence/OnlineOnly", decPresence, "presence_birth.json", edits(del("fw"), del("model"), del("boot_id"), del("ts")), true},
	{"Presence/FWTooLong", decPresence, "presence_birth.json", set("fw", long(257)), false},
	{"Presence/ModelTooLong", decPresence, "presence_birth.json", set("model", long(257)), false},
	{"Presence/BootIDTooLong", decPresence, "presence_birth.json", set("boot_id", long(257)), false},
	{"Presence/FieldsAt256", decPresence, "presence_birth.json", edits(set("fw", long(256)), set("model", long(256)), set("boot_id", long(256))), true},
	{"Presence/BirthMinimal", decPresence, "presence_birth.json", edits(del("ts"), del("model"), del("boot_id")), true},
	{"Presence/WillWithExtras", decPresence, "presence_will.json", set("ts", ts), true},

	// Health.
	{"Health/NoTS", decHealth, "health.json", del("ts"), false},
	{"Health/NullTS", decHealth, "health.json", set("ts", nil), false},
	{"Health/NegativeSeq", decHealth, "health.json", set("seq", -1), false},
	{"Health/NegativeUptime", decHealth, "health.json", set("uptime_s", -1), false},
	{"Health/BadPower", decHealth, "health.json", set("power", "solar"), false},
	{"Health/BatteryBelow0", decHealth, "health.json", set("battery_pct", -1), false},
	{"Health/BatteryAbove100", decHealth, "health.json", set("battery_pct", 101), false},
	{"Health/NegativeFree", decHealth, "health.json", set("free_compartments", -1), false},
	{"Health/DoorFault0", decHealth, "health.json", set("door_faults", []any{4, 0}), false},
	{"Health/FWTooLong", decHealth, "health.json", set("fw", long(257)), false},
	{"Health/Battery", decHealth, "health.json", edits(set("power", "battery"), set("battery_pct", 0)), true},
	{"Health/Minimal", decHealth, "health.json", func(m map[string]any) {
		for k := range m {
			if k != "ts" {
				delete(m, k)
			}
		}
	}, true},

	// Events: each type in its minimal valid form, then each rule broken.
	{"Event/DoorOpenedByCredential", decEvent, "event.json", edits(del("occupied"), set("type", "door_opened"), set("by", "credential"), set("credential", "k-1")), true},
	{"Event/DoorOpenedByCommand", decEvent, "event.json", edits(del("occupied"), set("type", "door_opened"), set("by", "command"), set("command", "c-1")), true},
	{"Event/DoorOpenedManual", decEvent, "event.json", edits(del("occupied"), set("type", "door_opened"), set("by", "manual")), true},
	{"Event/DoorAjar", decEvent, "event.json", edits(del("occupied"), set("type", "door_ajar"), set("open_s", 180)), true},
	{"Event/CodeAccepted", decEvent, "event.json", edits(del("occupied"), del("compartment"), set("type", "code_accepted"), set("credential", "k-91a..."), set("compartments", []any{3, 5})), true},
	{"Event/CodeRejectedUnknown", decEvent, "event.json", edits(del("occupied"), del("compartment"), set("type", "code_rejected"), set("reason", "unknown")), true},
	{"Event/CodeRejectedExpired", decEvent, "event.json", edits(del("occupied"), del("compartment"), set("type", "code_rejected"), set("reason", "expired")), true},
	{"Event/CodeRejectedUsed", decEvent, "event.json", edits(del("occupied"), del("compartment"), set("type", "code_rejected"), set("reason", "used")), true},
	{"Event/CodeRejectedLockedOut", decEvent, "event.json", edits(del("occupied"), del("compartment"), set("type", "code_rejected"), set("reason", "locked_out")), true},
	{"Event/Tamper", decEvent, "event.json", edits(del("occupied"), del("compartment"), set("type", "tamper"), set("detail", "case opened")), true},
	{"Event/PowerMains", decEvent, "event.json", edits(del("occupied"), del("compartment"), set("type", "power"), set("source", "mains")), true},
	{"Event/PowerBattery", decEvent, "event.json", edits(del("occupied"), del("compartment"), set("type", "power"), set("source", "battery")), true},
	{"Event/Reboot", decEvent, "event.json", edits(del("occupied"), del("compartment"), set("type", "reboot"), set("reason", "watchdog")), true},
	{"Event/ID64", decEvent, "event.json", set("id", long(64)), true},
	{"Event/NoID", decEvent, "event.json", del("id"), false},
	{"Event/ID128", decEvent, "event.json", set("id", long(128)), true},
	{"Event/ID129", decEvent, "event.json", set("id", long(129)), false},
	{"Event/IDBase64", decEvent, "event.json", set("id", "e/1+Zg=="), true},
	{"Event/IDSpace", decEvent, "event.json", set("id", "e 1"), true},
	{"Event/IDControl", decEvent, "event.json", set("id", "e\x01"), false},
	{"Event/NoTS", decEvent, "event.json", del("ts"), false},
	{"Event/NoType", decEvent, "event.json", del("type"), false},
	{"Event/UnknownType", decEvent, "event.json", set("type", "door_slammed"), false},
	{"Event/DoorClosedNoCompartment", decEvent, "event.json", del("compartment"), false},
	{"Event/DoorClosedCompartment0", decEvent, "event.json", set("compartment", 0), false},
	{"Event/DoorClosedNoOccupied", decEvent, "event.json", del("occupied"), false},
	{"Event/DoorOpenedNoCompartment", decEvent, "event.json", edits(del("compartment"), set("type", "door_opened")), false},
	{"Event/DoorOpenedBadBy", decEvent, "event.json", edits(set("type", "door_opened"), set("by", "magic")), false},
	{"Event/DoorAjarNoCompartment", decEvent, "event.json", edits(del("compartment"), set("type", "door_ajar")), false},
	{"Event/DoorAjarNegativeOpenS", decEvent, "event.json", edits(set("type", "door_ajar"), set("open_s", -5)), false},
	{"Event/CodeAcceptedNoCredential", decEvent, "event.json", set("type", "code_accepted"), false},
	{"Event/CodeAcceptedCompartment0", decEvent, "event.json", edits(set("type", "code_accepted"), set("credential", "k-1"), set("compartments", []any{3, 0})), false},
	{"Event/CodeRejectedNoReason", decEvent, "event.json", set("type", "code_rejected"), false},
	{"Event/CodeRejectedBadReason", decEvent, "event.json", edits(set("type", "code_rejected"), set("reason", "typo")), false},
	{"Event/PowerNoSource", decEvent, "event.json", set("type", "power"), false},
	{"Event/PowerBadSource", decEvent, "event.json", edits(set("type", "power"), set("source", "solar")), false},
	{"Event/CredentialTooLong", decEvent, "event.json", edits(set("type", "door_opened"), set("credential", long(257))), false},
	{"Event/CommandTooLong", decEvent, "event.json", edits(set("type", "door_opened"), set("command", long(257))), false},
	// A field of another type is an unknown field for this one: ignored,
	// whatever it holds.
	{"Event/ForeignTooLong", decEvent, "event.json", set("command", long(257)), true},
	{"Event/ForeignWrongType", decEvent, "event.json", edits(set("type", "tamper"), set("compartment", "left"), set("occupied", "maybe")), true},
	{"Event/ForeignOutOfRange", decEvent, "event.json", edits(set("type", "reboot"), set("compartments", []any{0}), set("open_s", -1)), true},
	{"Event/OwnWrongType", decEvent, "event.json", set("compartment", "left"), false},
	{"Event/ReasonLongIsClipped", decEvent, "event.json", edits(set("type", "reboot"), set("reason", long(257))), true},
	{"Event/DetailLongIsClipped", decEvent, "event.json", edits(set("type", "tamper"), set("detail", long(257))), true},

	// Commands: unknown types and bad compartments pass, so the device can
	// answer them "rejected".
	{"Command/SetService", decCommand, "command.json", edits(del("reason"), set("type", "set_service"), set("in_service", false)), true},
	{"Command/Reboot", decCommand, "command.json", edits(del("reason"), del("compartment"), set("type", "reboot")), true},
	{"Command/UnknownType", decCommand, "command.json", set("type", "self_destruct"), true},
	{"Command/NoIssuedAt", decCommand, "command.json", del("issued_at"), true},
	{"Command/NoID", decCommand, "command.json", del("id"), false},
	{"Command/BadID", decCommand, "command.json", set("id", "c#1"), false},
	{"Command/NoType", decCommand, "command.json", del("type"), false},
	{"Command/NoExpiresAt", decCommand, "command.json", del("expires_at"), false},

	// Command results.
	{"CommandResult/Rejected", decCommandResult, "command_result_ok.json", set("status", "rejected"), true},
	{"CommandResult/Expired", decCommandResult, "command_result_ok.json", set("status", "expired"), true},
	{"CommandResult/NoTS", decCommandResult, "command_result_ok.json", del("ts"), true},
	{"CommandResult/NoID", decCommandResult, "command_result_ok.json", del("id"), false},
	{"CommandResult/BadID", decCommandResult, "command_result_ok.json", set("id", "c+1"), false},
	{"CommandResult/NoStatus", decCommandResult, "command_result_ok.json", del("status"), false},
	{"CommandResult/BadStatus", decCommandResult, "command_result_ok.json", set("status", "done"), false},
	{"CommandResult/ErrorLongIsClipped", decCommandResult, "command_result_failed.json", set("error", long(257)), true},

	// Credential sets.
	{"CredSet/Empty", decCredSet, "creds.json", set("creds", []any{}), true},
	{"CredSet/QR", decCredSet, "creds.json", cred("kind", "qr"), true},
	{"CredSet/NegativeVersion", decCredSet, "creds.json", set("version", -1), false},
	{"CredSet/CredNoID", decCredSet, "creds.json", cred("id", nil), false},
	{"CredSet/CredBadID", decCredSet, "creds.json", cred("id", "k/1"), false},
	{"CredSet/CredBadKind", decCredSet, "creds.json", cred("kind", "nfc"), false},
	{"CredSet/CredNoKind", decCredSet, "creds.json", cred("kind", nil), false},
	{"CredSet/CredNoMAC", decCredSet, "creds.json", cred("mac", nil), false},
	{"CredSet/CredNoCompartments", decCredSet, "creds.json", cred("compartments", []any{}), false},
	{"CredSet/CredCompartment0", decCredSet, "creds.json", cred("compartments", []any{3, 0}), false},
	{"CredSet/CredGroup", decCredSet, "creds.json", cred("group", 7), true},
	{"CredSet/CredGroupNegative", decCredSet, "creds.json", cred("group", -1), false},
	{"CredSet/CredGroupString", decCredSet, "creds.json", cred("group", "k-91a"), false},
	{"CredsAck/Zero", decCredsAck, "creds_ack.json", set("version", 0), true},
	{"CredsAck/NegativeVersion", decCredsAck, "creds_ack.json", set("version", -1), false},

	// Configuration.
	{"Config/LockS0", decConfig, "config.json", lockout("lock_s", 0), true},
	{"Config/NegativeVersion", decConfig, "config.json", set("version", -1), false},
	{"Config/HealthInterval0", decConfig, "config.json", set("health_interval_s", 0), false},
	{"Config/DoorAjar0", decConfig, "config.json", set("door_ajar_s", 0), false},
	{"Config/NoLockout", decConfig, "config.json", del("lockout"), false},
	{"Config/MaxFailures0", decConfig, "config.json", lockout("max_failures", 0), false},
	{"Config/Window0", decConfig, "config.json", lockout("window_s", 0), false},
	{"Config/NegativeLockS", decConfig, "config.json", lockout("lock_s", -1), false},

	// Firmware jobs and status.
	{"FwJob/NoDeadline", decFwJob, "fw_job.json", del("deadline"), true},
	{"FwJob/UpperHex", decFwJob, "fw_job.json", set("sha256", strings.ToUpper("2daeb1f36095b44b318410b3f4e8b5d989dcc7bb023d1426c492dab0a3053e74")), true},
	{"FwJob/NoJob", decFwJob, "fw_job.json", del("job"), false},
	{"FwJob/BadJob", decFwJob, "fw_job.json", set("job", "j$1"), false},
	{"FwJob/NoVersion", decFwJob, "fw_job.json", del("version"), false},
	{"FwJob/VersionTooLong", decFwJob, "fw_job.json", set("version", long(257)), false},
	{"FwJob/NoURL", decFwJob, "fw_job.json", del("url"), false},
	{"FwJob/Size0", decFwJob, "fw_job.json", set("size", 0), false},
	{"FwJob/NegativeSize", decFwJob, "fw_job.json", set("size", -1), false},
	{"FwJob/SHA256Short", decFwJob, "fw_job.json", set("sha256", long(63)), false},
	{"FwJob/SHA256Placeholder", decFwJob, "fw_job.json", set("sha256", "hex"), false},
	{"FwJob/SHA256NotHex", decFwJob, "fw_job.json", set("sha256", strings.Repeat("z", 64)), false},
	{"FwJob/NoSig", decFwJob, "fw_job.json", del("sig"), false},
	{"FwStatus/Verifying", decFwStatus, "fw_status.json", edits(del("progress"), set("state", "verifying")), true},
	{"FwStatus/Installing", decFwStatus, "fw_status.json", edits(del("progress"), set("state", "installing")), true},
	{"FwStatus/Rebooting", decFwStatus, "fw_status.json", edits(del("progress"), set("state", "rebooting")), true},
	{"FwStatus/Succeeded", decFwStatus, "fw_status.json", edits(del("progress"), set("state", "succeeded")), true},
	{"FwStatus/Rejected", decFwStatus, "fw_status.json", edits(del("progress"), set("state", "rejected")), true},
	{"FwStatus/FailedDownload", decFwStatus, "fw_status.json", edits(set("state", "failed"), set("error", "download")), true},
	{"FwStatus/FailedChecksum", decFwStatus, "fw_status.json", edits(set("state", "failed"), set("error", "checksum")), true},
	{"FwStatus/FailedSignature", decFwStatus, "fw_status.json", edits(set("state", "failed"), set("error", "signature")), true},
	{"FwStatus/FailedInstall", decFwStatus, "fw_status.json", edits(set("state", "failed"), set("error", "install")), true},
	{"FwStatus/FailedBoot", decFwStatus, "fw_status.json", edits(set("state", "failed"), set("error", "boot")), true},
	{"FwStatus/FailedDeadline", decFwStatus, "fw_status.json", edits(set("state", "failed"), set("error", "deadline")), true},
	{"FwStatus/Progress0", decFwStatus, "fw_status.json", set("progress", 0), true},
	{"FwStatus/Progress1", decFwStatus, "fw_status.json", set("progress", 1), true},
	{"FwStatus/NoJob", decFwStatus, "fw_status.json", del("job"), false},
	{"FwStatus/BadJob", decFwStatus, "fw_status.json", set("job", ""), false},
	{"FwStatus/NoState", decFwStatus, "fw_status.json", del("state"), false},
	{"FwStatus/BadState", decFwStatus, "fw_status.json", set("state", "done"), false},
	{"FwStatus/FailedNoError", decFwStatus, "fw_status.json", set("state", "failed"), true},
	{"FwStatus/FailedOtherError", decFwStatus, "fw_status.json", edits(set("state", "failed"), set("error", "cosmic_ray")), true},
	{"FwStatus/ProgressBelow0", decFwStatus, "fw_status.json", set("progress", -0.01), false},
	{"FwStatus/ProgressAbove1", decFwStatus, "fw_status.json", set("progress", 1.01), false},
	{"FwStatus/ErrorLongIsClipped", decFwStatus, "fw_status.json", set("error", long(257)), true},

	// Provisioning.
	{"ProvisionRequest/256Compartments", decProvisionRequest, "provision_request.json", set("compartments", specs(256)), true},
	{"ProvisionRequest/Sizes", decProvisionRequest, "provision_request.json", edits(compartment(0, "size", "S"), compartment(1, "size", "XL"), compartment(1, "zone", "heated")), true},
	{"ProvisionRequest/NoSerial", decProvisionRequest, "provision_request.json", del("serial"), false},
	{"ProvisionRequest/SerialSlash", decProvisionRequest, "provision_request.json", set("serial", "SN/1"), false},
	{"ProvisionRequest/Serial65", decProvisionRequest, "provision_request.json", set("serial", long(65)), false},
	{"ProvisionRequest/NoModel", decProvisionRequest, "provision_request.json", del("model"), false},
	{"ProvisionRequest/ModelTooLong", decProvisionRequest, "provision_request.json", set("model", long(257)), false},
	{"ProvisionRequest/NoFW", decProvisionRequest, "provision_request.json", del("fw"), false},
	{"ProvisionRequest/FWTooLong", decProvisionRequest, "provision_request.json", set("fw", long(257)), false},
	{"ProvisionRequest/NoCompartments", decProvisionRequest, "provision_request.json", set("compartments", []any{}), false},
	{"ProvisionRequest/257Compartments", decProvisionRequest, "provision_request.json", set("compartments", specs(257)), false},
	{"ProvisionRequest/N0", decProvisionRequest, "provision_request.json", compartment(0, "n", 0), false},
	{"ProvisionRequest/DuplicateN", decProvisionRequest, "provision_request.json", compartment(1, "n", 1), false},
	// Vendors number compartments their own way; what the store cannot
	// hold (an int32 would take 1<<32+3 for 3) is refused.
	{"ProvisionRequest/NVendorNumbering", decProvisionRequest, "provision_request.json", compartment(1, "n", 1204), true},
	{"ProvisionRequest/NMaxInt32", decProvisionRequest, "provision_request.json", compartment(1, "n", math.MaxInt32), true},
	{"ProvisionRequest/NOverInt32", decProvisionRequest, "provision_request.json", compartment(1, "n", int64(math.MaxInt32)+1), false},
	{"ProvisionRequest/NWrapsTo3", decProvisionRequest, "provision_request.json", compartment(1, "n", int64(1)<<32+3), false},
	{"ProvisionRequest/BadSize", decProvisionRequest, "provision_request.json", compartment(0, "size", "XXL"), false},
	{"ProvisionRequest/LowercaseSize", decProvisionRequest, "provision_request.json", compartment(0, "size", "m"), false},
	{"ProvisionRequest/BadZone", decProvisionRequest, "provision_request.json", compartment(1, "zone", "frozen"), false},
	{"ProvisionResponse/OKMinimal", decProvisionResponse, "provision_response_ok.json", edits(del("fw_pubkey"), del("broker")), true},
	{"ProvisionResponse/NoStatus", decProvisionResponse, "provision_response_ok.json", del("status"), false},
	{"ProvisionResponse/BadStatus", decProvisionResponse, "provision_response_ok.json", set("status", "pending"), false},
	{"ProvisionResponse/OKNoDeviceID", decProvisionResponse, "provision_response_ok.json", del("device_id"), false},
	{"ProvisionResponse/OKBadDeviceID", decProvisionResponse, "provision_response_ok.json", set("device_id", "lk/1"), false},
	{"ProvisionResponse/OKNoPassword", decProvisionResponse, "provision_response_ok.json", del("password"), false},
	{"ProvisionResponse/OKNoCredKey", decProvisionResponse, "provision_response_ok.json", del("cred_key"), false},
	{"ProvisionResponse/ErrorNoError", decProvisionResponse, "provision_response_error.json", del("error"), false},
}

func TestValidate(t *testing.T) {
	for _, tt := range validationCases {
		name := tt.name + "/ErrInvalid"
		if tt.ok {
			name = tt.name + "/OK"
		}
		t.Run(name, func(t *testing.T) {
			b := MustMutate(t, tt.file, tt.edit)
			v, err := tt.decode(b)
			if tt.ok {
				if err != nil {
					t.Fatalf("%s: %v", b, err)
				}
				return
			}
			if !errors.Is(err, protocol.ErrInvalid) {
				t.Fatalf("%s: got %+v, %v; want ErrInvalid", b, v, err)
			}
			if v != nil {
				t.Fatalf("got value %+v with error", v)
			}
			if errors.Is(err, protocol.ErrMalformed) || errors.Is(err, protocol.ErrTooLarge) {
				t.Fatalf("%v: also matches another sentinel", err)
			}
		})
	}
}

// TestDescriptiveTextClipped: a tamper's detail, a reboot's reason and the
// error of a command's answer or a firmware report over 256 bytes are cut
// to 256 at a character boundary, not refused (the tamper's alert, the
// command's end and the job's failure would be lost); the body as read
// keeps the whole text. Ids over 256 bytes are still refused (TestValidate).
func TestDescriptiveTextClipped(t *testing.T) {
	// 255 bytes, then a 3-byte character that would end at byte 258.
	text := long(255) + "€" + long(100)
	want := long(255)
	event, body, err := protocol.DecodeBody[protocol.Event](MustMutate(t, "event.json", edits(set("type", "tamper"), set("detail", text))))
	if err != nil || event.Detail != want {
		t.Fatalf("tamper: %q, %v; want the detail cut to %d bytes", event.Detail, err, len(want))
	}
	if !strings.Contains(string(body), text) {
		t.Fatalf("the body as read lost the whole detail: %s", body)
	}
	reboot, err := protocol.Decode[protocol.Event](MustMutate(t, "event.json", edits(set("type", "reboot"), set("reason", text))))
	if err != nil || reboot.Reason != want {
		t.Fatalf("reboot: %q, %v", reboot.Reason, err)
	}
	res, err := protocol.Decode[protocol.CommandResult](MustMutate(t, "command_result_failed.json", set("error", text)))
	if err != nil || res.Error != want {
		t.Fatalf("command result: %q, %v", res.Error, err)
	}
	st, err := protocol.Decode[protocol.FwStatus](MustMutate(t, "fw_status.json", set("error", text)))
	if err != nil || st.Error != want {
		t.Fatalf("fw status: %q, %v", st.Error, err)
	}
	if _, err := protocol.Decode[protocol.Event](MustMutate(t, "event.json", edits(set("type", "door_opened"), set("credential", text)))); !errors.Is(err, protocol.ErrInvalid) {
		t.Fatalf("an id over 256 bytes: %v, want ErrInvalid", err)
	}
}

// TestValidate_NotOnTheWire covers rules that only values built in Go can
// break: JSON has no NaN or infinity.
func TestValidate_NotOnTheWire(t *testing.T) {
	base := func() protocol.Health { return protocol.Health{TS: protocol.Now()} }
	for name, v := range map[string]protocol.Validator{
		"HealthTempNaN":     func() *protocol.Health { h := base(); h.TempC = ptr(math.NaN()); return &h }(),
		"HealthTempInf":     func() *protocol.Health { h := base(); h.TempC = ptr(math.Inf(-1)); return &h }(),
		"FwStatusNaN":       &protocol.FwStatus{Job: "j-1", State: protocol.FwDownloading, Progress: ptr(math.NaN())},
		"FwStatusInf":       &protocol.FwStatus{Job: "j-1", State: protocol.FwDownloading, Progress: ptr(math.Inf(1))},
		"PresenceFWTooLong": &protocol.Presence{Online: true, FW: strings.Repeat("9", 257)},
	} {
		t.Run(name+"/Error", func(t *testing.T) {
			if err := v.Validate(); err == nil {
				t.Fatalf("%+v: got nil error", v)
			}
		})
	}
}
