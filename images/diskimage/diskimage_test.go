package diskimage

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// The SHA-256 of the GPT (LBA 0-33 and the last 33 sectors) of every
// embassy.img. The firmware measures the GPT into PCR 5: a change here
// changes PCR 5 on every server and needs a new policy.
const gptSHA256 = "e8ce36f2343584c6d12852e75f002d55b92f91bf2726616697322636f4701ec8"

// The SHA-256 of the image of pseudoRandom(3_000_000, 1): any change to
// the bytes written (FAT32 layout included) shows here.
const imageSHA256 = "1b46007176d4776b48f3229e3feb403e1d33da3c698d05cfdc1506e16811cb58"

func writeImage(t *testing.T, uki []byte) (string, *os.File) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "embassy.img")
	if err := Write(path, uki); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return path, f
}

func fileSHA256(t *testing.T, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// TestReproducible writes the image twice, to two files and to memory, and
// compares them, and compares the GPT and the whole image with the pinned
// hashes.
func TestReproducible(t *testing.T) {
	uki := pseudoRandom(3_000_000, 1)
	p1, f := writeImage(t, uki)
	p2, _ := writeImage(t, bytes.Clone(uki))
	h1, h2 := fileSHA256(t, p1), fileSHA256(t, p2)
	if h1 != h2 {
		t.Fatalf("two builds differ: %s, %s", h1, h2)
	}
	mem := make([]byte, ImageSize)
	if err := Build(memWriter(mem), []File{{Path: BootPath, Data: uki}}); err != nil {
		t.Fatal(err)
	}
	if h := sha256.Sum256(mem); hex.EncodeToString(h[:]) != h1 {
		t.Fatalf("image in memory %x, in a file %s", h, h1)
	}
	if fi, _ := f.Stat(); fi.Size() != ImageSize || fi.Mode().Perm() != 0o644 {
		t.Fatalf("size %d, mode %v", fi.Size(), fi.Mode())
	}
	gpt := sha256.New()
	gpt.Write(mem[:34*SectorSize])
	gpt.Write(mem[ImageSize-33*SectorSize:])
	if got := hex.EncodeToString(gpt.Sum(nil)); got != gptSHA256 {
		t.Errorf("GPT SHA-256 %s, pinned %s (PCR 5 changes)", got, gptSHA256)
	}
	if h1 != imageSHA256 {
		t.Errorf("image SHA-256 %s, pinned %s", h1, imageSHA256)
	}
}

// TestRoundTrip writes UKIs of sizes around cluster boundaries and the
// limit and reads them back with Inspect and ReadFile.
func TestRoundTrip(t *testing.T) {
	for _, size := range []int{1, 511, 512, 513, 3_000_000, 16<<20 + 123, MaxUKISize} {
		t.Run(fmt.Sprint(size), func(t *testing.T) {
			uki := pseudoRandom(size, uint64(size))
			_, f := writeImage(t, uki)
			d, err := Inspect(f, ImageSize)
			if err != nil {
				t.Fatal(err)
			}
			if err := CheckLayout(d); err != nil {
				t.Fatal(err)
			}
			got, err := ReadFile(d.Partitions[0].Open(f), BootPath)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, uki) {
				t.Fatalf("read back %d bytes, wrote %d, not equal", len(got), len(uki))
			}
			if _, err := ReadFile(d.Partitions[0].Open(f), "efi/boot/bootx64.efi"); err != nil {
				t.Fatalf("lower-case lookup: %v", err)
			}
			if _, err := ReadFile(d.Partitions[1].Open(f), BootPath); !errors.Is(err, fs.ErrNotExist) {
				t.Fatalf("slot B: %v, want not found", err)
			}
		})
	}
}

