// Package build assembles the appliance image: Debian's signed kernel, a
// reproducible initramfs with embassy-init as its init, the fixed command
// line, and the signed reference manifest that predicts the measured-boot
// events. The same inputs always give byte-identical artifacts.
package build

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"strings"
	"time"

	"github.com/dataembassy/embassy/appliance/config"
	"github.com/dataembassy/embassy/images/debkernel"
	"github.com/dataembassy/embassy/images/debstub"
	"github.com/dataembassy/embassy/images/diskimage"
	"github.com/dataembassy/embassy/images/imagekey"
	"github.com/dataembassy/embassy/images/manifest"
	"github.com/dataembassy/embassy/images/measure"
	"github.com/dataembassy/embassy/images/ovmfvars"
	"github.com/dataembassy/embassy/images/sbkeys"
	"github.com/dataembassy/embassy/images/uki"
	"github.com/dataembassy/embassy/initramfs/cpioimage"
	"github.com/dataembassy/embassy/initramfs/elfdeps"
	"github.com/dataembassy/embassy/initramfs/kmod"
)

// Artifact file names in the output folder.
const (
	KernelFile    = manifest.ComponentKernel
	InitramfsFile = manifest.ComponentInitramfs
	CmdlineFile   = manifest.ComponentCmdline
	ManifestFile  = manifest.File
	SignatureFile = manifest.SignatureFile
	// UKIFile is the signed Unified Kernel Image, DiskFile the disk image
	// that carries it (what is written to a server's boot disk).
	UKIFile  = manifest.ComponentUKI
	DiskFile = manifest.ComponentDisk
	// VarsFile is an OVMF variable store with the Secure Boot keys
	// enrolled and Secure Boot on: the firmware settings of a server
	// prepared at home, for QEMU (tests and the demo).
	VarsFile = "OVMF_VARS.secboot.fd"
	// BlankVars is the firmware's blank variable store VarsFile starts from.
	BlankVars = "/usr/share/OVMF/OVMF_VARS_4M.fd"
)

// VarsTimestamp stamps the enrolled Secure Boot variables, so that the
// VARS file is the same on every build.
var VarsTimestamp = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

// DefaultCmdline is the fixed kernel command line of the production image.
// Nothing on it can be changed at boot without changing PCR9. Beyond the
// console and panic handling it hardens the kernel against someone with
// the machine in hand (docs/appliance.md, "Kernel command line"):
//   - lockdown=integrity: no /dev/mem, kexec of unsigned kernels, or
//     unsigned modules; module.sig_enforce=1 says the last explicitly;
//   - intel_iommu=on, amd_iommu=force_isolation, iommu.passthrough=0,
//     iommu.strict=1: DMA from devices goes through the IOMMU where the
//     server has one, each device in its own domain, mappings torn down
//     at once rather than lazily;
//   - efi=disable_early_pci_dma: the EFI stub clears bus mastering on PCI
//     bridges before the kernel's IOMMU is up, closing the early window;
//   - init_on_free=1: the kernel zeroes pages and slab objects as they are
//     freed, so buffers that held TPM responses, dm-crypt tables or a
//     stopped process's heap hold nothing afterwards.
const DefaultCmdline = "console=ttyS0,115200 panic=-1 loglevel=4 lockdown=integrity module.sig_enforce=1 " +
	"intel_iommu=on amd_iommu=force_isolation iommu.passthrough=0 iommu.strict=1 efi=disable_early_pci_dma init_on_free=1"

// DefaultModules are the kernel modules the appliance loads at boot: virtio
// for QEMU, NVMe/AHCI/SCSI disks and e1000e NICs for real servers,
// dm-crypt with AES-XTS (xts over ecb over the built-in aes), ext4.
var DefaultModules = []string{
	"virtio_pci", "virtio_net", "virtio_blk",
	"nvme", "ahci", "sd_mod", "e1000e",
	"dm_crypt", "xts", "ecb", "aesni_intel", "crc32c_generic", "crc32c_intel", "libcrc32c",
	"ext4",
	// efivarfs: an upgrade makes the trial slot the next boot (BootNext).
	"efivarfs",
}

