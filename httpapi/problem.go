package httpapi

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/lockergate/lockergate/fleet"
	"github.com/lockergate/lockergate/protocol"
	"github.com/lockergate/lockergate/provisioning"
)

// Problem is an RFC 9457 problem detail.
type Problem struct {
	Type   string `json:"type"`
	Title  string `json:"title"`
	Status int    `json:"status"`
	Detail string `json:"detail,omitempty"`
}

func writeProblem(w http.ResponseWriter, status int, detail string) {
	w.Header().Set("Content-Type", "application/problem+json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(Problem{Type: "about:blank", Title: http.StatusText(status), Status: status, Detail: detail})
}

// writeError maps domain errors to problem details.
func (s *Server) writeError(w http.ResponseWriter, r *http.Request, err error) {
	status := http.StatusInternalServerError
	switch {
	case errors.Is(err, fleet.ErrNotFound), errors.Is(err, provisioning.ErrNotFound):
		status = http.StatusNotFound
	case errors.Is(err, errForbidden):
		status = http.StatusForbidden
	case errors.Is(err, fleet.ErrConflict):
		status = http.StatusConflict
	case errors.Is(err, fleet.ErrInvalid), errors.Is(err, provisioning.ErrInvalidRequest), errors.Is(err, errBadRequest):
		status = http.StatusBadRequest
	case errors.Is(err, fleet.ErrUnprocessable):
		status = http.StatusUnprocessableEntity
	case errors.Is(err, errTooLarge):
		status = http.StatusRequestEntityTooLarge
	}
	if status != http.StatusInternalServerError {
		writeProblem(w, status, err.Error())
		return
	}
	switch {
	case r.Context().Err() != nil && (errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded)):
		// The client went away (or its deadline passed) mid-request:
		// nobody reads the answer, and the database is not to blame.
		s.log.Debug("request ended by the client", "method", r.Method, "path", r.URL.Path, "err", err)
		writeProblem(w, http.StatusServiceUnavailable, "request cancelled")
	case s.opts.Unavailable != nil && s.opts.Unavailable(err):
		// One line per 10 s: during an outage every request fails so.
		if logDue(&s.unavailableLogged, 10*time.Second) {
			s.log.Warn("request refused: the database is unavailable or busy; answering 503 until it recovers",
				"method", r.Method, "path", r.URL.Path, "err", err)
		}
		w.Header().Set("Retry-After", strconv.Itoa(unavailableRetryAfter))
		writeProblem(w, http.StatusServiceUnavailable, "the database is unavailable or busy; retry in a few seconds")
	default:
		s.log.Error("request failed", "method", r.Method, "path", r.URL.Path, "err", err)
		writeProblem(w, status, "internal error; the gateway log has the details")
	}
}

// logDue reports whether a message logged at most once per every (last
// holds when, in Unix nanoseconds) is due again, and if so claims it.
func logDue(last *atomic.Int64, every time.Duration) bool {
	now := time.Now().UnixNano()
	l := last.Load()
	return now-l > int64(every) && last.CompareAndSwap(l, now)
}

// unavailableRetryAfter is the Retry-After (seconds) of a request refused
// because the store is unavailable.
const unavailableRetryAfter = 2

var errBadRequest = errors.New("bad request")

// errTooLarge is a request body over maxBody (413).
var errTooLarge = fmt.Errorf("request body larger than %d bytes", maxBody)

func badRequest(format string, args ...any) error {
	return fmt.Errorf("%w: %s", errBadRequest, fmt.Sprintf(format, args...))
}

// maxBody bounds request bodies of the JSON API.
const maxBody = 1 << 20

// decode reads a JSON object body into v.
func decode(r *http.Request, v any) error {
	body, err := io.ReadAll(io.LimitReader(r.Body, maxBody+1))
	if err != nil {
		return badRequest("read body: %v", err)
	}
	if len(body) > maxBody {
		return errTooLarge
	}
	if !utf8.Valid(body) {
		// encoding/json would store U+FFFD in place of each bad byte.
		return badRequest("body is not UTF-8")
	}
	if trimmed := bytes.TrimLeft(body, " \t\r\n"); len(trimmed) > 0 && trimmed[0] != '{' && trimmed[0] != '[' &&
		strings.HasPrefix(r.Header.Get("Content-Type"), "application/x-www-form-urlencoded") {
		// What curl -d sends without -H "Content-Type: application/json".
		return badRequest("the body must be a JSON object, sent with Content-Type: application/json; this one reads as a form (%.40q)", trimmed)
	}
	if err := json.Unmarshal(body, v); err != nil {
		var te *json.UnmarshalTypeError
		if errors.As(err, &te) {
			if te.Field == "" {
				return badRequest("the body must be %s, not %s", jsonKind(te.Type), te.Value)
			}
			return badRequest("field %q must be %s, not %s", te.Field, jsonKind(te.Type), te.Value)
		}
		var pe *time.ParseError
		if errors.As(err, &pe) {
			return badRequest("%q is not an RFC 3339 time: write it like 2026-11-24T21:30:00.123Z", pe.Value)
		}
		if strings.Contains(err.Error(), "Time.UnmarshalJSON") {
			// A number, true or an object where a time belongs: the
			// error names no field, so the message says what to send.
			return badRequest("a time field holds something other than a string: times are RFC 3339 strings, like \"2026-11-24T21:30:00.123Z\" (%v)", err)
		}
		return badRequest("malformed JSON: %v", err)
	}
	if err := protocol.CheckEscapes(body); err != nil {
		return badRequest("%v, which no field accepts", err)
	}
	truncateTimes(reflect.ValueOf(v))
	return nil
}

