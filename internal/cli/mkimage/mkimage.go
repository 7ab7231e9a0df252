// Package mkimage is the command tree of the mkimage program: `build`
// assembles the immutable appliance image and its signed reference
// manifest, `verify` checks a built image folder against its manifest.
package mkimage

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"

	"github.com/dataembassy/embassy/appliance/config"
	"github.com/dataembassy/embassy/images/build"
	"github.com/dataembassy/embassy/images/devpki"
	"github.com/dataembassy/embassy/images/imagekey"
	"github.com/dataembassy/embassy/images/sbkeys"
	"github.com/dataembassy/embassy/images/verify"
	"github.com/dataembassy/embassy/internal/cli"
)

// NewRootCmd builds the mkimage command tree.
func NewRootCmd() *cobra.Command {
	root := cli.Group(&cobra.Command{
		Use:   "mkimage",
		Short: "Build and verify the appliance image and its signed manifest",
		Long: `mkimage builds the immutable appliance image (Debian's signed kernel, an
initramfs with embassy-init as /init, the kernel command line) and a signed
manifest of what measured boot will record for it, and verifies a built
image folder against that manifest.

Run it from the repository's root: build compiles ./cmd/embassy-init.`,
		Example: `  mkimage build --out out --version 2
  mkimage verify out`,
	})
	root.AddCommand(newBuildCmd(), newVerifyCmd())
	return cli.WithCompletion(root)
}

type buildOptions struct {
	cache, out, cfgPath, clientCA, keyPath, kernelPkg, sbKeys string
	brokerCAs                                                 []string // NAME=FILE
	version                                                   uint64
}

func newBuildCmd() *cobra.Command {
	o := buildOptions{cache: cli.CacheDir()}
	cmd := &cobra.Command{
		Use:   "build [--out DIR] [--version N] [--config FILE] [--key FILE]",
		Short: "Build the image and its signed manifest into a folder",
		Long: `build fetches Debian's kernel and systemd-stub into the cache, builds
embassy-init and the initramfs, assembles them with the command line into a
Unified Kernel Image signed with the Secure Boot db key, writes it onto a
GPT disk image, predicts PCR4, PCR7, PCR9 and PCR11 and writes to --out:
embassy.img (what goes on a server's boot disk), embassy.efi (the signed
UKI), OVMF_VARS.secboot.fd (firmware variables with the keys enrolled and
Secure Boot on, for QEMU), the components vmlinuz, initramfs.cpio.zst and
cmdline, manifest.json and manifest.sig.

Without --broker-ca, --client-ca, --key and --secureboot-keys it uses the
local-default CAs and dev keys in the cache, creating them on first use.`,
		Example: `  # local default: dev key and CAs from .cache, image version 1 into out/
  mkimage build --out out --version 1

  # production: the image-signing key and the home state's CAs
  mkimage build --out release --version 7 --key image-signing.key \
      --broker-ca broker-a=a/broker-ca.pem --broker-ca broker-b=b/broker-ca.pem \
      --broker-ca broker-c=c/broker-ca.pem --client-ca client-ca.pem --secureboot-keys sb/`,
		Args: cli.ExactArgs(0),
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runBuild(cmd.Context(), cmd.OutOrStdout(), cmd.ErrOrStderr(), o)
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.cache, "cache", o.cache, "cache folder for downloads and local-default keys ($EMBASSY_CACHE)")
	f.StringVar(&o.out, "out", "out", "output folder")
	f.Uint64Var(&o.version, "version", 1, "image version (monotonic integer, for anti-rollback)")
	f.StringVar(&o.cfgPath, "config", "images/local/config.json", "image config: brokers and threshold")
	f.StringArrayVar(&o.brokerCAs, "broker-ca", nil, "NAME=FILE: broker NAME's own CA certificate (PEM), once per broker of the config (default: local-default CAs in the cache)")
	f.StringVar(&o.clientCA, "client-ca", "", "PEM bundle of the home-state client CA (default: local-default CA in the cache)")
	f.StringVar(&o.keyPath, "key", "", "image-signing ed25519 key, PKCS#8 PEM (default: local-default dev key in the cache)")
	f.StringVar(&o.sbKeys, "secureboot-keys", "", "folder with the Secure Boot PK and KEK certificates and the db certificate and key (default: local-default dev keys in the cache)")
	f.StringVar(&o.kernelPkg, "kernel-package", "", "pin the Debian kernel package (default: what linux-image-amd64 depends on)")
	cmd.MarkFlagDirname("cache")
	cmd.MarkFlagDirname("out")
	cmd.MarkFlagDirname("secureboot-keys")
	cmd.MarkFlagFilename("config", "json")
	cmd.MarkFlagFilename("broker-ca", "pem")
	cmd.MarkFlagFilename("client-ca", "pem")
	cmd.MarkFlagFilename("key", "key", "pem")
	return cmd
}