// Options says what to build.
type Options struct {
	ModuleRoot string // the Go module holding cmd/embassy-init
	CacheDir   string
	OutDir     string
	Version    uint64
	Config     *config.Config
	BrokerCAs  map[string][]byte // each broker's own CA (PEM), by broker name
	ClientCA   []byte            // PEM bundle
	SigningKey ed25519.PrivateKey
	// KernelPackage pins the Debian kernel package; empty takes the current one.
	KernelPackage string
	Cmdline       string   // DefaultCmdline when empty
	Modules       []string // DefaultModules when nil
	InitPackage   string   // "./cmd/embassy-init" when empty
	Mkfs          string   // host mke2fs; "/sbin/mke2fs" when empty
	// SecureBoot are the home state's Secure Boot keys: the db key signs
	// the UKI, and PCR7 is predicted for firmware with them enrolled.
	SecureBoot sbkeys.Keys
	// DBX are image digests the firmware's dbx forbids (may be empty).
	DBX [][32]byte
	// BlankVars is the blank OVMF variable store (BlankVars when empty).
	BlankVars string
	Log       *slog.Logger
}

// Result describes a finished build.
type Result struct {
	Manifest      *manifest.Manifest
	InitramfsSize int
	// The signed UKI's size, the stub package and the disk image's size.
	UKISize  int
	UKIStub  *debstub.Stub
	DiskSize int64
	Duration time.Duration
}

