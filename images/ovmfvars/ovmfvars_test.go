package ovmfvars

import (
	"bytes"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/binary"
	"errors"
	"math/big"
	"os"
	"reflect"
	"testing"
	"time"
)

const (
	debianBlank = "/usr/share/OVMF/OVMF_VARS_4M.fd"
	debianMS    = "/usr/share/OVMF/OVMF_VARS_4M.ms.fd"
)

func readOrSkip(t testing.TB, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Skipf("%s: %v (make deps installs ovmf)", path, err)
	}
	return b
}

func testCert(t testing.TB, cn string) *x509.Certificate {
	t.Helper()
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Unix(0, 0), NotAfter: time.Date(2049, 1, 1, 0, 0, 0, 0, time.UTC)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	return c
}

func testKeys(t testing.TB) SecureBootKeys {
	return SecureBootKeys{PK: testCert(t, "test PK"), KEK: testCert(t, "test KEK"), DB: testCert(t, "test db"),
		DBX: [][32]byte{{1, 2, 3}}, Owner: MustGUID("5f8e2a1c-7b3d-4e6f-9a0b-1c2d3e4f5a6b")}
}

var stamp = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

// TestParseDebianSecureBootVars reads the VARS image Debian ships with
// Microsoft's keys enrolled (made by edk2 itself): every key variable is
// found live, its signature lists parse to X.509 certificates, and
// Secure Boot is enabled. This checks our reading of the format against
// a store we did not write.
func TestParseDebianSecureBootVars(t *testing.T) {
	s, err := Parse(readOrSkip(t, debianMS))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []struct {
		vendor GUID
		name   string
	}{{GlobalVariable, "PK"}, {GlobalVariable, "KEK"}, {ImageSecurityDatabase, "db"}, {ImageSecurityDatabase, "dbx"}} {
		v, ok := s.Lookup(want.vendor, want.name)
		if !ok {
			t.Fatalf("%s not found", want.name)
		}
		if v.Attributes != NonVolatile|BootserviceAccess|RuntimeAccess|TimeBasedAuthenticatedWriteAccess || v.Timestamp.IsZero() {
			t.Errorf("%s: attributes %#x, timestamp %v", want.name, v.Attributes, v.Timestamp)
		}
		entries, err := ParseSignatureLists(v.Data)
		if err != nil || len(entries) == 0 {
			t.Fatalf("%s: %d entries, %v", want.name, len(entries), err)
		}
		for _, e := range entries {
			if e.Type == CertX509 {
				if _, err := x509.ParseCertificate(e.Data); err != nil {
					t.Errorf("%s: certificate: %v", want.name, err)
				}
			}
		}
	}
	if v, ok := s.Lookup(SecureBootEnableDisable, "SecureBootEnable"); !ok || !bytes.Equal(v.Data, []byte{1}) {
		t.Errorf("SecureBootEnable = %v (found %v)", v.Data, ok)
	}
	if v, ok := s.Lookup(CustomModeEnable, "CustomMode"); !ok || !bytes.Equal(v.Data, []byte{0}) {
		t.Errorf("the live CustomMode = %v (found %v); deleted copies must be skipped", v.Data, ok)
	}
}

// TestBuildSecureBootVars writes our keys into Debian's blank VARS image:
// the result parses back to exactly the variables written, is the same
// bytes on a second build, changes nothing outside the variable store,
// and refuses a template that already holds variables.
func TestBuildSecureBootVars(t *testing.T) {
	blank := readOrSkip(t, debianBlank)
	keys := testKeys(t)
	vars, err := SecureBootVariables(keys, stamp)
	if err != nil {
		t.Fatal(err)
	}
	img, err := Build(blank, vars)
	if err != nil {
		t.Fatal(err)
	}
	again, _ := Build(blank, vars)
	if !bytes.Equal(img, again) {
		t.Fatal("two builds differ")
	}
	s, err := Parse(img)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(s.Variables, vars) {
		t.Fatalf("parsed back %+v\nwant %+v", s.Variables, vars)
	}
	if !bytes.Equal(img[:s.storeStart+storeHeaderLen], blank[:s.storeStart+storeHeaderLen]) || !bytes.Equal(img[s.storeEnd:], blank[s.storeEnd:]) {
		t.Fatal("bytes outside the variable store changed")
	}
	pk, _ := s.Lookup(GlobalVariable, "PK")
	entries, err := ParseSignatureLists(pk.Data)
	if err != nil || len(entries) != 1 || entries[0].Type != CertX509 || entries[0].Owner != keys.Owner || !bytes.Equal(entries[0].Data, keys.PK.Raw) {
		t.Fatalf("PK entries %+v, %v", entries, err)
	}
	if _, err := Build(readOrSkip(t, debianMS), vars); err == nil {
		t.Fatal("a template with variables was accepted")
	}
	huge := []Variable{{Name: "big", Vendor: GlobalVariable, Data: make([]byte, len(blank))}}
	if _, err := Build(blank, huge); err == nil {
		t.Fatal("a variable larger than the store was written")
	}
	if _, err := Build(blank, append(vars, vars[0])); err == nil {
		t.Fatal("a variable given twice was written")
	}
}

