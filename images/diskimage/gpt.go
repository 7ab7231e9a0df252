package diskimage

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"sort"
	"unicode/utf16"
)

// ErrGPT is returned by Inspect for a disk without a valid GPT.
var ErrGPT = errors.New("invalid GPT")

// GPT header (UEFI 2.10 section 5.3.2) and entry (5.3.3) fields.
const (
	gptSignature    = "EFI PART"
	gptRevision     = 0x00010000
	gptHeaderSize   = 92
	entrySectors    = EntryCount * EntrySize / SectorSize
	entryNameOffset = 56
	entryNameChars  = 36

	// Limits Inspect puts on a header's entry array; the UEFI spec allows
	// any multiple of 128 bytes per entry, but no real disk needs more.
	maxEntryArray = 1 << 20
	maxEntrySize  = 4096
)

// Disk is what Inspect finds on a GPT disk.
type Disk struct {
	GUID           GUID
	Sectors        uint64 // the disk's size in sectors
	FirstUsableLBA uint64
	LastUsableLBA  uint64
	Partitions     []Partition // the used entries, in entry order
}

// Partition is a used GPT partition entry.
type Partition struct {
	Number     int // 1-based index of the entry
	Type       GUID
	GUID       GUID
	Name       string
	FirstLBA   uint64 // first sector
	LastLBA    uint64 // last sector, inclusive
	Attributes uint64
}

// Offset returns the partition's first byte on the disk.
func (p Partition) Offset() int64 { return int64(p.FirstLBA) * SectorSize }

// Size returns the partition's length in bytes.
func (p Partition) Size() int64 { return int64(p.LastLBA-p.FirstLBA+1) * SectorSize }

// Open returns a reader of the partition on disk r.
func (p Partition) Open(r io.ReaderAt) *io.SectionReader {
	return io.NewSectionReader(r, p.Offset(), p.Size())
}

// gptHeader holds the fields of a GPT header Inspect uses.
type gptHeader struct {
	myLBA, alternateLBA           uint64
	firstUsableLBA, lastUsableLBA uint64
	diskGUID                      GUID
	entriesLBA                    uint64
	numEntries, entrySize         uint32
	entriesCRC                    uint32
}

func (h *gptHeader) arraySectors() uint64 {
	return (uint64(h.numEntries)*uint64(h.entrySize) + SectorSize - 1) / SectorSize
}

// marshal returns the header's sector, CRC set.
func (h *gptHeader) marshal() []byte {
	b := make([]byte, SectorSize)
	le := binary.LittleEndian
	copy(b, gptSignature)
	le.PutUint32(b[8:], gptRevision)
	le.PutUint32(b[12:], gptHeaderSize)
	le.PutUint64(b[24:], h.myLBA)
	le.PutUint64(b[32:], h.alternateLBA)
	le.PutUint64(b[40:], h.firstUsableLBA)
	le.PutUint64(b[48:], h.lastUsableLBA)
	copy(b[56:72], h.diskGUID[:])
	le.PutUint64(b[72:], h.entriesLBA)
	le.PutUint32(b[80:], h.numEntries)
	le.PutUint32(b[84:], h.entrySize)
	le.PutUint32(b[88:], h.entriesCRC)
	le.PutUint32(b[16:], crc32.ChecksumIEEE(b[:gptHeaderSize]))
	return b
}

// protectiveMBR returns sector 0 of a GPT disk of n sectors: one partition
// of type 0xEE from LBA 1 over the whole disk (at most 2^32-1 sectors), no
// boot code.
func protectiveMBR(n uint64) []byte {
	b := make([]byte, SectorSize)
	e := b[446:462]
	copy(e, []byte{0x00, 0x00, 0x02, 0x00, 0xEE, 0xFF, 0xFF, 0xFF}) // status, CHS 0/0/2, type, CHS max
	binary.LittleEndian.PutUint32(e[8:], 1)
	binary.LittleEndian.PutUint32(e[12:], uint32(min(n-1, 0xFFFFFFFF)))
	b[510], b[511] = 0x55, 0xAA
	return b
}

// entryArray returns the partition entry array for d's partitions.
func entryArray(d *Disk) ([]byte, error) {
	b := make([]byte, EntryCount*EntrySize)
	for _, p := range d.Partitions {
		if p.Number < 1 || p.Number > EntryCount {
			return nil, fmt.Errorf("partition number %d out of range", p.Number)
		}
		e := b[(p.Number-1)*EntrySize:][:EntrySize]
		copy(e[0:16], p.Type[:])
		copy(e[16:32], p.GUID[:])
		binary.LittleEndian.PutUint64(e[32:], p.FirstLBA)
		binary.LittleEndian.PutUint64(e[40:], p.LastLBA)
		binary.LittleEndian.PutUint64(e[48:], p.Attributes)
		name := utf16.Encode([]rune(p.Name))
		if len(name) > entryNameChars {
			return nil, fmt.Errorf("partition name %q longer than %d UTF-16 units", p.Name, entryNameChars)
		}
		for i, u := range name {
			binary.LittleEndian.PutUint16(e[entryNameOffset+2*i:], u)
		}
	}
	return b, nil
}

