package qemutests

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/dataembassy/embassy/images/build"
	"github.com/dataembassy/embassy/images/manifest"
	"github.com/dataembassy/embassy/images/sbkeys"
	"github.com/dataembassy/embassy/initramfs/cpioimage"
)

// copyImage copies the artifacts of an image folder into a temp folder.
func copyImage(t testing.TB, src string) string {
	t.Helper()
	dst := t.TempDir()
	for _, f := range []string{build.KernelFile, build.InitramfsFile, build.CmdlineFile, build.UKIFile, build.DiskFile,
		build.VarsFile, build.ManifestFile, build.SignatureFile} {
		b, err := os.ReadFile(filepath.Join(src, f))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dst, f), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dst
}

// devSecureBootKeys are the local-default Secure Boot keys mkimage signed
// the image with (and enrolled in its VARS).
func devSecureBootKeys(t testing.TB) sbkeys.Keys {
	t.Helper()
	keys, err := sbkeys.EnsureDev(filepath.Join(cacheDir(), "keys", "secureboot"))
	if err != nil {
		t.Fatal(err)
	}
	return keys
}

// repackImage rebuilds the signed UKI and the disk image of the image copy
// in dir from its (changed) components, signed with the local-default
// Secure Boot db key: what someone holding the db key, and nothing else,
// could boot.
func repackImage(t testing.TB, dir string) {
	t.Helper()
	m := loadImage(t, imageDir())
	if err := build.Repack(context.Background(), dir, cacheDir(), m.Version, devSecureBootKeys(t)); err != nil {
		t.Fatalf("repack the image: %v", err)
	}
}

// runVerify runs `mkimage verify` on dir and returns its output and whether
// it exited zero.
func runVerify(t testing.TB, dir string) (string, bool) {
	t.Helper()
	cmd := exec.Command(mkimage, "verify", "--pubkey", pubKeyPath(), dir)
	out, err := cmd.CombinedOutput()
	if err != nil {
		if _, ok := err.(*exec.ExitError); !ok {
			t.Fatalf("run mkimage verify: %v", err)
		}
		return string(out), false
	}
	return string(out), true
}

func requireMismatch(t testing.TB, out string, names ...string) {
	t.Helper()
	for _, n := range names {
		if !strings.Contains(out, "MISMATCH "+n) {
			t.Errorf("mkimage verify does not name %q as a mismatch:\n%s", n, out)
		}
	}
}

// tamperInitramfs changes one byte of one file inside the initramfs and
// re-packs and recompresses it.
func tamperInitramfs(t testing.TB, dir, file string) {
	t.Helper()
	path := filepath.Join(dir, build.InitramfsFile)
	zst, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	raw, err := cpioimage.Decompress(zst)
	if err != nil {
		t.Fatal(err)
	}
	recs, err := cpioimage.ReadFiles(raw)
	if err != nil {
		t.Fatal(err)
	}
	changed := false
	for i, r := range recs {
		if r.Name != file {
			continue
		}
		b, err := cpioimage.Contents(r)
		if err != nil {
			t.Fatal(err)
		}
		// Flip the case of the first letter of the second line: one byte,
		// and the image still boots.
		at := bytes.IndexByte(b, '\n') + 1
		if at < 1 || at >= len(b) || !(b[at] >= 'a' && b[at] <= 'z') {
			t.Fatalf("%s has no second line starting with a letter", file)
		}
		b = append([]byte(nil), b...)
		b[at] ^= 0x20
		recs[i].ReaderAt = bytes.NewReader(b)
		changed = true
	}
	if !changed {
		t.Fatalf("initramfs has no %s", file)
	}
	arc, err := cpioimage.FromRecords(recs)
	if err != nil {
		t.Fatal(err)
	}
	out, err := arc.Build()
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(out, zst) {
		t.Fatal("tampering left the initramfs unchanged")
	}
	if err := os.WriteFile(path, out, 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestBootTamperedInitramfs: mkimage verify names the changed initramfs,
// and the boot's PCR9 initrd event (replayed on the host) differs from the
// manifest's while the command line event does not. The boot is the one
// TestTamperedImageGetsNoKeys/initramfs checks for keys.
func TestBootTamperedInitramfs(t *testing.T) {
	parallelReader(t)
	o := tamperedBoot(t, "initramfs")
	if o.verifyOK {
		t.Fatalf("mkimage verify accepted a tampered initramfs:\n%s", o.verify)
	}
	requireMismatch(t, o.verify, "component initramfs.cpio.zst", "measurement pcr9_initrd", "measurement pcr11_uki_sections",
		"component "+manifest.ComponentUKI, "measurement pcr4_uki_authenticode")
	if o.verdict.Check.InitrdMatch {
		t.Fatal("the PCR9 initrd event of a tampered initramfs equals the manifest's")
	}
	if !o.verdict.Check.LoadOptionsMatch {
		t.Errorf("command line event changed although only the initramfs was tampered: %+v", o.verdict.Check)
	}
	if o.verdict.Check.OK() {
		t.Fatal("boot check passed for a tampered initramfs")
	}
	t.Logf("verdict: %+v", o.verdict.Check)
}

// TestBootTamperedCmdline: the same for a changed command line (PCR9
// LoadOptions event), on TestTamperedImageGetsNoKeys/cmdline's boot.
func TestBootTamperedCmdline(t *testing.T) {
	parallelReader(t)
	o := tamperedBoot(t, "cmdline")
	if o.verifyOK {
		t.Fatalf("mkimage verify accepted a tampered command line:\n%s", o.verify)
	}
	requireMismatch(t, o.verify, "component "+manifest.ComponentCmdline, "measurement pcr9_load_options",
		"component "+manifest.ComponentUKI, "measurement pcr4_uki_authenticode")
	if o.verdict.Check.LoadOptionsMatch {
		t.Fatal("the PCR9 LoadOptions event of a tampered command line equals the manifest's")
	}
	if !o.verdict.Check.InitrdMatch || !o.verdict.Check.SecureBootMatch {
		t.Errorf("initrd or Secure Boot events changed although only the command line was tampered: %+v", o.verdict.Check)
	}
	if o.verdict.Check.UKIMatch || o.verdict.Check.SectionsMatch {
		t.Errorf("the repacked UKI's PCR4 or PCR11 measurement equals the manifest's: %+v", o.verdict.Check)
	}
	if o.verdict.Check.OK() {
		t.Fatal("boot check passed for a tampered command line")
	}
	t.Logf("verdict: %+v", o.verdict.Check)
}