func runBuild(ctx context.Context, stdout, stderr io.Writer, o buildOptions) error {
	log := slog.New(slog.NewTextHandler(stderr, nil))
	f, err := os.Open(o.cfgPath)
	if err != nil {
		return cli.Next(fmt.Errorf("open image config: %w", err),
			"run mkimage from the repository's root, or pass --config FILE")
	}
	cfg, err := config.Parse(f)
	f.Close()
	if err != nil {
		return fmt.Errorf("%s: %w", o.cfgPath, err)
	}
	pki := filepath.Join(o.cache, "pki")
	bcas, err := brokerCAs(o.brokerCAs, cfg, pki)
	if err != nil {
		return err
	}
	if o.clientCA == "" {
		ca, err := devpki.Ensure(pki, "client-ca", "embassy local home-state client CA")
		if err != nil {
			return err
		}
		o.clientCA = ca.CertPath
	}
	cca, err := os.ReadFile(o.clientCA)
	if err != nil {
		return fmt.Errorf("read client CA: %w", err)
	}
	var key []byte
	if o.keyPath == "" {
		key, err = imagekey.EnsureDev(filepath.Join(o.cache, "keys", "image-signing-dev.key"))
		if err != nil {
			return err
		}
		log.Warn("signing with the local-default dev key; pass --key for a production image")
	} else {
		key, err = imagekey.LoadPrivate(o.keyPath)
		if err != nil {
			return err
		}
	}
	var sb sbkeys.Keys
	if o.sbKeys == "" {
		if sb, err = sbkeys.EnsureDev(filepath.Join(o.cache, "keys", "secureboot")); err != nil {
			return err
		}
		log.Warn("signing the UKI with the local-default Secure Boot db key; pass --secureboot-keys for a production image")
	} else if sb, err = sbkeys.Load(o.sbKeys); err != nil {
		return err
	}
	root, err := os.Getwd()
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt)
	defer stop()
	res, err := build.Build(ctx, build.Options{
		ModuleRoot: root, CacheDir: o.cache, OutDir: o.out, Version: o.version,
		Config: cfg, BrokerCAs: bcas, ClientCA: cca, SigningKey: key,
		KernelPackage: o.kernelPkg, SecureBoot: sb, Log: log,
	})
	if err != nil {
		return err
	}
	m := res.Manifest
	fmt.Fprintf(stdout, "image version %d written to %s in %.1fs\n", m.Version, o.out, res.Duration.Seconds())
	fmt.Fprintf(stdout, "initramfs: %d bytes (%.2f MiB compressed; target <= 16 MiB)\n", res.InitramfsSize, float64(res.InitramfsSize)/(1<<20))
	fmt.Fprintf(stdout, "kernel:    %s %s (deb sha256 %s)\n", m.Kernel.Package, m.Kernel.Version, m.Kernel.DebSHA256)
	fmt.Fprintf(stdout, "stub:      %s %s (deb sha256 %s)\n", m.Stub.Package, m.Stub.Version, m.Stub.DebSHA256)
	fmt.Fprintf(stdout, "uki:       %s, %d bytes (%.2f MiB; target <= 24 MiB), signed by %s\n",
		build.UKIFile, res.UKISize, float64(res.UKISize)/(1<<20), sb.DB.Cert.Subject)
	fmt.Fprintf(stdout, "disk:      %s, %d bytes\n", build.DiskFile, res.DiskSize)
	fmt.Fprintf(stdout, "pcr4 uki authenticode:    %s\n", m.Measurements.UKIAuthenticode)
	for i, d := range m.Measurements.SecureBoot {
		fmt.Fprintf(stdout, "pcr7 secure boot event %d: %s\n", i, d)
	}
	fmt.Fprintf(stdout, "pcr9 load options:        %s\n", m.Measurements.LoadOptions)
	fmt.Fprintf(stdout, "pcr9 initrd:              %s\n", m.Measurements.Initrd)
	fmt.Fprintf(stdout, "pcr11 uki sections:       %s\n", m.Measurements.UKISections)
	return nil
}

