package efiboot

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/dataembassy/embassy/images/diskimage"
)

// file is the efivarfs form of a variable: attributes, then data.
func file(attrs uint32, data []byte) []byte {
	return append(binary.LittleEndian.AppendUint32(nil, attrs), data...)
}

func order(nums ...uint16) []byte {
	var b []byte
	for _, n := range nums {
		b = binary.LittleEndian.AppendUint16(b, n)
	}
	return file(AttrNVBSRT, b)
}

func varFile(name string) string { return name + "-" + GlobalVariable.String() }

// fakeVars makes a temporary directory standing in for efivarfs with the
// given files (name without the GUID suffix -> contents).
func fakeVars(t *testing.T, files map[string][]byte) (*Vars, string) {
	t.Helper()
	dir := t.TempDir()
	for name, b := range files {
		if err := os.WriteFile(filepath.Join(dir, varFile(name)), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	v, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	return v, dir
}

// ovmfFiles returns the efivarfs files of testdata/ovmf-efivars.
func ovmfFiles(t *testing.T) map[string][]byte {
	t.Helper()
	files := map[string][]byte{}
	for _, n := range []string{"Boot0000", "Boot0001", "Boot0002", "BootOrder"} {
		files[n] = file(AttrNVBSRT, readFixture(t, n))
	}
	return files
}

// snapshot returns every file of dir by name (GUID suffix removed).
func snapshot(t *testing.T, dir string) map[string][]byte {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string][]byte{}
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		out[strings.TrimSuffix(e.Name(), "-"+GlobalVariable.String())] = b
	}
	return out
}

func slotB(t *testing.T) (LoadOption, []byte) {
	t.Helper()
	o, err := BootEntryFor(diskimage.Layout().Partitions[1])
	if err != nil {
		t.Fatal(err)
	}
	b, err := o.Encode()
	if err != nil {
		t.Fatal(err)
	}
	return o, b
}

func TestOpenRefusesNonDirectory(t *testing.T) {
	f := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(f, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, dir := range []string{f, filepath.Join(t.TempDir(), "missing")} {
		if _, err := Open(dir); err == nil {
			t.Errorf("Open(%s) succeeded", dir)
		}
	}
}

func TestReadWriteDelete(t *testing.T) {
	v, dir := fakeVars(t, nil)
	tests := []struct {
		name string
		data []byte
	}{
		{"long", bytes.Repeat([]byte{0xAB}, 100)},
		{"shorter overwrite", []byte{1, 2}},
		{"empty", nil},
		{"largest", bytes.Repeat([]byte{7}, MaxDataSize)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := v.Write("Test", GlobalVariable, tt.data); err != nil {
				t.Fatal(err)
			}
			raw, err := os.ReadFile(filepath.Join(dir, varFile("Test")))
			if err != nil {
				t.Fatal(err)
			}
			if want := file(AttrNVBSRT, tt.data); !bytes.Equal(raw, want) {
				t.Fatalf("file holds %x, want %x", raw, want)
			}
			got, err := v.Read("Test", GlobalVariable)
			if err != nil {
				t.Fatal(err)
			}
			if got.Attributes != AttrNVBSRT || !bytes.Equal(got.Data, tt.data) {
				t.Fatalf("read %#x %x", got.Attributes, got.Data)
			}
		})
	}
	if err := v.Write("Test", GlobalVariable, make([]byte, MaxDataSize+1)); err == nil {
		t.Error("wrote more than MaxDataSize")
	}
	if err := v.Delete("Test", GlobalVariable); err != nil {
		t.Fatal(err)
	}
	if _, err := v.Read("Test", GlobalVariable); !errors.Is(err, ErrNotFound) {
		t.Fatalf("read after delete: %v, want ErrNotFound", err)
	}
	if err := v.Delete("Test", GlobalVariable); !errors.Is(err, ErrNotFound) {
		t.Fatalf("second delete: %v, want ErrNotFound", err)
	}
}

