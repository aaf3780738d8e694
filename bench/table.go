package bench

import (
	"fmt"
	"io"
	"os"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
)

// Machine describes where a benchmark ran.
type Machine struct {
	CPUs     int
	CPUModel string
	MemGiB   float64
	Kernel   string
	Go       string
}

// ThisMachine reads /proc for the machine's description.
func ThisMachine() Machine {
	m := Machine{CPUs: runtime.NumCPU(), Go: runtime.Version()}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPUModel = strings.TrimSpace(v)
				break
			}
		}
	}
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		var kb float64
		fmt.Sscanf(strings.TrimPrefix(strings.Split(string(b), "\n")[0], "MemTotal:"), "%f", &kb)
		m.MemGiB = kb / (1 << 20)
	}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.Kernel = strings.TrimSpace(string(b))
	}
	return m
}

func (m Machine) String() string {
	return fmt.Sprintf("%d CPUs (%s), %.1f GiB RAM, Linux %s, %s", m.CPUs, m.CPUModel, m.MemGiB, m.Kernel, m.Go)
}

// Load is the machine's load average and what else is busy, for noise notes.
func Load() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

// Report is one workload's result table.
type Report struct {
	Workload string
	Method   string
	Runs     int
	Started  time.Time
	LoadAvg  [2]string // before, after
	Busy     []string  // what else ran on the machine, sampled during the runs
	Columns  []string  // e.g. "lockergate", "bare mochi", "ratio"
	Rows     [][]string
	Notes    []string
	Targets  []string // "p99 < 250 ms: met (93 ms)"
	// Detail is an optional second table (e.g. every step of every run).
	DetailColumns []string
	Detail        [][]string
}

// Add appends a row.
func (r *Report) Add(cells ...string) { r.Rows = append(r.Rows, cells) }

// Print writes the table as Markdown (readable in a terminal too).
func (r *Report) Print(w io.Writer, m Machine) {
	fmt.Fprintf(w, "\n## %s\n\n", r.Workload)
	fmt.Fprintf(w, "- machine: %s\n", m)
	fmt.Fprintf(w, "- method: %s\n", r.Method)
	fmt.Fprintf(w, "- runs: %d (median, range in brackets); load average before %s, after %s\n", r.Runs, r.LoadAvg[0], r.LoadAvg[1])
	for _, b := range r.Busy {
		fmt.Fprintf(w, "- other load: %s\n", b)
	}
	fmt.Fprintln(w)
	printTable(w, r.Columns, r.Rows)
	if len(r.Targets) > 0 {
		fmt.Fprintf(w, "\nTargets:\n")
		for _, t := range r.Targets {
			fmt.Fprintf(w, "- %s\n", t)
		}
	}
	if len(r.Detail) > 0 {
		fmt.Fprintf(w, "\nEvery step of every run:\n\n")
		printTable(w, r.DetailColumns, r.Detail)
	}
	if len(r.Notes) > 0 {
		fmt.Fprintf(w, "\nNotes:\n")
		for _, n := range r.Notes {
			fmt.Fprintf(w, "- %s\n", n)
		}
	}
}

func ratio(a, b float64) string {
	if b == 0 {
		return "n/a"
	}
	return fmt.Sprintf("%.2f×", a/b)
}

func metOrNot(ok bool) string {
	if ok {
		return "met"
	}
	return "NOT met"
}

func printTable(w io.Writer, cols []string, rows [][]string) {
	tw := tabwriter.NewWriter(w, 0, 0, 1, ' ', 0)
	fmt.Fprintf(tw, "| %s\t |\n", strings.Join(cols, "\t | "))
	seps := make([]string, len(cols))
	for i := range seps {
		seps[i] = "---"
	}
	fmt.Fprintf(tw, "| %s\t |\n", strings.Join(seps, "\t | "))
	for _, row := range rows {
		cells := append([]string(nil), row...)
		for len(cells) < len(cols) {
			cells = append(cells, "")
		}
		fmt.Fprintf(tw, "| %s\t |\n", strings.Join(cells, "\t | "))
	}
	tw.Flush()
}

// BusyElsewhere samples every process for a second and names the busiest
// ones outside this benchmark (its own process and the process groups of
// the servers it started, given as pgids), for the noise notes.
func BusyElsewhere(ours map[int]bool) string {
	snap := func() map[int]struct {
		comm string
		cpu  float64
		pgid int
	} {
		out := map[int]struct {
			comm string
			cpu  float64
			pgid int
		}{}
		ents, _ := os.ReadDir("/proc")
		for _, e := range ents {
			pid, err := strconv.Atoi(e.Name())
			if err != nil {
				continue
			}
			b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
			if err != nil {
				continue
			}
			s := string(b)
			i, j := strings.IndexByte(s, '('), strings.LastIndexByte(s, ')')
			if i < 0 || j < i {
				continue
			}
			f := strings.Fields(s[j+1:])
			if len(f) < 13 {
				continue
			}
			u, _ := strconv.ParseFloat(f[11], 64)
			st, _ := strconv.ParseFloat(f[12], 64)
			pg, _ := strconv.Atoi(f[2])
			out[pid] = struct {
				comm string
				cpu  float64
				pgid int
			}{s[i+1 : j], (u + st) / clockTicks, pg}
		}
		return out
	}
	a := snap()
	time.Sleep(time.Second)
	b := snap()
	by := map[string]float64{}
	self := os.Getpid()
	for pid, p := range b {
		if pid == self || ours[p.pgid] {
			continue
		}
		if q, ok := a[pid]; ok {
			by[p.comm] += p.cpu - q.cpu
		}
	}
	type kv struct {
		k string
		v float64
	}
	var list []kv
	var total float64
	for k, v := range by {
		if v > 0 {
			list = append(list, kv{k, v})
			total += v
		}
	}
	sort.Slice(list, func(i, j int) bool { return list[i].v > list[j].v })
	var parts []string
	for i, e := range list {
		if i == 6 || e.v < 0.05 {
			break
		}
		parts = append(parts, fmt.Sprintf("%s %.0f%%", e.k, e.v*100))
	}
	return fmt.Sprintf("%.0f%% of a core outside this benchmark (%s)", total*100, strings.Join(parts, ", "))
}