// brokerCAs reads each broker's own CA from the --broker-ca NAME=FILE
// flags, or, with none given, takes the local-default ones in pkiDir
// (creating them on first use).
func brokerCAs(flags []string, cfg *config.Config, pkiDir string) (map[string][]byte, error) {
	out := map[string][]byte{}
	if len(flags) == 0 {
		for _, b := range cfg.Brokers {
			ca, err := devpki.BrokerCA(pkiDir, b.Name)
			if err != nil {
				return nil, err
			}
			if out[b.Name], err = os.ReadFile(ca.CertPath); err != nil {
				return nil, fmt.Errorf("read %s CA: %w", b.Name, err)
			}
		}
		return out, nil
	}
	for _, f := range flags {
		name, path, ok := strings.Cut(f, "=")
		if !ok || name == "" || path == "" {
			return nil, cli.Next(fmt.Errorf("--broker-ca %q: want NAME=FILE", f),
				"each broker has its own CA: pass --broker-ca broker-a=broker-a-ca.pem once per broker of the config")
		}
		if _, dup := out[name]; dup {
			return nil, fmt.Errorf("--broker-ca: broker %s given twice", name)
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return nil, fmt.Errorf("read %s CA: %w", name, err)
		}
		out[name] = b
	}
	if err := cfg.CheckBrokerCAs(out); err != nil {
		return nil, cli.Next(err, "pass --broker-ca NAME=FILE once for each broker of the config, and for no other")
	}
	return out, nil
}

type verifyOptions struct {
	pubPath string
	asJSON  bool
}

func newVerifyCmd() *cobra.Command {
	o := verifyOptions{pubPath: filepath.Join(cli.CacheDir(), "keys", "image-signing-dev.key.pub")}
	cmd := &cobra.Command{
		Use:   "verify [--pubkey FILE] [--json] DIR",
		Short: "Check a built image folder against its signed manifest",
		Long: `verify checks the manifest's signature with the image-signing public key and
recomputes every digest it records (artifacts and predicted PCR4/PCR9
events) from the files in DIR, naming each mismatch. It exits non-zero
unless everything matches.`,
		Example: `  mkimage verify out
  mkimage verify --pubkey image-signing.pub --json release`,
		Args: cli.ExactArgs(1),
		ValidArgsFunction: func(*cobra.Command, []string, string) ([]string, cobra.ShellCompDirective) {
			return nil, cobra.ShellCompDirectiveFilterDirs
		},
		RunE: func(cmd *cobra.Command, args []string) error { return runVerify(cmd.OutOrStdout(), args[0], o) },
	}
	cmd.Flags().StringVar(&o.pubPath, "pubkey", o.pubPath, "image-signing public key, PKIX PEM")
	cmd.Flags().BoolVar(&o.asJSON, "json", false, "print the report as JSON")
	cmd.MarkFlagFilename("pubkey", "pub", "pem")
	return cmd
}

func runVerify(out io.Writer, dir string, o verifyOptions) error {
	if err := cli.RequireImageDir(dir); err != nil {
		return err
	}
	pub, err := imagekey.LoadPublic(o.pubPath)
	if err != nil {
		return cli.Next(fmt.Errorf("image-signing public key: %w", err),
			"pass --pubkey FILE (`mkimage build` without --key writes the local-default one under the cache's keys/)")
	}
	rep := verify.Dir(dir, pub)
	if o.asJSON {
		enc := json.NewEncoder(out)
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
			fmt.Fprintln(out, line)
		}
	}
	if !rep.OK() {
		return fmt.Errorf("image %s does not match its manifest: %v", dir, rep.Failed())
	}
	if !o.asJSON {
		fmt.Fprintf(out, "image %s version %d verifies\n", dir, rep.Version)
	}
	return nil
}