func (o *Options) defaults() {
	if o.Cmdline == "" {
		o.Cmdline = DefaultCmdline
	}
	if o.Modules == nil {
		o.Modules = DefaultModules
	}
	if o.InitPackage == "" {
		o.InitPackage = "./cmd/embassy-init"
	}
	if o.Mkfs == "" {
		o.Mkfs = "/sbin/mke2fs"
	}
	if o.BlankVars == "" {
		o.BlankVars = BlankVars
	}
	if o.Log == nil {
		o.Log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
}

// CheckCmdline rejects command lines that could not be passed through
// QEMU/firmware unchanged.
func CheckCmdline(c string) error {
	if c == "" || len(c) > 2048 {
		return fmt.Errorf("command line must be 1 to 2048 bytes, is %d", len(c))
	}
	for i := 0; i < len(c); i++ {
		if c[i] < 0x20 || c[i] > 0x7e {
			return fmt.Errorf("command line byte %d (%#x) is not printable ASCII", i, c[i])
		}
	}
	return nil
}

// Build produces the image in o.OutDir.
func Build(ctx context.Context, o Options) (*Result, error) {
	start := time.Now()
	o.defaults()
	log := o.Log
	if o.Version == 0 {
		return nil, fmt.Errorf("image version must be at least 1")
	}
	if o.Config == nil {
		return nil, fmt.Errorf("no image config")
	}
	if err := o.Config.Validate(); err != nil {
		return nil, err
	}
	if err := o.Config.CheckBrokerCAs(o.BrokerCAs); err != nil {
		return nil, err
	}
	if _, err := config.ParseCertBundle(o.ClientCA); err != nil {
		return nil, fmt.Errorf("client CA: %w", err)
	}
	if len(o.SigningKey) != ed25519.PrivateKeySize {
		return nil, fmt.Errorf("no image-signing key")
	}
	if err := CheckCmdline(o.Cmdline); err != nil {
		return nil, err
	}
	if o.SecureBoot.DB.Signer == nil || o.SecureBoot.PK.Cert == nil || o.SecureBoot.KEK.Cert == nil {
		return nil, fmt.Errorf("no Secure Boot keys: %w", sbkeys.ErrNoSigningKey)
	}
	blankVars, err := os.ReadFile(o.BlankVars)
	if err != nil {
		return nil, fmt.Errorf("blank firmware variables: %w", err)
	}

	log.Info("build step", "step", "1/6 kernel")
	kern, err := (&debkernel.Fetcher{CacheDir: o.CacheDir, Package: o.KernelPackage, Log: log}).Fetch(ctx)
	if err != nil {
		return nil, err
	}
	vmlinuz, err := os.ReadFile(kern.Vmlinuz)
	if err != nil {
		return nil, fmt.Errorf("read kernel: %w", err)
	}
	log.Info("kernel", "package", kern.Package, "version", kern.Version, "deb_sha256", kern.DebSHA256)

	log.Info("build step", "step", "2/6 embassy-init")
	initBin, err := GoBuild(ctx, o.ModuleRoot, o.InitPackage)
	if err != nil {
		return nil, err
	}

	log.Info("build step", "step", "3/6 initramfs")
	arc := cpioimage.New()
	if err := Skeleton(arc, initBin); err != nil {
		return nil, err
	}
	nmods, err := addModules(arc, kern, o.Modules)
	if err != nil {
		return nil, err
	}
	if err := addProgram(arc, o.Mkfs, "/sbin/mke2fs", "mkfs.ext4", "mke2fs.conf"); err != nil {
		return nil, err
	}
	cfg, err := o.Config.Marshal()
	if err != nil {
		return nil, err
	}
	info, _ := json.Marshal(config.ImageInfoFile{Version: o.Version, KernelRelease: kern.Release})
	pub, err := imagekey.EncodePublic(o.SigningKey.Public().(ed25519.PublicKey))
	if err != nil {
		return nil, err
	}
	files := []struct {
		name string
		data []byte
	}{
		{config.Path, cfg},
		{config.ImagePubKey, pub},
		{config.ClientCAPath, o.ClientCA},
		{config.ImageInfo, append(info, '\n')},
	}
	for _, b := range o.Config.Brokers {
		files = append(files, struct {
			name string
			data []byte
		}{config.BrokerCAPath(b.Name), o.BrokerCAs[b.Name]})
	}
	for _, f := range files {
		if err := arc.File(f.name, f.data, 0o444); err != nil {
			return nil, err
		}
	}
	initramfs, err := arc.Build()
	if err != nil {
		return nil, err
	}
	log.Info("initramfs", "entries", arc.Len(), "modules", nmods, "compressed_bytes", len(initramfs),
		"compressed_mib", fmt.Sprintf("%.2f", float64(len(initramfs))/(1<<20)))

	log.Info("build step", "step", "4/6 signed UKI and disk image")
	if err := os.MkdirAll(o.OutDir, 0o755); err != nil {
		return nil, fmt.Errorf("create output folder: %w", err)
	}
	// The disk image is written beside the old one and renamed into place
	// with the other artifacts at the end: a build that fails half-way
	// leaves the previous image whole.
	newDisk := filepath.Join(o.OutDir, DiskFile+".new")
	defer os.Remove(newDisk)
	boot, err := BootImage(ctx, o.CacheDir, o.Version, vmlinuz, initramfs, o.Cmdline, o.SecureBoot, newDisk, log)
	if err != nil {
		return nil, err
	}
	vars, err := o.SecureBoot.Variables(o.DBX, VarsTimestamp)
	if err != nil {
		return nil, err
	}
	varsImage, err := ovmfvars.Build(blankVars, vars)
	if err != nil {
		return nil, fmt.Errorf("firmware variables: %w", err)
	}

	log.Info("build step", "step", "5/6 manifest")
	m, err := NewManifest(o.Version, kern, boot, vmlinuz, initramfs, o.Cmdline, o.SecureBoot, o.DBX)
	if err != nil {
		return nil, err
	}
	canon, err := m.Marshal()
	if err != nil {
		return nil, err
	}
	sig := manifest.Sign(canon, o.SigningKey)

	log.Info("build step", "step", "6/6 write", "out", o.OutDir)
	for _, f := range []struct {
		name string
		data []byte
	}{
		{KernelFile, vmlinuz},
		{InitramfsFile, initramfs},
		{CmdlineFile, []byte(o.Cmdline + "\n")},
		{UKIFile, boot.UKI},
		{VarsFile, varsImage},
		{ManifestFile, canon},
		{SignatureFile, sig},
	} {
		if err := writeAtomic(filepath.Join(o.OutDir, f.name), f.data); err != nil {
			return nil, err
		}
		if f.name == UKIFile {
			if err := os.Rename(newDisk, filepath.Join(o.OutDir, DiskFile)); err != nil {
				return nil, fmt.Errorf("install the disk image: %w", err)
			}
		}
	}
	return &Result{Manifest: m, InitramfsSize: len(initramfs), UKISize: len(boot.UKI), UKIStub: boot.Stub,
		DiskSize: boot.DiskSize, Duration: time.Since(start)}, nil
}

// Boot is a signed UKI, the disk image written around it, and what went
// into them.
type Boot struct {
	UKI        []byte
	DiskSize   int64
	DiskSHA256 [32]byte
	Stub       *debstub.Stub
	// Sections are the UKI's sections, for the PCR11 prediction.
	Sections uki.Sections
}

// BootImage assembles the UKI from kernel, initramfs and command line
// (AssembleUKI), signs it with the db key of keys and writes the disk
// image around it to diskPath (replaced atomically).
func BootImage(ctx context.Context, cacheDir string, version uint64, vmlinuz, initramfs []byte, cmdline string, keys sbkeys.Keys, diskPath string, log *slog.Logger) (*Boot, error) {
	unsigned, stub, secs, err := AssembleUKI(ctx, cacheDir, version, vmlinuz, initramfs, cmdline, log)
	if err != nil {
		return nil, err
	}
	signed, err := keys.SignPE(unsigned)
	if err != nil {
		return nil, fmt.Errorf("sign the UKI: %w", err)
	}
	b := &Boot{UKI: signed, Stub: stub, Sections: secs}
	// diskimage.Write replaces diskPath atomically.
	if err := diskimage.Write(diskPath, signed); err != nil {
		return nil, fmt.Errorf("disk image: %w", err)
	}
	if b.DiskSize, b.DiskSHA256, err = fileSHA256(diskPath); err != nil {
		return nil, err
	}
	log.Info("boot image", "uki_bytes", len(signed), "uki_mib", fmt.Sprintf("%.2f", float64(len(signed))/(1<<20)),
		"disk_bytes", b.DiskSize, "signed_by", keys.DB.Cert.Subject.String())
	return b, nil
}

func fileSHA256(path string) (int64, [32]byte, error) {
	var sum [32]byte
	f, err := os.Open(path)
	if err != nil {
		return 0, sum, err
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		return 0, sum, fmt.Errorf("hash %s: %w", path, err)
	}
	copy(sum[:], h.Sum(nil))
	return n, sum, nil
}

// Repack rebuilds the signed UKI and the disk image of the image folder
// dir from the kernel, initramfs and command line in it, with the db key
// of keys; the manifest is left as it is. Tests use it to boot an image
// whose components were changed and signed again, as someone holding the
// db key (and nothing else) could.
func Repack(ctx context.Context, dir, cacheDir string, version uint64, keys sbkeys.Keys) error {
	read := func(name string) ([]byte, error) { return os.ReadFile(filepath.Join(dir, name)) }
	vmlinuz, err := read(KernelFile)
	if err != nil {
		return err
	}
	initramfs, err := read(InitramfsFile)
	if err != nil {
		return err
	}
	cmdline, err := read(CmdlineFile)
	if err != nil {
		return err
	}
	boot, err := BootImage(ctx, cacheDir, version, vmlinuz, initramfs, strings.TrimSuffix(string(cmdline), "\n"), keys,
		filepath.Join(dir, DiskFile), slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		return err
	}
	return writeAtomic(filepath.Join(dir, UKIFile), boot.UKI)
}

// AssembleUKI fetches systemd-stub (debstub) and assembles an unsigned UKI
// from the kernel, initramfs and command line, with an os-release naming the
// image version. It returns the image, the stub package and the sections.
func AssembleUKI(ctx context.Context, cacheDir string, version uint64, vmlinuz, initramfs []byte, cmdline string, log *slog.Logger) ([]byte, *debstub.Stub, uki.Sections, error) {
	secs := uki.Sections{
		Linux:   vmlinuz,
		OSRel:   uki.OSRelease(version),
		Cmdline: []byte(cmdline),
		Initrd:  initramfs,
	}
	stub, err := (&debstub.Fetcher{CacheDir: cacheDir, Log: log}).Fetch(ctx)
	if err != nil {
		return nil, nil, secs, err
	}
	stubBytes, err := os.ReadFile(stub.Path)
	if err != nil {
		return nil, nil, secs, fmt.Errorf("read systemd-stub: %w", err)
	}
	img, err := uki.Assemble(stubBytes, secs)
	if err != nil {
		return nil, stub, secs, fmt.Errorf("assemble UKI on %s %s: %w", stub.Package, stub.Version, err)
	}
	log.Info("uki", "stub", stub.Package, "stub_version", stub.Version, "stub_deb_sha256", stub.DebSHA256,
		"bytes", len(img), "mib", fmt.Sprintf("%.2f", float64(len(img))/(1<<20)))
	return img, stub, secs, nil
}

// NewManifest computes the reference manifest for a boot image and the
// components it was built from: PCR4 from the signed UKI, PCR7 for
// firmware with keys (and dbx) enrolled, PCR9 from the command line and
// initramfs, PCR11 from the UKI's sections.
func NewManifest(version uint64, kern *debkernel.Kernel, boot *Boot, vmlinuz, initramfs []byte, cmdline string, keys sbkeys.Keys, dbx [][32]byte) (*manifest.Manifest, error) {
	ukiDigest, err := measure.Authenticode(boot.UKI)
	if err != nil {
		return nil, err
	}
	sb, err := measure.SecureBoot(keys.Enrolled(dbx))
	if err != nil {
		return nil, err
	}
	sbHex := make([]string, len(sb))
	for i := range sb {
		sbHex[i] = hex.EncodeToString(sb[i][:])
	}
	cd := measure.Cmdline(cmdline)
	id := measure.Initrd(initramfs)
	pcr11 := uki.PredictPCR11(boot.Sections)
	m := &manifest.Manifest{
		Schema:  manifest.Schema,
		Version: version,
		Kernel: manifest.KernelInfo{
			Package: kern.Package, Version: kern.Version, DebSHA256: kern.DebSHA256, Release: kern.Release,
		},
		Stub: manifest.PackageInfo{Package: boot.Stub.Package, Version: boot.Stub.Version, DebSHA256: boot.Stub.DebSHA256},
		Measurements: manifest.Measurements{
			UKIAuthenticode: hex.EncodeToString(ukiDigest[:]),
			SecureBoot:      sbHex,
			LoadOptions:     hex.EncodeToString(cd[:]),
			Initrd:          hex.EncodeToString(id[:]),
			UKISections:     hex.EncodeToString(pcr11[:]),
		},
	}
	for name, data := range map[string][]byte{
		KernelFile: vmlinuz, InitramfsFile: initramfs, CmdlineFile: []byte(cmdline + "\n"), UKIFile: boot.UKI,
	} {
		sum := sha256.Sum256(data)
		m.SetComponent(name, sum[:])
	}
	m.SetComponent(DiskFile, boot.DiskSHA256[:])
	return m, nil
}

// Skeleton adds the directories, the console device node and /init.
func Skeleton(arc *cpioimage.Archive, initBin []byte) error {
	for _, d := range []string{"dev", "proc", "sys", "run", "tmp", "mnt", "etc/embassy", "sbin", "lib", "lib64"} {
		if err := arc.Dir(d, 0o755); err != nil {
			return err
		}
	}
	// The kernel opens /dev/console for init before anything is mounted.
	if err := arc.CharDev("dev/console", 0o600, 5, 1); err != nil {
		return err
	}
	return arc.File("init", initBin, 0o755)
}

// GoBuild compiles a main package of the module as a static, reproducible
// linux/amd64 binary and returns it.
func GoBuild(ctx context.Context, moduleRoot, pkg string) ([]byte, error) {
	tmp, err := os.MkdirTemp("", "embassy-gobuild-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)
	out := filepath.Join(tmp, "bin")
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-buildvcs=false",
		"-ldflags=-s -w -buildid=", "-o", out, pkg)
	cmd.Dir = moduleRoot
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64", "GOFLAGS=-mod=mod")
	var errb bytes.Buffer
	cmd.Stderr = &errb
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("go build %s: %w: %s", pkg, err, strings.TrimSpace(errb.String()))
	}
	return os.ReadFile(out)
}

