package efiboot

import (
	"bytes"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/dataembassy/embassy/images/diskimage"
	"github.com/dataembassy/embassy/images/ovmfvars"
)

// unhex decodes hex with spaces and newlines allowed between bytes.
func unhex(t testing.TB, s string) []byte {
	t.Helper()
	s = strings.NewReplacer(" ", "", "\n", "", "\t", "").Replace(s)
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// The expected bytes below were written out by hand from UEFI 2.10 §3.1.3
// (EFI_LOAD_OPTION), §10.3.5.1 (Hard Drive), §10.3.5.4 (File Path) and
// §10.3.1 (End), and the GPT layout in images/diskimage.
const (
	// "\EFI\BOOT\BOOTX64.EFI" in UCS-2 with its NUL: 22 code units.
	bootPathUCS2 = `5c00 4500 4600 4900 5c00 4200 4f00 4f00 5400 5c00 4200 4f00 4f00 5400 5800 3600 3400 2e00 4500 4600 4900 0000`

	slotAEntryHex = `
		01000000 5e00              // Attributes ACTIVE, FilePathListLength 42+48+4 = 94
		6500 6d00 6200 6100 7300 7300 7900 2d00 6100 0000 // "embassy-a" NUL
		04 01 2a00 01000000        // HD (type 4, subtype 1), 42 bytes; partition 1
		0008000000000000           // start LBA 2048
		0000020000000000           // size 131072 LBAs
		8912f6d5 d548 454f ba95 1a12ce60dd08 // d5f61289-48d5-4f45-ba95-1a12ce60dd08, mixed-endian
		02 02                      // partition format GPT, signature type GUID
		04 04 3000                 // File (type 4, subtype 4), 4+44 bytes
		` + bootPathUCS2 + `
		7f ff 0400                 // End Entire`

	slotBEntryHex = `
		01000000 5e00
		6500 6d00 6200 6100 7300 7300 7900 2d00 6200 0000 // "embassy-b" NUL
		04 01 2a00 02000000        // partition 2
		0008020000000000           // start LBA 133120
		0000020000000000           // size 131072 LBAs
		0bb6f250 572d ce4d b536 2ddce0761b07 // 50f2b60b-2d57-4dce-b536-2ddce0761b07
		02 02
		04 04 3000
		` + bootPathUCS2 + `
		7f ff 0400`
)

// entryBytes decodes one of the tables above: hex, with // comments.
func entryBytes(t testing.TB, table string) []byte {
	t.Helper()
	var hexOnly []string
	for _, line := range strings.Split(table, "\n") {
		line, _, _ = strings.Cut(line, "//")
		hexOnly = append(hexOnly, line)
	}
	return unhex(t, strings.Join(hexOnly, " "))
}

func TestBootEntryForSlots(t *testing.T) {
	parts := diskimage.Layout().Partitions
	tests := []struct {
		name string
		part diskimage.Partition
		want string
	}{
		{"slot A", parts[0], slotAEntryHex},
		{"slot B", parts[1], slotBEntryHex},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			opt, err := BootEntryFor(tt.part)
			if err != nil {
				t.Fatal(err)
			}
			got, err := opt.Encode()
			if err != nil {
				t.Fatal(err)
			}
			want := entryBytes(t, tt.want)
			if len(want) != 6+20+94 {
				t.Fatalf("hand-written table has %d bytes, want 120", len(want))
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("encoded\n%x\nwant\n%x", got, want)
			}
			back, err := DecodeLoadOption(got)
			if err != nil {
				t.Fatal(err)
			}
			hd, err := back.FilePath[0].HardDrive()
			if err != nil {
				t.Fatal(err)
			}
			if hd.PartitionNumber != uint32(tt.part.Number) || hd.PartitionStart != tt.part.FirstLBA ||
				hd.PartitionStart+hd.PartitionSize-1 != tt.part.LastLBA || hd.PartitionGUID != tt.part.GUID {
				t.Errorf("decoded %v from partition %+v", hd, tt.part)
			}
			if p, err := back.FilePath[1].FilePath(); err != nil || p != `\EFI\BOOT\BOOTX64.EFI` {
				t.Errorf("file path %q, %v", p, err)
			}
		})
	}
}

