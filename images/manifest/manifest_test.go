package manifest

import (
	"bytes"
	"crypto/ed25519"
	"crypto/sha256"
	"errors"
	"reflect"
	"strings"
	"testing"
)

func digest(s string) []byte {
	d := sha256.Sum256([]byte(s))
	return d[:]
}

func sample() *Manifest {
	m := &Manifest{
		Schema:  Schema,
		Version: 7,
		Kernel: KernelInfo{
			Package: "linux-image-6.1.0-56-amd64", Version: "6.1.192-2",
			DebSHA256: strings.Repeat("ab", 32), Release: "6.1.0-56-amd64",
		},
		Stub: PackageInfo{Package: "systemd-boot-efi", Version: "252.39-1~deb12u2", DebSHA256: strings.Repeat("cd", 32)},
		Measurements: Measurements{
			UKIAuthenticode: strings.Repeat("01", 32),
			SecureBoot:      []string{strings.Repeat("05", 32), strings.Repeat("06", 32)},
			LoadOptions:     strings.Repeat("02", 32),
			Initrd:          strings.Repeat("03", 32),
			UKISections:     strings.Repeat("04", 32),
		},
	}
	m.SetComponent(ComponentKernel, digest("k"))
	m.SetComponent(ComponentInitramfs, digest("i"))
	m.SetComponent(ComponentCmdline, digest("c"))
	return m
}

func key(t *testing.T, seed byte) ed25519.PrivateKey {
	t.Helper()
	return ed25519.NewKeyFromSeed(bytes.Repeat([]byte{seed}, ed25519.SeedSize))
}

func TestSignVerifyRoundTrip(t *testing.T) {
	m := sample()
	b, err := m.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	k := key(t, 1)
	sig := Sign(b, k)
	got, err := Verify(b, sig, k.Public().(ed25519.PublicKey))
	if err != nil {
		t.Fatalf("Verify: %v", err)
	}
	if got.Version != 7 || !reflect.DeepEqual(got.Measurements, m.Measurements) || got.Stub != m.Stub {
		t.Fatalf("round trip changed the manifest: %+v", got)
	}
	if d, ok := got.Component(ComponentKernel); !ok || d != m.Components[2].SHA256 {
		t.Fatalf("component lookup: %q %v", d, ok)
	}
}

func TestCanonicalEncoding(t *testing.T) {
	m := sample()
	a, err := m.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	// Components given out of order are sorted by SetComponent, so the
	// encoding does not depend on insertion order.
	m2 := sample()
	m2.Components = nil
	m2.SetComponent(ComponentCmdline, digest("c"))
	m2.SetComponent(ComponentKernel, digest("k"))
	m2.SetComponent(ComponentInitramfs, digest("i"))
	b, err := m2.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(a, b) {
		t.Fatalf("encodings differ:\n%s\n%s", a, b)
	}
	if !bytes.HasPrefix(a, []byte(`{"schema":"embassy-image-manifest/v2","version":7,`)) || !bytes.HasSuffix(a, []byte("}\n")) {
		t.Fatalf("unexpected canonical form: %s", a)
	}
	p, err := Parse(a)
	if err != nil {
		t.Fatal(err)
	}
	again, _ := p.Marshal()
	if !bytes.Equal(a, again) {
		t.Fatal("Marshal(Parse(b)) != b")
	}
}

