package diskimage

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"strings"
)

// ErrFAT is returned by ReadFile for a slot that is not a valid FAT32 file
// system, or whose directories or cluster chains are damaged.
var ErrFAT = errors.New("invalid FAT32 file system")

// maxDirBytes is the largest directory FAT allows: 65536 entries.
const maxDirBytes = 65536 * dirEntrySize

// fatReader reads a FAT32 file system.
type fatReader struct {
	r         io.ReaderAt
	g         fatGeometry
	fatOffset int64  // byte offset of the FAT in use
	root      uint32 // the root directory's first cluster
	// One FAT sector cached: chains are mostly read sector by sector.
	cached    int64
	cachedFAT []byte
}

// ReadFile returns the contents of the file at path (8.3 components
// separated by "/", matched without regard to case) in the FAT32 file
// system on slot. It checks the boot sector's layout against the slot's
// size, that every cluster it follows is in range, in use and not bad,
// and that a file's chain is exactly as long as its size needs, which also
// ends any loop. A missing file gives an error wrapping fs.ErrNotExist.
func ReadFile(slot *io.SectionReader, path string) ([]byte, error) {
	names, err := splitPath(strings.ToUpper(path))
	if err != nil {
		return nil, err
	}
	fr, err := openFAT(slot, slot.Size())
	if err != nil {
		return nil, err
	}
	cluster := uint32(0) // the root, found in the boot sector
	for i, n := range names {
		e, err := fr.lookup(cluster, n)
		if err != nil {
			return nil, err
		}
		if e == nil {
			return nil, fmt.Errorf("%s: %w", path, fs.ErrNotExist)
		}
		last := i == len(names)-1
		if isDir := e.attr&attrDirectory != 0; isDir != !last {
			if last {
				return nil, fmt.Errorf("%s: is a directory", path)
			}
			return nil, fmt.Errorf("%s: %s is not a directory: %w", path, displayName(n), fs.ErrNotExist)
		}
		if !last {
			if e.cluster == 0 {
				return nil, fmt.Errorf("%w: directory %s has no cluster", ErrFAT, displayName(n))
			}
			cluster = e.cluster
			continue
		}
		return fr.readFile(e)
	}
	return nil, fmt.Errorf("%w: empty path", ErrName) // not reached: splitPath gives a component
}

