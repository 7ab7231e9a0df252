package uki

import (
	"bytes"
	"context"
	"crypto/sha256"
	"debug/pe"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/dataembassy/embassy/images/debstub"
	"github.com/dataembassy/embassy/internal/testenv"
)

// debianStub returns the bytes of Debian's systemd-stub, fetching the
// package into the build cache if needed, or skips the test.
func debianStub(t testing.TB) []byte {
	t.Helper()
	s, err := (&debstub.Fetcher{CacheDir: testenv.CacheDir(t)}).Fetch(context.Background())
	if err != nil {
		t.Skipf("no systemd-stub: cannot fetch %s (no network to the Debian mirror?): %v", debstub.Package, err)
	}
	b, err := os.ReadFile(s.Path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte(i*7) + byte(i>>9)
	}
	return b
}

func testSections() Sections {
	return Sections{
		Linux:   pattern(70001, 1),
		OSRel:   []byte("ID=embassy\nVERSION_ID=3\n"),
		Cmdline: []byte("console=ttyS0 panic=-1"),
		Initrd:  pattern(12345, 9),
	}
}

type stubCase struct {
	name string
	stub func(t *testing.T) []byte
}

func stubs() []stubCase {
	return []stubCase{
		{"synthetic", func(*testing.T) []byte { return defaultSynth().build() }},
		{"synthetic with symbol table", func(*testing.T) []byte {
			s := defaultSynth()
			s.symbols = true
			return s.build()
		}},
		{"synthetic, headers full but SizeOfHeaders unaligned", func(*testing.T) []byte {
			// 0x2c8 rounds up to 0x400: ukify's way of making room.
			s := defaultSynth()
			s.headers = 0x400
			b := s.build()
			binary.LittleEndian.PutUint32(b[0x44+coffSize+optSizeOfHeaders:], 0x2c8)
			return b
		}},
		{"debian", func(t *testing.T) []byte { return debianStub(t) }},
	}
}

func TestAssemble(t *testing.T) {
	secs := testSections()
	for _, tc := range stubs() {
		t.Run(tc.name, func(t *testing.T) {
			stub := tc.stub(t)
			img, err := Assemble(stub, secs)
			if err != nil {
				t.Fatal(err)
			}
			again, err := Assemble(bytes.Clone(stub), Sections{
				Linux: bytes.Clone(secs.Linux), OSRel: bytes.Clone(secs.OSRel),
				Cmdline: bytes.Clone(secs.Cmdline), Initrd: bytes.Clone(secs.Initrd),
			})
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(img, again) {
				t.Fatal("two assemblies of the same inputs differ")
			}
			checkImage(t, stub, img, secs)
		})
	}
}