func TestReadRefuses(t *testing.T) {
	tests := []struct {
		name    string
		varName string
		content []byte // nil: no file
		is      error
		msg     string
	}{
		{"missing", "Nope", nil, ErrNotFound, "Nope"},
		{"empty file", "Empty", []byte{}, ErrVariable, "0 bytes, shorter than the 4-byte attributes"},
		{"3 bytes", "Short", []byte{7, 0, 0}, ErrVariable, "3 bytes"},
		{"oversized", "Big", file(AttrNVBSRT, make([]byte, MaxDataSize+1)), ErrVariable, "more than 8192 bytes"},
		{"unknown attributes", "Odd", file(0x107, nil), ErrVariable, "unknown attribute bits 0x100 in 0x107"},
		{"slash in name", "a/b", nil, ErrName, `character '/'`},
		{"dot dot", "..", nil, ErrName, `character '.'`},
		{"empty name", "", nil, ErrName, "1-64 characters"},
		{"long name", strings.Repeat("A", 65), nil, ErrName, "1-64 characters"},
	}
	files := map[string][]byte{}
	for _, tt := range tests {
		if tt.content != nil {
			files[tt.varName] = tt.content
		}
	}
	v, _ := fakeVars(t, files)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := v.Read(tt.varName, GlobalVariable)
			if !errors.Is(err, tt.is) || !strings.Contains(err.Error(), tt.msg) {
				t.Fatalf("err = %v, want %v mentioning %q", err, tt.is, tt.msg)
			}
		})
	}
}

// TestListedEntriesAreNeverTouched: BootOrder and every Boot#### it lists
// cannot be written or deleted, and a BootOrder that cannot be read
// protects every Boot#### entry.
func TestListedEntriesAreNeverTouched(t *testing.T) {
	tests := []struct {
		name   string
		files  map[string][]byte
		target string
		is     error
	}{
		{"BootOrder", ovmfFiles(t), "BootOrder", ErrListed},
		{"listed Boot0001", ovmfFiles(t), "Boot0001", ErrListed},
		{"listed Boot0002", ovmfFiles(t), "Boot0002", ErrListed},
		{"listed hidden Boot0000 (UiApp)", ovmfFiles(t), "Boot0000", ErrListed},
		{"listed but missing", map[string][]byte{"BootOrder": order(5)}, "Boot0005", ErrListed},
		{"corrupt BootOrder", map[string][]byte{"BootOrder": file(AttrNVBSRT, []byte{1}), "Boot0003": file(AttrNVBSRT, nil)}, "Boot0003", ErrVariable},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			v, dir := fakeVars(t, tt.files)
			if err := v.Write(tt.target, GlobalVariable, []byte{1, 2}); !errors.Is(err, tt.is) {
				t.Errorf("Write: %v, want %v", err, tt.is)
			}
			if err := v.Delete(tt.target, GlobalVariable); !errors.Is(err, tt.is) {
				t.Errorf("Delete: %v, want %v", err, tt.is)
			}
			if got := snapshot(t, dir); !maps.EqualFunc(got, tt.files, bytes.Equal) {
				t.Errorf("files changed")
			}
		})
	}
	// Boot0003 is not listed by OVMF's BootOrder and may be written.
	v, _ := fakeVars(t, ovmfFiles(t))
	if err := v.Write("Boot0003", GlobalVariable, []byte{1}); err != nil {
		t.Errorf("unlisted Boot0003: %v", err)
	}
}

