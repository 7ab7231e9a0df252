// Command mkimage builds the immutable appliance image and its signed
// reference manifest, and verifies a built image.
//
//	mkimage build  [-out out] [-version N] [-config FILE] [-key FILE] ...
//	mkimage verify [-pubkey FILE] [-json] DIR
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"

	"github.com/dataembassy/embassy/appliance/config"
	"github.com/dataembassy/embassy/images/build"
	"github.com/dataembassy/embassy/images/devpki"
	"github.com/dataembassy/embassy/images/imagekey"
	"github.com/dataembassy/embassy/images/verify"
)

func usage() {
	fmt.Fprintln(os.Stderr, "usage: mkimage build [flags] | mkimage verify [flags] DIR")
	os.Exit(2)
}

func defaultCache() string {
	if c := os.Getenv("EMBASSY_CACHE"); c != "" {
		return c
	}
	return ".cache"
}

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	var err error
	switch os.Args[1] {
	case "build":
		err = runBuild(os.Args[2:])
	case "verify":
		err = runVerify(os.Args[2:])
	default:
		usage()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "mkimage:", err)
		os.Exit(1)
	}
}

func runBuild(args []string) error {
	fs := flag.NewFlagSet("build", flag.ExitOnError)
	cache := fs.String("cache", defaultCache(), "cache folder for downloads and local-default keys")
	out := fs.String("out", "out", "output folder")
	version := fs.Uint64("version", 1, "image version (monotonic integer, for anti-rollback)")
	cfgPath := fs.String("config", "images/local/config.json", "image config: brokers and threshold")
	brokerCA := fs.String("broker-ca", "", "PEM bundle of the broker CA (default: local-default CA in the cache)")
	clientCA := fs.String("client-ca", "", "PEM bundle of the home-state client CA (default: local-default CA in the cache)")
	keyPath := fs.String("key", "", "image-signing ed25519 key, PKCS#8 PEM (default: local-default dev key in the cache)")
	qemuMem := fs.Int("qemu-memory-mib", 1024, "also record the kernel's PCR4 digest under QEMU direct boot with this much RAM; 0 for a hardware-only manifest")
	kernelPkg := fs.String("kernel-package", "", "pin the Debian kernel package (default: what linux-image-amd64 depends on)")
	fs.Parse(args)
	if fs.NArg() != 0 {
		return fmt.Errorf("build takes no arguments, got %q", fs.Args())
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))

	f, err := os.Open(*cfgPath)
	if err != nil {
		return fmt.Errorf("open image config: %w", err)
	}
	cfg, err := config.Parse(f)
	f.Close()
	if err != nil {
		return fmt.Errorf("%s: %w", *cfgPath, err)
	}
	pki := filepath.Join(*cache, "pki")
	if *brokerCA == "" {
		ca, err := devpki.Ensure(pki, "broker-ca", "embassy local broker CA")
		if err != nil {
			return err
		}
		*brokerCA = ca.CertPath
	}
	if *clientCA == "" {
		ca, err := devpki.Ensure(pki, "client-ca", "embassy local home-state client CA")
		if err != nil {
			return err
		}
		*clientCA = ca.CertPath
	}
	bca, err := os.ReadFile(*brokerCA)
	if err != nil {
		return fmt.Errorf("read broker CA: %w", err)
	}
	cca, err := os.ReadFile(*clientCA)
	if err != nil {
		return fmt.Errorf("read client CA: %w", err)
	}
	var key []byte
	if *keyPath == "" {
		k, err := imagekey.EnsureDev(filepath.Join(*cache, "keys", "image-signing-dev.key"))
		if err != nil {
			return err
		}
		key = k
		log.Warn("signing with the local-default dev key; pass -key for a production image")
	} else {
		k, err := imagekey.LoadPrivate(*keyPath)
		if err != nil {
			return err
		}
		key = k
	}
	root, err := os.Getwd()
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	res, err := build.Build(ctx, build.Options{
		ModuleRoot: root, CacheDir: *cache, OutDir: *out, Version: *version,
		Config: cfg, BrokerCA: bca, ClientCA: cca, SigningKey: key,
		KernelPackage: *kernelPkg, QEMUMemoryMiB: *qemuMem, Log: log,
	})
	if err != nil {
		return err
	}
	fmt.Printf("image version %d written to %s in %.1fs\n", res.Manifest.Version, *out, res.Duration.Seconds())
	fmt.Printf("initramfs: %d bytes (%.2f MiB compressed; target <= 16 MiB)\n", res.InitramfsSize, float64(res.InitramfsSize)/(1<<20))
	fmt.Printf("kernel:    %s %s (deb sha256 %s)\n", res.Manifest.Kernel.Package, res.Manifest.Kernel.Version, res.Manifest.Kernel.DebSHA256)
	fmt.Printf("pcr4 kernel authenticode: %s\n", res.Manifest.Measurements.KernelAuthenticode)
	if q := res.Manifest.Measurements.KernelQEMUDirect; q != "" {
		fmt.Printf("pcr4 kernel, QEMU direct boot with %d MiB: %s\n", res.Manifest.Measurements.QEMUMemoryMiB, q)
	}
	fmt.Printf("pcr9 load options:        %s\n", res.Manifest.Measurements.LoadOptions)
	fmt.Printf("pcr9 initrd:              %s\n", res.Manifest.Measurements.Initrd)
	return nil
}

func runVerify(args []string) error {
	fs := flag.NewFlagSet("verify", flag.ExitOnError)
	pubPath := fs.String("pubkey", filepath.Join(defaultCache(), "keys", "image-signing-dev.key.pub"), "image-signing public key, PKIX PEM")
	asJSON := fs.Bool("json", false, "print the report as JSON")
	fs.Parse(args)
	if fs.NArg() != 1 {
		return fmt.Errorf("verify takes exactly one image folder")
	}
	pub, err := imagekey.LoadPublic(*pubPath)
	if err != nil {
		return err
	}
	rep := verify.Dir(fs.Arg(0), pub)
	if *asJSON {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		enc.Encode(rep)
	} else {
		for _, c := range rep.Checks {
			status := "ok      "
			if !c.OK {
				status = "MISMATCH"
			}
			line := fmt.Sprintf("%s %s", status, c.Name)
			if !c.OK {
				if c.Err != "" {
					line += ": " + c.Err
				} else {
					line += fmt.Sprintf(": manifest %s, artifact %s", c.Want, c.Got)
				}
			}
			fmt.Println(line)
		}
	}
	if !rep.OK() {
		return fmt.Errorf("image %s does not match its manifest: %v", fs.Arg(0), rep.Failed())
	}
	if !*asJSON {
		fmt.Printf("image %s version %d verifies\n", fs.Arg(0), rep.Version)
	}
	return nil
}