// checkImage parses img back with debug/pe and checks the stub's sections are
// unchanged, the new ones hold the inputs, and the headers add up.
func checkImage(t *testing.T, stub, img []byte, secs Sections) {
	t.Helper()
	orig, err := pe.NewFile(bytes.NewReader(stub))
	if err != nil {
		t.Fatal(err)
	}
	f, err := pe.NewFile(bytes.NewReader(img))
	if err != nil {
		t.Fatalf("UKI does not parse: %v", err)
	}
	oh := f.OptionalHeader.(*pe.OptionalHeader64)
	want := secs.List()
	if len(f.Sections) != len(orig.Sections)+len(want) {
		t.Fatalf("%d sections, want %d+%d", len(f.Sections), len(orig.Sections), len(want))
	}
	for i, s := range orig.Sections {
		a, _ := s.Data()
		b, _ := f.Sections[i].Data()
		if s.Name != f.Sections[i].Name || !bytes.Equal(a, b) {
			t.Errorf("stub section %d (%s) changed", i, s.Name)
		}
	}
	prevEnd := uint32(0)
	for _, s := range orig.Sections {
		prevEnd = max(prevEnd, s.VirtualAddress+s.VirtualSize)
	}
	for i, w := range want {
		s := f.Sections[len(orig.Sections)+i]
		data, err := s.Data()
		if err != nil {
			t.Fatal(err)
		}
		if s.Name != w.Name || s.VirtualSize != uint32(len(w.Data)) || !bytes.Equal(data[:s.VirtualSize], w.Data) {
			t.Errorf("section %d: %s, %d bytes; want %s, %d bytes", i, s.Name, s.VirtualSize, w.Name, len(w.Data))
		}
		if len(bytes.Trim(data[s.VirtualSize:], "\x00")) != 0 {
			t.Errorf("%s: padding not zero", s.Name)
		}
		if s.Offset%oh.FileAlignment != 0 || s.Size%oh.FileAlignment != 0 || s.VirtualAddress%oh.SectionAlignment != 0 {
			t.Errorf("%s: misaligned: raw %#x+%#x at %#x", s.Name, s.Offset, s.Size, s.VirtualAddress)
		}
		if s.VirtualAddress < prevEnd {
			t.Errorf("%s at %#x overlaps the section before (ends %#x)", s.Name, s.VirtualAddress, prevEnd)
		}
		prevEnd = s.VirtualAddress + s.VirtualSize
	}
	if oh.SizeOfImage%oh.SectionAlignment != 0 || oh.SizeOfImage < prevEnd {
		t.Errorf("SizeOfImage %#x, last section ends %#x", oh.SizeOfImage, prevEnd)
	}
	last := f.Sections[len(f.Sections)-1]
	if int(last.Offset+last.Size) != len(img) {
		t.Errorf("image is %d bytes, last section ends at %d", len(img), last.Offset+last.Size)
	}
	if oh.SizeOfHeaders%oh.FileAlignment != 0 {
		t.Errorf("SizeOfHeaders %#x not FileAlignment-aligned", oh.SizeOfHeaders)
	}
	z := bytes.Clone(img)
	off := int(binary.LittleEndian.Uint32(img[dosLfanew:])) + 4 + coffSize + optCheckSum
	binary.LittleEndian.PutUint32(z[off:], 0)
	if got := checksum(z); got != oh.CheckSum {
		t.Errorf("CheckSum %#x, want %#x", oh.CheckSum, got)
	}
	if f.FileHeader.PointerToSymbolTable != 0 && int(f.FileHeader.PointerToSymbolTable) >= int(last.Offset) {
		t.Errorf("symbol table pointer %#x points into section data", f.FileHeader.PointerToSymbolTable)
	}
}

// TestObjdumpListsSections cross-checks the layout with binutils.
func TestObjdumpListsSections(t *testing.T) {
	objdump, err := exec.LookPath("objdump")
	if err != nil {
		t.Skip("objdump (binutils) not installed")
	}
	secs := testSections()
	for _, tc := range stubs() {
		t.Run(tc.name, func(t *testing.T) {
			img, err := Assemble(tc.stub(t), secs)
			if err != nil {
				t.Fatal(err)
			}
			p := filepath.Join(t.TempDir(), "uki.efi")
			if err := os.WriteFile(p, img, 0o644); err != nil {
				t.Fatal(err)
			}
			out, err := exec.Command(objdump, "-h", p).CombinedOutput()
			if err != nil {
				t.Fatalf("objdump -h: %v\n%s", err, out)
			}
			if !strings.Contains(string(out), "pei-x86-64") {
				t.Errorf("objdump does not see a pei-x86-64 image:\n%s", out)
			}
			for _, s := range secs.List() {
				// "  9 .initrd       00003039  ..." : name then size in hex.
				found := false
				for _, line := range strings.Split(string(out), "\n") {
					f := strings.Fields(line)
					if len(f) >= 3 && f[1] == s.Name {
						found = true
						if want := hex.EncodeToString(binary.BigEndian.AppendUint32(nil, uint32(len(s.Data)))); f[2] != want {
							t.Errorf("objdump: %s size %s, want %s", s.Name, f[2], want)
						}
					}
				}
				if !found {
					t.Errorf("objdump -h does not list %s:\n%s", s.Name, out)
				}
			}
		})
	}
}

func TestChecksumMatchesDebianStub(t *testing.T) {
	stub := debianStub(t)
	f, err := pe.NewFile(bytes.NewReader(stub))
	if err != nil {
		t.Fatal(err)
	}
	want := f.OptionalHeader.(*pe.OptionalHeader64).CheckSum
	if want == 0 {
		t.Skip("stub carries no checksum")
	}
	z := bytes.Clone(stub)
	off := int(binary.LittleEndian.Uint32(stub[dosLfanew:])) + 4 + coffSize + optCheckSum
	binary.LittleEndian.PutUint32(z[off:], 0)
	if got := checksum(z); got != want {
		t.Errorf("checksum %#x, stub says %#x", got, want)
	}
}

