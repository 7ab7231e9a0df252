package diskimage

import (
	"bytes"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// Cross-checks with the Debian tools: sgdisk (gdisk) for the GPT,
// fsck.vfat and mkfs.fat (dosfstools) and mtools for the FAT32 file
// systems, both ways: they accept and read what this package writes, and
// this package reads what they write.

// needTool returns the path of a tool, skipping the test if it is absent
// (failing under EMBASSY_E2E=1, where make test has installed it).
func needTool(t *testing.T, name, pkg string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		// sgdisk, fsck.vfat and mkfs.fat live in /usr/sbin, which a
		// non-root PATH may lack.
		if _, serr := os.Stat(filepath.Join("/usr/sbin", name)); serr == nil {
			return filepath.Join("/usr/sbin", name)
		}
		if os.Getenv("EMBASSY_E2E") == "1" {
			t.Fatalf("%s not installed (Debian package %s; make deps installs it)", name, pkg)
		}
		t.Skipf("%s not installed (Debian package %s; make deps installs it)", name, pkg)
	}
	return p
}

func run(t *testing.T, name string, args ...string) (string, error) {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// sgdiskVerify runs sgdisk -v, which exits 0 even for a damaged GPT, and
// requires its verdict and no warning.
func sgdiskVerify(t *testing.T, sgdisk, img string) (string, bool) {
	t.Helper()
	out, err := run(t, sgdisk, "-v", img)
	ok := err == nil && strings.Contains(out, "No problems found")
	for _, bad := range []string{"Caution", "Warning", "ERROR", "Problem"} {
		ok = ok && !strings.Contains(out, bad)
	}
	return out, ok
}

// fsckVFAT runs fsck.vfat -n, which exits 1 for a damaged file system and
// prints nothing but its banner and summary for a clean one.
func fsckVFAT(t *testing.T, fsck, img string) (string, bool) {
	t.Helper()
	out, err := run(t, fsck, "-n", img)
	return out, err == nil && len(strings.Split(strings.TrimSpace(out), "\n")) == 2
}

// extract writes the bytes of r to a new file.
func extract(t *testing.T, r io.Reader, name string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := io.Copy(f, r); err != nil {
		t.Fatal(err)
	}
	return p
}

// mcopyOut reads path from the FAT image img with mtools.
func mcopyOut(t *testing.T, mcopy, img, path string) []byte {
	t.Helper()
	dst := filepath.Join(t.TempDir(), "out")
	out, err := run(t, mcopy, "-n", "-i", img, "::"+path, dst)
	if err != nil || out != "" {
		t.Fatalf("mcopy %s: %v: %s", path, err, out)
	}
	b, err := os.ReadFile(dst)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestToolsAcceptImage: sgdisk finds no problem in the GPT, fsck.vfat none
// in either slot, and mtools reads the UKI back unchanged. A damaged copy
// shows that each check can fail.
func TestToolsAcceptImage(t *testing.T) {
	sgdisk := needTool(t, "sgdisk", "gdisk")
	fsck := needTool(t, "fsck.vfat", "dosfstools")
	mcopy := needTool(t, "mcopy", "mtools")
	mdir := needTool(t, "mdir", "mtools")

	uki := pseudoRandom(3_000_000, 11)
	img, f := writeImage(t, uki)
	if out, ok := sgdiskVerify(t, sgdisk, img); !ok {
		t.Fatalf("sgdisk -v:\n%s", out)
	}
	out, err := run(t, sgdisk, "-p", img)
	if err != nil {
		t.Fatalf("sgdisk -p: %v\n%s", err, out)
	}
	for _, want := range []string{
		"Disk identifier (GUID): " + strings.ToUpper(DiskGUID.String()),
		"1            2048          133119   64.0 MiB    EF00  embassy-a",
		"2          133120          264191   64.0 MiB    EF00  embassy-b",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("sgdisk -p lacks %q:\n%s", want, out)
		}
	}
	for i, guid := range []GUID{SlotAGUID, SlotBGUID} {
		out, _ := run(t, sgdisk, "-i", string(rune('1'+i)), img)
		if !strings.Contains(out, "Partition unique GUID: "+strings.ToUpper(guid.String())) ||
			!strings.Contains(out, "Partition GUID code: C12A7328-F81F-11D2-BA4B-00A0C93EC93B (EFI system partition)") {
			t.Errorf("sgdisk -i %d:\n%s", i+1, out)
		}
	}

	d := Layout()
	slotA := extract(t, d.Partitions[0].Open(f), "a.img")
	slotB := extract(t, d.Partitions[1].Open(f), "b.img")
	for _, s := range []string{slotA, slotB} {
		if out, ok := fsckVFAT(t, fsck, s); !ok {
			t.Fatalf("fsck.vfat -n %s:\n%s", filepath.Base(s), out)
		}
	}
	if got := mcopyOut(t, mcopy, slotA, BootPath); !bytes.Equal(got, uki) {
		t.Fatalf("mcopy read back %d bytes, not the UKI", len(got))
	}
	out, err = run(t, mdir, "-i", slotA, "::/EFI/BOOT")
	if err != nil || !strings.Contains(out, "Volume in drive : is EMBASSY-A") ||
		!strings.Contains(out, "BOOTX64  EFI   3000000 2000-01-01   0:00") {
		t.Errorf("mdir: %v\n%s", err, out)
	}
	out, err = run(t, mdir, "-i", slotB, "::/")
	if err != nil || !strings.Contains(out, "Volume in drive : is EMBASSY-B") || !strings.Contains(out, "No files") {
		t.Errorf("mdir slot B: %v\n%s", err, out)
	}

	// The checks fail on damage: a backup GPT header with a wrong CRC, a
	// file whose FAT chain loops.
	b, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	b[ImageSize-SectorSize+60]++
	bad := filepath.Join(t.TempDir(), "bad.img")
	os.WriteFile(bad, b, 0o644)
	if out, ok := sgdiskVerify(t, sgdisk, bad); ok {
		t.Fatalf("sgdisk -v accepts a damaged backup header:\n%s", out)
	}
	a := b[SlotAFirstLBA*SectorSize : (SlotALastLBA+1)*SectorSize]
	a[fatReserved*SectorSize+4*10] = 5 // BOOTX64.EFI starts at cluster 5: link its cluster 10 back there
	os.WriteFile(bad, a, 0o644)
	if out, ok := fsckVFAT(t, fsck, bad); ok {
		t.Fatalf("fsck.vfat accepts a looping chain:\n%s", out)
	}
}

// TestToolsReadTree: fsck.vfat accepts a tree of directories and files and
// mtools reads each file back.
func TestToolsReadTree(t *testing.T) {
	fsck := needTool(t, "fsck.vfat", "dosfstools")
	mcopy := needTool(t, "mcopy", "mtools")
	files := treeFiles()
	fat, err := FAT32(40<<20, "TREE", files)
	if err != nil {
		t.Fatal(err)
	}
	img := extract(t, bytes.NewReader(fat), "tree.img")
	if out, ok := fsckVFAT(t, fsck, img); !ok {
		t.Fatalf("fsck.vfat -n:\n%s", out)
	}
	for _, f := range files {
		if got := mcopyOut(t, mcopy, img, f.Path); !bytes.Equal(got, f.Data) {
			t.Fatalf("%s: mcopy read %d bytes, %d written", f.Path, len(got), len(f.Data))
		}
	}
}

// TestReadForeignImages: Inspect reads a GPT sgdisk wrote and ReadFile a
// FAT32 mkfs.fat made and mtools filled, fragmented by a deletion.
func TestReadForeignImages(t *testing.T) {
	sgdisk := needTool(t, "sgdisk", "gdisk")
	mkfs := needTool(t, "mkfs.fat", "dosfstools")
	mcopy := needTool(t, "mcopy", "mtools")
	mmd := needTool(t, "mmd", "mtools")
	mdel := needTool(t, "mdel", "mtools")
	dir := t.TempDir()

	disk := filepath.Join(dir, "disk.img")
	if err := os.WriteFile(disk, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(disk, 10<<20); err != nil {
		t.Fatal(err)
	}
	if out, err := run(t, sgdisk, "-o", "-n", "1:2048:+4M", "-t", "1:ef00", "-c", "1:one",
		"-n", "2:0:0", "-t", "2:8300", "-c", "2:two", disk); err != nil {
		t.Fatalf("sgdisk: %v\n%s", err, out)
	}
	df, err := os.Open(disk)
	if err != nil {
		t.Fatal(err)
	}
	defer df.Close()
	d, err := Inspect(df, 10<<20)
	if err != nil {
		t.Fatal(err)
	}
	if len(d.Partitions) != 2 || d.Partitions[0].Name != "one" || d.Partitions[0].Type != ESPType ||
		d.Partitions[0].FirstLBA != 2048 || d.Partitions[0].Size() != 4<<20 || d.Partitions[1].Name != "two" ||
		d.Partitions[1].LastLBA != d.LastUsableLBA || d.Sectors != 20480 {
		t.Fatalf("%+v", d)
	}

	fat := filepath.Join(dir, "fat.img")
	if out, err := run(t, mkfs, "-F", "32", "-S", "512", "-s", "1", "-n", "FOREIGN", "-C", fat, "65536"); err != nil {
		t.Fatalf("mkfs.fat: %v\n%s", err, out)
	}
	if out, err := run(t, mmd, "-i", fat, "::/EFI", "::/EFI/BOOT"); err != nil {
		t.Fatalf("mmd: %v\n%s", err, out)
	}
	first, second := pseudoRandom(10_000, 1), pseudoRandom(200_000, 2)
	put := func(data []byte, path string) {
		src := filepath.Join(t.TempDir(), "src")
		os.WriteFile(src, data, 0o644)
		if out, err := run(t, mcopy, "-i", fat, src, "::"+path); err != nil {
			t.Fatalf("mcopy: %v\n%s", err, out)
		}
	}
	// A hole left by a deleted file, then a file larger than the hole,
	// written with FSInfo's next-free hint (which mtools follows) pointed
	// at the start: its chain has two runs.
	put(first, "/EFI/BOOT/GAP.BIN")
	put(first, "/EFI/BOOT/KEEP.BIN")
	if out, err := run(t, mdel, "-i", fat, "::/EFI/BOOT/GAP.BIN"); err != nil {
		t.Fatalf("mdel: %v\n%s", err, out)
	}
	hint, err := os.OpenFile(fat, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	_, err = hint.WriteAt([]byte{2, 0, 0, 0}, fatFSInfo*SectorSize+492) // mkfs.fat puts FSInfo in sector 1 too
	if cerr := hint.Close(); err != nil || cerr != nil {
		t.Fatal(err, cerr)
	}
	put(second, BootPath)
	ff, err := os.Open(fat)
	if err != nil {
		t.Fatal(err)
	}
	defer ff.Close()
	fi, _ := ff.Stat()
	slot := io.NewSectionReader(ff, 0, fi.Size())
	for _, c := range []struct {
		path string
		want []byte
	}{{BootPath, second}, {"/EFI/BOOT/KEEP.BIN", first}} {
		got, err := ReadFile(slot, c.path)
		if err != nil || !bytes.Equal(got, c.want) {
			t.Fatalf("%s: %d bytes, %v", c.path, len(got), err)
		}
	}
	fr, err := openFAT(slot, fi.Size())
	if err != nil {
		t.Fatal(err)
	}
	runs := 0
	e, _ := fr.lookup(0, [11]byte([]byte("EFI        ")))
	e, _ = fr.lookup(e.cluster, [11]byte([]byte("BOOT       ")))
	e, _ = fr.lookup(e.cluster, [11]byte([]byte("BOOTX64 EFI")))
	prev := uint32(0)
	fr.chain(e.cluster, 1<<20, func(c uint32) error {
		if c != prev+1 {
			runs++
		}
		prev = c
		return nil
	})
	if runs < 2 {
		t.Errorf("BOOTX64.EFI in %d run(s): the test did not fragment it", runs)
	}
}