// TestSlotImage: what an upgrade writes into a slot is what Build writes
// there for the same UKI and label.
func TestSlotImage(t *testing.T) {
	uki := pseudoRandom(100_000, 7)
	disk := make([]byte, ImageSize)
	if err := Build(memWriter(disk), []File{{Path: BootPath, Data: uki}}); err != nil {
		t.Fatal(err)
	}
	slot, err := SlotImage(LabelA, uki)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(slot, disk[SlotAFirstLBA*SectorSize:(SlotALastLBA+1)*SectorSize]) {
		t.Fatal("SlotImage(LabelA) differs from slot A of the image")
	}
	empty, err := FAT32(SlotSize, LabelB, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(empty, disk[SlotBFirstLBA*SectorSize:(SlotBLastLBA+1)*SectorSize]) {
		t.Fatal("empty FAT32 differs from slot B of the image")
	}
	// The upgrade: slot B rewritten, the GPT untouched.
	slotB, err := SlotImage(LabelB, uki)
	if err != nil {
		t.Fatal(err)
	}
	copy(disk[SlotBFirstLBA*SectorSize:], slotB)
	r := bytes.NewReader(disk)
	d, err := Inspect(r, ImageSize)
	if err != nil {
		t.Fatal(err)
	}
	if err := CheckLayout(d); err != nil {
		t.Fatal(err)
	}
	if got, err := ReadFile(d.Partitions[1].Open(r), BootPath); err != nil || !bytes.Equal(got, uki) {
		t.Fatalf("slot B after the upgrade: %v", err)
	}
}

// treeFiles is a file system with nested directories, an empty file, a
// directory spanning several clusters and files of several clusters.
func treeFiles() []File {
	files := []File{
		{Path: BootPath, Data: pseudoRandom(5000, 1)},
		{Path: "/EFI/LINUX/EMPTY", Data: nil},
		{Path: "README.TXT", Data: []byte("hello\n")},
		{Path: "/A/B/C/D/E.F", Data: pseudoRandom(513, 2)},
	}
	for i := range 40 { // 42 entries in /MANY: 3 clusters of 16
		files = append(files, File{Path: fmt.Sprintf("/MANY/F%03d.BIN", i), Data: pseudoRandom(i*100, uint64(i))})
	}
	return files
}

// TestFAT32Tree writes a tree and reads every file back.
func TestFAT32Tree(t *testing.T) {
	files := treeFiles()
	img, err := FAT32(40<<20, "TREE", files)
	if err != nil {
		t.Fatal(err)
	}
	r := io.NewSectionReader(bytes.NewReader(img), 0, int64(len(img)))
	for _, f := range files {
		got, err := ReadFile(r, f.Path)
		if err != nil {
			t.Fatalf("%s: %v", f.Path, err)
		}
		if !bytes.Equal(got, f.Data) {
			t.Fatalf("%s: %d bytes read back, %d written", f.Path, len(got), len(f.Data))
		}
	}
	for _, p := range []string{"/MANY/F040.BIN", "/NONE/X", "/EFI/BOOT/X"} {
		if _, err := ReadFile(r, p); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("%s: %v, want not found", p, err)
		}
	}
	if _, err := ReadFile(r, "/EFI/BOOT"); err == nil || errors.Is(err, fs.ErrNotExist) {
		t.Errorf("a directory read as a file: %v", err)
	}
	if _, err := ReadFile(r, "/README.TXT/X"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("a file used as a directory: %v", err)
	}
}

// TestFAT32Geometry checks, over the sizes FAT32 allows, the cluster size,
// that there are enough clusters for FAT32, that the FAT maps them all and
// is the smallest that does, and that the clusters fit in the volume.
func TestFAT32Geometry(t *testing.T) {
	for _, tc := range []struct {
		size int64
		spc  uint64
	}{
		{SlotSize, 1},
		{33 << 20, 1},
		{260 << 20, 1},
		{261 << 20, 8},
		{8 << 30, 8},
		{16 << 30, 16},
		{32 << 30, 32},
		{2<<40 - 512, 64},
	} {
		g, err := geometry(tc.size)
		if err != nil {
			t.Fatalf("%d: %v", tc.size, err)
		}
		if g.spc != tc.spc {
			t.Errorf("%d bytes: %d sectors per cluster, want %d", tc.size, g.spc, tc.spc)
		}
		if g.clusters < fatMinClusters || (g.clusters+2)*4 > g.fatSectors*SectorSize {
			t.Errorf("%d bytes: %d clusters, FAT of %d sectors", tc.size, g.clusters, g.fatSectors)
		}
		if smaller := g.fatSectors - 1; (((g.sectors-fatReserved-fatCount*smaller)/g.spc)+2)*4 <= smaller*SectorSize {
			t.Errorf("%d bytes: a FAT of %d sectors would do", tc.size, smaller)
		}
		if g.dataStart != fatReserved+fatCount*g.fatSectors || g.dataStart+g.clusters*g.spc > g.sectors {
			t.Errorf("%d bytes: data at %d, %d clusters of %d sectors, %d sectors", tc.size, g.dataStart, g.clusters, g.spc, g.sectors)
		}
	}
	if g, _ := geometry(SlotSize); g.clusters != 129022 || g.fatSectors != 1009 { // as fsck.vfat reports
		t.Errorf("slot: %d clusters, FAT of %d sectors", g.clusters, g.fatSectors)
	}
}

