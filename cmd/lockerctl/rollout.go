package main

import (
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/lockergate/lockergate/client"
)

// Firmware and rollout commands (docs/firmware.md).

const firmwareUsage = `  firmware upload FILE --version V --model M | firmware list | firmware show ID
  rollout create --firmware ID [--site S] [--model M] [--fw V] [--lockers ID,ID]
                 [--waves 1,10,50,100] [--max-failure-pct 5] [--min-per-wave N] [--rate N/min]
                 [--deadline RFC3339|DURATION] [--step-timeout 10m] [--failure-action pause|abort]
                 [--retries N] [--retry-on download,timeout] [--window 02:00-05:00] [--force]
  rollout list | rollout show ID | rollout watch ID [--interval 1s] | rollout jobs ID [--state S] [--wave N]
  rollout pause ID | rollout resume ID | rollout cancel ID | rollout retry-failed ID
`

// isFirmwareCommand reports whether key is one of these commands.
func isFirmwareCommand(key string) bool {
	switch key {
	case "firmware upload", "firmware list", "firmware show",
		"rollout create", "rollout list", "rollout show", "rollout watch", "rollout jobs",
		"rollout pause", "rollout resume", "rollout cancel", "rollout retry-failed":
		return true
	}
	return false
}

func (c *cli) firmwareCommand(key string, args []string) error {
	switch key {
	case "firmware upload":
		return c.firmwareUpload(args)
	case "firmware list":
		return c.list("/v1/firmware", nil, []string{"id", "model", "version", "size", "sha256", "created_at"})
	case "firmware show":
		return c.oneArg(args, func(id string) error { return c.show("/v1/firmware/" + url.PathEscape(id)) })
	case "rollout create":
		return c.rolloutCreate(args)
	case "rollout list":
		return c.list("/v1/rollouts", nil, []string{"id", "version", "model", "status", "current_wave", "reason", "created_at"})
	case "rollout show":
		return c.oneArg(args, func(id string) error {
			st, err := c.rollout(id)
			if err != nil {
				return err
			}
			return c.printRollout(st)
		})
	case "rollout watch":
		return c.rolloutWatch(args)
	case "rollout jobs":
		return c.rolloutJobs(args)
	case "rollout pause", "rollout resume", "rollout cancel", "rollout retry-failed":
		return c.oneArg(args, func(id string) error {
			var st rolloutStatus
			if err := c.c.Post(c.ctx, "/v1/rollouts/"+url.PathEscape(id)+"/"+strings.TrimPrefix(key, "rollout "), nil, &st); err != nil {
				return err
			}
			return c.printRollout(&st)
		})
	}
	return usageError("unknown command: " + key)
}

// positional parses flags that may come before or after the positional
// arguments and returns the positional ones.
func positional(fs interface {
	Parse([]string) error
	NArg() int
	Arg(int) string
	Args() []string
}, args []string) ([]string, error) {
	var pos []string
	for len(args) > 0 {
		if err := fs.Parse(args); err != nil {
			return nil, usageError(err.Error())
		}
		if fs.NArg() == 0 {
			break
		}
		pos = append(pos, fs.Arg(0))
		args = fs.Args()[1:]
	}
	return pos, nil
}

