package build

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/dataembassy/embassy/appliance/config"
	"github.com/dataembassy/embassy/images/devpki"
	"github.com/dataembassy/embassy/images/uki"
	"github.com/dataembassy/embassy/images/verify"
	"github.com/dataembassy/embassy/initramfs/cpioimage"
	"github.com/dataembassy/embassy/internal/testenv"
)

func options(t *testing.T, out string) Options {
	t.Helper()
	root := testenv.RepoRoot(t)
	f, err := os.Open(filepath.Join(root, "images/local/config.json"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	cfg, err := config.Parse(f)
	if err != nil {
		t.Fatal(err)
	}
	pki := t.TempDir()
	var pems [][]byte
	for _, n := range []string{"broker-ca", "client-ca"} {
		ca, err := devpki.Ensure(pki, n, n)
		if err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(ca.CertPath)
		if err != nil {
			t.Fatal(err)
		}
		pems = append(pems, b)
	}
	return Options{
		ModuleRoot: root, CacheDir: testenv.CacheDir(t), OutDir: out, Version: 3,
		Config: cfg, BrokerCA: pems[0], ClientCA: pems[1],
		SigningKey:    ed25519.NewKeyFromSeed(bytes.Repeat([]byte{7}, 32)),
		QEMUMemoryMiB: 1024,
		Log:           slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
	}
}

var artifacts = []string{KernelFile, InitramfsFile, CmdlineFile, ManifestFile, SignatureFile}

// TestReproducibleBuild builds the image twice from clean output folders
// and requires byte-identical artifacts.
func TestReproducibleBuild(t *testing.T) {
	testenv.CachedKernel(t)
	a, b := t.TempDir(), t.TempDir()
	opts := options(t, a)
	res, err := Build(context.Background(), opts)
	if err != nil {
		t.Fatal(err)
	}
	opts.OutDir = b
	if _, err := Build(context.Background(), opts); err != nil {
		t.Fatal(err)
	}
	for _, f := range artifacts {
		x, err := os.ReadFile(filepath.Join(a, f))
		if err != nil {
			t.Fatal(err)
		}
		y, err := os.ReadFile(filepath.Join(b, f))
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(x, y) {
			t.Errorf("%s differs between two builds", f)
		}
	}
	t.Logf("initramfs %d bytes (%.2f MiB)", res.InitramfsSize, float64(res.InitramfsSize)/(1<<20))
	if res.InitramfsSize > 16<<20 {
		t.Errorf("initramfs is %d bytes, over the 16 MiB target", res.InitramfsSize)
	}

	// The image holds what the appliance needs and no shell.
	zst, _ := os.ReadFile(filepath.Join(a, InitramfsFile))
	raw, err := cpioimage.Decompress(zst)
	if err != nil {
		t.Fatal(err)
	}
	recs, err := cpioimage.ReadFiles(raw)
	if err != nil {
		t.Fatal(err)
	}
	have := map[string]bool{}
	for _, r := range recs {
		have[r.Name] = true
	}
	rel := res.Manifest.Kernel.Release
	for _, want := range []string{
		"init", "dev/console", "sbin/mke2fs", "sbin/mkfs.ext4", "etc/mke2fs.conf",
		"lib64/ld-linux-x86-64.so.2", "lib/x86_64-linux-gnu/libext2fs.so.2",
		strings.TrimPrefix(config.Path, "/"), strings.TrimPrefix(config.BrokerCAPath, "/"),
		strings.TrimPrefix(config.ClientCAPath, "/"), strings.TrimPrefix(config.ModulesLoad, "/"),
		"lib/modules/" + rel + "/modules.dep",
		"lib/modules/" + rel + "/kernel/drivers/md/dm-crypt.ko",
		"lib/modules/" + rel + "/kernel/drivers/md/dm-mod.ko",
		"lib/modules/" + rel + "/kernel/fs/ext4/ext4.ko",
		"lib/modules/" + rel + "/kernel/fs/jbd2/jbd2.ko",
		"lib/modules/" + rel + "/kernel/drivers/block/virtio_blk.ko",
		"lib/modules/" + rel + "/kernel/drivers/net/virtio_net.ko",
		"lib/modules/" + rel + "/kernel/drivers/nvme/host/nvme.ko",
		"lib/modules/" + rel + "/kernel/drivers/ata/ahci.ko",
		"lib/modules/" + rel + "/kernel/drivers/scsi/sd_mod.ko",
		"lib/modules/" + rel + "/kernel/drivers/net/ethernet/intel/e1000e/e1000e.ko",
	} {
		if !have[want] {
			t.Errorf("initramfs lacks %s", want)
		}
	}
	for _, shell := range []string{"bin/sh", "bin/bash", "bin/elvish", "bbin/elvish", "bin/login"} {
		if have[shell] {
			t.Errorf("production initramfs contains a shell or login: %s", shell)
		}
	}

	// verify accepts the build, and names what a change breaks.
	pub := opts.SigningKey.Public().(ed25519.PublicKey)
	if rep := verify.Dir(a, pub); !rep.OK() {
		t.Fatalf("verify rejects a fresh build: %v", rep.Failed())
	}
	cases := []struct {
		file   string
		change func([]byte) []byte
		want   []string
	}{
		{CmdlineFile, func(b []byte) []byte { return append(bytes.TrimSuffix(b, []byte("\n")), []byte(" single\n")...) },
			[]string{"component cmdline", "measurement pcr9_load_options"}},
		{KernelFile, func(b []byte) []byte { b[len(b)/2] ^= 1; return b },
			[]string{"component vmlinuz", "measurement pcr4_kernel_authenticode", "measurement pcr4_kernel_qemu_direct"}},
		{InitramfsFile, func(b []byte) []byte { return append(b, 0) },
			[]string{"component initramfs.cpio.zst", "measurement pcr9_initrd", "measurement pcr4_kernel_qemu_direct"}},
		{ManifestFile, func(b []byte) []byte { return bytes.Replace(b, []byte(`"version":3`), []byte(`"version":4`), 1) },
			[]string{"signature"}},
	}
	for _, c := range cases {
		t.Run("tampered "+c.file, func(t *testing.T) {
			dir := t.TempDir()
			for _, f := range artifacts {
				data, _ := os.ReadFile(filepath.Join(a, f))
				if f == c.file {
					data = c.change(data)
				}
				os.WriteFile(filepath.Join(dir, f), data, 0o644)
			}
			rep := verify.Dir(dir, pub)
			if rep.OK() {
				t.Fatal("verify accepted a tampered image")
			}
			failed := strings.Join(rep.Failed(), ",")
			for _, w := range c.want {
				if !strings.Contains(failed, w) {
					t.Errorf("failed checks %q lack %q", failed, w)
				}
			}
		})
	}
	otherKey := ed25519.NewKeyFromSeed(bytes.Repeat([]byte{8}, 32)).Public().(ed25519.PublicKey)
	if rep := verify.Dir(a, otherKey); rep.OK() || rep.Failed()[0] != "signature" {
		t.Fatalf("verify with the wrong key: %+v", rep)
	}
}

func TestBuildRejectsBadOptions(t *testing.T) {
	opts := options(t, t.TempDir())
	cases := map[string]func(o *Options){
		"version 0":       func(o *Options) { o.Version = 0 },
		"no key":          func(o *Options) { o.SigningKey = nil },
		"bad CA":          func(o *Options) { o.BrokerCA = []byte("junk") },
		"newline cmdline": func(o *Options) { o.Cmdline = "a\nb" },
		"no config":       func(o *Options) { o.Config = nil },
	}
	for name, mutate := range cases {
		t.Run(name, func(t *testing.T) {
			o := opts
			mutate(&o)
			if _, err := Build(context.Background(), o); err == nil {
				t.Fatal("accepted")
			}
		})
	}
}

// TestAssembleUKI builds a UKI from stand-in kernel and initramfs bytes on
// Debian's systemd-stub (skipped when it cannot be fetched) and checks it is
// reproducible and its predicted PCR 11 covers the os-release it made.
func TestAssembleUKI(t *testing.T) {
	log := slog.New(slog.DiscardHandler)
	kernel, initrd := bytes.Repeat([]byte("k"), 5000), bytes.Repeat([]byte("i"), 3000)
	img, stub, pcr11, err := AssembleUKI(context.Background(), testenv.CacheDir(t), 7, kernel, initrd, DefaultCmdline, log)
	if err != nil {
		if stub == nil {
			t.Skipf("no systemd-stub (no network to the Debian mirror?): %v", err)
		}
		t.Fatal(err)
	}
	again, _, _, err := AssembleUKI(context.Background(), testenv.CacheDir(t), 7, kernel, initrd, DefaultCmdline, log)
	if err != nil || !bytes.Equal(img, again) {
		t.Fatalf("second assembly differs (err %v)", err)
	}
	want := uki.PredictPCR11(uki.Sections{Linux: kernel, Initrd: initrd, Cmdline: []byte(DefaultCmdline),
		OSRel: []byte("NAME=\"Data Embassy\"\nID=embassy\nVERSION_ID=7\n")})
	if pcr11 != want || stub.Version == "" {
		t.Errorf("pcr11 %x, want %x; stub %+v", pcr11, want, stub)
	}
}
