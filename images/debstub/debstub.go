// Package debstub fetches Debian's systemd-boot-efi package with apt-get
// download into the build cache and unpacks it there, so that the image
// builder can take systemd's EFI stub (linuxx64.efi.stub) from it to assemble
// a Unified Kernel Image. Nothing is installed system-wide.
package debstub

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"strings"

	"github.com/dataembassy/embassy/images/debpkg"
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
	deb := debpkg.Cached(dir, f.debPattern())
	if deb == "" {
		spec := Package
		if f.Version != "" {
			spec += "=" + f.Version
		}
		var err error
		if deb, err = debpkg.Download(ctx, dir, spec, f.debPattern(), log); err != nil {
			return nil, fmt.Errorf("%w: %v", ErrNoPackage, err)
		}
	}
	u, err := debpkg.Unpack(ctx, deb, log, nil)
	if err != nil {
		return nil, err
	}
	if u.Package != Package || !versionPattern.MatchString(u.Version) {
		return nil, fmt.Errorf("%w: %s is %s %s", ErrNoPackage, deb, u.Package, u.Version)
	}
	s := &Stub{Package: u.Package, Version: u.Version, DebSHA256: u.DebSHA256, Path: filepath.Join(u.Root, filepath.FromSlash(StubPath))}
	if fi, err := os.Stat(s.Path); err != nil {
		return nil, fmt.Errorf("%w: package has no %s: %v", ErrNoPackage, StubPath, err)
	} else if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("%w: %s is not a regular file", ErrNoPackage, StubPath)
	}
	return s, nil
}
