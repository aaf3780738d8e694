package httpapi

// Idempotency-Key: a create request's first answer kept per token and key,
// replayed to its repeats (docs/api.md).

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"strings"
	"unicode"

	"github.com/lockergate/lockergate/fleet"
)

// idempotent makes a create handler honour Idempotency-Key: a repeat with the
// same key and body returns the first answer and creates nothing; the same
// key with another body is a 409.
func (s *Server) idempotent(h handler, secrets secretSpec) handler {
	return s.idempotentBy(h, secrets, func(r *http.Request) (*request, error) {
		body, err := readAllLimited(r)
		if err != nil {
			return nil, err
		}
		raw := sha256.Sum256(body)
		sum := sha256.Sum256(canonicalJSON(body))
		r.Body = nopCloser{bytes.NewReader(body)}
		return &request{route: r.Method + " " + r.URL.Path, hash: sum[:], rawHash: raw[:]}, nil
	})
}

// canonicalJSON is body in one spelling of its value, so that a repeat
// whose client wrote the same JSON another way (key order, spaces, escapes)
// is the same request: objects with their keys sorted, numbers as written.
// A body that is not one JSON value is itself.
func canonicalJSON(body []byte) []byte {
	d := json.NewDecoder(bytes.NewReader(body))
	d.UseNumber()
	var v any
	if err := d.Decode(&v); err != nil || d.More() {
		return body
	}
	if _, err := d.Token(); err != io.EOF || foldedKeys(v) {
		return body
	}
	out, err := json.Marshal(v)
	if err != nil {
		return body
	}
	return out
}

// foldedKeys reports whether an object in v has two keys equal but for
// case: encoding/json gives a struct field the last of them in the body's
// order, which sorting the keys would lose.
func foldedKeys(v any) bool {
	switch v := v.(type) {
	case map[string]any:
		folded := make(map[string]bool, len(v))
		for k, e := range v {
			f := foldKey(k)
			if folded[f] {
				return true
			}
			folded[f] = true
			if foldedKeys(e) {
				return true
			}
		}
	case []any:
		for _, e := range v {
			if foldedKeys(e) {
				return true
			}
		}
	}
	return false
}

// foldKey is k with each letter in one case of its fold class, so that
// keys strings.EqualFold holds equal (as encoding/json matches fields) are
// equal.
func foldKey(k string) string {
	return strings.Map(func(r rune) rune {
		least := r
		for f := unicode.SimpleFold(r); f != r; f = unicode.SimpleFold(f) {
			least = min(least, f)
		}
		return least
	}, k)
}

// request is what Idempotency-Key compares a repeat by: its route, a hash
// stored with the key's claim, and, for a body too large to hold and hash
// first (a firmware image), sameBody, which reads the repeat's body and
// compares it with the first answer.
type request struct {
	route    string
	hash     []byte
	sameBody func(first []byte) (bool, error)
	// rawHash is the body's own hash, which keys claimed before bodies
	// were compared by value hold.
	rawHash []byte
}

// idempotentBy is idempotent with identify telling what a request is.
func (s *Server) idempotentBy(h handler, secrets secretSpec, identify func(*http.Request) (*request, error)) handler {
	return func(w http.ResponseWriter, r *http.Request) error {
		key := r.Header.Get("Idempotency-Key")
		if key == "" {
			return h(w, r)
		}
		if len(key) > 200 {
			return badRequest("Idempotency-Key longer than 200 bytes")
		}
		req, err := identify(r)
		if err != nil {
			return err
		}
		actor := principal(r).ID
		// Claim the key before running, so that two requests with one key
		// never both run (a client retrying while the first is in flight).
		claimed, err := s.store.ClaimIdempotent(r.Context(), actor, key, req.route, req.hash)
		if err != nil {
			return err
		}
		if !claimed {
			return s.repeat(w, r, actor, key, req)
		}
		rec := &recorder{ResponseWriter: w}
		// What the request makes may take its id from the claim
		// (idempotentID): a run after one that died with its gateway, the
		// claim taken over, then makes nothing twice.
		seed := sha256.Sum256(fmt.Appendf(nil, "%s\x00%s\x00%s\x00%x", actor, key, req.route, req.hash))
		r = r.WithContext(context.WithValue(r.Context(), idemKey{}, seed))
		herr := h(rec, r)
		// The answer is kept (or the claim given up) even if the client has
		// gone: it is about what happened, not about this connection.
		ctx := context.WithoutCancel(r.Context())
		if herr == nil && rec.status >= 200 && rec.status < 300 {
			clean, held := splitSecrets(rec.body.Bytes(), secrets.fields)
			var sealed []byte
			if held != nil && s.replay != nil && !secrets.shownOnce {
				sealed = s.replay.seal(held, actor, key, req.route)
			}
			if err := s.store.FinishIdempotent(ctx, actor, key, rec.status, clean, sealed); err != nil {
				s.log.Error("store idempotent answer", "err", err)
			}
			return nil
		}
		if err := s.store.ReleaseIdempotent(ctx, actor, key); err != nil {
			s.log.Error("release Idempotency-Key", "err", err)
		}
		return herr
	}
}

type idemKey struct{}

// idempotentID is the id, with prefix, of what request r makes, derived from
// its Idempotency-Key claim (the same for every run of one request), or ""
// for a request without a key (a fresh id is made).
func idempotentID(r *http.Request, prefix string) string {
	seed, ok := r.Context().Value(idemKey{}).([32]byte)
	if !ok {
		return ""
	}
	return fleet.DerivedID(prefix, seed)
}