// jsonKind names what JSON value a field of Go type t takes, for error
// messages that speak JSON rather than Go.
func jsonKind(t reflect.Type) string {
	if t == reflect.TypeFor[time.Time]() {
		return "an RFC 3339 time string"
	}
	switch t.Kind() {
	case reflect.Pointer:
		return jsonKind(t.Elem())
	case reflect.Struct, reflect.Map:
		return "an object"
	case reflect.Slice, reflect.Array:
		return "an array"
	case reflect.String:
		return "a string"
	case reflect.Bool:
		return "true or false"
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return "a whole number in range"
	case reflect.Float32, reflect.Float64:
		return "a number"
	}
	return "another kind of value"
}

// truncateTimes cuts every settable time in v (through pointers, structs,
// slices and arrays) to whole microseconds, what PostgreSQL keeps: an
// answer that echoes a time the request gave then says what a later GET
// will.
func truncateTimes(v reflect.Value) {
	switch v.Kind() {
	case reflect.Pointer:
		if !v.IsNil() {
			truncateTimes(v.Elem())
		}
	case reflect.Struct:
		if v.Type() == reflect.TypeFor[time.Time]() {
			if v.CanSet() {
				v.Set(reflect.ValueOf(v.Interface().(time.Time).Truncate(time.Microsecond)))
			}
			return
		}
		for i := range v.NumField() {
			// An unexported embedded struct's exported fields are filled
			// by encoding/json too.
			if f := v.Type().Field(i); f.IsExported() || f.Anonymous {
				truncateTimes(v.Field(i))
			}
		}
	case reflect.Slice, reflect.Array:
		for i := range v.Len() {
			truncateTimes(v.Index(i))
		}
	}
}

// checkText refuses a request whose path or query holds a NUL character or
// invalid UTF-8 (say /v1/lockers/%00 or ?site=%FF): no id, name or filter
// can, and PostgreSQL refuses such text, which would be a 500.
func checkText(r *http.Request) error {
	bad := func(s string) bool { return strings.ContainsRune(s, 0) || !utf8.ValidString(s) }
	if bad(r.URL.Path) {
		return badRequest("the path holds a NUL character or invalid UTF-8")
	}
	for k, vs := range r.URL.Query() {
		if bad(k) || slices.ContainsFunc(vs, bad) {
			return badRequest("query parameter %q holds a NUL character or invalid UTF-8", k)
		}
	}
	if bad(r.Header.Get("Idempotency-Key")) {
		return badRequest("Idempotency-Key holds a NUL character or invalid UTF-8")
	}
	return nil
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

// List is the envelope of every list answer.
type List[T any] struct {
	Items []T    `json:"items"`
	Next  string `json:"next"`
}

func listOf[T any](items []T, limit int, cursor func(T) string) List[T] {
	if items == nil {
		items = []T{}
	}
	l := List[T]{Items: items}
	if len(items) > 0 && len(items) == limit {
		l.Next = cursor(items[len(items)-1])
	}
	return l
}

// pageParams reads limit (default 100, max 1000) and after.
func pageParams(r *http.Request) (limit int, after string, err error) {
	limit = 100
	if v := r.URL.Query().Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > 1000 {
			return 0, "", badRequest("limit must be 1..1000")
		}
		limit = n
	}
	return limit, r.URL.Query().Get("after"), nil
}

func timeParam(r *http.Request, name string) (time.Time, error) {
	v := r.URL.Query().Get(name)
	if v == "" {
		return time.Time{}, nil
	}
	t, err := time.Parse(time.RFC3339Nano, v)
	if plus := strings.ReplaceAll(v, " ", "+"); err != nil && plus != v {
		if _, perr := time.Parse(time.RFC3339Nano, plus); perr == nil {
			// A "+01:00" offset sent unescaped: in a query a + is a space.
			return time.Time{}, badRequest("%s must be an RFC 3339 time, not %q: write a + in a URL query as %%2B (%s)", name, v,
				strings.ReplaceAll(v, " ", "%2B"))
		}
	}
	if err != nil {
		return time.Time{}, badRequest("%s must be an RFC 3339 time, like 2026-11-24T21:30:00Z, not %q", name, v)
	}
	return t, nil
}
