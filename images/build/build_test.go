package build

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"encoding/pem"
	"log/slog"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/dataembassy/embassy/appliance/config"
	"github.com/dataembassy/embassy/images/devpki"
	"github.com/dataembassy/embassy/images/diskimage"
	"github.com/dataembassy/embassy/images/ovmfvars"
	"github.com/dataembassy/embassy/images/sbkeys"
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
	brokerCAs := map[string][]byte{}
	for _, b := range cfg.Brokers {
		ca, err := devpki.BrokerCA(pki, b.Name)
		if err != nil {
			t.Fatal(err)
		}
		if brokerCAs[b.Name], err = os.ReadFile(ca.CertPath); err != nil {
			t.Fatal(err)
		}
	}
	for _, n := range []string{"client-ca"} {
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
	keys, err := sbkeys.EnsureDev(filepath.Join(pki, "secureboot"))
	if err != nil {
		t.Fatal(err)
	}
	return Options{
		ModuleRoot: root, CacheDir: testenv.CacheDir(t), OutDir: out, Version: 3,
		Config: cfg, BrokerCAs: brokerCAs, ClientCA: pems[0],
		SigningKey: ed25519.NewKeyFromSeed(bytes.Repeat([]byte{7}, 32)),
		SecureBoot: keys,
		Log:        slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
	}
}

var artifacts = []string{KernelFile, InitramfsFile, CmdlineFile, UKIFile, DiskFile, VarsFile, ManifestFile, SignatureFile}

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
	t.Logf("initramfs %d bytes (%.2f MiB), UKI %d bytes (%.2f MiB), disk %d bytes", res.InitramfsSize,
		float64(res.InitramfsSize)/(1<<20), res.UKISize, float64(res.UKISize)/(1<<20), res.DiskSize)
	if res.InitramfsSize > 16<<20 {
		t.Errorf("initramfs is %d bytes, over the 16 MiB target", res.InitramfsSize)
	}
	if res.UKISize > 24<<20 {
		t.Errorf("UKI is %d bytes, over the 24 MiB target", res.UKISize)
	}

	// The UKI is signed by the db key alone, and the disk carries exactly
	// it as the removable-media boot path of slot A.
	ukiBytes, _ := os.ReadFile(filepath.Join(a, UKIFile))
	dbPEM := filepath.Join(t.TempDir(), "db.pem")
	os.WriteFile(dbPEM, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: opts.SecureBoot.DB.Cert.Raw}), 0o600)
	if out, err := exec.Command("sbverify", "--cert", dbPEM, filepath.Join(a, UKIFile)).CombinedOutput(); err != nil {
		t.Errorf("sbverify does not accept the UKI with the db certificate: %v\n%s", err, out)
	}
	onDisk := readBootFile(t, filepath.Join(a, DiskFile))
	if !bytes.Equal(onDisk, ukiBytes) {
		t.Error("the disk image's BOOTX64.EFI is not the signed UKI")
	}
	// The VARS file enrolls exactly our keys with Secure Boot on.
	vars, _ := os.ReadFile(filepath.Join(a, VarsFile))
	store, err := ovmfvars.Parse(vars)
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range []struct {
		vendor ovmfvars.GUID
		name   string
	}{{ovmfvars.GlobalVariable, "PK"}, {ovmfvars.GlobalVariable, "KEK"}, {ovmfvars.ImageSecurityDatabase, "db"},
		{ovmfvars.SecureBootEnableDisable, "SecureBootEnable"}} {
		if _, ok := store.Lookup(v.vendor, v.name); !ok {
			t.Errorf("VARS file lacks %s", v.name)
		}
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
		strings.TrimPrefix(config.Path, "/"), strings.TrimPrefix(config.BrokerCAPath("broker-a"), "/"),
		strings.TrimPrefix(config.BrokerCAPath("broker-b"), "/"), strings.TrimPrefix(config.BrokerCAPath("broker-c"), "/"),
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
			[]string{"component vmlinuz", "measurement pcr11_uki_sections"}},
		{InitramfsFile, func(b []byte) []byte { return append(b, 0) },
			[]string{"component initramfs.cpio.zst", "measurement pcr9_initrd", "measurement pcr11_uki_sections"}},
		{UKIFile, func(b []byte) []byte { b[len(b)/2] ^= 1; return b },
			[]string{"component embassy.efi", "measurement pcr4_uki_authenticode"}},
		{DiskFile, func(b []byte) []byte { b[len(b)-1] ^= 1; return b },
			[]string{"component embassy.img"}},
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
		"version 0": func(o *Options) { o.Version = 0 },
		"no key":    func(o *Options) { o.SigningKey = nil },
		"bad CA":    func(o *Options) { o.BrokerCAs = map[string][]byte{"broker-a": []byte("junk")} },
		"CA missing for a broker": func(o *Options) {
			o.BrokerCAs = maps.Clone(o.BrokerCAs)
			delete(o.BrokerCAs, o.Config.Brokers[0].Name)
		},
		"CA for no broker": func(o *Options) {
			o.BrokerCAs = maps.Clone(o.BrokerCAs)
			o.BrokerCAs["broker-z"] = o.ClientCA
		},
		"newline cmdline": func(o *Options) { o.Cmdline = "a\nb" },
		"no config":       func(o *Options) { o.Config = nil },
		"no db key":       func(o *Options) { o.SecureBoot.DB.Signer = nil },
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
	img, stub, secs, err := AssembleUKI(context.Background(), testenv.CacheDir(t), 7, kernel, initrd, DefaultCmdline, log)
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
	if pcr11 := uki.PredictPCR11(secs); pcr11 != want || stub.Version == "" {
		t.Errorf("pcr11 %x, want %x; stub %+v", pcr11, want, stub)
	}
}

// readBootFile reads /EFI/BOOT/BOOTX64.EFI from slot A of a disk image.
func readBootFile(t *testing.T, path string) []byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	d, err := diskimage.Inspect(f, st.Size())
	if err != nil {
		t.Fatal(err)
	}
	b, err := diskimage.ReadFile(d.Partitions[0].Open(f), "/EFI/BOOT/BOOTX64.EFI")
	if err != nil {
		t.Fatal(err)
	}
	return b
}