// TestErrors: refused UKIs, names, labels, sizes and overfull file systems.
func TestErrors(t *testing.T) {
	big := make([]byte, MaxUKISize+1)
	for _, tc := range []struct {
		name  string
		build func() error
		want  error
		text  string
	}{
		{"empty UKI", func() error { return Write(filepath.Join(t.TempDir(), "x"), nil) }, ErrEmpty, ""},
		{"UKI too large", func() error { return Write(filepath.Join(t.TempDir(), "x"), big) }, ErrTooLarge, "25165825 bytes"},
		{"slot UKI empty", func() error { _, err := SlotImage(LabelB, []byte{}); return err }, ErrEmpty, ""},
		{"slot UKI too large", func() error { _, err := SlotImage(LabelB, big); return err }, ErrTooLarge, ""},
		{"lower case", fatFiles(File{Path: "/efi/boot/bootx64.efi", Data: []byte{1}}), ErrName, "lower-case"},
		{"long base", fatFiles(File{Path: "/ABCDEFGHI.EFI", Data: []byte{1}}), ErrName, "longer than 8"},
		{"long extension", fatFiles(File{Path: "/A.EFIX", Data: []byte{1}}), ErrName, "extension"},
		{"empty extension", fatFiles(File{Path: "/A.", Data: []byte{1}}), ErrName, "extension"},
		{"two dots", fatFiles(File{Path: "/A.B.C", Data: []byte{1}}), ErrName, "more than one dot"},
		{"dot", fatFiles(File{Path: "/EFI/./X", Data: []byte{1}}), ErrName, "no base name"},
		{"dot dot", fatFiles(File{Path: "/EFI/../X", Data: []byte{1}}), ErrName, "no base name"},
		{"empty component", fatFiles(File{Path: "/EFI//X", Data: []byte{1}}), ErrName, "empty component"},
		{"empty path", fatFiles(File{Path: "", Data: []byte{1}}), ErrName, "empty component"},
		{"trailing slash", fatFiles(File{Path: "/EFI/", Data: []byte{1}}), ErrName, "empty component"},
		{"space", fatFiles(File{Path: "/A B", Data: []byte{1}}), ErrName, "not allowed"},
		{"plus", fatFiles(File{Path: "/A+B", Data: []byte{1}}), ErrName, "not allowed"},
		{"non-ASCII", fatFiles(File{Path: "/Ä", Data: []byte{1}}), ErrName, "not allowed"},
		{"duplicate", fatFiles(File{Path: "/A", Data: []byte{1}}, File{Path: "A", Data: []byte{2}}), ErrName, "already a file"},
		{"file over directory", fatFiles(File{Path: "/A/B", Data: []byte{1}}, File{Path: "/A", Data: []byte{2}}), ErrName, "already a directory"},
		{"directory over file", fatFiles(File{Path: "/A", Data: []byte{1}}, File{Path: "/A/B", Data: []byte{2}}), ErrName, "already a file"},
		{"label lower case", func() error { _, err := FAT32(SlotSize, "embassy", nil); return err }, ErrName, "not allowed"},
		{"label too long", func() error { _, err := FAT32(SlotSize, "ABCDEFGHIJKL", nil); return err }, ErrName, "1-11"},
		{"file larger than the volume", fatFiles(File{Path: "/BIG", Data: make([]byte, SlotSize)}), ErrNoSpace, "/BIG"},
		{"files larger than the volume", fatFiles(
			File{Path: "/A", Data: make([]byte, SlotSize/2)}, File{Path: "/B", Data: make([]byte, SlotSize/2)}), ErrNoSpace, "clusters"},
		{"directory too large", func() error {
			files := make([]File, 65535)
			for i := range files {
				files[i] = File{Path: fmt.Sprintf("/D/%X", i)}
			}
			_, err := planFAT32(SlotSize, "", files)
			return err
		}, ErrNoSpace, "65537 entries"},
		{"size not in sectors", func() error { _, err := FAT32(SlotSize+1, "", nil); return err }, ErrSize, ""},
		{"size zero", func() error { _, err := FAT32(0, "", nil); return err }, ErrSize, ""},
		{"too small for FAT32", func() error { _, err := FAT32(32<<20, "", nil); return err }, ErrSize, "65525"},
		{"too large for FAT32", func() error { _, err := geometry(2 << 40); return err }, ErrSize, ""},
		{"Build with a bad name", func() error {
			return Build(newSparse(ImageSize), []File{{Path: "/efi", Data: []byte{1}}})
		}, ErrName, ""},
		{"Build with too much", func() error {
			return Build(newSparse(ImageSize), []File{{Path: "/A", Data: make([]byte, SlotSize)}})
		}, ErrNoSpace, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.build()
			if !errors.Is(err, tc.want) || !strings.Contains(fmt.Sprint(err), tc.text) {
				t.Fatalf("got %v, want %v with %q", err, tc.want, tc.text)
			}
		})
	}
}

