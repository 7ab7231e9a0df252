package qemutests

import (
	"cmp"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
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
	// first and last bound the QEMU phase: the first scenario's start
	// and the last one's end. With scenarios side by side the phase is
	// shorter than the sum of their times.
	first, last time.Time
}

// scenarioStarted notes when the first scenario began.
func scenarioStarted(at time.Time) {
	scenarioTimes.mu.Lock()
	defer scenarioTimes.mu.Unlock()
	if scenarioTimes.first.IsZero() || at.Before(scenarioTimes.first) {
		scenarioTimes.first = at
	}
}

// How a timed row was run; it decides its mark and whether it counts in
// the sum.
type timedKind int

const (
	timedSequential timedKind = iota // a scenario of the sequential phase
	timedParallel                    // a scenario of the parallel phase
	timedReader                      // reads a shared run: its wait is no cost of its own
	timedSharedRun                   // a run made once that readers share
	timedSetUp                       // the shared set-up, counted in the first scenario
)

// reportScenarioTime records one row's wall time.
func reportScenarioTime(name string, d time.Duration, kind timedKind) {
	scenarioTimes.mu.Lock()
	defer scenarioTimes.mu.Unlock()
	mark := map[timedKind]string{
		timedParallel:  "  (parallel phase)",
		timedReader:    "  (reads a shared run; waits included, not summed)",
		timedSharedRun: "  (parallel phase)",
	}[kind]
	scenarioTimes.lines = append(scenarioTimes.lines, fmt.Sprintf("%-45s %7.1f s%s", name, d.Seconds(), mark))
	if kind != timedSetUp && kind != timedReader {
		scenarioTimes.total += d
	}
	if now := time.Now(); now.After(scenarioTimes.last) {
		scenarioTimes.last = now
	}
}

// timeSharedRun starts the clock of a run that readers share and returns
// the function that stops it.
func timeSharedRun(name string) (stop func()) {
	start := time.Now()
	scenarioStarted(start)
	return func() { reportScenarioTime(name, time.Since(start), timedSharedRun) }
}

// slots bounds the parallel phase: a scenario there takes one slot per VM
// it runs at a time, and waits until that many are free. The pool has two
// slots per core (CI: 2 cores, 4 slots): a TCG vCPU keeps a core busy only
// while its guest computes, and the scenarios wait for consoles, brokers
// and timers much of the time. Measured on the 2-core machine (the whole
// QEMU suite): one at a time 1,717 s, 3 slots 1,275 s, 4 slots 1,074 s.
// EMBASSY_QEMU_SLOTS overrides the size (1: one scenario at a time).
var slots = newSlotPool()

type slotPool struct {
	mu      sync.Mutex
	size    int
	free    int
	waiting []*slotWaiter
	arrived int
	// open is set a moment after the first scenario asked: the parallel
	// phase's scenarios all ask at once, and the costliest go first only
	// if they are all in the queue when the first slots are given.
	open      bool
	openAfter time.Duration
}

// slotsOpenAfter is how long the pool gathers the first requests.
const slotsOpenAfter = time.Second

// slotWaiter is a scenario waiting for n slots, expected to take about
// cost; granted is closed when it has them.
type slotWaiter struct {
	n, order int
	cost     time.Duration
	granted  chan struct{}
}

func newSlotPool() *slotPool {
	n := min(2*runtime.NumCPU(), 6)
	if v, err := strconv.Atoi(os.Getenv("EMBASSY_QEMU_SLOTS")); err == nil && v > 0 {
		n = v
	}
	return &slotPool{size: n, free: n, openAfter: slotsOpenAfter}
}

// take waits until it is given n slots (at most the pool's size) and
// returns how many it took. Slots go to the costliest waiting scenarios
// first, so that the long ones do not end up alone at the end, then in
// order of arrival; a cheaper one takes slots a costlier one cannot use
// yet.
func (p *slotPool) take(n int, cost time.Duration) int {
	n = min(n, p.size)
	p.mu.Lock()
	w := &slotWaiter{n: n, cost: cost, order: p.arrived, granted: make(chan struct{})}
	if p.arrived == 0 {
		time.AfterFunc(p.openAfter, func() {
			p.mu.Lock()
			defer p.mu.Unlock()
			p.open = true
			p.grant()
		})
	}
	p.arrived++
	p.waiting = append(p.waiting, w)
	p.grant()
	p.mu.Unlock()
	<-w.granted
	return n
}

func (p *slotPool) give(n int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.free += n
	p.grant()
}

// grant hands free slots to waiters, costliest first; p.mu is held.
func (p *slotPool) grant() {
	if !p.open {
		return
	}
	slices.SortStableFunc(p.waiting, func(a, b *slotWaiter) int {
		if a.cost != b.cost {
			return cmp.Compare(b.cost, a.cost)
		}
		return a.order - b.order
	})
	kept := p.waiting[:0]
	for _, w := range p.waiting {
		if w.n <= p.free {
			p.free -= w.n
			close(w.granted)
			continue
		}
		kept = append(kept, w)
	}
	p.waiting = kept
}

// slotHolders are the top-level tests holding slots; parallelTests every
// test of the parallel phase, readerTests those that read a shared run.
var slotHolders, parallelTests, readerTests sync.Map

// parallelScenario runs t in the parallel phase, after every sequential
// scenario, beside others: it waits for vms slots (the VMs it runs at
// once; about is what it takes alone, which orders the waiting), and its
// time is taken from when it has them.
func parallelScenario(t *testing.T, vms int, about time.Duration) {
	t.Helper()
	enterParallelPhase(t)
	n := slots.take(vms, about)
	slotHolders.Store(rootTestName(t), true)
	t.Cleanup(func() {
		slotHolders.Delete(rootTestName(t))
		slots.give(n)
	})
	requireE2E(t)
}

// parallelReader runs t in the parallel phase without slots of its own:
// it reads a run made once (revokeServingAppliance, tamperedBoot,
// upgradeRun), which takes slots for its boots (slotsForRun).
func parallelReader(t *testing.T) {
	t.Helper()
	enterParallelPhase(t)
	readerTests.Store(t.Name(), true)
	requireE2E(t)
}

// enterParallelPhase pauses t until the sequential scenarios are done and
// marks it as a test of the parallel phase.
func enterParallelPhase(t *testing.T) {
	t.Helper()
	skipUnlessE2E(t)
	t.Parallel()
	parallelTests.Store(t.Name(), true)
}

// slotsForRun takes vms slots for a shared run's boots (about: what it
// takes alone) unless t's scenario holds slots already, and returns the
// function that gives them back.
func slotsForRun(t testing.TB, vms int, about time.Duration) (release func()) {
	if _, held := slotHolders.Load(rootTestName(t)); held {
		return func() {}
	}
	n := slots.take(vms, about)
	return func() { slots.give(n) }
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
	fmt.Fprintf(&b, "  %-45s %7.1f s\n", "total (sum of scenarios)", scenarioTimes.total.Seconds())
	fmt.Fprintf(&b, "  %-45s %7.1f s\n", "QEMU phase (wall clock)", scenarioTimes.last.Sub(scenarioTimes.first).Seconds())
	os.MkdirAll(filepath.Dir(path), 0o755)
	os.WriteFile(path, []byte(b.String()), 0o644)
	fmt.Print(b.String())
}
