// Command gen writes the dashboards, alert rules and rule tests of package
// dashboards into the dashboards directory (run by go generate ./dashboards).
package main

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"

	"github.com/lockergate/lockergate/dashboards"
)

func main() { os.Exit(run()) }

func run() int {
	dir := flag.String("dir", ".", "the dashboards directory")
	flag.Parse()
	files, err := dashboards.Files()
	if err != nil {
		fmt.Fprintln(os.Stderr, "gen:", err)
		return 1
	}
	for name, b := range files {
		p := filepath.Join(*dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			fmt.Fprintln(os.Stderr, "gen:", err)
			return 1
		}
		if err := os.WriteFile(p, b, 0o644); err != nil {
			fmt.Fprintln(os.Stderr, "gen:", err)
			return 1
		}
	}
	return 0
}
