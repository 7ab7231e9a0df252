package ingest_test

import (
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"syscall"
	"testing"
	"time"

	"github.com/dataembassy/embassy/internal/testenv"
)

// benchRounds is the number of rounds of BenchmarkResticBackup; the order
// of ours and the baseline alternates from one round to the next.
const benchRounds = 3

// BenchmarkResticBackup times `restic backup` of the cached Debian kernel's
// module tree (about 390 MiB in about 4,000 real files) into our ingest
// server (two mirrored disks, mutual TLS) against the client-bound limit, a
// local restic repository on disk, in the same run: a first backup into
// fresh repositories, then a second, deduplicated backup of the same tree.
// Each round measures both with a cold page cache (dropped before every
// backup) and a warm one (the source tree read just before every backup),
// and runs ours first in rounds 1 and 3, the baseline first in round 2. It
// prints every round and the median ratio ours/baseline of each pass and
// cache state.
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
	cold := dropPageCache
	if err := dropPageCache(src); err != nil {
		fmt.Printf("cannot drop the page cache (%v): cold runs evict only the source tree's pages (fadvise DONTNEED)\n", err)
		cold = evictTree
	}
	prepare := map[string]func(string) error{"cold": cold, "warm": readTree}
	for n := 0; n < b.N; n++ {
		ratios := map[string][]float64{} // "first cold" -> one ratio per round
		for round := 0; round < benchRounds; round++ {
			order := []string{"ours", "local"}
			caches := []string{"cold", "warm"}
			if round%2 == 1 {
				order = []string{"local", "ours"}
				caches = []string{"warm", "cold"}
			}
			for _, cache := range caches {
				run := backupRunners(b)
				for _, target := range order {
					if _, err := run[target]("", "init"); err != nil {
						b.Fatal(err)
					}
				}
				for _, pass := range []string{"first", "second"} {
					took := map[string]time.Duration{}
					for _, target := range order {
						if err := prepare[cache](src); err != nil {
							b.Fatalf("%s cache: %v", cache, err)
						}
						// Named relative to its parent, as in the tests: the
						// trees hold the module tree alone.
						d, err := run[target](filepath.Dir(src), "backup", filepath.Base(src))
						if err != nil {
							b.Fatal(err)
						}
						took[target] = d
					}
					r := took["ours"].Seconds() / took["local"].Seconds()
					ratios[pass+" "+cache] = append(ratios[pass+" "+cache], r)
					fmt.Printf("round %d (%s first), %s cache, %s backup: ours %.2fs, local repository %.2fs, ratio %.2f\n",
						round+1, order[0], cache, pass, took["ours"].Seconds(), took["local"].Seconds(), r)
				}
			}
		}
		for _, pass := range []string{"first", "second"} {
			for _, cache := range []string{"cold", "warm"} {
				med := median(ratios[pass+" "+cache])
				b.ReportMetric(med, fmt.Sprintf("ratio-%s-%s", pass, cache))
				fmt.Printf("restic backup of %s, %s backup, %s cache: median ratio ours/local of %d rounds %.2f (target <= 1.25 on the first)\n",
					src, pass, cache, benchRounds, med)
			}
		}
	}
}

// backupRunners returns, for "ours" (a fresh ingest server) and "local" (a
// fresh local repository), a function that runs restic in a directory and
// returns its wall time.
func backupRunners(b *testing.B) map[string]func(dir string, args ...string) (time.Duration, error) {
	f := start(b)
	local := filepath.Join(b.TempDir(), "local-repo")
	timed := func(run func() ([]byte, error)) (time.Duration, error) {
		t0 := time.Now()
		out, err := run()
		if err != nil {
			return 0, fmt.Errorf("%w: %s", err, out)
		}
		return time.Since(t0), nil
	}
	return map[string]func(string, ...string) (time.Duration, error){
		"local": func(dir string, args ...string) (time.Duration, error) {
			cmd := exec.Command("restic", append([]string{"-r", local, "--no-cache"}, args...)...)
			cmd.Dir = dir
			cmd.Env = append(os.Environ(), "RESTIC_PASSWORD=bench")
			return timed(cmd.CombinedOutput)
		},
		"ours": func(dir string, args ...string) (time.Duration, error) {
			return timed(func() ([]byte, error) {
				out, err := f.resticIn(b, dir, f.clientPEM, args...)
				return []byte(out), err
			})
		},
	}
}

func median(xs []float64) float64 {
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	return s[len(s)/2]
}

// dropPageCache writes back dirty pages and drops the whole page cache
// (root only): source tree, repositories and store alike start cold.
func dropPageCache(string) error {
	syscall.Sync()
	return os.WriteFile("/proc/sys/vm/drop_caches", []byte("3\n"), 0o200)
}

// evictTree is the fallback without root: it drops the source tree's pages
// from the page cache, file by file.
func evictTree(dir string) error {
	syscall.Sync()
	return walkFiles(dir, func(f *os.File) error {
		_, _, errno := syscall.Syscall6(syscall.SYS_FADVISE64, f.Fd(), 0, 0, 4 /* POSIX_FADV_DONTNEED */, 0, 0)
		if errno != 0 {
			return errno
		}
		return nil
	})
}

// readTree reads every file of dir, so that the backup finds it in the
// page cache.
func readTree(dir string) error {
	return walkFiles(dir, func(f *os.File) error {
		_, err := io.Copy(io.Discard, f)
		return err
	})
}

func walkFiles(dir string, fn func(*os.File) error) error {
	return filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return err
		}
		f, err := os.Open(p)
		if err != nil {
			return err
		}
		defer f.Close()
		return fn(f)
	})
}