func fatFiles(files ...File) func() error {
	return func() error { _, err := FAT32(SlotSize, "T", files); return err }
}

// TestWriteLeavesNothingOnError: a refused UKI leaves no file behind and
// no temporary one.
func TestWriteLeavesNothingOnError(t *testing.T) {
	dir := t.TempDir()
	if err := Write(filepath.Join(dir, "embassy.img"), nil); err == nil {
		t.Fatal("empty UKI accepted")
	}
	if err := Write(filepath.Join(dir, "missing", "embassy.img"), []byte{1}); err == nil {
		t.Fatal("write into a missing folder succeeded")
	}
	if m, _ := filepath.Glob(filepath.Join(dir, "*")); len(m) != 0 {
		t.Fatalf("left behind: %v", m)
	}
	if m, _ := filepath.Glob(filepath.Join(dir, ".*")); len(m) != 0 {
		t.Fatalf("left behind: %v", m)
	}
}

// TestWriteSpeed: a 16 MiB UKI is written well under a second.
func TestWriteSpeed(t *testing.T) {
	uki := pseudoRandom(16<<20, 3)
	path := filepath.Join(t.TempDir(), "embassy.img")
	start := time.Now()
	if err := Write(path, uki); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > 500*time.Millisecond {
		t.Errorf("Write took %v", d)
	}
}

// smallDisk is a GPT disk of 128 sectors with two partitions.
func smallDisk(t testing.TB) []byte {
	d := &Disk{GUID: DiskGUID, Sectors: 128, FirstUsableLBA: 34, LastUsableLBA: 94, Partitions: []Partition{
		{Number: 1, Type: ESPType, GUID: SlotAGUID, Name: NameA, FirstLBA: 40, LastLBA: 59},
		{Number: 3, Type: ESPType, GUID: SlotBGUID, Name: "ünïcode name of 36 UTF-16 characters", FirstLBA: 60, LastLBA: 94, Attributes: 1},
	}}
	s := newSparse(128 * SectorSize)
	if err := writeGPT(s, d); err != nil {
		t.Fatal(err)
	}
	return s.bytes()
}

