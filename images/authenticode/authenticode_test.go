package authenticode

import (
	"encoding/binary"
	"encoding/hex"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/dataembassy/embassy/images/authenticode/petest"
	"github.com/dataembassy/embassy/internal/testenv"
)

// TestDebianKernelMatchesOsslsigncode checks our digest of Debian's signed
// kernel against osslsigncode's independent computation.
func TestDebianKernelMatchesOsslsigncode(t *testing.T) {
	kernel := testenv.CachedKernel(t)
	if _, err := exec.LookPath("osslsigncode"); err != nil {
		t.Skip("osslsigncode not installed")
	}
	img, err := os.ReadFile(kernel)
	if err != nil {
		t.Fatal(err)
	}
	got, err := SHA256(img)
	if err != nil {
		t.Fatal(err)
	}
	out, _ := exec.Command("osslsigncode", "verify", "-in", kernel).CombinedOutput()
	m := regexp.MustCompile(`Calculated message digest\s*:\s*([0-9A-Fa-f]{64})`).FindSubmatch(out)
	if m == nil {
		t.Fatalf("osslsigncode printed no calculated digest:\n%s", out)
	}
	if want := strings.ToLower(string(m[1])); hex.EncodeToString(got[:]) != want {
		t.Fatalf("digest %x, osslsigncode says %s", got, want)
	}

	// Stripping the signature (certificate table entry and data) leaves
	// the Authenticode digest unchanged.
	stripped := stripSignature(t, img)
	if len(stripped) == len(img) {
		t.Fatal("kernel carries no signature to strip")
	}
	got2, err := SHA256(stripped)
	if err != nil {
		t.Fatal(err)
	}
	if got2 != got {
		t.Fatalf("unsigned digest %x differs from signed %x", got2, got)
	}
	// But a changed code byte changes it.
	changed := append([]byte(nil), img...)
	changed[len(changed)/2] ^= 1
	if d, _ := SHA256(changed); d == got {
		t.Fatal("changing a byte of the image did not change the digest")
	}
	_ = filepath.Base(kernel)
}

func stripSignature(t *testing.T, img []byte) []byte {
	t.Helper()
	pe := binary.LittleEndian.Uint32(img[0x3c:])
	opt := pe + 24
	dir := opt + 112 + securityDir*8
	addr := binary.LittleEndian.Uint32(img[dir:])
	size := binary.LittleEndian.Uint32(img[dir+4:])
	out := append([]byte(nil), img[:addr]...)
	binary.LittleEndian.PutUint64(out[dir:], 0)
	if int(addr+size) != len(img) {
		t.Fatalf("signature is not at the end of the image")
	}
	return out
}

// minimalPE builds a small PE32+ image with one section and optional
// trailing bytes.
func minimalPE(numDirs uint32, trailing []byte) []byte {
	return petest.MinimalPE(numDirs, 0, trailing)
}

func TestChecksumIsExcluded(t *testing.T) {
	a := minimalPE(16, nil)
	b := append([]byte(nil), a...)
	binary.LittleEndian.PutUint32(b[0x44+20+64:], 0xdeadbeef) // checksum
	da, err := SHA256(a)
	if err != nil {
		t.Fatal(err)
	}
	db, err := SHA256(b)
	if err != nil {
		t.Fatal(err)
	}
	if da != db {
		t.Fatal("the checksum field changed the digest")
	}
	// Trailing data that is not a signature is covered.
	dc, err := SHA256(minimalPE(16, []byte("extra")))
	if err != nil {
		t.Fatal(err)
	}
	if dc == da {
		t.Fatal("trailing data is not covered")
	}
	// Few data directories (no certificate table) still hash.
	if _, err := SHA256(minimalPE(2, nil)); err != nil {
		t.Fatal(err)
	}
}

func TestRejectsMalformed(t *testing.T) {
	good := minimalPE(16, nil)
	mut := func(f func(b []byte) []byte) []byte { return f(append([]byte(nil), good...)) }
	cases := map[string][]byte{
		"empty":             nil,
		"no MZ":             mut(func(b []byte) []byte { b[0] = 'X'; return b }),
		"PE offset too far": mut(func(b []byte) []byte { binary.LittleEndian.PutUint32(b[0x3c:], 0xfffffff0); return b }),
		"bad magic":         mut(func(b []byte) []byte { binary.LittleEndian.PutUint16(b[0x58:], 0x999); return b }),
		"headers too big":   mut(func(b []byte) []byte { binary.LittleEndian.PutUint32(b[0x58+60:], 1<<30); return b }),
		"section past end":  mut(func(b []byte) []byte { binary.LittleEndian.PutUint32(b[0x58+240+20:], 0x10000); return b }),
		"too many dirs":     mut(func(b []byte) []byte { binary.LittleEndian.PutUint32(b[0x58+108:], 1000); return b }),
		"cert table too far": mut(func(b []byte) []byte {
			binary.LittleEndian.PutUint32(b[0x58+112+32:], 0x200)
			binary.LittleEndian.PutUint32(b[0x58+112+36:], 1<<20)
			return b
		}),
		"truncated": good[:0x100],
	}
	for name, img := range cases {
		t.Run(name, func(t *testing.T) {
			if _, err := SHA256(img); !errors.Is(err, ErrNotPE) {
				t.Fatalf("got %v, want ErrNotPE", err)
			}
		})
	}
}

func FuzzSHA256(f *testing.F) {
	f.Add(minimalPE(16, nil))
	f.Add(minimalPE(2, []byte("x")))
	f.Fuzz(func(t *testing.T, b []byte) {
		SHA256(b) // must not panic or read out of bounds
	})
}