// repeat answers a request whose Idempotency-Key was claimed before: with
// the first answer when it is the same request and that one has finished.
func (s *Server) repeat(w http.ResponseWriter, r *http.Request, actor, key string, req *request) error {
	prev, err := s.store.GetIdempotent(r.Context(), actor, key)
	if errors.Is(err, fleet.ErrNotFound) {
		// Released between the two calls: the other request failed.
		w.Header().Set("Retry-After", "1")
		writeProblem(w, http.StatusConflict, "a request with this Idempotency-Key just ended; retry")
		return nil
	}
	if err != nil {
		return err
	}
	switch {
	case prev.Route != req.route || !bytes.Equal(prev.BodyHash, req.hash) && (req.rawHash == nil || !bytes.Equal(prev.BodyHash, req.rawHash)):
		writeProblem(w, http.StatusConflict, "Idempotency-Key was used with another request")
		return nil
	case prev.Status == 0:
		w.Header().Set("Retry-After", "1")
		writeProblem(w, http.StatusConflict, "a request with this Idempotency-Key is in progress; retry when it has finished")
		return nil
	}
	if req.sameBody != nil {
		same, err := req.sameBody(prev.Response)
		if err != nil {
			return err
		}
		if !same {
			writeProblem(w, http.StatusConflict, "Idempotency-Key was used with another request")
			return nil
		}
	}
	body := prev.Response
	if prev.Sealed != nil && s.replay != nil {
		if held, err := s.replay.open(prev.Sealed, actor, key, prev.Route); err != nil {
			s.log.Warn("Idempotency-Key answer replayed without its secrets: their sealed copy does not open (was the master key replaced?)",
				"route", prev.Route, "err", err)
		} else {
			body = restoreSecrets(body, held)
		}
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Idempotent-Replayed", "true")
	w.WriteHeader(prev.Status)
	w.Write(body)
	return nil
}

// secretSpec names the fields of a create route's answer that are secrets
// or pickup codes: shown to the caller, never stored in clear. An
// Idempotency-Key's answer is stored without them. Unless they are shown
// once, they are also kept sealed (replaySealer) for
// fleet.ReplaySecretsFor, so that a replay in that time repeats the whole
// first answer and a later one leaves them out.
type secretSpec struct {
	fields []string
	// shownOnce: never in a replay (api-v1: tokens, API and claim alike,
	// are stored hashed and shown once).
	shownOnce bool
}

// secretFields are the secretSpecs by create route. A webhook's secret
// signs its deliveries (kept sealed with the webhook anyway), and a
// credential's code is shown again by GET /v1/pickups/{id}: both are
// repeated by a replay. A webhook's "token" is its owner's token id, not a
// secret.
var secretFields = map[string]secretSpec{
	"/v1/tokens":      {fields: []string{"token"}, shownOnce: true},
	"/v1/claims":      {fields: []string{"token"}, shownOnce: true},
	"/v1/webhooks":    {fields: []string{"secret"}},
	"/v1/credentials": {fields: []string{"code", "qr"}},
}

// splitSecrets returns body without the top-level fields named in secrets
// (clean) and those fields as a JSON object (held; nil when body has none
// of them or is not a JSON object).
func splitSecrets(body []byte, secrets []string) (clean, held []byte) {
	if len(secrets) == 0 {
		return body, nil
	}
	var m map[string]json.RawMessage
	if json.Unmarshal(body, &m) != nil {
		return body, nil
	}
	taken := map[string]json.RawMessage{}
	for _, f := range secrets {
		if v, ok := m[f]; ok {
			taken[f] = v
			delete(m, f)
		}
	}
	if len(taken) == 0 {
		return body, nil
	}
	out, err := json.Marshal(m)
	if err != nil {
		return body, nil
	}
	if held, err = json.Marshal(taken); err != nil {
		held = nil // the answer without them all the same
	}
	return append(out, '\n'), held
}

// restoreSecrets puts the fields splitSecrets held back into clean.
func restoreSecrets(clean, held []byte) []byte {
	var m, h map[string]json.RawMessage
	if json.Unmarshal(clean, &m) != nil || json.Unmarshal(held, &h) != nil {
		return clean
	}
	maps.Copy(m, h)
	out, err := json.Marshal(m)
	if err != nil {
		return clean
	}
	return append(out, '\n')
}

// replaySealer encrypts the secrets of an Idempotency-Key's first answer
// (AES-256-GCM, with a key derived from the master key, which is kept in
// the data directory, not in the database) for the replays of that key
// alone: the actor, key and route are the sealed box's associated data,
// so a box moved to another row does not open.
type replaySealer struct{ aead cipher.AEAD }

// newReplaySealer returns nil for an empty master key.
func newReplaySealer(master []byte) *replaySealer {
	if len(master) == 0 {
		return nil
	}
	m := hmac.New(sha256.New, master)
	m.Write([]byte("lockergate/idempotent-replay/v1"))
	block, err := aes.NewCipher(m.Sum(nil))
	if err != nil {
		panic(err) // a 32-byte key cannot fail
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		panic(err)
	}
	return &replaySealer{aead: aead}
}

func replayAD(actor, key, route string) []byte {
	return []byte(actor + "\x00" + key + "\x00" + route)
}

func (s *replaySealer) seal(plain []byte, actor, key, route string) []byte {
	nonce := make([]byte, s.aead.NonceSize())
	rand.Read(nonce)
	return s.aead.Seal(nonce, nonce, plain, replayAD(actor, key, route))
}

func (s *replaySealer) open(sealed []byte, actor, key, route string) ([]byte, error) {
	n := s.aead.NonceSize()
	if len(sealed) < n {
		return nil, errors.New("sealed secrets too short")
	}
	return s.aead.Open(nil, sealed[:n], sealed[n:], replayAD(actor, key, route))
}
