package qemutests

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"
)

// ScenarioTimesFile (under out/test-logs/) lists every QEMU scenario's wall
// time and the total; `make test` and `make e2e` print it.
const ScenarioTimesFile = "scenario-times.txt"

var scenarioTimes struct {
	started sync.Map // test name -> true once its time is being taken
	mu      sync.Mutex
	lines   []string
	total   time.Duration
}

// reportScenarioTime records one scenario's wall time.
func reportScenarioTime(name string, d time.Duration) {
	scenarioTimes.mu.Lock()
	defer scenarioTimes.mu.Unlock()
	scenarioTimes.lines = append(scenarioTimes.lines, fmt.Sprintf("%-45s %7.1f s", name, d.Seconds()))
	if !strings.Contains(name, "shared set-up") {
		scenarioTimes.total += d
	}
}

// writeScenarioTimes writes the table; the shared set-up is counted in the
// scenario that first asked for it, so the total is the sum of scenarios.
func writeScenarioTimes(path string) {
	scenarioTimes.mu.Lock()
	defer scenarioTimes.mu.Unlock()
	if len(scenarioTimes.lines) == 0 {
		return
	}
	var b strings.Builder
	fmt.Fprintln(&b, "QEMU scenarios (wall time):")
	for _, l := range scenarioTimes.lines {
		fmt.Fprintln(&b, "  "+l)
	}
	fmt.Fprintf(&b, "  %-45s %7.1f s\n", "total", scenarioTimes.total.Seconds())
	os.MkdirAll(filepath.Dir(path), 0o755)
	os.WriteFile(path, []byte(b.String()), 0o644)
	fmt.Print(b.String())
}
