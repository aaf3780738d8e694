// Command lockerctl is the operator CLI over the Lockergate HTTP API.
//
// It reads LOCKERGATE_URL (default http://127.0.0.1:8080) and
// LOCKERGATE_TOKEN (default: the admin.token of the gateway's data directory,
// --data-dir or LOCKERGATE_DATA_DIR, ./lockergate-data by default).
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/lockergate/lockergate/client"
	"github.com/lockergate/lockergate/fleet"
)

func main() { os.Exit(run(os.Args[1:], os.Stdout, os.Stderr)) }

const usage = `usage: lockerctl [-o table|json] [--url URL] [--token TOKEN | --data-dir DIR] [--limit N] [--after CURSOR] COMMAND

commands:
  lockers list [--site S] [--online true|false] [--model M] [--fw V]
  lockers show ID
  lockers health ID | lockers events ID [--since RFC3339|-1h] [--until RFC3339]
  lockers uptime ID [--since RFC3339] [--until RFC3339]
  commands show LOCKER COMMAND
  lockers disable ID | enable ID | replaceable ID | rotate-codes ID
  unlock LOCKER COMPARTMENT [--reason remote] [--ttl 30] [--wait 10]
  sites list | sites create ID [--name N] [--timezone TZ]
  claims list [--site S] | claims create --site S [--uses N] [--expires-in 24h] [--serials GLOBS] | claims revoke ID
  tokens list [--role R] [--site S] [--name N] [--revoked true|false] | tokens show ID
  tokens create --role R --name N [--site S] [--sites S1,S2] | tokens revoke ID
  tokens sites ID S1,S2 | tokens sites ID --all     (a platform token's sites)
  audit [--locker ID] [--actor A] [--token ID] [--since RFC3339|-1h]
  alerts list [--site S] [--locker ID] [--kind K] [--open true|false] [--since RFC3339|-1h] | alerts clear ID
` + handoffUsage + firmwareUsage + `
lists print every page unless --limit N stops them after N items; the next
N start at the cursor it prints (--after CURSOR).
environment: LOCKERGATE_URL (default http://127.0.0.1:8080),
             LOCKERGATE_TOKEN (default: DIR/admin.token when readable),
             LOCKERGATE_DATA_DIR (DIR: the gateway's --data-dir, default ./lockergate-data)
`

type cli struct {
	c      *client.Client
	out    io.Writer
	json   bool
	ctx    context.Context
	stderr io.Writer
	// limit, when above 0, is how many items a list prints at most; after
	// is the cursor its first page starts after.
	limit int
	after string
}

