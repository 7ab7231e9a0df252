package diskimage

import (
	"bytes"
	"hash/crc32"
	"io"
	"testing"
)

// The fuzzer's inputs are compact encodings of a disk and a slot: only the
// bytes the parsers read are in them, and the harness puts them in place.
// Go's minimizer takes time quadratic in an input's length for every new
// input it keeps, so that whole sectors of zeros would cost most of a
// short run.

// Disk input: a GPT disk of 4-32 sectors. Byte 0 gives the size; then the
// MBR's partition table and signature, the first 92 bytes of the primary
// header, the first two entries of the primary array, the first 92 bytes
// of the backup header at the last LBA and, if present, the first two
// entries of the backup array in the sector before it, which is otherwise
// the primary array's copy.
const (
	fuzzMBR        = 1
	fuzzHeader     = fuzzMBR + SectorSize - 446
	fuzzEntries    = fuzzHeader + gptHeaderSize
	fuzzBackup     = fuzzEntries + 2*EntrySize
	fuzzBackupEnts = fuzzBackup + gptHeaderSize
	fuzzDiskMax    = fuzzBackupEnts + 2*EntrySize
)

// fuzzDisk returns the disk an input encodes, its CRCs recomputed if fix.
func fuzzDisk(in []byte, fix bool) []byte {
	if len(in) == 0 {
		return nil
	}
	n := 4 + int(in[0])%29
	d := make([]byte, n*SectorSize)
	put := func(from, to, off int) {
		if from < len(in) {
			copy(d[off:off+to-from], in[from:min(len(in), to)])
		}
	}
	put(fuzzMBR, fuzzHeader, 446)
	put(fuzzHeader, fuzzEntries, SectorSize)
	put(fuzzEntries, fuzzBackup, 2*SectorSize)
	put(fuzzBackup, fuzzBackupEnts, (n-1)*SectorSize)
	if len(in) > fuzzBackupEnts {
		put(fuzzBackupEnts, fuzzDiskMax, (n-2)*SectorSize)
	} else {
		copy(d[(n-2)*SectorSize:][:2*EntrySize], d[2*SectorSize:])
	}
	if fix {
		fixGPTCRCs(d, 1)
		fixGPTCRCs(d, uint64(n-1))
	}
	return d
}

// diskSeed encodes a GPT disk of 8 sectors: 4 entries in one sector at
// each end, usable LBA 3-5, two partitions.
func diskSeed() (seed, disk []byte) {
	const n = 8
	disk = make([]byte, n*SectorSize)
	copy(disk, protectiveMBR(n))
	array := disk[2*SectorSize:][:SectorSize]
	full, _ := entryArray(&Disk{Partitions: []Partition{
		{Number: 1, Type: ESPType, GUID: SlotAGUID, FirstLBA: 3, LastLBA: 3, Name: "a"},
		{Number: 2, Type: ESPType, GUID: SlotBGUID, FirstLBA: 4, LastLBA: 5, Name: "b"},
	}})
	copy(array, full)
	copy(disk[(n-2)*SectorSize:], array)
	h := gptHeader{myLBA: 1, alternateLBA: n - 1, firstUsableLBA: 3, lastUsableLBA: 5, diskGUID: DiskGUID,
		entriesLBA: 2, numEntries: 4, entrySize: EntrySize, entriesCRC: crc32.ChecksumIEEE(array)}
	copy(disk[SectorSize:], h.marshal())
	h.myLBA, h.alternateLBA, h.entriesLBA = n-1, 1, n-2
	copy(disk[(n-1)*SectorSize:], h.marshal())

	seed = []byte{n - 4}
	seed = append(seed, disk[446:SectorSize]...)
	seed = append(seed, disk[SectorSize:][:gptHeaderSize]...)
	seed = append(seed, disk[2*SectorSize:][:2*EntrySize]...)
	seed = append(seed, disk[(n-1)*SectorSize:][:gptHeaderSize]...)
	return seed, disk
}

// Slot input: a FAT32 of SlotSize bytes (as laid out for SlotSize) that
// reads as zero elsewhere: the BPB (up to byte 90) and the boot signature,
// the first 32 entries of the first FAT, and the first fuzzChunk bytes of
// each cluster of the data region from cluster 2 on.
const (
	fuzzBPB   = 90
	fuzzBoot  = fuzzBPB + 2
	fuzzFAT   = 128
	fuzzChunk = 128
	fuzzMax   = fuzzBoot + fuzzFAT + 16*fuzzChunk
)