// openFAT reads and checks the boot sector of the FAT32 file system on r,
// size bytes long. Only the fields it needs to find the FAT and the
// clusters are trusted, and each is checked; FSInfo, the backup boot
// sector, the label and the volume ID are not read.
func openFAT(r io.ReaderAt, size int64) (*fatReader, error) {
	b := make([]byte, SectorSize)
	if _, err := r.ReadAt(b, 0); err != nil {
		return nil, fmt.Errorf("read boot sector: %w", err)
	}
	le := binary.LittleEndian
	if b[510] != 0x55 || b[511] != 0xAA || !(b[0] == 0xEB && b[2] == 0x90 || b[0] == 0xE9) {
		return nil, fmt.Errorf("%w: no boot sector", ErrFAT)
	}
	var (
		bps       = uint64(le.Uint16(b[11:]))
		spc       = uint64(b[13])
		reserved  = uint64(le.Uint16(b[14:]))
		nfats     = uint64(b[16])
		rootEnts  = le.Uint16(b[17:])
		total16   = le.Uint16(b[19:])
		fat16     = le.Uint16(b[22:])
		total     = uint64(le.Uint32(b[32:]))
		fatSize   = uint64(le.Uint32(b[36:]))
		extFlags  = le.Uint16(b[40:])
		version   = le.Uint16(b[42:])
		rootClus  = le.Uint32(b[44:])
		activeFAT = uint64(0)
	)
	switch {
	case bps != SectorSize:
		return nil, fmt.Errorf("%w: %d bytes per sector, want %d", ErrFAT, bps, SectorSize)
	case spc == 0 || spc&(spc-1) != 0 || spc*bps > 32<<10:
		return nil, fmt.Errorf("%w: %d sectors per cluster", ErrFAT, spc)
	case reserved == 0 || nfats == 0 || nfats > 2:
		return nil, fmt.Errorf("%w: %d reserved sectors, %d FATs", ErrFAT, reserved, nfats)
	case rootEnts != 0 || total16 != 0 || fat16 != 0 || fatSize == 0 || version != 0:
		return nil, fmt.Errorf("%w: not FAT32 (root entries %d, 16-bit sector count %d, 16-bit FAT size %d, FAT32 FAT size %d, version %#x)",
			ErrFAT, rootEnts, total16, fat16, fatSize, version)
	case total == 0 || total*bps > uint64(size):
		return nil, fmt.Errorf("%w: %d sectors in %d bytes", ErrFAT, total, size)
	}
	if extFlags&0x80 != 0 { // mirroring off: only the active FAT is used
		activeFAT = uint64(extFlags & 0x0F)
		if activeFAT >= nfats {
			return nil, fmt.Errorf("%w: active FAT %d of %d", ErrFAT, activeFAT, nfats)
		}
	}
	g := fatGeometry{sectors: total, spc: spc, fatSectors: fatSize, dataStart: reserved + nfats*fatSize}
	if g.dataStart >= total { // no overflow: each term is below 2^32 * 3
		return nil, fmt.Errorf("%w: data region starts at sector %d of %d", ErrFAT, g.dataStart, total)
	}
	g.clusters = (total - g.dataStart) / spc
	switch {
	case g.clusters < fatMinClusters || g.clusters > fatMaxClusters:
		return nil, fmt.Errorf("%w: %d clusters is not FAT32", ErrFAT, g.clusters)
	case (g.clusters+2)*4 > fatSize*bps:
		return nil, fmt.Errorf("%w: a FAT of %d sectors cannot map %d clusters", ErrFAT, fatSize, g.clusters)
	case rootClus < 2 || uint64(rootClus) > g.clusters+1:
		return nil, fmt.Errorf("%w: root directory cluster %d", ErrFAT, rootClus)
	}
	return &fatReader{r: r, g: g, fatOffset: int64((reserved + activeFAT*fatSize) * bps), root: rootClus, cached: -1}, nil
}

// next returns the FAT entry of cluster c (in range).
func (fr *fatReader) next(c uint32) (uint32, error) {
	off := fr.fatOffset + int64(c)*4
	sector := off / SectorSize
	if sector != fr.cached {
		if fr.cachedFAT == nil {
			fr.cachedFAT = make([]byte, SectorSize)
		}
		if _, err := fr.r.ReadAt(fr.cachedFAT, sector*SectorSize); err != nil {
			fr.cached = -1
			return 0, fmt.Errorf("read FAT: %w", err)
		}
		fr.cached = sector
	}
	return binary.LittleEndian.Uint32(fr.cachedFAT[off%SectorSize:]) & fatMask, nil
}

func (fr *fatReader) valid(c uint32) bool { return c >= 2 && uint64(c) <= fr.g.clusters+1 }

// chain follows the chain from cluster first for at most limit clusters,
// calling visit with each. It returns the number of clusters visited and
// whether the chain ended (an end-of-chain mark) within the limit. A free,
// bad or out-of-range link is an error.
func (fr *fatReader) chain(first uint32, limit uint64, visit func(c uint32) error) (n uint64, ended bool, err error) {
	c := first
	if !fr.valid(c) {
		return 0, false, fmt.Errorf("%w: cluster %d out of range 2-%d", ErrFAT, c, fr.g.clusters+1)
	}
	for n < limit {
		if err := visit(c); err != nil {
			return n, false, err
		}
		n++
		next, err := fr.next(c)
		if err != nil {
			return n, false, err
		}
		switch {
		case next >= fatEOCMin:
			return n, true, nil
		case next == fatBad:
			return n, false, fmt.Errorf("%w: cluster %d links to a bad cluster", ErrFAT, c)
		case !fr.valid(next):
			return n, false, fmt.Errorf("%w: cluster %d links to %d (out of range 2-%d, or free)", ErrFAT, c, next, fr.g.clusters+1)
		}
		c = next
	}
	return n, false, nil
}