func TestMalformedStubs(t *testing.T) {
	good := defaultSynth().build()
	mod := func(f func(*synth)) []byte {
		s := defaultSynth()
		f(&s)
		return s.build()
	}
	cases := []struct {
		name string
		stub []byte
		want error
	}{
		{"empty", nil, ErrNotPE},
		{"truncated DOS header", good[:0x30], ErrNotPE},
		{"truncated in PE header", good[:0x50], ErrNotPE},
		{"truncated in optional header", good[:0x44+coffSize+100], ErrNotPE},
		{"truncated in section table", good[:0x44+coffSize+240+20], ErrNotPE},
		{"truncated section data", good[:0x400+0x10], ErrNotPE},
		{"ELF", append([]byte("\x7fELF\x02\x01\x01"), make([]byte, 200)...), ErrNotPE},
		{"MZ without PE", append([]byte("MZ"), make([]byte, 200)...), ErrNotPE},
		{"PE32", mod(func(s *synth) { s.magic = 0x10b }), ErrUnsupportedStub},
		{"ROM image magic", mod(func(s *synth) { s.magic = 0x107 }), ErrUnsupportedStub},
		{"arm64", mod(func(s *synth) { s.machine = 0xaa64 }), ErrUnsupportedStub},
		{"i386", mod(func(s *synth) { s.machine = 0x14c }), ErrUnsupportedStub},
		{"Windows console", mod(func(s *synth) { s.subsystem = 3 }), ErrUnsupportedStub},
		{"EFI boot service driver", mod(func(s *synth) { s.subsystem = 11 }), ErrUnsupportedStub},
		{"signed", mod(func(s *synth) { s.signed = true }), ErrSignedStub},
		{"already a UKI", mod(func(s *synth) { s.firstSection = ".linux" }), ErrAlreadyUKI},
		{"has .pcrsig", mod(func(s *synth) { s.firstSection = ".pcrsig" }), ErrAlreadyUKI},
		// 0x400 of headers hold the section table at 0x15c: 15 sections fit.
		{"no room for headers", mod(func(s *synth) { s.sections = 14 }), ErrNoHeaderRoom},
		{"no room, headers 0x200", mod(func(s *synth) { s.headers = 0x200; s.sections = 3 }), ErrNoHeaderRoom},
		{"header slack in use", func() []byte {
			b := bytes.Clone(good)
			b[0x44+coffSize+240+sectionHeaderSize+5] = 1
			return b
		}(), ErrNoHeaderRoom},
		{"FileAlignment 3", func() []byte {
			b := bytes.Clone(good)
			binary.LittleEndian.PutUint32(b[0x44+coffSize+optFileAlign:], 3)
			return b
		}(), ErrNotPE},
		{"SizeOfHeaders beyond file", func() []byte {
			b := bytes.Clone(good)
			binary.LittleEndian.PutUint32(b[0x44+coffSize+optSizeOfHeaders:], 0x10000)
			return b
		}(), ErrNotPE},
		{"no sections", mod(func(s *synth) { s.sections = 0 }), ErrNotPE},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Assemble(tc.stub, testSections())
			if !errors.Is(err, tc.want) {
				t.Fatalf("error %v, want %v", err, tc.want)
			}
			t.Log(err)
		})
	}
	// The same stub with fewer sections does fit.
	if _, err := Assemble(mod(func(s *synth) { s.sections = 11 }), testSections()); err != nil {
		t.Errorf("11+4 sections in 0x400 of headers: %v", err)
	}
	if _, err := Assemble(good, Sections{OSRel: []byte("ID=x\n")}); err == nil {
		t.Error("UKI without a kernel accepted")
	}
}