func TestEnsureBootEntry(t *testing.T) {
	_, want := slotB(t)
	other := file(AttrNVBSRT, append(bytes.Clone(want[:len(want)-4]), 0x7f, 0xff, 0x04, 0x00, 0xEE)) // same path, optional data
	tests := []struct {
		name    string
		files   map[string][]byte
		want    uint16
		created bool
	}{
		{"OVMF's variables: 0000-0002 listed", ovmfFiles(t), 3, true},
		{"nothing at all", nil, 0, true},
		{"listed number without a variable is skipped", map[string][]byte{"BootOrder": order(0, 1), "Boot0001": other}, 2, true},
		{"identical unlisted entry reused", map[string][]byte{"BootOrder": order(1), "Boot0001": other, "Boot0007": file(AttrNVBSRT, want)}, 7, false},
		{"identical listed entry not used", map[string][]byte{"BootOrder": order(0), "Boot0000": file(AttrNVBSRT, want)}, 1, true},
		{"similar entry not reused", map[string][]byte{"Boot0000": other}, 1, true},
		{"corrupt unlisted entry skipped, kept", map[string][]byte{"Boot0000": {1, 2}, "Boot0001": file(0x8000, want)}, 2, true},
		{"lower-case name is not Boot####", map[string][]byte{"Boot000a": file(AttrNVBSRT, want)}, 0, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			v, dir := fakeVars(t, tt.files)
			num, err := EnsureBootEntry(v, mustSlotB(t))
			if err != nil {
				t.Fatal(err)
			}
			if num != tt.want {
				t.Fatalf("got Boot%04X, want Boot%04X", num, tt.want)
			}
			after := snapshot(t, dir)
			wantFiles := maps.Clone(tt.files)
			if wantFiles == nil {
				wantFiles = map[string][]byte{}
			}
			if tt.created {
				wantFiles[BootName(tt.want)] = file(AttrNVBSRT, want)
			}
			if !maps.EqualFunc(after, wantFiles, bytes.Equal) {
				t.Fatalf("files after: %v\nwant %v", keys(after), keys(wantFiles))
			}
			// A second call finds the entry it made.
			again, err := EnsureBootEntry(v, mustSlotB(t))
			if err != nil || again != num {
				t.Fatalf("second call: Boot%04X, %v", again, err)
			}
			if got := snapshot(t, dir); !maps.EqualFunc(got, after, bytes.Equal) {
				t.Fatal("second call changed files")
			}
		})
	}
}

func mustSlotB(t *testing.T) LoadOption {
	o, _ := slotB(t)
	return o
}

// keys lists a snapshot for error messages.
func keys(m map[string][]byte) []string {
	var out []string
	for k, v := range m {
		out = append(out, fmt.Sprintf("%s(%d bytes)", k, len(v)))
	}
	slices.Sort(out)
	return out
}

func TestEnsureBootEntryRefuses(t *testing.T) {
	tests := []struct {
		name  string
		files map[string][]byte
		opt   LoadOption
		is    error
	}{
		{"odd BootOrder", map[string][]byte{"BootOrder": file(AttrNVBSRT, []byte{1, 0, 2})}, mustSlotB(t), ErrVariable},
		{"oversized BootOrder", map[string][]byte{"BootOrder": file(AttrNVBSRT, make([]byte, MaxDataSize+2))}, mustSlotB(t), ErrVariable},
		{"short BootOrder file", map[string][]byte{"BootOrder": {7}}, mustSlotB(t), ErrVariable},
		{"invalid option", nil, LoadOption{Description: "\x00"}, ErrLoadOption},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			v, dir := fakeVars(t, tt.files)
			if _, err := EnsureBootEntry(v, tt.opt); !errors.Is(err, tt.is) {
				t.Fatalf("err = %v, want %v", err, tt.is)
			}
			if got := snapshot(t, dir); len(got) != len(tt.files) {
				t.Fatalf("files changed: %v", keys(got))
			}
		})
	}
}

