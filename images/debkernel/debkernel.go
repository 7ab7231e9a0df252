// Package debkernel fetches Debian's amd64 kernel package with apt-get
// download into a cache folder, unpacks it and generates its modules.dep, so
// the image builder can take the signed EFI-stub kernel and its modules from
// it.
package debkernel

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"strings"

	"github.com/dataembassy/embassy/images/debpkg"
)

// MetaPackage is the Debian package that depends on the current kernel.
const MetaPackage = "linux-image-amd64"

var packageName = regexp.MustCompile(`^linux-image-[0-9][0-9a-z.+-]*-amd64$`)

// Kernel is an unpacked kernel package.
type Kernel struct {
	Package    string // e.g. linux-image-6.1.0-56-amd64
	Version    string // Debian package version
	DebSHA256  string // hex SHA-256 of the .deb
	Release    string // uname -r, e.g. 6.1.0-56-amd64
	Vmlinuz    string // path of the kernel image
	ModulesDir string // path of lib/modules/<release>
}

// Fetcher downloads and unpacks kernel packages into CacheDir.
type Fetcher struct {
	CacheDir string
	// Package pins the kernel package; empty means whatever MetaPackage
	// depends on now.
	Package string
	Log     *slog.Logger
}

// resolvePackage finds the concrete kernel package the meta package names.
func (f *Fetcher) resolvePackage(ctx context.Context) (string, error) {
	if f.Package != "" {
		if !packageName.MatchString(f.Package) {
			return "", fmt.Errorf("kernel package %q does not look like linux-image-<release>-amd64", f.Package)
		}
		return f.Package, nil
	}
	out, err := debpkg.Run(ctx, "", "apt-cache", "depends", MetaPackage)
	if err != nil {
		return "", fmt.Errorf("resolve %s (run apt-get update first?): %w", MetaPackage, err)
	}
	for _, line := range strings.Split(out, "\n") {
		if dep, ok := strings.CutPrefix(strings.TrimSpace(line), "Depends: "); ok && packageName.MatchString(dep) {
			return dep, nil
		}
	}
	return "", fmt.Errorf("apt-cache depends %s names no linux-image-*-amd64 package", MetaPackage)
}

// Fetch makes sure the kernel is downloaded and unpacked, and returns it. A
// package already in the cache is used without asking apt.
func (f *Fetcher) Fetch(ctx context.Context) (*Kernel, error) {
	log := f.Log
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	dir := filepath.Join(f.CacheDir, "kernel")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("create kernel cache: %w", err)
	}
	// Reuse the newest cached package (of the pinned name, if any) so that
	// builds work offline.
	pattern := "linux-image-*-amd64_*_amd64.deb"
	if f.Package != "" {
		pattern = f.Package + "_*_amd64.deb"
	}
	deb := debpkg.Cached(dir, pattern)
	if deb == "" {
		pkg, err := f.resolvePackage(ctx)
		if err != nil {
			return nil, err
		}
		if deb, err = debpkg.Download(ctx, dir, pkg, pkg+"_*_amd64.deb", log); err != nil {
			return nil, fmt.Errorf("download kernel: %w", err)
		}
	}
	return unpack(ctx, deb, log)
}

func unpack(ctx context.Context, deb string, log *slog.Logger) (*Kernel, error) {
	// The kernel's modules.dep is generated once, as the tree is unpacked.
	depmod := func(tree string) error {
		rel, err := findRelease(tree)
		if err != nil {
			return err
		}
		if _, err := debpkg.Run(ctx, "", "depmod", "-b", tree, rel); err != nil {
			return fmt.Errorf("generate modules.dep: %w", err)
		}
		return nil
	}
	u, err := debpkg.Unpack(ctx, deb, log, depmod)
	if err != nil {
		return nil, err
	}
	if !packageName.MatchString(u.Package) {
		return nil, fmt.Errorf("%s: package %q is not a linux-image-*-amd64", deb, u.Package)
	}
	k := &Kernel{Package: u.Package, Version: u.Version, DebSHA256: u.DebSHA256}
	rel, err := findRelease(u.Root)
	if err != nil {
		return nil, err
	}
	k.Release = rel
	k.Vmlinuz = filepath.Join(u.Root, "boot", "vmlinuz-"+rel)
	k.ModulesDir = filepath.Join(u.Root, "lib", "modules", rel)
	if _, err := os.Stat(k.Vmlinuz); err != nil {
		return nil, fmt.Errorf("kernel package has no vmlinuz: %w", err)
	}
	return k, nil
}

func findRelease(root string) (string, error) {
	ents, err := os.ReadDir(filepath.Join(root, "lib", "modules"))
	if err != nil {
		return "", fmt.Errorf("kernel package has no lib/modules: %w", err)
	}
	if len(ents) != 1 {
		return "", fmt.Errorf("kernel package has %d module trees, want 1", len(ents))
	}
	return ents[0].Name(), nil
}