// writeGPT writes the protective MBR and both GPTs (header and entries) of
// disk d, which must have 128 entries' room (2+32 sectors at each end).
func writeGPT(w io.WriterAt, d *Disk) error {
	array, err := entryArray(d)
	if err != nil {
		return err
	}
	last := d.Sectors - 1
	primary := gptHeader{
		myLBA: 1, alternateLBA: last,
		firstUsableLBA: d.FirstUsableLBA, lastUsableLBA: d.LastUsableLBA,
		diskGUID: d.GUID, entriesLBA: 2,
		numEntries: EntryCount, entrySize: EntrySize, entriesCRC: crc32.ChecksumIEEE(array),
	}
	backup := primary
	backup.myLBA, backup.alternateLBA, backup.entriesLBA = last, 1, last-entrySectors
	for _, s := range []struct {
		lba  uint64
		data []byte
	}{
		{0, protectiveMBR(d.Sectors)},
		{1, primary.marshal()},
		{2, array},
		{backup.entriesLBA, array},
		{last, backup.marshal()},
	} {
		if _, err := w.WriteAt(s.data, int64(s.lba)*SectorSize); err != nil {
			return fmt.Errorf("write GPT: %w", err)
		}
	}
	return nil
}

// Inspect reads the GPT of a disk of size bytes: the protective MBR, both
// headers with their CRCs, both entry arrays with theirs (which must be
// equal), and the used entries, which must lie in the usable area without
// overlapping. It does not fall back to the backup when the primary is
// damaged, as firmware may: a disk this package wrote has both intact.
func Inspect(r io.ReaderAt, size int64) (*Disk, error) {
	if size%SectorSize != 0 || size < 4*SectorSize {
		return nil, fmt.Errorf("%w: disk size %d is not a whole number of at least 4 sectors", ErrGPT, size)
	}
	n := uint64(size / SectorSize)
	sector := make([]byte, SectorSize)
	if _, err := r.ReadAt(sector, 0); err != nil {
		return nil, fmt.Errorf("read MBR: %w", err)
	}
	if err := checkProtectiveMBR(sector); err != nil {
		return nil, err
	}
	primary, primaryArray, err := readHeader(r, 1, n)
	if err != nil {
		return nil, fmt.Errorf("primary header: %w", err)
	}
	if primary.alternateLBA != n-1 {
		return nil, fmt.Errorf("%w: primary header puts the backup at LBA %d, not at the disk's last LBA %d", ErrGPT, primary.alternateLBA, n-1)
	}
	backup, backupArray, err := readHeader(r, n-1, n)
	if err != nil {
		return nil, fmt.Errorf("backup header: %w", err)
	}
	if backup.alternateLBA != 1 {
		return nil, fmt.Errorf("%w: backup header's alternate LBA is %d, not 1", ErrGPT, backup.alternateLBA)
	}
	if primary.diskGUID != backup.diskGUID || primary.firstUsableLBA != backup.firstUsableLBA ||
		primary.lastUsableLBA != backup.lastUsableLBA || primary.numEntries != backup.numEntries ||
		primary.entrySize != backup.entrySize || !bytes.Equal(primaryArray, backupArray) {
		return nil, fmt.Errorf("%w: primary and backup GPT differ", ErrGPT)
	}
	d := &Disk{GUID: primary.diskGUID, Sectors: n, FirstUsableLBA: primary.firstUsableLBA, LastUsableLBA: primary.lastUsableLBA}
	for i := range primary.numEntries {
		e := primaryArray[uint64(i)*uint64(primary.entrySize):][:EntrySize]
		var p Partition
		copy(p.Type[:], e[0:16])
		if p.Type == (GUID{}) {
			continue
		}
		p.Number = int(i) + 1
		copy(p.GUID[:], e[16:32])
		p.FirstLBA = binary.LittleEndian.Uint64(e[32:])
		p.LastLBA = binary.LittleEndian.Uint64(e[40:])
		p.Attributes = binary.LittleEndian.Uint64(e[48:])
		if p.FirstLBA > p.LastLBA {
			return nil, fmt.Errorf("%w: partition %d ends (LBA %d) before it starts (LBA %d)", ErrGPT, p.Number, p.LastLBA, p.FirstLBA)
		}
		if p.FirstLBA < d.FirstUsableLBA || p.LastLBA > d.LastUsableLBA {
			return nil, fmt.Errorf("%w: partition %d (LBA %d-%d) outside the usable LBA %d-%d", ErrGPT,
				p.Number, p.FirstLBA, p.LastLBA, d.FirstUsableLBA, d.LastUsableLBA)
		}
		name := make([]uint16, 0, entryNameChars)
		for j := 0; j < entryNameChars; j++ {
			u := binary.LittleEndian.Uint16(e[entryNameOffset+2*j:])
			if u == 0 {
				break
			}
			name = append(name, u)
		}
		p.Name = string(utf16.Decode(name))
		d.Partitions = append(d.Partitions, p)
	}
	byStart := append([]Partition(nil), d.Partitions...)
	sort.Slice(byStart, func(i, j int) bool { return byStart[i].FirstLBA < byStart[j].FirstLBA })
	for i := 1; i < len(byStart); i++ {
		if byStart[i].FirstLBA <= byStart[i-1].LastLBA {
			return nil, fmt.Errorf("%w: partitions %d and %d overlap", ErrGPT, byStart[i-1].Number, byStart[i].Number)
		}
	}
	return d, nil
}

