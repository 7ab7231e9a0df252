package store

import (
	"bufio"
	"crypto/rand"
	"fmt"
	"io/fs"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/dataembassy/embassy/appliance/objref"
)

// crashChildEnv makes the test binary act as the writer that gets killed.
const crashChildEnv = "EMBASSY_STORE_CRASH_CHILD"

func TestMain(m *testing.M) {
	if roots := os.Getenv(crashChildEnv); roots != "" {
		crashChild(strings.Split(roots, ","))
		return
	}
	os.Exit(m.Run())
}

// crashChild writes random objects forever, printing "ACK <name> <disks>"
// after each acknowledgement.
func crashChild(roots []string) {
	var specs []DiskSpec
	for i, r := range roots {
		specs = append(specs, DiskSpec{ID: fmt.Sprint(i), Root: r})
	}
	s, err := Open(quiet(), specs)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	out := bufio.NewWriter(os.Stdout)
	for {
		n, _ := rand.Int(rand.Reader, big.NewInt(64<<10))
		b := make([]byte, n.Int64()+1)
		rand.Read(b)
		name := objref.Digest(b)
		disks, err := s.Put(ns, name, b)
		if err != nil {
			fmt.Fprintln(os.Stderr, "put:", err)
			os.Exit(1)
		}
		fmt.Fprintf(out, "ACK %s %s\n", name, strings.Join(disks, ","))
		out.Flush()
	}
}

// TestCrashSafety kills a writer with SIGKILL at random moments, at least
// 50 times, and checks after each kill that every acknowledged object is
// present and verifies on every disk it was acknowledged on, and that no
// partial object is visible.
func TestCrashSafety(t *testing.T) {
	if testing.Short() {
		t.Skip("crash loop skipped in -short mode")
	}
	roots := []string{filepath.Join(t.TempDir(), "d0"), filepath.Join(t.TempDir(), "d1")}
	acked := map[string][]string{} // name -> disk indices
	const kills = 50
	for round := 0; round < kills; round++ {
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), crashChildEnv+"="+strings.Join(roots, ","))
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		var stderr strings.Builder
		cmd.Stderr = &stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		delay, _ := rand.Int(rand.Reader, big.NewInt(150))
		timer := time.AfterFunc(time.Duration(20+delay.Int64())*time.Millisecond, func() {
			cmd.Process.Signal(syscall.SIGKILL)
		})
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			f := strings.Fields(sc.Text())
			if len(f) == 3 && f[0] == "ACK" {
				acked[f[1]] = strings.Split(f[2], ",")
			}
		}
		cmd.Wait()
		timer.Stop()
		if stderr.Len() > 0 {
			t.Fatalf("writer failed: %s", stderr.String())
		}
		// Every acknowledged object verifies on each disk it was acked on.
		for name, disks := range acked {
			for _, d := range disks {
				var idx int
				fmt.Sscan(d, &idx)
				b, err := os.ReadFile(copyOn(roots[idx], name))
				if err != nil {
					t.Fatalf("round %d: acknowledged %s missing on disk %d: %v", round, name, idx, err)
				}
				if objref.Digest(b) != name {
					t.Fatalf("round %d: acknowledged %s does not verify on disk %d", round, name, idx)
				}
			}
		}
		// No partial object is visible: every object file verifies.
		for _, r := range roots {
			filepath.WalkDir(filepath.Join(r, "objects"), func(p string, e fs.DirEntry, err error) error {
				if err != nil || e.IsDir() {
					return err
				}
				b, rerr := os.ReadFile(p)
				if rerr != nil || objref.Digest(b) != e.Name() {
					t.Fatalf("round %d: visible object %s is partial or corrupt", round, p)
				}
				return nil
			})
		}
	}
	if len(acked) < kills {
		t.Fatalf("only %d objects acknowledged over %d runs: the kills came too early to test anything", len(acked), kills)
	}
	t.Logf("%d kills, %d acknowledged objects verified", kills, len(acked))
}
