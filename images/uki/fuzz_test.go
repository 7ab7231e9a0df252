package uki

import (
	"bytes"
	"debug/pe"
	"os"
	"path/filepath"
	"testing"

	"github.com/dataembassy/embassy/internal/testenv"
)

// FuzzAssemble feeds hostile stub bytes to the PE parsing and validation and,
// when a stub is accepted, checks the UKI built from it parses back with
// debug/pe and holds the sections. It must never panic.
func FuzzAssemble(f *testing.F) {
	good := defaultSynth().build()
	f.Add(good)
	s := defaultSynth()
	s.symbols = true
	f.Add(s.build())
	s = defaultSynth()
	s.sections = 3
	f.Add(s.build())
	f.Add(good[:0x100])
	f.Add([]byte("MZ"))
	if m, _ := filepath.Glob(filepath.Join(testenv.CacheDir(f), "stub", "*.unpacked", "usr", "lib", "systemd", "boot", "efi", "linuxx64.efi.stub")); len(m) > 0 {
		// Only the headers: minimizing an input grown from the whole 80 KiB
		// stub takes the fuzzer most of a short run.
		if b, err := os.ReadFile(m[0]); err == nil && len(b) > 0x400 {
			f.Add(b[:0x400])
		}
	}
	secs := Sections{Linux: []byte("kernel"), OSRel: []byte("ID=x\n"), Cmdline: []byte("quiet"), Initrd: []byte("07070")}
	f.Fuzz(func(t *testing.T, stub []byte) {
		if len(stub) > 64<<10 { // larger inputs only slow the fuzzer down
			return
		}
		in := bytes.Clone(stub)
		img, err := Assemble(stub, secs)
		if !bytes.Equal(in, stub) {
			t.Fatal("Assemble modified its input")
		}
		if err != nil {
			return
		}
		pf, err := pe.NewFile(bytes.NewReader(img))
		if err != nil {
			t.Fatalf("accepted stub gave a UKI debug/pe rejects: %v", err)
		}
		want := secs.List()
		if len(pf.Sections) < len(want) {
			t.Fatalf("%d sections", len(pf.Sections))
		}
		for i, w := range want {
			sec := pf.Sections[len(pf.Sections)-len(want)+i]
			data, err := sec.Data()
			if err != nil || sec.Name != w.Name || int(sec.VirtualSize) != len(w.Data) || !bytes.Equal(data[:len(w.Data)], w.Data) {
				t.Fatalf("section %s: %v", w.Name, err)
			}
		}
	})
}
