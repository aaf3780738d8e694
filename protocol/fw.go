package protocol

import (
	"crypto/ed25519"
	"encoding/base64"
	"encoding/hex"
)

// FwSigMessage returns the bytes a firmware signature covers: the raw 32-byte
// SHA-256 of the image (not its hex form) followed by the version string.
func FwSigMessage(sha256Sum []byte, version string) []byte {
	msg := make([]byte, 0, len(sha256Sum)+len(version))
	msg = append(msg, sha256Sum...)
	return append(msg, version...)
}

// VerifyFwSig reports whether j.Sig is pub's Ed25519 signature over j's
// sha256 and version, as a device checks it before installing.
func VerifyFwSig(pub ed25519.PublicKey, j *FwJob) bool {
	sum, err := hex.DecodeString(j.SHA256)
	if err != nil || len(sum) != 32 || len(pub) != ed25519.PublicKeySize {
		return false
	}
	sig, err := base64.StdEncoding.DecodeString(j.Sig)
	if err != nil {
		return false
	}
	return ed25519.Verify(pub, FwSigMessage(sum, j.Version), sig)
}

// DecodeFwJob decodes a payload of fw/job, where the empty payload means no
// job: it returns nil and no error for it. Anything else is as Decode.
func DecodeFwJob(payload []byte) (*FwJob, error) {
	if len(payload) == 0 {
		return nil, nil
	}
	return Decode[FwJob](payload)
}