// fatEntry is a directory entry ReadFile uses.
type fatEntry struct {
	attr    byte
	cluster uint32
	size    uint32
}

// lookup returns the entry named name in the directory starting at cluster
// dir (0 for the root), or nil if there is none.
func (fr *fatReader) lookup(dir uint32, name [11]byte) (*fatEntry, error) {
	if dir == 0 {
		dir = fr.root
	}
	cs := fr.g.clusterSize()
	buf := make([]byte, cs)
	var found *fatEntry
	done := errors.New("done") // ends the walk early
	_, ended, err := fr.chain(dir, max(1, maxDirBytes/cs), func(c uint32) error {
		if _, err := fr.r.ReadAt(buf, fr.g.clusterOffset(c)); err != nil {
			return fmt.Errorf("read directory cluster %d: %w", c, err)
		}
		for e := buf; len(e) >= dirEntrySize; e = e[dirEntrySize:] {
			switch {
			case e[0] == 0x00: // no entries after this one
				return done
			case e[0] == 0xE5, e[11]&0x3F == attrLongName, e[11]&attrVolumeLabel != 0:
				continue // deleted, long-name part, volume label
			}
			var n [11]byte
			copy(n[:], e[:11])
			if n[0] == 0x05 { // a name starting with 0xE5
				n[0] = 0xE5
			}
			if n == name {
				le := binary.LittleEndian
				found = &fatEntry{attr: e[11], cluster: uint32(le.Uint16(e[20:]))<<16 | uint32(le.Uint16(e[26:])), size: le.Uint32(e[28:])}
				return done
			}
		}
		return nil
	})
	switch {
	case err == done:
		return found, nil
	case err != nil:
		return nil, err
	case !ended:
		return nil, fmt.Errorf("%w: directory at cluster %d is longer than %d bytes, or its chain loops", ErrFAT, dir, maxDirBytes)
	}
	return nil, nil
}

// readFile returns the contents of the file e: exactly ceil(size/cluster
// size) clusters, the chain ending at the last.
func (fr *fatReader) readFile(e *fatEntry) ([]byte, error) {
	if e.size == 0 {
		return []byte{}, nil
	}
	cs := fr.g.clusterSize()
	need := (uint64(e.size) + cs - 1) / cs
	if need > fr.g.clusters {
		return nil, fmt.Errorf("%w: file of %d bytes larger than the file system", ErrFAT, e.size)
	}
	// Walk the chain first, collecting contiguous runs, so that nothing is
	// allocated for a size the chain does not back.
	type run struct{ first, n uint32 }
	var runs []run
	n, ended, err := fr.chain(e.cluster, need, func(c uint32) error {
		if k := len(runs) - 1; k >= 0 && runs[k].first+runs[k].n == c {
			runs[k].n++
		} else {
			runs = append(runs, run{c, 1})
		}
		return nil
	})
	switch {
	case err != nil:
		return nil, err
	case n < need:
		return nil, fmt.Errorf("%w: file of %d bytes has a chain of %d clusters, needs %d", ErrFAT, e.size, n, need)
	case !ended:
		return nil, fmt.Errorf("%w: file of %d bytes has a chain longer than %d clusters, or one that loops", ErrFAT, e.size, need)
	}
	out := make([]byte, e.size)
	pos := uint64(0)
	for _, r := range runs {
		l := min(uint64(r.n)*cs, uint64(e.size)-pos)
		if _, err := fr.r.ReadAt(out[pos:pos+l], fr.g.clusterOffset(r.first)); err != nil {
			return nil, fmt.Errorf("read file clusters %d-%d: %w", r.first, r.first+r.n-1, err)
		}
		pos += l
	}
	return out, nil
}