func addModules(arc *cpioimage.Archive, kern *debkernel.Kernel, names []string) (int, error) {
	depFile, err := os.Open(filepath.Join(kern.ModulesDir, "modules.dep"))
	if err != nil {
		return 0, fmt.Errorf("open modules.dep: %w", err)
	}
	defer depFile.Close()
	deps, err := kmod.ParseDep(depFile)
	if err != nil {
		return 0, err
	}
	builtinData, err := os.ReadFile(filepath.Join(kern.ModulesDir, "modules.builtin"))
	if err != nil {
		return 0, fmt.Errorf("read modules.builtin: %w", err)
	}
	builtin, err := kmod.ParseBuiltin(bytes.NewReader(builtinData))
	if err != nil {
		return 0, err
	}
	paths, err := deps.Resolve(names, builtin)
	if err != nil {
		return 0, fmt.Errorf("resolve kernel modules: %w", err)
	}
	base := path.Join("lib/modules", kern.Release)
	for _, p := range paths {
		b, err := os.ReadFile(filepath.Join(kern.ModulesDir, filepath.FromSlash(p)))
		if err != nil {
			return 0, fmt.Errorf("read module: %w", err)
		}
		if err := arc.File(path.Join(base, p), b, 0o444); err != nil {
			return 0, err
		}
	}
	sub, err := deps.Subset(paths)
	if err != nil {
		return 0, err
	}
	if err := arc.File(path.Join(base, "modules.dep"), sub, 0o444); err != nil {
		return 0, err
	}
	if err := arc.File(path.Join(base, "modules.builtin"), builtinData, 0o444); err != nil {
		return 0, err
	}
	return len(paths), arc.File(config.ModulesLoad, []byte(strings.Join(names, "\n")+"\n"), 0o444)
}