func TestBootEntryForRefuses(t *testing.T) {
	good := diskimage.Layout().Partitions[1]
	tests := []struct {
		name   string
		change func(*diskimage.Partition)
		msg    string
	}{
		{"number 0", func(p *diskimage.Partition) { p.Number = 0 }, "partition number 0"},
		{"number 129", func(p *diskimage.Partition) { p.Number = 129 }, "partition number 129"},
		{"no GUID", func(p *diskimage.Partition) { p.GUID = GUID{} }, "no unique GUID"},
		{"reversed", func(p *diskimage.Partition) { p.LastLBA = p.FirstLBA - 1 }, "before it starts"},
		{"no name", func(p *diskimage.Partition) { p.Name = "" }, "no name"},
		{"name with NUL", func(p *diskimage.Partition) { p.Name = "a\x00b" }, "NUL"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := good
			tt.change(&p)
			_, err := BootEntryFor(p)
			if !errors.Is(err, ErrLoadOption) || !strings.Contains(err.Error(), tt.msg) {
				t.Fatalf("err = %v, want ErrLoadOption mentioning %q", err, tt.msg)
			}
		})
	}
}

// readFixture returns the data (after the attributes) of a variable in
// testdata/ovmf-efivars.
func readFixture(t testing.TB, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", "ovmf-efivars", name+"-"+ovmfvars.GlobalVariable.String()))
	if err != nil {
		t.Fatal(err)
	}
	return b[4:]
}

// TestDecodeOVMFEntries decodes the boot entries OVMF created itself
// (testdata/README.md) and checks them against GUIDs known from edk2.
func TestDecodeOVMFEntries(t *testing.T) {
	fvFile := func(guid string) Node {
		g := ovmfvars.MustGUID(guid)
		return Node{Type: TypeMedia, SubType: 0x06, Data: g[:]} // PIWG Firmware File, §10.3.5.6
	}
	dxeFV := ovmfvars.MustGUID("7cb8bdc9-f8eb-4f34-aaea-3ee4af6516a1")       // OVMF's DXEFV FvNameGuid
	fvVol := Node{Type: TypeMedia, SubType: 0x07, Data: dxeFV[:]}            // PIWG Firmware Volume, §10.3.5.7
	autoCreated := ovmfvars.MustGUID("8108ac4e-9f11-4d59-850e-e21a522c59b2") // edk2 BDS auto-created option
	tests := []struct {
		name string
		want LoadOption
	}{
		{"Boot0000", LoadOption{
			Attributes:  LoadOptionActive | LoadOptionHidden | LoadOptionCategoryApp,
			Description: "UiApp",
			FilePath:    []Node{fvVol, fvFile("462caa21-7614-4503-836e-8ab6f4662331")}, // UiApp
		}},
		{"Boot0001", LoadOption{
			Attributes:  LoadOptionActive,
			Description: "UEFI Misc Device",
			FilePath: []Node{
				{Type: TypeACPI, SubType: 0x01, Data: unhex(t, "d041030a 00000000")}, // PciRoot(0): _HID PNP0A03, _UID 0
				{Type: TypeHardware, SubType: 0x01, Data: unhex(t, "00 02")},         // Pci(0x2,0x0): function, device
				{Type: TypeHardware, SubType: 0x01, Data: unhex(t, "00 00")},         // Pci(0x0,0x0)
			},
			OptionalData: autoCreated[:],
		}},
		{"Boot0002", LoadOption{
			Attributes:  LoadOptionActive,
			Description: "EFI Internal Shell",
			FilePath:    []Node{fvVol, fvFile("7c04a583-9e3e-4f1c-ad65-e05268d0b4d1")}, // Shell
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			data := readFixture(t, tt.name)
			got, err := DecodeLoadOption(data)
			if err != nil {
				t.Fatal(err)
			}
			if !equalOptions(got, tt.want) {
				t.Errorf("decoded %+v\nwant    %+v", got, tt.want)
			}
			back, err := got.Encode()
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(back, data) {
				t.Errorf("re-encoded\n%x\nOVMF wrote\n%x", back, data)
			}
		})
	}
}