// TestInspectRejects damages a small GPT disk in the ways Inspect checks
// for, with the CRCs fixed where the damage is behind them.
func TestInspectRejects(t *testing.T) {
	good := smallDisk(t)
	d, err := Inspect(bytes.NewReader(good), int64(len(good)))
	if err != nil {
		t.Fatal(err)
	}
	if len(d.Partitions) != 2 || d.Partitions[1].Number != 3 || d.Partitions[1].Name != "ünïcode name of 36 UTF-16 characters" ||
		d.Partitions[1].Attributes != 1 || d.Partitions[0].Size() != 20*SectorSize || d.Partitions[0].Offset() != 40*SectorSize {
		t.Fatalf("%+v", d)
	}
	if err := CheckLayout(d); !errors.Is(err, ErrLayout) {
		t.Fatalf("CheckLayout of a small disk: %v", err)
	}
	le := binary.LittleEndian
	last := uint64(len(good)/SectorSize - 1)
	both := func(f func(h []byte)) func(b []byte) {
		return func(b []byte) {
			for _, lba := range []uint64{1, last} {
				f(b[lba*SectorSize:][:SectorSize])
				fixGPTCRCs(b, lba)
			}
		}
	}
	entry := func(i int, f func(e []byte)) func(b []byte) {
		return func(b []byte) {
			f(b[2*SectorSize+i*EntrySize:][:EntrySize])
			f(b[(last-entrySectors)*SectorSize+uint64(i)*EntrySize:][:EntrySize])
			fixGPTCRCs(b, 1)
			fixGPTCRCs(b, last)
		}
	}
	for _, tc := range []struct {
		name   string
		damage func(b []byte)
		size   int64 // 0: the whole disk
		text   string
	}{
		{"not whole sectors", func(b []byte) {}, 128*SectorSize - 1, "whole number"},
		{"too small", func(b []byte) {}, 3 * SectorSize, "whole number"},
		{"no MBR signature", func(b []byte) { b[510] = 0 }, 0, "boot signature"},
		{"no protective partition", func(b []byte) { b[446+4] = 0x07 }, 0, "protective"},
		{"no GPT signature", func(b []byte) { b[SectorSize] = 'X' }, 0, "signature"},
		{"header CRC", func(b []byte) { b[SectorSize+16]++ }, 0, "header CRC"},
		{"entry CRC", func(b []byte) { b[2*SectorSize+100]++ }, 0, "entry array CRC"},
		{"backup entry CRC", func(b []byte) { b[(last-entrySectors)*SectorSize]++ }, 0, "backup header"},
		{"backup missing", func(b []byte) { clear(b[last*SectorSize:]) }, 0, "backup header"},
		{"disk grown", func(b []byte) {}, 256 * SectorSize, "not at the disk's last LBA"},
		{"revision", both(func(h []byte) { le.PutUint32(h[8:], 0x00020000) }), 0, "revision"},
		{"header size small", both(func(h []byte) { le.PutUint32(h[12:], 91) }), 0, "header size"},
		{"header size large", both(func(h []byte) { le.PutUint32(h[12:], 513) }), 0, "header size"},
		{"my LBA", func(b []byte) { le.PutUint64(b[SectorSize+24:], 2); fixGPTCRCs(b, 1) }, 0, "says it is at LBA 2"},
		{"backup's alternate", func(b []byte) { le.PutUint64(b[last*SectorSize+32:], 2); fixGPTCRCs(b, last) }, 0, "alternate LBA is 2"},
		{"entry size", both(func(h []byte) { le.PutUint32(h[84:], 100) }), 0, "entries of 100 bytes"},
		{"no entries", both(func(h []byte) { le.PutUint32(h[80:], 0) }), 0, "0 entries"},
		{"entry array huge", both(func(h []byte) { le.PutUint32(h[80:], 1<<20) }), 0, "entries of"},
		{"usable reversed", both(func(h []byte) { le.PutUint64(h[40:], 95) }), 0, "usable LBA 95-94"},
		{"usable past the end", both(func(h []byte) { le.PutUint64(h[48:], last) }), 0, "usable LBA"},
		{"array in usable area", func(b []byte) { le.PutUint64(b[SectorSize+72:], 40); fixGPTCRCs(b, 1) }, 0, "overlaps"},
		{"array beyond the disk", func(b []byte) { le.PutUint64(b[SectorSize+72:], 1<<63); fixGPTCRCs(b, 1) }, 0, "overlaps"},
		{"backup array over its header", func(b []byte) { le.PutUint64(b[last*SectorSize+72:], last-1); fixGPTCRCs(b, last) }, 0, "overlaps"},
		{"disk GUIDs differ", func(b []byte) { b[last*SectorSize+56]++; fixGPTCRCs(b, last) }, 0, "differ"},
		{"CRCs fixed, nothing changed", entry(0, func(e []byte) {}), 0, ""}, // the harness's own control
		{"arrays differ", func(b []byte) {
			b[(last-entrySectors)*SectorSize+EntrySize*5]++
			fixGPTCRCs(b, last)
		}, 0, "differ"},
		{"partition reversed", entry(0, func(e []byte) { le.PutUint64(e[32:], 60) }), 0, "partition 1 ends (LBA 59) before it starts (LBA 60)"},
		{"partition before usable", entry(0, func(e []byte) { le.PutUint64(e[32:], 33) }), 0, "outside"},
		{"partition after usable", entry(2, func(e []byte) { le.PutUint64(e[40:], 95) }), 0, "outside"},
		{"partitions overlap", entry(0, func(e []byte) { le.PutUint64(e[40:], 60) }), 0, "overlap"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := bytes.Clone(good)
			tc.damage(b)
			size := tc.size
			if size == 0 {
				size = int64(len(b))
			}
			r := io.NewSectionReader(bytes.NewReader(b), 0, size) // reads past it as zero
			if size > int64(len(b)) {
				r = io.NewSectionReader(readerAtPadded(b), 0, size)
			}
			_, err := Inspect(r, size)
			if tc.text == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.text) {
				t.Fatalf("got %v, want an error with %q", err, tc.text)
			}
		})
	}
}

// readerAtPadded reads b followed by zeros.
type readerAtPadded []byte

func (p readerAtPadded) ReadAt(b []byte, off int64) (int, error) {
	clear(b)
	if off < int64(len(p)) {
		copy(b, p[off:])
	}
	return len(b), nil
}