func TestBootNext(t *testing.T) {
	v, dir := fakeVars(t, ovmfFiles(t))
	if _, ok, err := BootNext(v); ok || err != nil {
		t.Fatalf("BootNext before: %v %v", ok, err)
	}
	num, err := EnsureBootEntry(v, mustSlotB(t))
	if err != nil {
		t.Fatal(err)
	}
	before := snapshot(t, dir)
	refusals := []struct {
		name string
		num  uint16
		is   error
	}{
		{"listed", 1, ErrListed},
		{"missing", 9, ErrNotFound},
	}
	for _, tt := range refusals {
		t.Run(tt.name, func(t *testing.T) {
			if err := SetBootNext(v, tt.num); !errors.Is(err, tt.is) {
				t.Fatalf("SetBootNext(%d): %v, want %v", tt.num, err, tt.is)
			}
		})
	}
	if err := os.WriteFile(filepath.Join(dir, varFile("Boot0009")), file(AttrNVBSRT, []byte{1, 0, 0, 0, 9, 0}), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := SetBootNext(v, 9); !errors.Is(err, ErrLoadOption) {
		t.Fatalf("SetBootNext to a corrupt entry: %v, want ErrLoadOption", err)
	}
	if err := os.Remove(filepath.Join(dir, varFile("Boot0009"))); err != nil {
		t.Fatal(err)
	}
	if got := snapshot(t, dir); !maps.EqualFunc(got, before, bytes.Equal) {
		t.Fatal("refused SetBootNext changed files")
	}

	if err := SetBootNext(v, num); err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile(filepath.Join(dir, varFile("BootNext")))
	if err != nil {
		t.Fatal(err)
	}
	if want := file(AttrNVBSRT, []byte{byte(num), 0}); !bytes.Equal(raw, want) {
		t.Fatalf("BootNext file %x, want %x", raw, want)
	}
	if got, ok, err := BootNext(v); got != num || !ok || err != nil {
		t.Fatalf("BootNext = %d %v %v", got, ok, err)
	}
	if err := ClearBootNext(v); err != nil {
		t.Fatal(err)
	}
	if err := ClearBootNext(v); err != nil {
		t.Fatalf("clearing no BootNext: %v", err)
	}
	if got := snapshot(t, dir); !maps.EqualFunc(got, before, bytes.Equal) {
		t.Fatal("files differ after SetBootNext and ClearBootNext")
	}
}

func TestBootCurrent(t *testing.T) {
	tests := []struct {
		name    string
		content []byte
		want    uint16
		is      error
	}{
		{"Boot0001", file(AttrBootserviceAccess|AttrRuntimeAccess, []byte{1, 0}), 1, nil},
		{"Boot1234", file(AttrBootserviceAccess|AttrRuntimeAccess, []byte{0x34, 0x12}), 0x1234, nil},
		{"missing", nil, 0, ErrNotFound},
		{"one byte", file(AttrBootserviceAccess|AttrRuntimeAccess, []byte{1}), 0, ErrVariable},
		{"three bytes", file(AttrBootserviceAccess|AttrRuntimeAccess, []byte{1, 0, 0}), 0, ErrVariable},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			files := map[string][]byte{}
			if tt.content != nil {
				files["BootCurrent"] = tt.content
			}
			v, _ := fakeVars(t, files)
			got, err := BootCurrent(v)
			if !errors.Is(err, tt.is) || (tt.is == nil && err != nil) {
				t.Fatalf("err = %v, want %v", err, tt.is)
			}
			if got != tt.want {
				t.Fatalf("BootCurrent = %#x, want %#x", got, tt.want)
			}
		})
	}
}

func TestBootNameRoundTrip(t *testing.T) {
	for _, n := range []uint16{0, 1, 0xA, 0xBEEF, 0xFFFF} {
		got, ok := parseBootName(BootName(n))
		if !ok || got != n {
			t.Errorf("%s -> %#x %v", BootName(n), got, ok)
		}
	}
	for _, s := range []string{"Boot000a", "Boot00001", "Boot001", "BootOrder", "Boot-001", "boot0001", "Boot00G0"} {
		if _, ok := parseBootName(s); ok {
			t.Errorf("%q parsed as a Boot#### name", s)
		}
	}
}