// fuzzFiles is the tree of the slot seed; the files' data is zero beyond
// fuzzChunk bytes in each cluster, as only those are in the input.
var fuzzFiles = []File{
	{Path: BootPath, Data: chunkedData(300, 5)},
	{Path: "/X/Z.BIN", Data: chunkedData(600, 6)},
}

func chunkedData(n int, seed uint64) []byte {
	b := pseudoRandom(n, seed)
	for i := range b {
		if i%SectorSize >= fuzzChunk {
			b[i] = 0
		}
	}
	return b
}

func fuzzSlot(in []byte) *io.SectionReader {
	g, _ := geometry(SlotSize)
	s := newSparse(SlotSize)
	put := func(from, n int, off int64) {
		if from < len(in) {
			s.WriteAt(in[from:min(len(in), from+n)], off)
		}
	}
	put(0, fuzzBPB, 0)
	put(fuzzBPB, 2, 510)
	put(fuzzBoot, fuzzFAT, fatReserved*SectorSize)
	for i := fuzzBoot + fuzzFAT; i < len(in); i += fuzzChunk {
		put(i, fuzzChunk, g.clusterOffset(uint32(2+(i-fuzzBoot-fuzzFAT)/fuzzChunk)))
	}
	return io.NewSectionReader(s, 0, SlotSize)
}

// slotSeed encodes a slot holding fuzzFiles.
func slotSeed(t testing.TB) []byte {
	p, err := planFAT32(SlotSize, LabelA, fuzzFiles)
	if err != nil {
		t.Fatal(err)
	}
	img := make([]byte, SlotSize)
	if err := p.write(memWriter(img)); err != nil {
		t.Fatal(err)
	}
	seed := append([]byte(nil), img[:fuzzBPB]...)
	seed = append(seed, img[510:512]...)
	seed = append(seed, img[fatReserved*SectorSize:][:fuzzFAT]...)
	for c := range p.used {
		seed = append(seed, img[p.g.clusterOffset(uint32(2+c)):][:fuzzChunk]...)
	}
	return seed
}

// FuzzInspect feeds a damaged GPT disk to Inspect, with the CRCs made to
// match again when fix is set so that the checks behind them are reached,
// and a damaged FAT32 slot to ReadFile. Neither may panic or return what
// they are meant to refuse; the undamaged seeds must read back.
func FuzzInspect(f *testing.F) {
	diskIn, disk := diskSeed()
	if !bytes.Equal(fuzzDisk(diskIn, false), disk) {
		f.Fatal("the disk seed does not encode the disk")
	}
	slot := slotSeed(f)
	if len(slot) > fuzzMax {
		f.Fatalf("slot seed of %d bytes", len(slot))
	}
	f.Add(diskIn, slot, true)
	f.Add(diskIn, slot[:fuzzBoot], false)
	f.Add(diskIn[:fuzzEntries], slot[:fuzzBoot+fuzzFAT], true)
	f.Fuzz(func(t *testing.T, diskIn, slotIn []byte, fix bool) {
		if len(diskIn) > fuzzDiskMax || len(slotIn) > fuzzMax {
			return
		}
		d := fuzzDisk(diskIn, fix)
		r := bytes.NewReader(d)
		gpt, err := Inspect(r, int64(len(d)))
		if bytes.Equal(d, disk) && (err != nil || len(gpt.Partitions) != 2) {
			t.Fatalf("seed disk: %v", err)
		}
		if err == nil {
			if gpt.Sectors != uint64(len(d)/SectorSize) || gpt.FirstUsableLBA < 2 || gpt.LastUsableLBA >= gpt.Sectors || gpt.FirstUsableLBA > gpt.LastUsableLBA {
				t.Fatalf("accepted %+v on %d sectors", gpt, len(d)/SectorSize)
			}
			for _, p := range gpt.Partitions {
				if p.FirstLBA < gpt.FirstUsableLBA || p.LastLBA > gpt.LastUsableLBA || p.FirstLBA > p.LastLBA {
					t.Fatalf("accepted partition %+v", p)
				}
				ReadFile(p.Open(r), BootPath)
			}
			CheckLayout(gpt)
		}

		sr := fuzzSlot(slotIn)
		seed := bytes.Equal(slotIn, slot)
		for _, file := range fuzzFiles {
			got, err := ReadFile(sr, file.Path)
			if seed && (err != nil || !bytes.Equal(got, file.Data)) {
				t.Fatalf("seed slot %s: %v", file.Path, err)
			}
			if err == nil && len(got) > SlotSize {
				t.Fatalf("%s: %d bytes from a %d-byte slot", file.Path, len(got), SlotSize)
			}
		}
	})
}
