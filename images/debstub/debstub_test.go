package debstub

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/dataembassy/embassy/internal/testenv"
)

func TestVersionPinValidated(t *testing.T) {
	for _, v := range []string{"252; rm -rf /", "../x", " 252", "abc"} {
		f := &Fetcher{CacheDir: t.TempDir(), Version: v}
		if _, err := f.Fetch(context.Background()); err == nil {
			t.Errorf("version %q accepted", v)
		}
	}
}

func TestDebPatternEscapesEpoch(t *testing.T) {
	f := &Fetcher{Version: "1:252.39-1~deb12u2"}
	if got, want := f.debPattern(), "systemd-boot-efi_1%3a252.39-1~deb12u2_amd64.deb"; got != want {
		t.Errorf("pattern %q, want %q", got, want)
	}
}

// TestFetch downloads the package into a scratch cache (or skips when the
// Debian mirror cannot be reached) and checks what Fetch reports, then that a
// second Fetch works from the cache alone.
func TestFetch(t *testing.T) {
	cache := t.TempDir()
	// Reuse a .deb the repository cache already holds, so the test does not
	// download again.
	if m, _ := filepath.Glob(filepath.Join(testenv.CacheDir(t), "stub", Package+"_*_amd64.deb")); len(m) > 0 {
		b, err := os.ReadFile(m[len(m)-1])
		if err != nil {
			t.Fatal(err)
		}
		os.MkdirAll(filepath.Join(cache, "stub"), 0o755)
		if err := os.WriteFile(filepath.Join(cache, "stub", filepath.Base(m[len(m)-1])), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	s, err := (&Fetcher{CacheDir: cache}).Fetch(context.Background())
	if err != nil {
		t.Skipf("cannot fetch %s (no network to the Debian mirror?): %v", Package, err)
	}
	if s.Package != Package || s.Version == "" || len(s.DebSHA256) != 64 {
		t.Errorf("stub %+v", s)
	}
	b, err := os.ReadFile(s.Path)
	if err != nil || len(b) < 2 || string(b[:2]) != "MZ" {
		t.Fatalf("stub at %s is not a PE file: %v", s.Path, err)
	}
	again, err := (&Fetcher{CacheDir: cache, Version: s.Version}).Fetch(context.Background())
	if err != nil {
		t.Fatalf("second fetch, pinned: %v", err)
	}
	if *again != *s {
		t.Errorf("second fetch %+v, first %+v", again, s)
	}
}
