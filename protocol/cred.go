package protocol

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
)

// CredMAC returns base64(HMAC-SHA256(credKey, code)), the form in which a pickup
// code travels to and is checked by the locker.
func CredMAC(credKey []byte, code string) string {
	m := hmac.New(sha256.New, credKey)
	m.Write([]byte(code))
	return base64.StdEncoding.EncodeToString(m.Sum(nil))
}

// CredMatches reports in constant time whether code matches mac under credKey.
func CredMatches(credKey []byte, code, mac string) bool {
	return hmac.Equal([]byte(CredMAC(credKey, code)), []byte(mac))
}
