package ingest_test

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/dataembassy/embassy/internal/testenv"
)

// BenchmarkResticBackup times `restic backup` of the cached Debian kernel's
// module tree (about 390 MiB of real files) into our ingest server (two
// mirrored disks, mutual TLS) and into a local restic repository on disk,
// the client-bound limit, in the same run; then a second, deduplicated
// backup of the same tree into each.
func BenchmarkResticBackup(b *testing.B) {
	if _, err := exec.LookPath("restic"); err != nil {
		b.Skip("restic not installed")
	}
	kernel := testenv.CachedKernel(b)
	tree := filepath.Join(filepath.Dir(filepath.Dir(kernel)), "lib", "modules")
	m, _ := filepath.Glob(filepath.Join(tree, "*", "kernel"))
	if len(m) == 0 {
		b.Skip("no module tree in the cache")
	}
	src := m[0]
	for n := 0; n < b.N; n++ {
		f := start(b)
		local := filepath.Join(b.TempDir(), "local-repo")
		runLocal := func(args ...string) (time.Duration, error) {
			cmd := exec.Command("restic", append([]string{"-r", local, "--no-cache"}, args...)...)
			cmd.Env = append(os.Environ(), "RESTIC_PASSWORD=bench")
			t0 := time.Now()
			out, err := cmd.CombinedOutput()
			if err != nil {
				return 0, fmt.Errorf("%v: %s", err, out)
			}
			return time.Since(t0), nil
		}
		runOurs := func(args ...string) (time.Duration, error) {
			t0 := time.Now()
			out, err := f.restic(b, f.clientPEM, args...)
			if err != nil {
				return 0, fmt.Errorf("%v: %s", err, out)
			}
			return time.Since(t0), nil
		}
		if _, err := runLocal("init"); err != nil {
			b.Fatal(err)
		}
		if _, err := runOurs("init"); err != nil {
			b.Fatal(err)
		}
		for _, pass := range []string{"first", "second (deduplicated)"} {
			lt, err := runLocal("backup", src)
			if err != nil {
				b.Fatal(err)
			}
			ot, err := runOurs("backup", src)
			if err != nil {
				b.Fatal(err)
			}
			b.ReportMetric(ot.Seconds()/lt.Seconds(), "ratio-"+map[string]string{"first": "first", "second (deduplicated)": "second"}[pass])
			fmt.Printf("restic backup, %s pass, %s: ours %.1fs, local repository %.1fs, ratio %.2f (target <= 1.25 on the first)\n",
				pass, src, ot.Seconds(), lt.Seconds(), ot.Seconds()/lt.Seconds())
		}
	}
}