func TestParseRejects(t *testing.T) {
	good, err := sample().Marshal()
	if err != nil {
		t.Fatal(err)
	}
	s := string(good)
	cases := []struct {
		name  string
		input string
		want  string
	}{
		{"empty", "", "decode manifest"},
		{"truncated", s[:len(s)/2], "decode manifest"},
		{"unknown top-level field", strings.Replace(s, `{"schema"`, `{"extra":1,"schema"`, 1), "unknown field"},
		{"unknown nested field", strings.Replace(s, `"release"`, `"url":"x","release"`, 1), "unknown field"},
		{"trailing data", s + "{}", "trailing data"},
		{"pretty printed", strings.Replace(s, `,"version"`, `, "version"`, 1), "not canonically encoded"},
		{"no trailing newline", strings.TrimSuffix(s, "\n"), "not canonically encoded"},
		{"wrong schema", strings.Replace(s, Schema, "other/v9", 1), "schema"},
		{"version zero", strings.Replace(s, `"version":7`, `"version":0`, 1), "version"},
		{"negative version", strings.Replace(s, `"version":7`, `"version":-1`, 1), "decode manifest"},
		{"uppercase digest", strings.Replace(s, strings.Repeat("01", 32), strings.Repeat("AB", 32), 1), "lowercase hex"},
		{"short digest", strings.Replace(s, strings.Repeat("02", 32), "02", 1), "lowercase hex"},
		{"unsorted components", strings.Replace(s, `"name":"cmdline"`, `"name":"zzz"`, 1), "not sorted"},
		{"path in component name", strings.Replace(s, `"name":"cmdline"`, `"name":"../x"`, 1), "bad name"},
		{"no secure boot events", strings.Replace(s, `["`+strings.Repeat("05", 32)+`","`+strings.Repeat("06", 32)+`"]`, `[]`, 1), "pcr7_secure_boot has 0 events"},
		{"bad secure boot event", strings.Replace(s, strings.Repeat("06", 32), "6", 1), "pcr7_secure_boot event 1"},
		{"no stub", strings.Replace(s, `"package":"systemd-boot-efi"`, `"package":""`, 1), "stub.package"},
		{"old schema with QEMU digest", strings.Replace(strings.Replace(s, Schema, "embassy-image-manifest/v1", 1), `"pcr9_initrd"`, `"pcr4_kernel_qemu_direct":"x","pcr9_initrd"`, 1), "unknown field"},
		{"oversized", s + strings.Repeat(" ", MaxSize), "more than"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := Parse([]byte(c.input))
			if err == nil {
				t.Fatal("accepted")
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Fatalf("error %q does not mention %q", err, c.want)
			}
		})
	}
}

func TestVerifyRejects(t *testing.T) {
	b, err := sample().Marshal()
	if err != nil {
		t.Fatal(err)
	}
	k := key(t, 1)
	pub := k.Public().(ed25519.PublicKey)
	sig := Sign(b, k)
	other := key(t, 2).Public().(ed25519.PublicKey)

	if _, err := Verify(b, sig, other); !errors.Is(err, ErrBadSignature) {
		t.Errorf("wrong key: got %v, want ErrBadSignature", err)
	}
	flipped := append([]byte(nil), b...)
	flipped[20] ^= 1
	if _, err := Verify(flipped, sig, pub); !errors.Is(err, ErrBadSignature) {
		t.Errorf("changed manifest: got %v, want ErrBadSignature", err)
	}
	if _, err := Verify(b[:len(b)-10], sig, pub); !errors.Is(err, ErrBadSignature) {
		t.Errorf("truncated manifest: got %v, want ErrBadSignature", err)
	}
	if _, err := Verify(b, sig[:20], pub); err == nil {
		t.Error("truncated signature accepted")
	}
	if _, err := Verify(b, []byte("not base64!\n"), pub); err == nil {
		t.Error("garbage signature accepted")
	}
	if _, err := Verify(b, sig, pub[:10]); err == nil {
		t.Error("short public key accepted")
	}
	// A validly signed but non-canonical manifest is still refused.
	loose := bytes.Replace(b, []byte(`,"version"`), []byte(`, "version"`), 1)
	if _, err := Verify(loose, Sign(loose, k), pub); !errors.Is(err, ErrNotCanonical) {
		t.Errorf("signed non-canonical manifest: got %v, want ErrNotCanonical", err)
	}
}

func FuzzParse(f *testing.F) {
	good, _ := sample().Marshal()
	f.Add(good)
	f.Add([]byte(`{"schema":"x"}`))
	f.Add([]byte(`[]`))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := Parse(b)
		if err != nil {
			return
		}
		// Whatever parses is canonical and valid.
		again, err := m.Marshal()
		if err != nil {
			t.Fatalf("parsed manifest does not marshal: %v", err)
		}
		if !bytes.Equal(again, b) {
			t.Fatalf("parsed manifest re-encodes differently")
		}
	})
}