// checkProtectiveMBR requires the boot signature and a 0xEE partition
// starting at LBA 1 (a hybrid MBR may have others beside it).
func checkProtectiveMBR(b []byte) error {
	if b[510] != 0x55 || b[511] != 0xAA {
		return fmt.Errorf("%w: no MBR boot signature", ErrGPT)
	}
	for i := range 4 {
		e := b[446+16*i:][:16]
		if e[4] == 0xEE && binary.LittleEndian.Uint32(e[8:]) == 1 {
			return nil
		}
	}
	return fmt.Errorf("%w: no protective MBR partition (type 0xEE from LBA 1)", ErrGPT)
}

// readHeader reads and checks the GPT header at lba on a disk of n sectors,
// and its entry array (numEntries*entrySize bytes), whose CRC it checks.
func readHeader(r io.ReaderAt, lba, n uint64) (*gptHeader, []byte, error) {
	b := make([]byte, SectorSize)
	if _, err := r.ReadAt(b, int64(lba)*SectorSize); err != nil {
		return nil, nil, fmt.Errorf("read LBA %d: %w", lba, err)
	}
	le := binary.LittleEndian
	if string(b[:8]) != gptSignature {
		return nil, nil, fmt.Errorf("%w: no GPT signature at LBA %d", ErrGPT, lba)
	}
	if rev := le.Uint32(b[8:]); rev != gptRevision {
		return nil, nil, fmt.Errorf("%w: revision %#x", ErrGPT, rev)
	}
	hsize := le.Uint32(b[12:])
	if hsize < gptHeaderSize || hsize > SectorSize {
		return nil, nil, fmt.Errorf("%w: header size %d", ErrGPT, hsize)
	}
	crc := le.Uint32(b[16:])
	le.PutUint32(b[16:], 0)
	if got := crc32.ChecksumIEEE(b[:hsize]); got != crc {
		return nil, nil, fmt.Errorf("%w: header CRC %#08x, computed %#08x", ErrGPT, crc, got)
	}
	h := &gptHeader{
		myLBA: le.Uint64(b[24:]), alternateLBA: le.Uint64(b[32:]),
		firstUsableLBA: le.Uint64(b[40:]), lastUsableLBA: le.Uint64(b[48:]),
		entriesLBA: le.Uint64(b[72:]), numEntries: le.Uint32(b[80:]), entrySize: le.Uint32(b[84:]),
		entriesCRC: le.Uint32(b[88:]),
	}
	copy(h.diskGUID[:], b[56:72])
	if h.myLBA != lba {
		return nil, nil, fmt.Errorf("%w: header at LBA %d says it is at LBA %d", ErrGPT, lba, h.myLBA)
	}
	if h.entrySize < EntrySize || h.entrySize%EntrySize != 0 || h.entrySize > maxEntrySize ||
		h.numEntries == 0 || uint64(h.numEntries)*uint64(h.entrySize) > maxEntryArray {
		return nil, nil, fmt.Errorf("%w: %d entries of %d bytes", ErrGPT, h.numEntries, h.entrySize)
	}
	// The usable area lies between the two headers and their arrays; the
	// array lies on its own side of it, clear of both headers.
	if h.firstUsableLBA > h.lastUsableLBA || h.firstUsableLBA < 2 || h.lastUsableLBA > n-3 {
		return nil, nil, fmt.Errorf("%w: usable LBA %d-%d on a disk of %d sectors", ErrGPT, h.firstUsableLBA, h.lastUsableLBA, n)
	}
	inside := h.entriesLBA < n
	if arrayEnd := h.entriesLBA + h.arraySectors(); inside && lba == 1 { // arrayEnd is exclusive
		inside = h.entriesLBA >= 2 && arrayEnd <= h.firstUsableLBA
	} else if inside {
		inside = h.entriesLBA > h.lastUsableLBA && arrayEnd <= lba
	}
	if !inside {
		return nil, nil, fmt.Errorf("%w: entry array at LBA %d (%d sectors) overlaps the usable area or a header", ErrGPT, h.entriesLBA, h.arraySectors())
	}
	array := make([]byte, uint64(h.numEntries)*uint64(h.entrySize))
	if _, err := r.ReadAt(array, int64(h.entriesLBA)*SectorSize); err != nil {
		return nil, nil, fmt.Errorf("read entry array at LBA %d: %w", h.entriesLBA, err)
	}
	if got := crc32.ChecksumIEEE(array); got != h.entriesCRC {
		return nil, nil, fmt.Errorf("%w: entry array CRC %#08x, computed %#08x", ErrGPT, h.entriesCRC, got)
	}
	return h, array, nil
}
