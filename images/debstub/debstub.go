// Package debstub fetches Debian's systemd-boot-efi package with apt-get
// download into the build cache and unpacks it there, so that the image
// builder can take systemd's EFI stub (linuxx64.efi.stub) from it to assemble
// a Unified Kernel Image. Nothing is installed system-wide.
package debstub

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
)

// Package is the Debian package that ships systemd-stub.
const Package = "systemd-boot-efi"

// StubPath is where the x86-64 stub lives inside the package.
const StubPath = "usr/lib/systemd/boot/efi/linuxx64.efi.stub"

// ErrNoPackage is returned (wrapped) when apt leaves no usable .deb behind.
var ErrNoPackage = errors.New("no systemd-boot-efi package")

var versionPattern = regexp.MustCompile(`^[0-9][0-9A-Za-z.+~:-]*$`)

// Stub is the unpacked EFI stub and the package it came from.
type Stub struct {
	Package   string // systemd-boot-efi
	Version   string // Debian package version, e.g. 252.39-1~deb12u2
	DebSHA256 string // hex SHA-256 of the .deb
	Path      string // path of linuxx64.efi.stub
}

// Fetcher downloads and unpacks systemd-boot-efi into CacheDir/stub.
type Fetcher struct {
	CacheDir string
	// Version pins the package version; empty means the candidate apt
	// offers now (or the newest one already in the cache).
	Version string
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

// debPattern is the glob for the cached .deb; apt-get download writes an
// epoch's colon as %3a.
func (f *Fetcher) debPattern() string {
	if f.Version != "" {
		return Package + "_" + strings.ReplaceAll(f.Version, ":", "%3a") + "_amd64.deb"
	}
	return Package + "_*_amd64.deb"
}

// Fetch makes sure the stub is downloaded and unpacked, and returns it. A
// package already in the cache is used without asking apt, so builds work
// offline.
func (f *Fetcher) Fetch(ctx context.Context) (*Stub, error) {
	log := f.Log
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if f.Version != "" && !versionPattern.MatchString(f.Version) {
		return nil, fmt.Errorf("%s version %q does not look like a Debian version", Package, f.Version)
	}
	dir := filepath.Join(f.CacheDir, "stub")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("create stub cache: %w", err)
	}
	deb := newest(filepath.Join(dir, f.debPattern()))
	if deb == "" {
		spec := Package
		if f.Version != "" {
			spec += "=" + f.Version
		}
		log.Info("downloading stub package", "package", spec)
		if _, err := run(ctx, dir, "apt-get", "download", spec); err != nil {
			return nil, fmt.Errorf("download %s (run apt-get update first?): %w", spec, err)
		}
		if deb = newest(filepath.Join(dir, f.debPattern())); deb == "" {
			return nil, fmt.Errorf("%w: apt-get download %s left no .deb in %s", ErrNoPackage, spec, dir)
		}
	}
	return unpack(ctx, deb, log)
}

func newest(pattern string) string {
	m, _ := filepath.Glob(pattern)
	if len(m) == 0 {
		return ""
	}
	return m[len(m)-1]
}

func unpack(ctx context.Context, deb string, log *slog.Logger) (*Stub, error) {
	data, err := os.ReadFile(deb)
	if err != nil {
		return nil, fmt.Errorf("read stub package: %w", err)
	}
	sum := sha256.Sum256(data)
	s := &Stub{DebSHA256: hex.EncodeToString(sum[:])}
	fields, err := run(ctx, "", "dpkg-deb", "-f", deb, "Package", "Version")
	if err != nil {
		return nil, err
	}
	for _, line := range strings.Split(fields, "\n") {
		if v, ok := strings.CutPrefix(line, "Package: "); ok {
			s.Package = strings.TrimSpace(v)
		}
		if v, ok := strings.CutPrefix(line, "Version: "); ok {
			s.Version = strings.TrimSpace(v)
		}
	}
	if s.Package != Package || !versionPattern.MatchString(s.Version) {
		return nil, fmt.Errorf("%w: %s has unexpected package fields %q", ErrNoPackage, deb, fields)
	}
	root := strings.TrimSuffix(deb, ".deb") + ".unpacked"
	stamp := filepath.Join(root, ".complete")
	// The stamp records which .deb was unpacked; a replaced .deb of the
	// same name is unpacked again.
	if got, err := os.ReadFile(stamp); err != nil || strings.TrimSpace(string(got)) != s.DebSHA256 {
		log.Info("unpacking stub package", "deb", filepath.Base(deb), "version", s.Version)
		tmp := root + ".tmp"
		os.RemoveAll(tmp)
		if _, err := run(ctx, "", "dpkg-deb", "-x", deb, tmp); err != nil {
			return nil, err
		}
		if err := os.WriteFile(filepath.Join(tmp, ".complete"), []byte(s.DebSHA256+"\n"), 0o644); err != nil {
			return nil, err
		}
		os.RemoveAll(root)
		if err := os.Rename(tmp, root); err != nil {
			return nil, fmt.Errorf("install unpacked stub: %w", err)
		}
	}
	s.Path = filepath.Join(root, filepath.FromSlash(StubPath))
	if fi, err := os.Stat(s.Path); err != nil {
		return nil, fmt.Errorf("%w: package has no %s: %v", ErrNoPackage, StubPath, err)
	} else if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("%w: %s is not a regular file", ErrNoPackage, StubPath)
	}
	return s, nil
}