func equalOptions(a, b LoadOption) bool {
	if a.Attributes != b.Attributes || a.Description != b.Description ||
		!bytes.Equal(a.OptionalData, b.OptionalData) || len(a.FilePath) != len(b.FilePath) {
		return false
	}
	for i := range a.FilePath {
		x, y := a.FilePath[i], b.FilePath[i]
		if x.Type != y.Type || x.SubType != y.SubType || !bytes.Equal(x.Data, y.Data) {
			return false
		}
	}
	return true
}

func TestLoadOptionRoundTrip(t *testing.T) {
	slotB, err := BootEntryFor(diskimage.Layout().Partitions[1])
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		opt  LoadOption
	}{
		{"slot B", slotB},
		{"empty description and path", LoadOption{}},
		{"optional data", LoadOption{Attributes: 0x109, Description: "x", OptionalData: []byte{1, 2, 3}}},
		{"BMP characters", LoadOption{Description: "Ölkännchen €"}},
		{"two instances", LoadOption{Description: "multi", FilePath: []Node{
			{Type: TypeHardware, SubType: 1, Data: []byte{0, 1}},
			{Type: TypeEnd, SubType: SubTypeEndInstance},
			{Type: TypeHardware, SubType: 1, Data: []byte{0, 2}},
		}}},
		{"header-only node", LoadOption{FilePath: []Node{{Type: 0x05, SubType: 0x01}}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b, err := tt.opt.Encode()
			if err != nil {
				t.Fatal(err)
			}
			got, err := DecodeLoadOption(b)
			if err != nil {
				t.Fatal(err)
			}
			if !equalOptions(got, tt.opt) {
				t.Errorf("decoded %+v, want %+v", got, tt.opt)
			}
		})
	}
}

func TestDecodeLoadOptionRefuses(t *testing.T) {
	// "a" NUL is 61 00 00 00; End Entire is 7f ff 04 00.
	tests := []struct {
		name, hex, msg string
	}{
		{"empty", ``, "shorter than the 6-byte header"},
		{"header only", `01000000 0400`, "no terminating NUL"},
		{"odd description", `01000000 0400 61`, "no terminating NUL"},
		{"unterminated description", `01000000 0400 6100 6200`, "no terminating NUL"},
		{"surrogate", `01000000 0400 00d8 0000 7fff0400`, "surrogate"},
		{"path list past the end", `01000000 0800 6100 0000 7fff0400`, "FilePathListLength 8 but only 4 bytes"},
		{"path list empty", `01000000 0000 6100 0000`, "without an End Entire node"},
		{"path list of 3 bytes", `01000000 0300 6100 0000 7fff04`, "without an End Entire node"},
		{"node length 3", `01000000 0800 6100 0000 0401 0300 7fff0400`, "has length 3"},
		{"node length past list", `01000000 0800 6100 0000 0401 0900 7fff0400 00`, "has length 9"},
		{"node length 0 (would loop)", `01000000 0800 6100 0000 0401 0000 7fff0400`, "has length 0"},
		{"no End", `01000000 0400 6100 0000 0401 0400`, "without an End Entire node"},
		{"End Entire too long", `01000000 0500 6100 0000 7fff0500 00`, "End Entire node at byte 0 has length 5"},
		{"End before list end", `01000000 0800 6100 0000 7fff0400 7fff0400`, "End Entire node at byte 0 but FilePathListLength is 8"},
		{"unknown End subtype", `01000000 0800 6100 0000 7f02 0400 7fff0400`, "unknown subtype 0x02"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := DecodeLoadOption(unhex(t, tt.hex))
			if !errors.Is(err, ErrLoadOption) || !strings.Contains(err.Error(), tt.msg) {
				t.Fatalf("err = %v, want ErrLoadOption mentioning %q", err, tt.msg)
			}
		})
	}
}

