// Command embassy-demo runs the local-default demonstration: it boots the
// built image once in QEMU (OVMF, a fresh swtpm, two NICs) and prints the
// host's measured-boot verdict against the signed manifest.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"time"

	"github.com/dataembassy/embassy/images/imagekey"
	"github.com/dataembassy/embassy/qemu-tests/bootreport"
	"github.com/dataembassy/embassy/qemu-tests/vm"
)

func main() {
	image := flag.String("image", "out", "image folder built by mkimage")
	cache := flag.String("cache", ".cache", "cache folder (dev keys, swtpm local CA)")
	pubPath := flag.String("pubkey", "", "image-signing public key (default: the local-default dev key)")
	timeout := flag.Duration("timeout", 5*time.Minute, "how long to wait for the appliance")
	flag.Parse()
	if err := run(*image, *cache, *pubPath, *timeout); err != nil {
		fmt.Fprintln(os.Stderr, "embassy-demo:", err)
		os.Exit(1)
	}
}

func run(image, cache, pubPath string, timeout time.Duration) error {
	if pubPath == "" {
		pubPath = filepath.Join(cache, "keys", "image-signing-dev.key.pub")
	}
	pub, err := imagekey.LoadPublic(pubPath)
	if err != nil {
		return err
	}
	m, err := bootreport.ImageManifest(image, pub)
	if err != nil {
		return fmt.Errorf("image manifest: %w", err)
	}
	cfg, err := bootreport.BootConfig("demo", image, m)
	if err != nil {
		return err
	}
	cfg.SwtpmCA = filepath.Join(cache, "swtpm-localca")
	cfg.LogDir = filepath.Join(image, "demo-logs")
	start := time.Now()
	cfg.Stdout = &bootreport.ProgressWriter{Out: os.Stdout, Start: start}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	fmt.Printf("booting image version %d (%s) in QEMU/OVMF with a fresh swtpm...\n", m.Version, m.Kernel.Package)
	v, err := vm.Start(ctx, cfg)
	if err != nil {
		return err
	}
	defer v.Close()
	ev, err := bootreport.Wait(ctx, v)
	if err != nil {
		return err
	}
	verdict, err := bootreport.Verify(ev, m.Measurements)
	if err != nil {
		return fmt.Errorf("event log does not replay to the TPM's PCRs: %w", err)
	}
	fmt.Printf("\nmeasured-boot verdict (event log replayed against PCR0-9 read from the TPM):\n")
	mark := func(ok bool) string {
		if ok {
			return "match"
		}
		return "MISMATCH"
	}
	fmt.Printf("  PCR4 kernel      %-8s %s\n", mark(verdict.Check.KernelMatch), m.Measurements.KernelQEMUDirect)
	fmt.Printf("  PCR9 cmdline     %-8s %s\n", mark(verdict.Check.LoadOptionsMatch), m.Measurements.LoadOptions)
	fmt.Printf("  PCR9 initrd      %-8s %s\n", mark(verdict.Check.InitrdMatch), m.Measurements.Initrd)
	for _, p := range verdict.Check.Problems {
		fmt.Printf("  problem: %s\n", p)
	}
	fmt.Printf("  console log: %s\n", v.LogPath)
	if !verdict.Check.OK() {
		return fmt.Errorf("the booted image does not match manifest version %d", m.Version)
	}
	fmt.Printf("PASS: the appliance booted exactly image version %d\n", m.Version)
	return nil
}
