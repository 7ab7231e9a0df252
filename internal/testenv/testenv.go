// Package testenv locates the repository and its download cache for tests
// that use real artifacts (Debian's kernel) instead of synthetic ones.
package testenv

import (
	"os"
	"path/filepath"
	"sort"
	"testing"
)

// RepoRoot returns the folder holding go.mod.
func RepoRoot(t testing.TB) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatal("no go.mod above the test folder")
		}
		dir = parent
	}
}

// CacheDir returns the download cache ($EMBASSY_CACHE or .cache).
func CacheDir(t testing.TB) string {
	if c := os.Getenv("EMBASSY_CACHE"); c != "" {
		return c
	}
	return filepath.Join(RepoRoot(t), ".cache")
}

// CachedKernel returns the newest unpacked Debian kernel image in the cache,
// skipping the test if there is none (`make image` or `make test` fetch it).
func CachedKernel(t testing.TB) string {
	t.Helper()
	m, _ := filepath.Glob(filepath.Join(CacheDir(t), "kernel", "*.unpacked", "boot", "vmlinuz-*"))
	if len(m) == 0 {
		if os.Getenv("EMBASSY_E2E") == "1" {
			t.Fatal("no Debian kernel in the cache; run make image")
		}
		t.Skip("no Debian kernel in the cache; run make image (make test does)")
	}
	sort.Strings(m)
	return m[len(m)-1]
}