func run(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("lockerctl", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, usage) }
	output := fs.String("o", "table", "output: table or json")
	base := fs.String("url", envOr("LOCKERGATE_URL", "http://127.0.0.1:8080"), "gateway API URL")
	token := fs.String("token", os.Getenv("LOCKERGATE_TOKEN"), "API token")
	dataDir := fs.String("data-dir", envOr("LOCKERGATE_DATA_DIR", "lockergate-data"), "the gateway's data directory (its --data-dir, env LOCKERGATE_DATA_DIR for both), to read admin.token from when no token is given")
	limit := fs.Int("limit", 0, "lists: print at most this many items, and the cursor to go on from (0: every page)")
	after := fs.String("after", "", "lists: start after this cursor (printed by a list that --limit stopped)")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if *output != "table" && *output != "json" {
		fmt.Fprintln(stderr, "lockerctl: -o must be table or json")
		return 2
	}
	if *limit < 0 {
		fmt.Fprintln(stderr, "lockerctl: --limit must be 0 (every page) or more")
		return 2
	}
	tokenFile := filepath.Join(*dataDir, "admin.token")
	if *token == "" {
		if b, err := os.ReadFile(tokenFile); err == nil {
			*token = strings.TrimSpace(string(b))
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	c := &cli{c: client.New(*base, *token), out: stdout, json: *output == "json", ctx: ctx, stderr: stderr, limit: *limit, after: *after}
	rest := fs.Args()
	if len(rest) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	err := c.dispatch(rest)
	var ue usageError
	switch {
	case err == nil:
		return 0
	case errors.As(err, &ue):
		fmt.Fprintf(stderr, "lockerctl: %s\n\n%s", ue, usage)
		return 2
	default:
		var ae *client.Error
		if errors.As(err, &ae) && ae.Status == http.StatusUnauthorized {
			fmt.Fprintf(stderr, "lockerctl: %v\n(set LOCKERGATE_TOKEN or --token; without one, lockerctl reads %s: point --data-dir or LOCKERGATE_DATA_DIR at the gateway's data directory)\n", err, tokenFile)
			return 1
		}
		fmt.Fprintf(stderr, "lockerctl: %v\n", err)
		return 1
	}
}

type usageError string

func (e usageError) Error() string { return string(e) }

func envOr(k, d string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return d
}

func (c *cli) dispatch(args []string) error {
	key := args[0]
	if len(args) > 1 && !strings.HasPrefix(args[1], "-") && key != "unlock" && key != "audit" {
		key += " " + args[1]
		args = args[2:]
	} else {
		args = args[1:]
	}
	if isFirmwareCommand(key) { // firmware and rollouts: rollout.go
		return c.firmwareCommand(key, args)
	}
	if isHandoffCommand(key) { // pickups, codes and webhooks: pickups.go
		return c.handoffCommand(key, args)
	}
	switch key {
	case "lockers list":
		return c.lockersList(args)
	case "lockers show":
		return c.oneArg(args, func(id string) error { return c.show("/v1/lockers/" + url.PathEscape(id)) })
	case "lockers health", "lockers events", "lockers uptime":
		return c.lockerHistory(key, args)
	case "commands show":
		if len(args) != 2 || args[0] == "" || args[1] == "" {
			return usageError("want a locker id and a command id")
		}
		return c.show("/v1/lockers/" + url.PathEscape(args[0]) + "/commands/" + url.PathEscape(args[1]))
	case "lockers disable", "lockers enable", "lockers replaceable":
		return c.oneArg(args, func(id string) error {
			body := map[string]bool{"disabled": key == "lockers disable"}
			if key == "lockers replaceable" {
				body = map[string]bool{"replaceable": true}
			}
			var out map[string]any
			if _, err := c.c.Do(c.ctx, client.Request{Method: http.MethodPatch, Path: "/v1/lockers/" + url.PathEscape(id), Body: body}, &out); err != nil {
				return err
			}
			return c.print(out, nil)
		})
	case "lockers rotate-codes":
		return c.postOne(args, "/v1/lockers/%s/rotate-codes")
	case "unlock":
		return c.unlock(args)
	case "sites list":
		return c.list("/v1/sites", nil, []string{"id", "name", "timezone"})
	case "sites create":
		return c.sitesCreate(args)
	case "claims list":
		fs := c.flags("claims list")
		site := fs.String("site", "", "site")
		if err := fs.Parse(args); err != nil {
			return usageError(err.Error())
		}
		return c.list("/v1/claims", url.Values{"site": {*site}}, []string{"id", "site", "uses", "used", "expires_at", "revoked_at"})
	case "claims create":
		return c.claimsCreate(args)
	case "claims revoke":
		return c.oneArg(args, func(id string) error {
			_, err := c.c.Do(c.ctx, client.Request{Method: http.MethodDelete, Path: "/v1/claims/" + url.PathEscape(id)}, nil)
			return err
		})
	case "tokens create":
		fs := c.flags("tokens create")
		role := fs.String("role", "", "admin, operator, store, platform or broker")
		name := fs.String("name", "", "token name (platform tokens: the platform's name)")
		site := fs.String("site", "", "site (store tokens)")
		sites := fs.String("sites", "", "comma-separated sites where a platform token may make pickups and codes (default: every site)")
		if err := fs.Parse(args); err != nil {
			return usageError(err.Error())
		}
		return c.tokensCreate(map[string]any{"role": *role, "name": *name, "site": *site}, splitList(*sites))
	case "tokens sites":
		return c.tokenSites(args)
	case "tokens list":
		fs := c.flags("tokens list")
		role := fs.String("role", "", "only tokens of this role")
		site := fs.String("site", "", "only store tokens of this site and platform tokens that list it")
		name := fs.String("name", "", "only tokens of this name (exactly)")
		revoked := fs.String("revoked", "", "true: only revoked tokens; false: only live ones (default: both)")
		if err := fs.Parse(args); err != nil {
			return usageError(err.Error())
		}
		return c.list("/v1/tokens", url.Values{"role": {*role}, "site": {*site}, "name": {*name}, "revoked": {*revoked}},
			[]string{"id", "role", "site", "sites", "name", "created_at", "last_used_at", "revoked_at"})
	case "tokens show":
		return c.oneArg(args, func(id string) error { return c.show("/v1/tokens/" + url.PathEscape(id)) })
	case "tokens revoke":
		return c.oneArg(args, func(id string) error {
			_, err := c.c.Do(c.ctx, client.Request{Method: http.MethodDelete, Path: "/v1/tokens/" + url.PathEscape(id)}, nil)
			return err
		})
	case "audit":
		fs := c.flags("audit")
		locker := fs.String("locker", "", "locker id")
		actor := fs.String("actor", "", "actor")
		token := fs.String("token", "", "the id of the API token the actions were taken with")
		since := fs.String("since", "", "RFC 3339 time, or a negative duration from now (-1h)")
		if err := fs.Parse(args); err != nil {
			return usageError(err.Error())
		}
		if err := sinceArg(since); err != nil {
			return err
		}
		return c.list("/v1/audit", url.Values{"locker": {*locker}, "actor": {*actor}, "token": {*token}, "since": {*since}},
			[]string{"ts", "actor", "action", "locker", "site"})
	case "alerts list":
		fs := c.flags("alerts list")
		site := fs.String("site", "", "site")
		locker := fs.String("locker", "", "locker id")
		kind := fs.String("kind", "", "alert kind")
		open := fs.String("open", "", "true (open only) or false (cleared only)")
		since := fs.String("since", "", "RFC 3339 time, or a negative duration from now (-1h)")
		if err := fs.Parse(args); err != nil {
			return usageError(err.Error())
		}
		if err := sinceArg(since); err != nil {
			return err
		}
		q := url.Values{"site": {*site}, "locker": {*locker}, "kind": {*kind}, "open": {*open}, "since": {*since}}
		return c.list("/v1/alerts", q, []string{"id", "raised_at", "site", "locker", "compartment", "kind", "detail", "cleared_at"})
	case "alerts clear":
		return c.postOne(args, "/v1/alerts/%s/clear")
	}
	return usageError("unknown command: " + key)
}

func (c *cli) flags(name string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(c.stderr)
	return fs
}

func (c *cli) oneArg(args []string, f func(string) error) error {
	if len(args) != 1 || args[0] == "" {
		return usageError("want exactly one id")
	}
	return f(args[0])
}

// postOne posts without a body to pathFmt with the one id in args (its %s)
// and prints the answer.
func (c *cli) postOne(args []string, pathFmt string) error {
	return c.oneArg(args, func(id string) error {
		var out map[string]any
		if _, err := c.c.Do(c.ctx, client.Request{Method: http.MethodPost, Path: fmt.Sprintf(pathFmt, url.PathEscape(id))}, &out); err != nil {
			return err
		}
		return c.print(out, nil)
	})
}

// create posts body to path and prints the answer.
func (c *cli) create(path string, body any) error {
	var out map[string]any
	if err := c.c.Post(c.ctx, path, body, &out); err != nil {
		return err
	}
	return c.print(out, nil)
}

func (c *cli) show(path string) error {
	var out map[string]any
	if err := c.c.Get(c.ctx, path, nil, &out); err != nil {
		return err
	}
	return c.print(out, nil)
}

// sinceArg turns a --since given as a negative duration (-1h: an hour
// ago) into the RFC 3339 time the API takes; a time is left as it is.
func sinceArg(since *string) error {
	d, err := time.ParseDuration(*since)
	if err != nil {
		return nil // a time, or nothing: the API judges it
	}
	if d >= 0 {
		return usageError("--since: a duration must be negative (-1h: an hour ago)")
	}
	*since = time.Now().Add(d).UTC().Format(time.RFC3339Nano)
	return nil
}

// lockerHistory prints a locker's health or events (every page within
// --since, default the last hour, and --until) or its uptime per day.
func (c *cli) lockerHistory(key string, args []string) error {
	if len(args) == 0 || args[0] == "" || strings.HasPrefix(args[0], "-") {
		return usageError("want a locker id, then the flags")
	}
	id := args[0]
	fs := c.flags(key)
	def := "-1h"
	if key == "lockers uptime" {
		def = "" // the API's: the last seven days
	}
	since := fs.String("since", def, "RFC 3339 time, or a negative duration from now (-1h)")
	until := fs.String("until", "", "RFC 3339 time")
	if err := fs.Parse(args[1:]); err != nil {
		return usageError(err.Error())
	}
	if err := sinceArg(since); err != nil {
		return err
	}
	if *until == "" && key != "lockers uptime" {
		// Pages end at the first request's time: a busy locker's new rows
		// must not keep the paging going.
		*until = time.Now().UTC().Format(time.RFC3339Nano)
	}
	q := url.Values{"since": {*since}, "until": {*until}}
	path := "/v1/lockers/" + url.PathEscape(id)
	switch key {
	case "lockers health":
		return c.list(path+"/health", q, []string{"received_at", "seq", "ts"})
	case "lockers events":
		return c.list(path+"/events", q, []string{"received_at", "id", "type", "compartment", "ts"})
	}
	var out map[string]any
	if err := c.c.Get(c.ctx, path+"/uptime", withoutEmpty(q), &out); err != nil {
		return err
	}
	if c.json {
		return c.print(out, nil)
	}
	days, _ := out["days"].([]any)
	rows := make([]map[string]any, 0, len(days)+1)
	for _, d := range days {
		if m, ok := d.(map[string]any); ok {
			rows = append(rows, m)
		}
	}
	rows = append(rows, map[string]any{"date": "total", "observed_s": out["observed_s"], "online_s": out["online_s"], "uptime": out["uptime"]})
	return c.print(rows, []string{"date", "uptime", "online_s", "observed_s", "connects", "disconnects"})
}

func (c *cli) lockersList(args []string) error {
	fs := c.flags("lockers list")
	site := fs.String("site", "", "site")
	online := fs.String("online", "", "true or false")
	model := fs.String("model", "", "model")
	fw := fs.String("fw", "", "firmware version")
	if err := fs.Parse(args); err != nil {
		return usageError(err.Error())
	}
	q := url.Values{"site": {*site}, "online": {*online}, "model": {*model}, "fw": {*fw}}
	return c.list("/v1/lockers", q, []string{"id", "serial", "site", "model", "fw", "online", "last_seen"})
}

// withoutEmpty removes q's parameters that a flag left empty (not
// given) and returns q, a new one if q is nil.
func withoutEmpty(q url.Values) url.Values {
	if q == nil {
		return url.Values{}
	}
	for k, v := range q {
		if len(v) == 1 && v[0] == "" {
			delete(q, k)
		}
	}
	return q
}

// list fetches every page of a list and prints it.
// maxPage is the most items the API answers in one page.
const maxPage = 1000

// list prints every item of the list at path (with the filters in q),
// reading it in the largest pages the API gives; with --limit it stops
// after that many and says on stderr where the rest begin. JSON is written
// page by page; a table needs every row for its widths.
func (c *cli) list(path string, q url.Values, cols []string) error {
	q = withoutEmpty(q)
	if c.after != "" {
		q.Set("after", c.after)
	}
	var items []map[string]any // table rows
	out := &jsonArray{w: c.out}
	n, next := 0, ""
	for {
		page := maxPage
		if c.limit > 0 {
			page = min(maxPage, c.limit-n)
		}
		q.Set("limit", strconv.Itoa(page))
		var p struct {
			Items []map[string]any `json:"items"`
			Next  string           `json:"next"`
		}
		if err := c.c.Get(c.ctx, path, q, &p); err != nil {
			return err
		}
		n += len(p.Items)
		if c.json {
			if err := out.add(p.Items); err != nil {
				return err
			}
		} else {
			items = append(items, p.Items...)
		}
		if next = p.Next; next == "" || (c.limit > 0 && n >= c.limit) {
			break
		}
		q.Set("after", next)
	}
	if c.json {
		if err := out.end(); err != nil {
			return err
		}
	} else if err := c.print(items, cols); err != nil {
		return err
	}
	if c.limit > 0 && next != "" {
		fmt.Fprintf(c.stderr, "lockerctl: stopped at --limit %d; there may be more: go on with --after %s\n", c.limit, next)
	}
	return nil
}

// jsonArray writes a JSON array item by item, as print would write it whole.
type jsonArray struct {
	w io.Writer
	n int
}

func (a *jsonArray) add(items []map[string]any) error {
	for _, it := range items {
		b, err := json.MarshalIndent(it, "  ", "  ")
		if err != nil {
			return err
		}
		sep := ",\n  "
		if a.n == 0 {
			sep = "[\n  "
		}
		a.n++
		if _, err := io.WriteString(a.w, sep+string(b)); err != nil {
			return err
		}
	}
	return nil
}

func (a *jsonArray) end() error {
	end := "\n]\n"
	if a.n == 0 {
		end = "[]\n"
	}
	_, err := io.WriteString(a.w, end)
	return err
}

func (c *cli) unlock(args []string) error {
	fs := c.flags("unlock")
	reason := fs.String("reason", "remote", "staging, pickup, remote or service")
	ttl := fs.Int("ttl", 30, "seconds the unlock stays valid")
	wait := fs.Int("wait", 10, "seconds to wait for the locker's answer")
	pos, err := positional(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 2 {
		return usageError("unlock needs LOCKER COMPARTMENT")
	}
	n, err := strconv.Atoi(pos[1])
	if err != nil || n < 1 {
		return usageError("COMPARTMENT must be a number >= 1")
	}
	var out map[string]any
	err = c.c.Post(c.ctx, "/v1/lockers/"+url.PathEscape(pos[0])+"/commands",
		map[string]any{"type": "unlock", "compartment": n, "reason": *reason, "ttl_s": *ttl, "wait_s": *wait}, &out)
	if err != nil {
		return err
	}
	if err := c.print(out, nil); err != nil {
		return err
	}
	if s, _ := out["status"].(string); s != "ok" && !c.json {
		return fmt.Errorf("unlock %v: status %s", out["id"], s)
	}
	return nil
}

// tokensCreate makes a token; with sites, it checks that the gateway kept
// them: one older than sites ignores them and makes a token for every site.
func (c *cli) tokensCreate(body map[string]any, sites []string) error {
	body["sites"] = sites
	var out struct {
		Sites          []string `json:"sites"`
		SharesPlatform bool     `json:"shares_platform"`
	}
	var raw json.RawMessage
	if err := c.c.Post(c.ctx, "/v1/tokens", body, &raw); err != nil {
		return err
	}
	if err := json.Unmarshal(raw, &out); err != nil {
		return err
	}
	var printed map[string]any
	if err := json.Unmarshal(raw, &printed); err != nil {
		return err
	}
	if err := c.print(printed, nil); err != nil {
		return err
	}
	if out.SharesPlatform {
		fmt.Fprintf(c.stderr, "lockerctl: warning: another live platform token is named %v: both see that platform's pickups and codes "+
			"(a rotation: revoke the older one once the platform uses this one; a mistyped name: revoke this one)\n", body["name"])
	}
	if want := fleet.TokenSites(sites); !slices.Equal(out.Sites, want) {
		return fmt.Errorf("the token was made with sites %v, not %v (a gateway older than token sites ignores them: revoke it, upgrade every instance, make it again)",
			out.Sites, want)
	}
	return nil
}

// tokenSites sets a platform token's sites: ID S1,S2, or ID --all for
// every site.
func (c *cli) tokenSites(args []string) error {
	fs := c.flags("tokens sites")
	all := fs.Bool("all", false, "let the token make pickups and codes at every site")
	pos, err := positional(fs, args)
	if err != nil {
		return err
	}
	want := 2 // ID S1,S2
	if *all {
		want = 1
	}
	if len(pos) != want || pos[0] == "" {
		return usageError("tokens sites needs ID and a comma-separated list of sites, or ID --all")
	}
	sites := []string{} // every site
	if !*all {
		if sites = splitList(pos[1]); len(sites) == 0 {
			return usageError("no site given: name the sites, or --all for every site")
		}
	}
	var out map[string]any
	if _, err := c.c.Do(c.ctx, client.Request{Method: http.MethodPatch, Path: "/v1/tokens/" + url.PathEscape(pos[0]), Body: map[string]any{"sites": sites}}, &out); err != nil {
		return err
	}
	return c.print(out, nil)
}

func (c *cli) sitesCreate(args []string) error {
	fs := c.flags("sites create")
	name := fs.String("name", "", "display name")
	tz := fs.String("timezone", "UTC", "IANA time zone")
	if len(args) == 0 || strings.HasPrefix(args[0], "-") {
		return usageError("sites create needs an ID")
	}
	id := args[0]
	if err := fs.Parse(args[1:]); err != nil {
		return usageError(err.Error())
	}
	return c.create("/v1/sites", map[string]string{"id": id, "name": *name, "timezone": *tz})
}

func (c *cli) claimsCreate(args []string) error {
	fs := c.flags("claims create")
	site := fs.String("site", "", "site")
	uses := fs.Int("uses", 1, "how many lockers may use it")
	exp := fs.Duration("expires-in", 24*time.Hour, "validity")
	serials := fs.String("serials", "", "comma-separated serial globs allowed (default: any)")
	if err := fs.Parse(args); err != nil {
		return usageError(err.Error())
	}
	if *exp < time.Second {
		// 0 s would be the API's default, a day.
		return usageError("--expires-in must be at least 1s")
	}
	return c.create("/v1/claims", map[string]any{"site": *site, "uses": *uses,
		"expires_in_s": int(exp.Seconds()), "serial_pattern": *serials})
}

// print writes v as JSON (-o json) or as a table of cols / key-value lines.
func (c *cli) print(v any, cols []string) error {
	if c.json {
		enc := json.NewEncoder(c.out)
		enc.SetIndent("", "  ")
		return enc.Encode(v)
	}
	tw := tabwriter.NewWriter(c.out, 0, 4, 2, ' ', 0)
	defer tw.Flush()
	switch x := v.(type) {
	case []map[string]any:
		fmt.Fprintln(tw, strings.ToUpper(strings.Join(cols, "\t")))
		for _, it := range x {
			cells := make([]string, len(cols))
			for i, col := range cols {
				cells[i] = cell(it[col])
			}
			fmt.Fprintln(tw, strings.Join(cells, "\t"))
		}
	case map[string]any:
		keys := make([]string, 0, len(x))
		for k := range x {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		for _, k := range keys {
			fmt.Fprintf(tw, "%s\t%s\n", k, cell(x[k]))
		}
	}
	return nil
}

func cell(v any) string {
	switch x := v.(type) {
	case nil:
		return "-"
	case string:
		return x
	case float64:
		return strconv.FormatFloat(x, 'f', -1, 64)
	case bool:
		return strconv.FormatBool(x)
	default:
		b, _ := json.Marshal(x)
		return string(b)
	}
}