// firmwareUpload streams the image: it is never read into memory.
func (c *cli) firmwareUpload(args []string) error {
	fs := c.flags("firmware upload")
	version := fs.String("version", "", "firmware version (semantic version, e.g. 1.5.0)")
	model := fs.String("model", "", "locker model the image is for")
	pos, err := positional(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 || *version == "" || *model == "" {
		return usageError("firmware upload needs FILE, --version and --model")
	}
	f, err := os.Open(pos[0])
	if err != nil {
		return err
	}
	defer f.Close()
	info, err := f.Stat()
	if err != nil {
		return err
	}
	q := url.Values{"version": {*version}, "model": {*model}}
	req, err := http.NewRequestWithContext(c.ctx, http.MethodPost, c.c.BaseURL+"/v1/firmware?"+q.Encode(), f)
	if err != nil {
		return err
	}
	req.ContentLength = info.Size()
	req.Header.Set("Content-Type", "application/octet-stream")
	if c.c.Token != "" {
		req.Header.Set("Authorization", "Bearer "+c.c.Token)
	}
	// No overall timeout: a large image on a slow link takes what it takes
	// (Ctrl-C cancels).
	resp, err := (&http.Client{}).Do(req)
	if err != nil {
		return fmt.Errorf("upload: %w (is the gateway running? check LOCKERGATE_URL)", err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusCreated {
		e := &client.Error{Status: resp.StatusCode, Title: http.StatusText(resp.StatusCode)}
		json.Unmarshal(b, e)
		return e
	}
	var out map[string]any
	if err := json.Unmarshal(b, &out); err != nil {
		return err
	}
	return c.print(out, nil)
}

func splitList(s string) []string {
	var out []string
	for _, v := range strings.Split(s, ",") {
		if v = strings.TrimSpace(v); v != "" {
			out = append(out, v)
		}
	}
	return out
}

func (c *cli) rolloutCreate(args []string) error {
	fs := c.flags("rollout create")
	fw := fs.String("firmware", "", "firmware id (from firmware upload)")
	site := fs.String("site", "", "only lockers of this site")
	model := fs.String("model", "", "only lockers of this model (must be the firmware's)")
	from := fs.String("fw", "", "only lockers running this version")
	lockers := fs.String("lockers", "", "only these lockers (comma-separated ids)")
	waves := fs.String("waves", "", "cumulative wave percentages, e.g. 1,10,50,100 (default)")
	maxFail := fs.Float64("max-failure-pct", -1, "failures per wave that stop the rollout, in percent (default 5)")
	minPer := fs.Int("min-per-wave", 0, "lockers per wave at least (default 1)")
	rate := fs.Int("rate", 0, "jobs handed out per minute at most (default 600)")
	deadline := fs.String("deadline", "", "RFC 3339 time, or a duration from now (e.g. 72h)")
	step := fs.Duration("step-timeout", 0, "a job without progress for this long times out (default 10m)")
	action := fs.String("failure-action", "", "pause (default) or abort when a wave fails its gate")
	retries := fs.Int("retries", 0, "retries of a failed job (0-10)")
	retryOn := fs.String("retry-on", "", "failure kinds to retry (default download,timeout)")
	window := fs.String("window", "", "install window in the site's local time, e.g. 02:00-05:00")
	force := fs.Bool("force", false, "allow downgrades")
	if err := fs.Parse(args); err != nil {
		return usageError(err.Error())
	}
	if *fw == "" || fs.NArg() > 0 {
		return usageError("rollout create needs --firmware and takes no other arguments")
	}
	body := map[string]any{
		"firmware": *fw,
		"selector": map[string]any{"site": *site, "model": *model, "fw": *from, "lockers": splitList(*lockers)},
		"retries":  *retries, "window": *window, "force": *force, "failure_action": *action,
	}
	// Left out unless given: the gateway's default applies to a field
	// left out, and 0 is out of range for each.
	for name, v := range map[string]int{"min_per_wave": *minPer, "rate_per_min": *rate, "step_timeout_s": int(step.Seconds())} {
		if v != 0 {
			body[name] = v
		}
	}
	if *step > 0 && *step < time.Second {
		return usageError("--step-timeout: 1s or more")
	}
	if *waves != "" {
		var ws []int
		for _, v := range splitList(*waves) {
			n, err := strconv.Atoi(v)
			if err != nil {
				return usageError("--waves: want numbers like 1,10,50,100")
			}
			ws = append(ws, n)
		}
		body["waves"] = ws
	}
	if *maxFail >= 0 {
		body["max_failure_pct"] = *maxFail
	}
	if *retryOn != "" {
		body["retry_on"] = splitList(*retryOn)
	}
	if *deadline != "" {
		t, err := time.Parse(time.RFC3339, *deadline)
		if err != nil {
			d, derr := time.ParseDuration(*deadline)
			if derr != nil {
				return usageError("--deadline: want an RFC 3339 time or a duration")
			}
			t = time.Now().Add(d)
		}
		body["deadline"] = t.UTC().Format(time.RFC3339)
	}
	var st rolloutStatus
	if err := c.c.Post(c.ctx, "/v1/rollouts", body, &st); err != nil {
		return err
	}
	return c.printRollout(&st)
}

// rolloutStatus is the part of GET /v1/rollouts/{id} the CLI shows.
type rolloutStatus struct {
	ID          string         `json:"id"`
	Firmware    string         `json:"firmware"`
	Version     string         `json:"version"`
	Model       string         `json:"model"`
	Status      string         `json:"status"`
	Reason      string         `json:"reason"`
	CurrentWave int            `json:"current_wave"`
	Targets     int            `json:"targets"`
	Counts      map[string]int `json:"counts"`
	Skipped     map[string]int `json:"skipped"`
	WrongModel  int            `json:"wrong_model"`
	Waiting     map[string]int `json:"waiting"`
	MaxFailure  float64        `json:"max_failure_pct"`
	Waves       []struct {
		Wave       int            `json:"wave"`
		Percent    int            `json:"percent"`
		Size       int            `json:"size"`
		State      string         `json:"state"`
		Counts     map[string]int `json:"counts"`
		FailurePct float64        `json:"failure_pct"`
	} `json:"wave_status"`
	raw json.RawMessage
}

func (c *cli) rollout(id string) (*rolloutStatus, error) {
	var raw json.RawMessage
	if err := c.c.Get(c.ctx, "/v1/rollouts/"+url.PathEscape(id), nil, &raw); err != nil {
		return nil, err
	}
	st := &rolloutStatus{raw: raw}
	return st, json.Unmarshal(raw, st)
}

func (c *cli) printRollout(st *rolloutStatus) error {
	if c.json {
		var v any = st
		if st.raw != nil {
			v = st.raw
		}
		enc := json.NewEncoder(c.out)
		enc.SetIndent("", "  ")
		return enc.Encode(v)
	}
	_, err := io.WriteString(c.out, renderRollout(st))
	return err
}

// ended reports whether a rollout status is final.
func ended(status string) bool {
	return status == "completed" || status == "aborted" || status == "cancelled"
}

// renderRollout is the progress view: one line per wave with its jobs by
// state, then the totals.
func renderRollout(st *rolloutStatus) string {
	var b strings.Builder
	fmt.Fprintf(&b, "rollout %s  firmware %s (%s %s)  %s", st.ID, st.Firmware, st.Model, st.Version, strings.ToUpper(st.Status))
	if len(st.Waves) > 0 {
		fmt.Fprintf(&b, "  wave %d/%d", st.CurrentWave, len(st.Waves))
	}
	b.WriteString("\n")
	if st.Reason != "" {
		fmt.Fprintf(&b, "reason: %s\n", st.Reason)
	}
	tw := tabwriter.NewWriter(&b, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "WAVE\t%\tSIZE\tQUEUED\tSENT\tDOWNLOADING\tINSTALLING\tSUCCEEDED\tFAILED\tCANCELLED\tFAIL%\tSTATE\t")
	row := func(name, pct string, size int, m map[string]int, failPct, state string) {
		fmt.Fprintf(tw, "%s\t%s\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%s\t%s\t\n", name, pct, size,
			m["queued"], m["sent"], m["downloading"]+m["verifying"], m["installing"]+m["rebooting"],
			m["succeeded"], m["failed"]+m["rejected"]+m["timed_out"], m["cancelled"], failPct, state)
	}
	for _, w := range st.Waves {
		row(strconv.Itoa(w.Wave), strconv.Itoa(w.Percent), w.Size, w.Counts, strconv.FormatFloat(w.FailurePct, 'f', 1, 64), w.State)
	}
	row("total", "", st.Targets, st.Counts, "", "")
	tw.Flush()
	skipped := byReason(st.Skipped)
	if st.WrongModel > 0 {
		skipped = append(skipped, fmt.Sprintf("other model %d", st.WrongModel))
	}
	if len(skipped) > 0 {
		fmt.Fprintf(&b, "not updated: %s\n", strings.Join(skipped, ", "))
	}
	if waiting := byReason(st.Waiting); len(waiting) > 0 {
		fmt.Fprintf(&b, "waiting for their lockers: %s\n", strings.Join(waiting, ", "))
	}
	return b.String()
}

// byReason lists counts by reason as "reason n", in the reasons' order.
func byReason(m map[string]int) []string {
	var out []string
	for _, k := range slices.Sorted(maps.Keys(m)) {
		out = append(out, fmt.Sprintf("%s %d", k, m[k]))
	}
	return out
}

// rolloutWatch redraws the progress view until the rollout ends (a
// terminal gets the screen redrawn; a pipe gets each change once). It
// fails when the rollout ends other than completed.
func (c *cli) rolloutWatch(args []string) error {
	fs := c.flags("rollout watch")
	interval := fs.Duration("interval", time.Second, "how often to poll")
	pos, err := positional(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 || *interval <= 0 {
		return usageError("rollout watch needs one rollout id")
	}
	tty := isTerminal(c.out)
	last := ""
	for {
		st, err := c.rollout(pos[0])
		if err != nil {
			return err
		}
		frame := renderRollout(st)
		if c.json {
			frame = string(st.raw) + "\n"
		}
		if frame != last {
			if tty && !c.json {
				io.WriteString(c.out, "\x1b[H\x1b[2J") // home and clear
			}
			io.WriteString(c.out, frame)
			if !tty && !c.json {
				io.WriteString(c.out, "\n")
			}
			last = frame
		}
		if ended(st.Status) {
			if st.Status != "completed" {
				return fmt.Errorf("rollout %s %s: %s", st.ID, st.Status, st.Reason)
			}
			return nil
		}
		select {
		case <-c.ctx.Done():
			return c.ctx.Err()
		case <-time.After(*interval):
		}
	}
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	info, err := f.Stat()
	return err == nil && info.Mode()&os.ModeCharDevice != 0
}

func (c *cli) rolloutJobs(args []string) error {
	fs := c.flags("rollout jobs")
	state := fs.String("state", "", "only jobs in this state")
	wave := fs.String("wave", "", "only jobs of this wave (1-based)")
	pos, err := positional(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return usageError("rollout jobs needs one rollout id")
	}
	return c.list("/v1/rollouts/"+url.PathEscape(pos[0])+"/jobs", url.Values{"state": {*state}, "wave": {*wave}},
		[]string{"locker", "wave", "state", "error", "attempt", "from_fw", "job", "updated_at"})
}
