package protocol_test

import (
	"crypto/ed25519"
	"encoding/base64"
	"reflect"
	"testing"

	"github.com/lockergate/lockergate/protocol"
)

// The Lockergate extensions of fw/job (docs/protocol.md, "Firmware job"):
// an install window and the forced-downgrade mark.

func TestFwJobWindowGolden(t *testing.T) {
	raw := MustReadTestdata(t, "fw_job_window.json")
	got, err := decFwJob(raw)
	if err != nil {
		t.Fatal(err)
	}
	j := got.(*protocol.FwJob)
	if j.InstallAfter != MustTime(t, "2026-11-25T08:00:00.000Z") || j.InstallBefore != MustTime(t, "2026-11-25T11:00:00.000Z") || j.Downgrade {
		t.Fatalf("decoded %+v", j)
	}
	if g, w := MustGeneric(t, protocol.Encode(j)), MustGeneric(t, raw); !reflect.DeepEqual(g, w) {
		t.Fatalf("encode: got %v, want %v", g, w)
	}
	// The extension fields are not signed: the signature still verifies.
	pub, _ := base64.StdEncoding.DecodeString("IVL40Zt5HSRFMkLhXy6rbLfP+ntqXtMAl5YOBpiB2xI=")
	if !protocol.VerifyFwSig(ed25519.PublicKey(pub), j) {
		t.Fatal("signature of the windowed job does not verify")
	}
	// A job without the extensions encodes without them.
	plain := *j
	plain.InstallAfter, plain.InstallBefore = protocol.Time{}, protocol.Time{}
	if m := MustGeneric(t, protocol.Encode(&plain)).(map[string]any); m["install_after"] != nil || m["downgrade"] != nil {
		t.Fatalf("plain job encodes extension fields: %v", m)
	}
}

func TestFwJobWindowInvalid(t *testing.T) {
	for name, mutate := range map[string]func(m map[string]any){
		"OnlyAfter":     func(m map[string]any) { delete(m, "install_before") },
		"OnlyBefore":    func(m map[string]any) { delete(m, "install_after") },
		"BeforeIsFirst": func(m map[string]any) { m["install_before"] = "2026-11-25T07:00:00.000Z" },
		"Empty":         func(m map[string]any) { m["install_before"] = m["install_after"] },
	} {
		t.Run(name, func(t *testing.T) {
			if _, err := decFwJob(MustMutate(t, "fw_job_window.json", mutate)); err == nil {
				t.Fatal("accepted")
			}
		})
	}
}