func TestEmptySectionsLeftOut(t *testing.T) {
	img, err := Assemble(defaultSynth().build(), Sections{Linux: []byte("kernel")})
	if err != nil {
		t.Fatal(err)
	}
	f, err := pe.NewFile(bytes.NewReader(img))
	if err != nil {
		t.Fatal(err)
	}
	if n := len(f.Sections); n != 2 || f.Sections[1].Name != ".linux" {
		t.Errorf("%d sections, last %s; want .text and .linux", n, f.Sections[n-1].Name)
	}
	if f.Sections[1].Characteristics != scnMemRead|scnCntCode {
		t.Errorf(".linux characteristics %#x", f.Sections[1].Characteristics)
	}
}

const systemdMeasure = "/usr/lib/systemd/systemd-measure"

// TestPCR11MatchesSystemdMeasure compares the prediction with systemd's own
// calculation. `--phase=` asks for the value right after the stub's
// measurements; without it systemd-measure goes on with the phase strings
// systemd-pcrphase would extend (the first is "enter-initrd").
func TestPCR11MatchesSystemdMeasure(t *testing.T) {
	if _, err := os.Stat(systemdMeasure); err != nil {
		t.Skipf("%s not installed", systemdMeasure)
	}
	full := testSections()
	cases := []struct {
		name string
		s    Sections
	}{
		{"all four", full},
		{"kernel only", Sections{Linux: full.Linux}},
		{"no initrd", Sections{Linux: full.Linux, OSRel: full.OSRel, Cmdline: full.Cmdline}},
		{"cmdline with newline", Sections{Linux: full.Linux, Cmdline: []byte("quiet\n"), Initrd: full.Initrd}},
		{"one-byte sections", Sections{Linux: []byte{0}, OSRel: []byte{1}, Cmdline: []byte{2}, Initrd: []byte{3}}},
	}
	if k, ok := realKernel(t); ok {
		cases = append(cases, struct {
			name string
			s    Sections
		}{"Debian kernel", Sections{Linux: k, OSRel: full.OSRel, Cmdline: full.Cmdline, Initrd: full.Initrd}})
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			args := []string{"calculate", "--bank=sha256"}
			for _, s := range tc.s.List() {
				p := filepath.Join(dir, strings.TrimPrefix(s.Name, "."))
				if err := os.WriteFile(p, s.Data, 0o644); err != nil {
					t.Fatal(err)
				}
				args = append(args, "--"+strings.TrimPrefix(s.Name, ".")+"="+p)
			}
			pred := PredictPCR11(tc.s)
			if got := measure(t, append(args, "--phase=")...); got != pred {
				t.Errorf("PredictPCR11 %x, systemd-measure %x", pred, got)
			}
			afterPhase := Extend(pred, sha256.Sum256([]byte("enter-initrd")))
			if got := measure(t, args...); got != afterPhase {
				t.Errorf("after enter-initrd: predicted %x, systemd-measure %x", afterPhase, got)
			}
		})
	}
}

// measure runs systemd-measure and returns the first PCR 11 value it prints.
func measure(t *testing.T, args ...string) [32]byte {
	t.Helper()
	out, err := exec.Command(systemdMeasure, args...).Output()
	if err != nil {
		t.Fatalf("systemd-measure %v: %v", args, err)
	}
	for _, line := range strings.Split(string(out), "\n") {
		if v, ok := strings.CutPrefix(line, "11:sha256="); ok {
			b, err := hex.DecodeString(strings.TrimSpace(v))
			if err != nil || len(b) != 32 {
				t.Fatalf("systemd-measure printed %q", line)
			}
			return [32]byte(b)
		}
	}
	t.Fatalf("no 11:sha256= line in %q", out)
	return [32]byte{}
}

func realKernel(t *testing.T) ([]byte, bool) {
	m, _ := filepath.Glob(filepath.Join(testenv.CacheDir(t), "kernel", "*.unpacked", "boot", "vmlinuz-*"))
	if len(m) == 0 {
		return nil, false
	}
	b, err := os.ReadFile(m[len(m)-1])
	return b, err == nil
}

func TestPCR11Events(t *testing.T) {
	ev := PCR11Events(Sections{Initrd: []byte("i"), Linux: []byte("k"), Cmdline: []byte("c")})
	var got []string
	for _, e := range ev {
		got = append(got, string(e.Data))
	}
	want := []string{".linux\x00", "k", ".cmdline\x00", "c", ".initrd\x00", "i"}
	if strings.Join(got, "|") != strings.Join(want, "|") {
		t.Errorf("events %q, want %q", got, want)
	}
}
