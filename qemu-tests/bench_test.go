package qemutests

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
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
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	v, err := vm.Start(ctx, cfg)
	if err != nil {
		b.Fatal(err)
	}
	defer v.Close()
	_, line, err := v.WaitFor(ctx, 0, match)
	if err != nil {
		b.Fatal(err)
	}
	return line.At.Sub(v.Started)
}

// BenchmarkBoot measures QEMU start to embassy-init's first log line, beside
// a bare image (same kernel, cmdline, OVMF, swtpm and TCG; init prints one
// line) measured in the same run, and reports the ratio.
func BenchmarkBoot(b *testing.B) {
	if os.Getenv("EMBASSY_E2E") != "1" {
		b.Skip("boots QEMU: run with EMBASSY_E2E=1 (make bench-boot)")
	}
	dir := imageDir()
	m := loadImage(b, dir)
	bare := buildBareInitrd(b)
	var appliance, baseline time.Duration
	for i := 0; i < b.N; i++ {
		cfg, err := bootreport.BootConfig("bench", dir, m)
		if err != nil {
			b.Fatal(err)
		}
		cfg.SwtpmCA = filepath.Join(cacheDir(), "swtpm-localca")
		cfg.LogDir = b.TempDir()
		appliance += timeToLine(b, cfg, func(s string) bool { return bootreport.JSONMsg(s) == logmsg.MsgStarting })

		cfg.Initrd = bare
		cfg.LogDir = b.TempDir()
		baseline += timeToLine(b, cfg, func(s string) bool { return strings.Contains(s, "bare init up") })
	}
	a := appliance.Seconds() / float64(b.N)
	z := baseline.Seconds() / float64(b.N)
	b.ReportMetric(a, "s/appliance-boot")
	b.ReportMetric(z, "s/bare-boot")
	b.ReportMetric(a/z, "ratio")
	fmt.Printf("boot to first init line: appliance %.2fs, bare %.2fs, ratio %.2f (n=%d)\n", a, z, a/z, b.N)
}
