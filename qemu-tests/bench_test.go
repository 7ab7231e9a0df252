package qemutests

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/dataembassy/embassy/appliance/logmsg"
	"github.com/dataembassy/embassy/images/build"
	"github.com/dataembassy/embassy/initramfs/cpioimage"
	"github.com/dataembassy/embassy/qemu-tests/bootreport"
	"github.com/dataembassy/embassy/qemu-tests/vm"
)

// buildBareInitrd builds the baseline initramfs: only /init (bareinit) and
// /dev/console.
func buildBareInitrd(b *testing.B) string {
	b.Helper()
	bin, err := build.GoBuild(context.Background(), repoRoot, "./qemu-tests/bareinit")
	if err != nil {
		b.Fatal(err)
	}
	arc := cpioimage.New()
	if err := build.Skeleton(arc, bin); err != nil {
		b.Fatal(err)
	}
	data, err := arc.Build()
	if err != nil {
		b.Fatal(err)
	}
	path := filepath.Join(b.TempDir(), "bare.cpio.zst")
	if err := os.WriteFile(path, data, 0o644); err != nil {
		b.Fatal(err)
	}
	return path
}

// timeToLine boots cfg and returns the time from QEMU start to the first
// console line that match accepts.
func timeToLine(b *testing.B, cfg vm.Config, match func(string) bool) time.Duration {
	b.Helper()
	harnessNetwork(b, &cfg)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	v, err := vm.Start(ctx, cfg)
	if err != nil {
		b.Fatal(err)
	}
	defer v.Close()
	_, line, err := v.WaitFor(ctx, 0, func(s string) bool { return match(s) || bootreport.JSONMsg(s) == logmsg.MsgHalted })
	if err != nil {
		b.Fatal(err)
	}
	if bootreport.JSONMsg(line.Text) == logmsg.MsgHalted {
		b.Fatalf("appliance halted: %s", line.Text)
	}
	return line.At.Sub(v.Started)
}

// BenchmarkBoot measures boot-to-ready: QEMU start to "ingest serving" of a
// provisioned appliance (firmware, kernel, modules, DHCP on both NICs,
// attestation at the brokers, shares, unlock of both disks, store open,
// listener up), beside a bare image (same kernel, cmdline, OVMF, swtpm and
// TCG; its init prints one line) in the same run. Rounds alternate which
// of the two boots first; the ratio is the median of the rounds' ratios.
func BenchmarkBoot(b *testing.B) {
	if os.Getenv("EMBASSY_E2E") != "1" {
		b.Skip("boots QEMU: run with EMBASSY_E2E=1 (make bench-boot)")
	}
	dir := imageDir()
	bare := buildBareInitrd(b)
	provisionedEmbassy(b) // made once, outside the rounds
	ready := func() time.Duration {
		hb, cfg, _ := provisioned(b, "bench-ready")
		defer hb.close()
		cfg.LogDir = b.TempDir()
		return timeToLine(b, cfg, func(s string) bool { return bootreport.JSONMsg(s) == logmsg.MsgServing })
	}
	// The bare image: the same signed UKI but for its initramfs, on the
	// same disk layout, under the same firmware and variables.
	bareDir := copyImage(b, dir)
	if err := os.Rename(bare, filepath.Join(bareDir, build.InitramfsFile)); err != nil {
		b.Fatal(err)
	}
	repackImage(b, bareDir)
	bareBoot := func() time.Duration {
		cfg := bootreport.BootConfig("bench-bare", bareDir)
		cfg.SwtpmCA = filepath.Join(cacheDir(), "swtpm-localca")
		cfg.LogDir = b.TempDir()
		return timeToLine(b, cfg, func(s string) bool { return strings.Contains(s, "bare init up") })
	}
	var readies, bares, ratios []float64
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		var r, z time.Duration
		if i%2 == 0 {
			r, z = ready(), bareBoot()
		} else {
			z, r = bareBoot(), ready()
		}
		readies, bares = append(readies, r.Seconds()), append(bares, z.Seconds())
		ratios = append(ratios, r.Seconds()/z.Seconds())
		fmt.Printf("round %d: boot-to-ready %.2fs, bare boot %.2fs, ratio %.2f\n", i+1, r.Seconds(), z.Seconds(), r.Seconds()/z.Seconds())
	}
	a, z, ratio := median(readies), median(bares), median(ratios)
	b.ReportMetric(a, "s/boot-to-ready")
	b.ReportMetric(z, "s/bare-boot")
	b.ReportMetric(ratio, "ratio")
	fmt.Printf("boot-to-ready %.2fs, bare boot %.2fs, median ratio %.2f (n=%d, alternating order)\n", a, z, ratio, b.N)
}

// median of a non-empty slice.
func median(xs []float64) float64 {
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}