// addProgram copies a dynamically linked host program with its interpreter,
// libraries, alias names and /etc config file into the archive.
func addProgram(arc *cpioimage.Archive, hostPath, imagePath, alias, etcFile string) error {
	prog, err := os.ReadFile(hostPath)
	if err != nil {
		return fmt.Errorf("read %s (is e2fsprogs installed?): %w", hostPath, err)
	}
	if err := arc.File(imagePath, prog, 0o755); err != nil {
		return err
	}
	if alias != "" {
		if err := arc.Symlink(path.Join(path.Dir(imagePath), alias), path.Base(imagePath)); err != nil {
			return err
		}
	}
	libs, err := elfdeps.Resolve([]string{hostPath}, elfdeps.DefaultSearchPath)
	if err != nil {
		return err
	}
	for _, lib := range libs {
		if arc.Has(lib) {
			continue
		}
		b, err := os.ReadFile(lib)
		if err != nil {
			return fmt.Errorf("read library: %w", err)
		}
		if err := arc.File(lib, b, 0o555); err != nil {
			return err
		}
	}
	if etcFile != "" {
		b, err := os.ReadFile(filepath.Join("/etc", etcFile))
		if err != nil {
			return fmt.Errorf("read /etc/%s: %w", etcFile, err)
		}
		if err := arc.File(path.Join("etc", etcFile), b, 0o444); err != nil {
			return err
		}
	}
	return nil
}

func writeAtomic(name string, data []byte) error {
	tmp := name + ".tmp"
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o644)
	if err != nil {
		return fmt.Errorf("write %s: %w", name, err)
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", name, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("sync %s: %w", name, err)
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, name); err != nil {
		return fmt.Errorf("install %s: %w", name, err)
	}
	return nil
}
