// Command embassy-demo runs the local-default demonstration (package
// qemu-tests/demo): three key brokers, one appliance in QEMU with fresh
// disks, enrollment and approvals with embassyctl, a restic backup of a
// sample register, and a status; then everything keeps running until
// Ctrl-C and is cleaned up.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/dataembassy/embassy/qemu-tests/demo"
)

func main() {
	image := flag.String("image", "out", "image folder built by mkimage")
	cache := flag.String("cache", ".cache", "cache folder (PKI, dev keys, swtpm CA)")
	bin := flag.String("bin", filepath.Join(".cache", "bin"), "folder with the keybroker and embassyctl binaries")
	sample := flag.String("sample", "", "folder to back up (default: a subtree of the cached Debian kernel)")
	hold := flag.Bool("hold", true, "keep everything running until Ctrl-C")
	flag.Parse()
	if *sample == "" {
		m, _ := filepath.Glob(filepath.Join(*cache, "kernel", "*.unpacked", "lib", "modules", "*", "kernel", "drivers", "net"))
		if len(m) == 0 {
			fmt.Fprintln(os.Stderr, "embassy-demo: no sample folder in the kernel cache\n  next: run `make image` (it caches the Debian kernel), or pass -sample DIR")
			os.Exit(2)
		}
		*sample = m[0]
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	err := demo.Run(ctx, demo.Options{Image: *image, Cache: *cache, Bin: *bin, Sample: *sample, Out: os.Stdout, Hold: *hold})
	if err != nil {
		fmt.Fprintln(os.Stderr, "embassy-demo:", err)
		os.Exit(1)
	}
}
