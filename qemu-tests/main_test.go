// Package qemutests boots the real appliance image in QEMU (OVMF, swtpm,
// two NICs, virtio disks) and checks it end to end. The tests run when
// EMBASSY_E2E=1 (set by `make e2e` and `make test`, which build the image
// first); EMBASSY_IMAGE names the image folder (default: out/).
package qemutests

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/dataembassy/embassy/images/imagekey"
	"github.com/dataembassy/embassy/images/manifest"
	"github.com/dataembassy/embassy/qemu-tests/bootreport"
	"github.com/dataembassy/embassy/qemu-tests/vm"
)

var (
	repoRoot    string
	mkimage     string // path of a built mkimage binary
	guestfwdBin string // path of a built guestfwd binary (hostBrokers.guestForwards)
)

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	wd, _ := os.Getwd()
	repoRoot = filepath.Dir(wd)
	if os.Getenv("EMBASSY_E2E") == "1" {
		tmp, err := os.MkdirTemp("", "embassy-e2e-bin-")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer os.RemoveAll(tmp)
		fixture.root = tmp
		defer releaseSharedTwins()
		defer writeScenarioTimes(filepath.Join(repoRoot, "out", "test-logs", ScenarioTimesFile))
		if mkimage, err = buildTool(tmp, "./cmd/mkimage"); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		if guestfwdBin, err = buildTool(tmp, "./qemu-tests/guestfwd"); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
	}
	// The parallel phase's limit is slots, not go test's
	// -parallel (GOMAXPROCS by default): a scenario waiting for a run
	// made once by another (parallelReader) must not hold one of the
	// few places go test gives.
	if f := flag.Lookup("test.parallel"); f != nil && !parallelFlagSet() {
		f.Value.Set("32")
	}
	return m.Run()
}

// buildTool builds the main package pkg of the module into dir and
// returns the binary's path.
func buildTool(dir, pkg string) (string, error) {
	out := filepath.Join(dir, filepath.Base(pkg))
	cmd := exec.Command("go", "build", "-o", out, pkg)
	cmd.Dir = repoRoot
	cmd.Stderr = os.Stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("build %s: %w", pkg, err)
	}
	return out, nil
}

// parallelFlagSet reports whether -test.parallel is on the command line.
func parallelFlagSet() bool {
	for _, a := range os.Args[1:] {
		if strings.HasPrefix(strings.TrimLeft(a, "-"), "test.parallel") {
			return true
		}
	}
	return false
}

// skipUnlessE2E skips unless the end-to-end environment was asked for.
func skipUnlessE2E(t testing.TB) {
	t.Helper()
	if os.Getenv("EMBASSY_E2E") != "1" {
		t.Skip("boots QEMU: run with EMBASSY_E2E=1 (make e2e / make test)")
	}
}

// requireE2E skips unless the end-to-end environment was asked for, and
// records the scenario's wall time.
func requireE2E(t testing.TB) {
	t.Helper()
	skipUnlessE2E(t)
	if _, timed := scenarioTimes.started.LoadOrStore(t.Name(), true); !timed && !strings.Contains(t.Name(), "/") {
		start := time.Now()
		scenarioStarted(start)
		kind := timedSequential
		if _, ok := parallelTests.Load(t.Name()); ok {
			kind = timedParallel
		}
		if _, ok := readerTests.Load(t.Name()); ok {
			kind = timedReader
		}
		t.Cleanup(func() { reportScenarioTime(t.Name(), time.Since(start), kind) })
	}
}

// testLogDir is where a test's console logs go.
func testLogDir(t testing.TB) string {
	return filepath.Join(repoRoot, "out", "test-logs", t.Name())
}

func cacheDir() string {
	if c := os.Getenv("EMBASSY_CACHE"); c != "" {
		return c
	}
	return filepath.Join(repoRoot, ".cache")
}

func imageDir() string {
	if d := os.Getenv("EMBASSY_IMAGE"); d != "" {
		return d
	}
	return filepath.Join(repoRoot, "out")
}

func pubKeyPath() string {
	return filepath.Join(cacheDir(), "keys", "image-signing-dev.key.pub")
}

// loadImage verifies the image folder and returns its manifest.
func loadImage(t testing.TB, dir string) *manifest.Manifest {
	t.Helper()
	pub, err := imagekey.LoadPublic(pubKeyPath())
	if err != nil {
		t.Fatalf("image-signing key: %v (build the image with make image)", err)
	}
	m, err := bootreport.ImageManifest(dir, pub)
	if err != nil {
		t.Fatalf("manifest: %v", err)
	}
	return m
}

// bootConfig returns a VM config for the image in dir.
func bootConfig(t testing.TB, name, dir string) vm.Config {
	t.Helper()
	cfg := bootreport.BootConfig(name, dir)
	cfg.LogDir = testLogDir(t)
	os.RemoveAll(cfg.LogDir)
	cfg.SwtpmCA = filepath.Join(cacheDir(), "swtpm-localca")
	return cfg
}

// startVM boots a VM and tears it down when the test ends, pointing to the
// console log if the test failed.
func startVM(t testing.TB, cfg vm.Config) *vm.VM {
	t.Helper()
	releaseSharedTwins() // a scenario of its own: no idle VMs beside it
	harnessNetwork(t, &cfg)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	v, err := vm.Start(ctx, cfg)
	if err != nil {
		t.Fatalf("start VM: %v", err)
	}
	t.Cleanup(func() {
		v.Close()
		if t.Failed() {
			t.Logf("console log of %s: %s", cfg.Name, v.LogPath)
		}
	})
	return v
}
