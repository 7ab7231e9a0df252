// Package debpkg fetches one Debian package into a cache folder with
// `apt-get download` and unpacks it there once, so that the image builder
// takes files from Debian's own packages (the kernel, systemd's EFI stub)
// and records which .deb they came from. A package already in the cache is
// used without asking apt, so builds work offline.
package debpkg

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// Unpacked is a package unpacked in the cache.
type Unpacked struct {
	Deb       string // path of the .deb
	Package   string // its Package field
	Version   string // its Version field
	DebSHA256 string // hex SHA-256 of the .deb
	Root      string // where it is unpacked
}

// Run runs a command in dir and returns its standard output; the error
// carries its standard error.
func Run(ctx context.Context, dir string, name string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
	}
	return out.String(), nil
}

// Cached returns the newest .deb in dir matching pattern (a glob), or "".
func Cached(dir, pattern string) string {
	m, _ := filepath.Glob(filepath.Join(dir, pattern))
	if len(m) == 0 {
		return ""
	}
	return m[len(m)-1]
}

// Download runs `apt-get download spec` in dir and returns the .deb it
// left, found with pattern.
func Download(ctx context.Context, dir, spec, pattern string, log *slog.Logger) (string, error) {
	log.Info("downloading package", "package", spec)
	if _, err := Run(ctx, dir, "apt-get", "download", spec); err != nil {
		return "", fmt.Errorf("download %s (run apt-get update first?): %w", spec, err)
	}
	deb := Cached(dir, pattern)
	if deb == "" {
		return "", fmt.Errorf("apt-get download %s left no .deb matching %s in %s", spec, pattern, dir)
	}
	return deb, nil
}

// Unpack reads the .deb's fields and unpacks it next to itself (dpkg-deb
// -x into <name>.unpacked) unless that was done for these very bytes: a
// stamp records the .deb's SHA-256, so a replaced .deb of the same name is
// unpacked again. prepare, if set, runs on the fresh tree before it is put
// in place (the kernel's modules.dep, say).
func Unpack(ctx context.Context, deb string, log *slog.Logger, prepare func(tree string) error) (*Unpacked, error) {
	data, err := os.ReadFile(deb)
	if err != nil {
		return nil, fmt.Errorf("read package: %w", err)
	}
	sum := sha256.Sum256(data)
	u := &Unpacked{Deb: deb, DebSHA256: hex.EncodeToString(sum[:]), Root: strings.TrimSuffix(deb, ".deb") + ".unpacked"}
	fields, err := Run(ctx, "", "dpkg-deb", "-f", deb, "Package", "Version")
	if err != nil {
		return nil, err
	}
	for _, line := range strings.Split(fields, "\n") {
		if v, ok := strings.CutPrefix(line, "Package: "); ok {
			u.Package = strings.TrimSpace(v)
		}
		if v, ok := strings.CutPrefix(line, "Version: "); ok {
			u.Version = strings.TrimSpace(v)
		}
	}
	if u.Package == "" || u.Version == "" {
		return nil, fmt.Errorf("%s: no Package or Version field in %q", deb, fields)
	}
	stamp := filepath.Join(u.Root, ".complete")
	if got, err := os.ReadFile(stamp); err == nil && strings.TrimSpace(string(got)) == u.DebSHA256 {
		return u, nil
	}
	log.Info("unpacking package", "deb", filepath.Base(deb), "version", u.Version)
	tmp := u.Root + ".tmp"
	os.RemoveAll(tmp)
	if _, err := Run(ctx, "", "dpkg-deb", "-x", deb, tmp); err != nil {
		return nil, err
	}
	if prepare != nil {
		if err := prepare(tmp); err != nil {
			return nil, err
		}
	}
	if err := os.WriteFile(filepath.Join(tmp, ".complete"), []byte(u.DebSHA256+"\n"), 0o644); err != nil {
		return nil, err
	}
	os.RemoveAll(u.Root)
	if err := os.Rename(tmp, u.Root); err != nil {
		return nil, fmt.Errorf("install unpacked %s: %w", u.Package, err)
	}
	return u, nil
}
