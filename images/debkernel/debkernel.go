// Package debkernel fetches Debian's amd64 kernel package with apt-get
// download into a cache folder, unpacks it and generates its modules.dep, so
// the image builder can take the signed EFI-stub kernel and its modules from
// it.
package debkernel

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
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

func run(ctx context.Context, dir string, name string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
	}
	return out.String(), nil
}

// resolvePackage finds the concrete kernel package the meta package names.
func (f *Fetcher) resolvePackage(ctx context.Context) (string, error) {
	if f.Package != "" {
		if !packageName.MatchString(f.Package) {
			return "", fmt.Errorf("kernel package %q does not look like linux-image-<release>-amd64", f.Package)
		}
		return f.Package, nil
	}
	out, err := run(ctx, "", "apt-cache", "depends", MetaPackage)
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
	deb := ""
	if matches, _ := filepath.Glob(filepath.Join(dir, pattern)); len(matches) > 0 {
		deb = matches[len(matches)-1]
	}
	if deb == "" {
		pkg, err := f.resolvePackage(ctx)
		if err != nil {
			return nil, err
		}
		log.Info("downloading kernel package", "package", pkg)
		if _, err := run(ctx, dir, "apt-get", "download", pkg); err != nil {
			return nil, fmt.Errorf("download kernel: %w", err)
		}
		matches, _ := filepath.Glob(filepath.Join(dir, pkg+"_*_amd64.deb"))
		if len(matches) == 0 {
			return nil, fmt.Errorf("apt-get download %s left no .deb in %s", pkg, dir)
		}
		deb = matches[len(matches)-1]
	}
	return unpack(ctx, deb, log)
}

func unpack(ctx context.Context, deb string, log *slog.Logger) (*Kernel, error) {
	data, err := os.ReadFile(deb)
	if err != nil {
		return nil, fmt.Errorf("read kernel package: %w", err)
	}
	sum := sha256.Sum256(data)
	k := &Kernel{DebSHA256: hex.EncodeToString(sum[:])}
	fields, err := run(ctx, "", "dpkg-deb", "-f", deb, "Package", "Version")
	if err != nil {
		return nil, err
	}
	for _, line := range strings.Split(fields, "\n") {
		if v, ok := strings.CutPrefix(line, "Package: "); ok {
			k.Package = strings.TrimSpace(v)
		}
		if v, ok := strings.CutPrefix(line, "Version: "); ok {
			k.Version = strings.TrimSpace(v)
		}
	}
	if !packageName.MatchString(k.Package) || k.Version == "" {
		return nil, fmt.Errorf("%s: unexpected package fields %q", deb, fields)
	}
	root := strings.TrimSuffix(deb, ".deb") + ".unpacked"
	stamp := filepath.Join(root, ".complete")
	if _, err := os.Stat(stamp); err != nil {
		log.Info("unpacking kernel package", "deb", filepath.Base(deb))
		tmp := root + ".tmp"
		os.RemoveAll(tmp)
		if _, err := run(ctx, "", "dpkg-deb", "-x", deb, tmp); err != nil {
			return nil, err
		}
		rel, err := findRelease(tmp)
		if err != nil {
			return nil, err
		}
		if _, err := run(ctx, "", "depmod", "-b", tmp, rel); err != nil {
			return nil, fmt.Errorf("generate modules.dep: %w", err)
		}
		if err := os.WriteFile(filepath.Join(tmp, ".complete"), []byte(k.DebSHA256+"\n"), 0o644); err != nil {
			return nil, err
		}
		os.RemoveAll(root)
		if err := os.Rename(tmp, root); err != nil {
			return nil, fmt.Errorf("install unpacked kernel: %w", err)
		}
	}
	rel, err := findRelease(root)
	if err != nil {
		return nil, err
	}
	k.Release = rel
	k.Vmlinuz = filepath.Join(root, "boot", "vmlinuz-"+rel)
	k.ModulesDir = filepath.Join(root, "lib", "modules", rel)
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