func TestEncodeRefuses(t *testing.T) {
	tests := []struct {
		name string
		opt  LoadOption
		msg  string
	}{
		{"NUL in description", LoadOption{Description: "a\x00"}, "NUL at byte 1"},
		{"outside the BMP", LoadOption{Description: "🔑"}, "not a UCS-2 character"},
		{"invalid UTF-8", LoadOption{Description: "\xff"}, "not valid UTF-8"},
		{"End Entire inside", LoadOption{FilePath: []Node{{Type: TypeEnd, SubType: SubTypeEndEntire}}}, "End node of subtype 0xff"},
		{"node too large", LoadOption{FilePath: []Node{{Type: 1, SubType: 1, Data: make([]byte, 0xFFFC)}}}, "at most 65531 fit"},
		{"list too large", LoadOption{FilePath: []Node{
			{Type: 1, SubType: 1, Data: make([]byte, 0x8000)},
			{Type: 1, SubType: 1, Data: make([]byte, 0x8000)},
		}}, "exceeds FilePathListLength's 16 bits"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := tt.opt.Encode()
			if !errors.Is(err, ErrLoadOption) || !strings.Contains(err.Error(), tt.msg) {
				t.Fatalf("err = %v, want ErrLoadOption mentioning %q", err, tt.msg)
			}
		})
	}
}

func TestNodeAccessorsRefuse(t *testing.T) {
	hd := HardDrive{PartitionNumber: 1, PartitionGUID: diskimage.SlotAGUID}.Node()
	mbr := hd
	mbr.Data = bytes.Clone(hd.Data)
	mbr.Data[36], mbr.Data[37] = PartitionFormatMBR, SignatureTypeMBR
	file, err := FileNode(`\A`)
	if err != nil {
		t.Fatal(err)
	}
	padded := file
	padded.Data = append(bytes.Clone(file.Data), 0, 0)
	tests := []struct {
		name string
		fn   func() error
		msg  string
	}{
		{"file as HD", func() error { _, err := file.HardDrive(); return err }, "not a Hard Drive node"},
		{"short HD", func() error {
			_, err := (Node{Type: TypeMedia, SubType: SubTypeHardDrive, Data: hd.Data[:20]}).HardDrive()
			return err
		}, "24 bytes, want 42"},
		{"MBR HD", func() error { _, err := mbr.HardDrive(); return err }, "partition format 0x01"},
		{"HD as file", func() error { _, err := hd.FilePath(); return err }, "not a File Path node"},
		{"file with bytes after NUL", func() error { _, err := padded.FilePath(); return err }, "2 bytes after the NUL"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.fn()
			if !errors.Is(err, ErrLoadOption) || !strings.Contains(err.Error(), tt.msg) {
				t.Fatalf("err = %v, want ErrLoadOption mentioning %q", err, tt.msg)
			}
		})
	}
}

// FuzzDecodeLoadOption: whatever DecodeLoadOption accepts encodes back to
// exactly the input, and the node accessors never panic. The seeds are
// valid options (ours and OVMF's), so the fuzzer mutates past the length
// checks into the description, the nodes and the optional data.
func FuzzDecodeLoadOption(f *testing.F) {
	for _, p := range diskimage.Layout().Partitions {
		o, err := BootEntryFor(p)
		if err != nil {
			f.Fatal(err)
		}
		b, err := o.Encode()
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	for _, n := range []string{"Boot0000", "Boot0001", "Boot0002"} {
		f.Add(readFixture(f, n))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		o, err := DecodeLoadOption(b)
		if err != nil {
			if !errors.Is(err, ErrLoadOption) {
				t.Fatalf("error %v does not wrap ErrLoadOption", err)
			}
			return
		}
		for _, n := range o.FilePath {
			_ = n.String()
		}
		back, err := o.Encode()
		if err != nil {
			t.Fatalf("decoded %+v but cannot encode it: %v", o, err)
		}
		if !bytes.Equal(back, b) {
			t.Fatalf("round trip changed\n%x\ninto\n%x", b, back)
		}
	})
}