// TestParseRefusesDamagedImages: each damage gets ErrFormat, never a
// panic or a partial store.
func TestParseRefusesDamagedImages(t *testing.T) {
	blank := readOrSkip(t, debianBlank)
	vars, _ := SecureBootVariables(testKeys(t), stamp)
	good, err := Build(blank, vars)
	if err != nil {
		t.Fatal(err)
	}
	first := fvHeaderMinLen + storeHeaderLen
	for _, tc := range []struct {
		name   string
		damage func(b []byte) []byte
	}{
		{"truncated", func(b []byte) []byte { return b[:100] }},
		{"volume shorter than it says", func(b []byte) []byte { return b[:len(b)-4096] }},
		{"volume GUID", func(b []byte) []byte { b[16] ^= 1; return b }},
		{"no _FVH", func(b []byte) []byte { b[40] = 'X'; return b }},
		{"header checksum", func(b []byte) []byte { b[50] ^= 1; return b }},
		{"store GUID", func(b []byte) []byte { b[fvHeaderMinLen] ^= 1; return b }},
		{"store size past the image", func(b []byte) []byte {
			binary.LittleEndian.PutUint32(b[fvHeaderMinLen+16:], uint32(len(b)))
			return b
		}},
		{"store not formatted", func(b []byte) []byte { b[fvHeaderMinLen+20] = 0; return b }},
		{"odd name size", func(b []byte) []byte { binary.LittleEndian.PutUint32(b[first+36:], 5); return b }},
		{"data past the store", func(b []byte) []byte { binary.LittleEndian.PutUint32(b[first+40:], 1<<30); return b }},
		{"name not terminated", func(b []byte) []byte { b[first+varHeaderLen+4] = 'X'; b[first+varHeaderLen+5] = 0; return b }},
		{"junk after the last variable", func(b []byte) []byte { b[len(b)/3] = 0; return b }},
		{"timestamp out of range", func(b []byte) []byte { b[first+18] = 13; return b }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := Parse(tc.damage(bytes.Clone(good))); !errors.Is(err, ErrFormat) {
				t.Fatalf("got %v, want ErrFormat", err)
			}
		})
	}
}

func TestGUIDRoundTrip(t *testing.T) {
	for _, s := range []string{"8be4df61-93ca-11d2-aa0d-00e098032b8c", "d719b2cb-3d3a-4596-a3bc-dad00e67656f"} {
		g, err := ParseGUID(s)
		if err != nil || g.String() != s {
			t.Errorf("%s -> %s, %v", s, g, err)
		}
	}
	for _, bad := range []string{"", "8be4df6193ca11d2aa0d00e098032b8c", "zbe4df61-93ca-11d2-aa0d-00e098032b8c"} {
		if _, err := ParseGUID(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

// smallBlank is a minimal empty VARS image of 16 KiB laid out as
// OVMF's (volume header, empty authenticated store), small enough for the
// fuzzer to run fast.
func smallBlank() []byte {
	const total = 16 << 10
	b := bytes.Repeat([]byte{0xFF}, total)
	copy(b[0:16], make([]byte, 16))
	copy(b[16:32], nvDataFV[:])
	binary.LittleEndian.PutUint64(b[32:40], total)
	copy(b[40:44], "_FVH")
	binary.LittleEndian.PutUint32(b[44:48], 0x0004feff)
	binary.LittleEndian.PutUint16(b[48:50], fvHeaderMinLen)
	binary.LittleEndian.PutUint16(b[50:52], 0)
	copy(b[52:56], []byte{0, 0, 0, 2})
	binary.LittleEndian.PutUint32(b[56:60], total/0x1000)
	binary.LittleEndian.PutUint32(b[60:64], 0x1000)
	copy(b[64:72], make([]byte, 8))
	binary.LittleEndian.PutUint16(b[50:52], -checksum16(b[:fvHeaderMinLen]))
	sh := b[fvHeaderMinLen:]
	copy(sh[0:16], authenticatedVarsGUID[:])
	binary.LittleEndian.PutUint32(sh[16:20], total-fvHeaderMinLen)
	sh[20], sh[21] = storeFormatted, storeHealthy
	copy(sh[22:28], make([]byte, 6))
	return b
}

// FuzzParse feeds hostile VARS images: never a panic; whatever parses
// writes back (through Build on the blank template) to an image that
// parses to the same variables.
func FuzzParse(f *testing.F) {
	blank := smallBlank()
	// Certificate bytes are opaque to the store: no key generation here,
	// which under the fuzzer's instrumentation takes minutes per worker.
	cert := &x509.Certificate{Raw: bytes.Repeat([]byte{0x30}, 700)}
	vars, _ := SecureBootVariables(SecureBootKeys{PK: cert, KEK: cert, DB: cert, DBX: [][32]byte{{9}}}, stamp)
	good, err := Build(blank, vars)
	if err != nil {
		f.Fatal(err)
	}
	// Seeds are whole small images; the fuzzer's bytes replace the start
	// of a good one, so that mutations of a short input still meet a
	// well-formed rest.
	f.Add(good[:4096])
	f.Add(blank[:256])
	f.Fuzz(func(t *testing.T, head []byte) {
		img := bytes.Clone(good)
		copy(img, head)
		s, err := Parse(img)
		if err != nil {
			if !errors.Is(err, ErrFormat) {
				t.Fatalf("error without ErrFormat: %v", err)
			}
			return
		}
		rebuilt, err := Build(blank, s.Variables)
		if err != nil {
			return // e.g. a variable given twice in the damaged store
		}
		s2, err := Parse(rebuilt)
		if err != nil || !reflect.DeepEqual(s2.Variables, s.Variables) {
			t.Fatalf("round trip: %v", err)
		}
		for _, v := range s.Variables {
			ParseSignatureLists(v.Data)
		}
	})
}

// TestSmallBlankIsValid: the fuzzer's small template parses as an empty
// store, like Debian's.
func TestSmallBlankIsValid(t *testing.T) {
	s, err := Parse(smallBlank())
	if err != nil || len(s.Variables) != 0 {
		t.Fatalf("%v, %d variables", err, len(s.Variables))
	}
}
