package protocol_test

import (
	"bytes"
	"crypto/ed25519"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"testing"

	"github.com/lockergate/lockergate/protocol"
)

func TestCredMAC(t *testing.T) {
	key := make([]byte, 32)
	for i := range key {
		key[i] = byte(i)
	}
	const code = "493817"

	// Computed here with crypto/hmac, and separately (Python's hmac) for the
	// golden creds.json, whose cred_key is provision_response_ok.json's.
	m := hmac.New(sha256.New, key)
	m.Write([]byte(code))
	want := base64.StdEncoding.EncodeToString(m.Sum(nil))
	const golden = "wccpWH4Yk4YI/Pfzq9w/u82RfoBB/M67+z8PmruBOtU="
	if want != golden {
		t.Fatalf("test vector: crypto/hmac gives %s, golden file has %s", want, golden)
	}
	if got := protocol.CredMAC(key, code); got != want {
		t.Fatalf("CredMAC: got %s, want %s", got, want)
	}

	creds, err := protocol.Decode[protocol.CredSet](MustReadTestdata(t, "creds.json"))
	if err != nil {
		t.Fatal(err)
	}
	prov, err := protocol.Decode[protocol.ProvisionResponse](MustReadTestdata(t, "provision_response_ok.json"))
	if err != nil {
		t.Fatal(err)
	}
	credKey, err := base64.StdEncoding.DecodeString(prov.CredKey)
	if err != nil {
		t.Fatal(err)
	}
	mac := creds.Creds[0].MAC

	t.Run("Matches", func(t *testing.T) {
		if !protocol.CredMatches(credKey, code, mac) {
			t.Fatal("golden code does not match golden mac")
		}
	})
	t.Run("NoMatch", func(t *testing.T) {
		otherKey := bytes.Clone(credKey)
		otherKey[0] ^= 1
		for name, c := range map[string]struct {
			key       []byte
			code, mac string
		}{
			"WrongCode":     {credKey, "493818", mac},
			"CodePrefix":    {credKey, "49381", mac},
			"CodeSpace":     {credKey, code + " ", mac},
			"WrongKey":      {otherKey, code, mac},
			"NoKey":         {nil, code, mac},
			"EmptyMAC":      {credKey, code, ""},
			"URLAlphabet":   {credKey, code, "wccpWH4Yk4YI_Pfzq9w_u82RfoBB_M67-z8PmruBOtU="},
			"Unpadded":      {credKey, code, "wccpWH4Yk4YI/Pfzq9w/u82RfoBB/M67+z8PmruBOtU"},
			"CodeAsMACOnly": {credKey, mac, mac},
		} {
			if protocol.CredMatches(c.key, c.code, c.mac) {
				t.Errorf("%s: matches", name)
			}
		}
	})
}

func TestFwSig(t *testing.T) {
	// The golden job is signed by the key with seed 0x42 x 32, whose public
	// half is the golden provisioning answer's fw_pubkey.
	priv := ed25519.NewKeyFromSeed(bytes.Repeat([]byte{0x42}, 32))
	pub := priv.Public().(ed25519.PublicKey)
	prov, err := protocol.Decode[protocol.ProvisionResponse](MustReadTestdata(t, "provision_response_ok.json"))
	if err != nil {
		t.Fatal(err)
	}
	if got, want := prov.FwPubkey, base64.StdEncoding.EncodeToString(pub); got != want {
		t.Fatalf("fw_pubkey: got %s, want %s", got, want)
	}
	job, err := protocol.Decode[protocol.FwJob](MustReadTestdata(t, "fw_job.json"))
	if err != nil {
		t.Fatal(err)
	}

	t.Run("Message", func(t *testing.T) {
		sum := sha256.Sum256(make([]byte, job.Size)) // the golden image is all zeros
		got := protocol.FwSigMessage(sum[:], "1.5.0")
		want := append(sum[:], "1.5.0"...)
		if !bytes.Equal(got, want) || len(got) != 32+5 {
			t.Fatalf("got %x, want %x", got, want)
		}
		if !ed25519.Verify(pub, want, mustB64(t, job.Sig)) {
			t.Fatal("golden sig does not verify over sha256 || version")
		}
	})
	t.Run("OK", func(t *testing.T) {
		if !protocol.VerifyFwSig(pub, job) {
			t.Fatal("golden job does not verify")
		}
	})
	t.Run("Rejected", func(t *testing.T) {
		otherPub := ed25519.NewKeyFromSeed(bytes.Repeat([]byte{0x43}, 32)).Public().(ed25519.PublicKey)
		for name, mut := range map[string]func(j *protocol.FwJob) ed25519.PublicKey{
			"OtherKey":   func(j *protocol.FwJob) ed25519.PublicKey { return otherPub },
			"ShortKey":   func(j *protocol.FwJob) ed25519.PublicKey { return pub[:31] },
			"Downgrade":  func(j *protocol.FwJob) ed25519.PublicKey { j.Version = "1.4.0"; return pub },
			"OtherImage": func(j *protocol.FwJob) ed25519.PublicKey { j.SHA256 = "1" + j.SHA256[1:]; return pub },
			"BadHex":     func(j *protocol.FwJob) ed25519.PublicKey { j.SHA256 = "zz" + j.SHA256[2:]; return pub },
			"ShortHex":   func(j *protocol.FwJob) ed25519.PublicKey { j.SHA256 = j.SHA256[:62]; return pub },
			"BadBase64":  func(j *protocol.FwJob) ed25519.PublicKey { j.Sig = "!" + j.Sig[1:]; return pub },
			"NoSig":      func(j *protocol.FwJob) ed25519.PublicKey { j.Sig = ""; return pub },
		} {
			j := *job
			if protocol.VerifyFwSig(mut(&j), &j) {
				t.Errorf("%s: verifies", name)
			}
		}
	})
}

func mustB64(tb testing.TB, s string) []byte {
	tb.Helper()
	b, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		tb.Fatal(err)
	}
	return b
}

func TestFwJob_None(t *testing.T) {
	var none *protocol.FwJob
	if got := protocol.Encode(none); len(got) != 0 || got == nil {
		t.Fatalf("Encode(nil *FwJob): got %q, want empty payload", got)
	}
	t.Run("Empty", func(t *testing.T) {
		got, err := protocol.DecodeFwJob(nil)
		if got != nil || err != nil {
			t.Fatalf("got %+v, %v; want nil, nil", got, err)
		}
	})
	t.Run("OK", func(t *testing.T) {
		got, err := protocol.DecodeFwJob(MustReadTestdata(t, "fw_job.json"))
		if err != nil || got.Job != "j-5d1..." {
			t.Fatalf("got %+v, %v", got, err)
		}
	})
	t.Run("ErrMalformed", func(t *testing.T) {
		for _, p := range []string{" ", "null", "{}x"} {
			if _, err := protocol.DecodeFwJob([]byte(p)); !errors.Is(err, protocol.ErrMalformed) {
				t.Fatalf("%q: got %v, want ErrMalformed", p, err)
			}
		}
	})
	t.Run("ErrInvalid", func(t *testing.T) {
		if _, err := protocol.DecodeFwJob([]byte(`{}`)); !errors.Is(err, protocol.ErrInvalid) {
			t.Fatalf("got %v, want ErrInvalid", err)
		}
	})
}
