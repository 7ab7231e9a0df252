package luks2

import (
	"fmt"
	"os/exec"
	"sort"
	"testing"
	"time"
)

// BenchmarkFormat: LUKS2 format of a 1 GiB file with our formatter against
// `cryptsetup luksFormat` with the same PBKDF2 settings, in alternating
// rounds of the same run; the median ratio counts.
func BenchmarkFormat(b *testing.B) {
	if _, err := exec.LookPath("cryptsetup"); err != nil {
		b.Skip("cryptsetup not installed")
	}
	pass := secret(b, 32)
	kf := b.TempDir() + "/key"
	if err := writeFile(kf, pass); err != nil {
		b.Fatal(err)
	}
	var ours, theirs []float64
	for n := 0; n < b.N; n++ {
		for r := 0; r < 5; r++ {
			disk := newDisk(b, 1<<30)
			start := time.Now()
			if out, err := exec.Command("cryptsetup", "luksFormat", "--type", "luks2", "--batch-mode",
				"--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--hash", "sha256",
				"--cipher", Cipher, "--key-size", "512", "--sector-size", "512",
				"--key-file", kf, disk).CombinedOutput(); err != nil {
				b.Fatalf("cryptsetup: %v %s", err, out)
			}
			theirs = append(theirs, time.Since(start).Seconds())

			disk = newDisk(b, 1<<30)
			start = time.Now()
			if _, err := FormatFile(disk, pass, Options{}); err != nil {
				b.Fatal(err)
			}
			ours = append(ours, time.Since(start).Seconds())
		}
	}
	med := func(x []float64) float64 { s := append([]float64(nil), x...); sort.Float64s(s); return s[len(s)/2] }
	o, c := med(ours), med(theirs)
	b.ReportMetric(o*1000, "ours-ms")
	b.ReportMetric(c*1000, "cryptsetup-ms")
	b.ReportMetric(o/c, "ratio")
	fmt.Printf("LUKS2 format 1 GiB, median of %d: ours %.0f ms, cryptsetup luksFormat %.0f ms, ratio %.2f (target <= 2)\n", len(ours), o*1000, c*1000, o/c)
}
