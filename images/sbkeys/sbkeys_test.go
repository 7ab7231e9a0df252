package sbkeys

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/dataembassy/embassy/images/ovmfvars"
)

// kernel is a real PE image to sign: the Debian kernel the image builder
// fetched into the cache, already signed by Debian.
func kernel(t *testing.T) []byte {
	t.Helper()
	m, _ := filepath.Glob("../../.cache/kernel/*/boot/vmlinuz-*")
	if len(m) == 0 {
		t.Skip("no Debian kernel in .cache/kernel (make image fetches it)")
	}
	b, err := os.ReadFile(m[0])
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestDevKeysSignAndVerify: the local-default keys are made once and
// loaded again unchanged; a signature by the db key verifies with our
// code and with osslsigncode (a verifier we did not write), and another
// folder's db key does not verify it; the Debian signature the kernel
// had is replaced.
func TestDevKeysSignAndVerify(t *testing.T) {
	dir := t.TempDir()
	ks, err := EnsureDev(dir)
	if err != nil {
		t.Fatal(err)
	}
	again, err := EnsureDev(dir)
	if err != nil || !again.DB.Cert.Equal(ks.DB.Cert) || !again.PK.Cert.Equal(ks.PK.Cert) {
		t.Fatalf("keys made again instead of loaded: %v", err)
	}
	if err := ks.KEK.Cert.CheckSignatureFrom(ks.PK.Cert); err != nil {
		t.Errorf("KEK not signed by PK: %v", err)
	}
	if err := ks.DB.Cert.CheckSignatureFrom(ks.KEK.Cert); err != nil {
		t.Errorf("db not signed by KEK: %v", err)
	}
	img := kernel(t)
	if err := VerifyWithTools(t, dir, img); err == nil {
		t.Fatal("the unsigned-by-us kernel verifies with our db key")
	}
	signed, err := ks.SignPE(img)
	if err != nil {
		t.Fatal(err)
	}
	if err := VerifyWithTools(t, dir, signed); err != nil {
		t.Fatal(err)
	}
	if again, err := ks.SignPE(img); err != nil || !bytes.Equal(again, signed) {
		t.Fatalf("signing twice gave different images (err %v)", err)
	}
	otherDir := t.TempDir()
	if _, err := EnsureDev(otherDir); err != nil {
		t.Fatal(err)
	}
	if err := VerifyWithTools(t, otherDir, signed); err == nil {
		t.Fatal("another db key verifies our signature")
	}
}

// TestVariablesAreReproducible: the same keys give the same VARS bytes.
func TestVariablesAreReproducible(t *testing.T) {
	ks, err := EnsureDev(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	blank, err := os.ReadFile("/usr/share/OVMF/OVMF_VARS_4M.fd")
	if err != nil {
		t.Skip("no OVMF VARS template")
	}
	at := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	var imgs [][]byte
	for i := 0; i < 2; i++ {
		vars, err := ks.Variables(nil, at)
		if err != nil {
			t.Fatal(err)
		}
		img, err := ovmfvars.Build(blank, vars)
		if err != nil {
			t.Fatal(err)
		}
		imgs = append(imgs, img)
	}
	if !bytes.Equal(imgs[0], imgs[1]) {
		t.Fatal("two VARS images from the same keys differ")
	}
}

func TestLoadRefusesMismatchedKey(t *testing.T) {
	a, b := t.TempDir(), t.TempDir()
	if _, err := EnsureDev(a); err != nil {
		t.Fatal(err)
	}
	if _, err := EnsureDev(b); err != nil {
		t.Fatal(err)
	}
	key, _ := os.ReadFile(filepath.Join(b, "db.key"))
	os.WriteFile(filepath.Join(a, "db.key"), key, 0o600)
	if _, err := Load(a); err == nil {
		t.Fatal("a db key that does not match its certificate was loaded")
	}
	os.Remove(filepath.Join(a, "db.key"))
	if _, err := Load(a); err == nil {
		t.Fatal("keys without a db private key were loaded for signing")
	}
}

// VerifyWithTools checks img's Authenticode signature against the keys in
// dir with two verifiers we did not write: sbverify (--cert db.pem) and
// osslsigncode (the chain PK, KEK, db); both must accept it, and only one
// signature may be there. Skips when either tool is missing.
func VerifyWithTools(t *testing.T, dir string, img []byte) error {
	t.Helper()
	for _, tool := range []string{"sbverify", "osslsigncode"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed (Debian packages sbsigntool, osslsigncode; make deps)", tool)
		}
	}
	work := t.TempDir()
	in := filepath.Join(work, "signed.efi")
	os.WriteFile(in, img, 0o600)
	var bundle []byte
	for _, role := range roles {
		b, _ := os.ReadFile(filepath.Join(dir, role+".pem"))
		bundle = append(bundle, b...)
	}
	ca := filepath.Join(work, "chain.pem")
	os.WriteFile(ca, bundle, 0o600)
	if out, err := exec.Command("sbverify", "--cert", filepath.Join(dir, "db.pem"), in).CombinedOutput(); err != nil {
		return fmt.Errorf("sbverify: %v\n%s", err, out)
	}
	out, err := exec.Command("osslsigncode", "verify", "-CAfile", ca, "-in", in).CombinedOutput()
	if err != nil || !bytes.Contains(out, []byte("Signature verification: ok")) {
		return fmt.Errorf("osslsigncode: %v\n%s", err, out)
	}
	if bytes.Contains(out, []byte("Signature Index: 1")) {
		return fmt.Errorf("more than one signature:\n%s", out)
	}
	return nil
}
