package diskimage

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"sort"
)

// File is a file to put in a FAT32 file system.
type File struct {
	Path string // upper-case 8.3 components separated by "/", e.g. BootPath
	Data []byte
}

var (
	// ErrSize is returned for a FAT32 size that is not a whole number of
	// sectors, too small for FAT32's 65525 clusters or too large.
	ErrSize = errors.New("unsupported FAT32 size")
	// ErrNoSpace is returned when the files do not fit.
	ErrNoSpace = errors.New("files do not fit in the file system")
)

// FAT32 layout constants (Microsoft's FAT specification, "FAT: General
// Overview of On-Disk Format", sections 3-6).
const (
	fatReserved     = 32 // reserved sectors: boot sector, FSInfo, backups at 6 and 7
	fatCount        = 2
	fatFSInfo       = 1
	fatBackupBoot   = 6
	fatMinClusters  = 65525 // fewer clusters make it FAT16
	fatMaxClusters  = 0x0FFFFFF5
	fatEOC          = 0x0FFFFFFF // end of chain as written
	fatEOCMin       = 0x0FFFFFF8 // any value from here on ends a chain
	fatBad          = 0x0FFFFFF7
	fatMask         = 0x0FFFFFFF
	dirEntrySize    = 32
	attrVolumeLabel = 0x08
	attrDirectory   = 0x10
	attrArchive     = 0x20
	attrLongName    = 0x0F
	// fixedDate is 2000-01-01 in FAT's date format ((year-1980)<<9 |
	// month<<5 | day); the time is 00:00:00.
	fixedDate = (2000-1980)<<9 | 1<<5 | 1
)

// sectorsPerCluster follows the FAT specification's table for FAT32: 512
// bytes up to 260 MiB (more clusters than FAT32's minimum from about 33 MiB
// on), then 4 KiB up to 8 GiB, 8 KiB up to 16 GiB, 16 KiB up to 32 GiB and
// 32 KiB beyond.
func sectorsPerCluster(sectors uint64) uint64 {
	switch {
	case sectors <= 532480:
		return 1
	case sectors <= 16777216:
		return 8
	case sectors <= 33554432:
		return 16
	case sectors <= 67108864:
		return 32
	}
	return 64
}

// fatGeometry is the layout of a FAT32 file system.
type fatGeometry struct {
	sectors    uint64 // total
	spc        uint64 // sectors per cluster
	fatSectors uint64 // per FAT
	dataStart  uint64 // first sector of cluster 2
	clusters   uint64 // data clusters (numbered 2..clusters+1)
}

func (g *fatGeometry) clusterSize() uint64 { return g.spc * SectorSize }

// clusterOffset returns the byte offset of cluster c in the file system.
func (g *fatGeometry) clusterOffset(c uint32) int64 {
	return int64((g.dataStart + uint64(c-2)*g.spc) * SectorSize)
}

// geometry lays out a FAT32 file system of size bytes: the smallest FAT
// that covers the clusters left after it.
func geometry(size int64) (*fatGeometry, error) {
	if size <= 0 || size%SectorSize != 0 || size/SectorSize > 0xFFFFFFFF {
		return nil, fmt.Errorf("%w: %d bytes is not a whole number of 512-byte sectors below 2 TiB", ErrSize, size)
	}
	g := &fatGeometry{sectors: uint64(size / SectorSize)}
	g.spc = sectorsPerCluster(g.sectors)
	if g.sectors <= fatReserved+fatCount {
		return nil, fmt.Errorf("%w: %d bytes", ErrSize, size)
	}
	clustersFor := func(fatSectors uint64) uint64 {
		used := fatReserved + fatCount*fatSectors
		if used >= g.sectors {
			return 0
		}
		return (g.sectors - used) / g.spc
	}
	fits := func(fatSectors uint64) bool { return (clustersFor(fatSectors)+2)*4 <= fatSectors*SectorSize }
	// Each FAT sector covers 128 clusters: start from the estimate and
	// adjust to the smallest FAT that fits.
	f := max(1, (g.sectors-fatReserved)/(128*g.spc+fatCount))
	for f > 1 && fits(f-1) {
		f--
	}
	for !fits(f) {
		f++
	}
	g.fatSectors = f
	g.dataStart = fatReserved + fatCount*f
	g.clusters = clustersFor(f)
	if g.clusters < fatMinClusters || g.clusters > fatMaxClusters {
		return nil, fmt.Errorf("%w: %d bytes give %d clusters of %d bytes; FAT32 needs %d-%d", ErrSize,
			size, g.clusters, g.clusterSize(), fatMinClusters, fatMaxClusters)
	}
	return g, nil
}

// fatNode is a file or directory of the tree being written.
type fatNode struct {
	name     [11]byte
	dir      bool
	data     []byte
	children []*fatNode // sorted by name when allocated
	byName   map[[11]byte]*fatNode
	parent   *fatNode
	first    uint32 // first cluster, 0 for an empty file
	clusters uint64
}

// fatPlan is a FAT32 file system laid out and ready to write.
type fatPlan struct {
	g       *fatGeometry
	label   [11]byte
	volID   uint32
	root    *fatNode
	used    uint64 // clusters allocated
	ordered []*fatNode
}

// planFAT32 checks the names and sizes and allocates the clusters: the root
// directory at cluster 2, then each directory followed by its children in
// name order, depth first, each contiguous.
func planFAT32(size int64, label string, files []File) (*fatPlan, error) {
	g, err := geometry(size)
	if err != nil {
		return nil, err
	}
	p := &fatPlan{g: g, root: &fatNode{dir: true}}
	if p.label, err = volumeLabel(label); err != nil {
		return nil, err
	}
	// A fixed volume ID, different for different labels (Linux lists file
	// systems by it under /dev/disk/by-uuid).
	p.volID = crc32.ChecksumIEEE(p.label[:])
	for _, f := range files {
		if err := p.add(f); err != nil {
			return nil, err
		}
	}
	cs := g.clusterSize()
	var alloc func(n *fatNode) error
	alloc = func(n *fatNode) error {
		if n.dir {
			sort.Slice(n.children, func(i, j int) bool { return bytes.Compare(n.children[i].name[:], n.children[j].name[:]) < 0 })
			entries := uint64(len(n.children))
			if n == p.root {
				if p.hasLabel() {
					entries++
				}
			} else {
				entries += 2 // "." and ".."
			}
			if entries*dirEntrySize > maxDirBytes {
				return fmt.Errorf("%w: a directory with %d entries; FAT allows %d", ErrNoSpace, entries, maxDirBytes/dirEntrySize)
			}
			n.clusters = max(1, (entries*dirEntrySize+cs-1)/cs)
		} else {
			n.clusters = (uint64(len(n.data)) + cs - 1) / cs
		}
		if n.clusters > 0 {
			n.first = uint32(2 + p.used)
			p.used += n.clusters
		}
		p.ordered = append(p.ordered, n)
		for _, c := range n.children {
			if p.used > g.clusters {
				return nil // reported below
			}
			if err := alloc(c); err != nil {
				return err
			}
		}
		return nil
	}
	if err := alloc(p.root); err != nil {
		return nil, err
	}
	if p.used > g.clusters {
		return nil, fmt.Errorf("%w: more than the %d clusters of %d bytes (%d bytes) of a %d-byte FAT32",
			ErrNoSpace, g.clusters, cs, g.clusters*cs, size)
	}
	return p, nil
}

// add puts f into the tree.
func (p *fatPlan) add(f File) error {
	names, err := splitPath(f.Path)
	if err != nil {
		return err
	}
	if uint64(len(f.Data)) > 0xFFFFFFFF {
		return fmt.Errorf("%w: %s: %d bytes, FAT32 files hold less than 4 GiB", ErrNoSpace, f.Path, len(f.Data))
	}
	if uint64(len(f.Data)) > p.g.clusters*p.g.clusterSize() {
		return fmt.Errorf("%w: %s: %d bytes in %d bytes of clusters", ErrNoSpace, f.Path, len(f.Data), p.g.clusters*p.g.clusterSize())
	}
	dir := p.root
	for i, n := range names {
		found := dir.byName[n]
		last := i == len(names)-1
		switch {
		case found != nil && (last || !found.dir):
			kind := "file"
			if found.dir {
				kind = "directory"
			}
			return fmt.Errorf("%w: %s: %s is already a %s", ErrName, f.Path, displayName(n), kind)
		case found != nil:
			dir = found
		case last:
			dir.addChild(&fatNode{name: n, data: f.Data})
		default:
			d := &fatNode{name: n, dir: true}
			dir.addChild(d)
			dir = d
		}
	}
	return nil
}

func (n *fatNode) addChild(c *fatNode) {
	if n.byName == nil {
		n.byName = map[[11]byte]*fatNode{}
	}
	c.parent = n
	n.children = append(n.children, c)
	n.byName[c.name] = c
}

// hasLabel says whether the root directory holds a volume label entry: it
// does unless the volume has none ("NO NAME" in the boot sector).
func (p *fatPlan) hasLabel() bool { return p.label != noLabel }

// dirEntry returns a directory entry with the fixed timestamps.
func dirEntry(name [11]byte, attr byte, cluster uint32, size uint32) []byte {
	e := make([]byte, dirEntrySize)
	le := binary.LittleEndian
	copy(e, name[:])
	e[11] = attr
	le.PutUint16(e[16:], fixedDate) // creation date (time 0 at 14)
	le.PutUint16(e[18:], fixedDate) // last access date
	le.PutUint16(e[20:], uint16(cluster>>16))
	le.PutUint16(e[24:], fixedDate) // write date (time 0 at 22)
	le.PutUint16(e[26:], uint16(cluster))
	le.PutUint32(e[28:], size)
	return e
}

// dotNames are the names of a directory's "." and ".." entries.
var dotNames = [2][11]byte{[11]byte([]byte(".          ")), [11]byte([]byte("..         "))}

// directory returns the contents of directory n, n.clusters long.
func (p *fatPlan) directory(n *fatNode) []byte {
	b := make([]byte, 0, n.clusters*p.g.clusterSize())
	if n == p.root {
		if p.hasLabel() {
			b = append(b, dirEntry(p.label, attrVolumeLabel, 0, 0)...)
		}
	} else {
		parent := n.parent.first
		if n.parent == p.root {
			parent = 0 // ".." of a directory in the root names cluster 0
		}
		b = append(b, dirEntry(dotNames[0], attrDirectory, n.first, 0)...)
		b = append(b, dirEntry(dotNames[1], attrDirectory, parent, 0)...)
	}
	for _, c := range n.children {
		if c.dir {
			b = append(b, dirEntry(c.name, attrDirectory, c.first, 0)...)
		} else {
			b = append(b, dirEntry(c.name, attrArchive, c.first, uint32(len(c.data)))...)
		}
	}
	return b[:cap(b)]
}

// reserved returns the reserved sectors: the boot sector and FSInfo, and
// their backups at sectors 6 and 7.
func (p *fatPlan) reserved() []byte {
	g := p.g
	b := make([]byte, fatReserved*SectorSize)
	le := binary.LittleEndian
	boot := b[:SectorSize]
	copy(boot, []byte{0xEB, 0x58, 0x90}) // jump over the BPB
	copy(boot[3:11], "EMBASSY ")         // OEM name
	le.PutUint16(boot[11:], SectorSize)
	boot[13] = byte(g.spc)
	le.PutUint16(boot[14:], fatReserved)
	boot[16] = fatCount
	boot[21] = 0xF8             // media: fixed disk
	le.PutUint16(boot[24:], 32) // sectors per track (CHS, unused)
	le.PutUint16(boot[26:], 64) // heads (CHS, unused)
	le.PutUint32(boot[28:], 0)  // hidden sectors: 0, so a slot image fits either slot
	le.PutUint32(boot[32:], uint32(g.sectors))
	le.PutUint32(boot[36:], uint32(g.fatSectors))
	le.PutUint32(boot[44:], 2) // root directory cluster
	le.PutUint16(boot[48:], fatFSInfo)
	le.PutUint16(boot[50:], fatBackupBoot)
	boot[64] = 0x80 // drive number
	boot[66] = 0x29 // extended boot signature: the next three fields are valid
	le.PutUint32(boot[67:], p.volID)
	copy(boot[71:82], p.label[:])
	copy(boot[82:90], "FAT32   ")
	boot[510], boot[511] = 0x55, 0xAA

	info := b[fatFSInfo*SectorSize:][:SectorSize]
	le.PutUint32(info[0:], 0x41615252)
	le.PutUint32(info[484:], 0x61417272)
	le.PutUint32(info[488:], uint32(g.clusters-p.used)) // free clusters
	next := uint32(2 + p.used)                          // hint: first free cluster
	if p.used == g.clusters {
		next = 0xFFFFFFFF
	}
	le.PutUint32(info[492:], next)
	le.PutUint32(info[508:], 0xAA550000)

	copy(b[fatBackupBoot*SectorSize:], b[:2*SectorSize])
	return b
}

// fat returns one FAT.
func (p *fatPlan) fat() []byte {
	b := make([]byte, p.g.fatSectors*SectorSize)
	le := binary.LittleEndian
	le.PutUint32(b[0:], 0x0FFFFF00|0xF8) // media byte
	le.PutUint32(b[4:], fatEOC)          // clean, no I/O errors
	for _, n := range p.ordered {
		for i := range n.clusters {
			c := uint64(n.first) + i
			next := uint32(c + 1)
			if i == n.clusters-1 {
				next = fatEOC
			}
			le.PutUint32(b[4*c:], next)
		}
	}
	return b
}

// write writes the file system to w at offset 0: the reserved sectors, both
// FATs, the directories and the files (each padded with zeros to its last
// cluster's end). Free clusters are not written.
func (p *fatPlan) write(w io.WriterAt) error {
	if _, err := w.WriteAt(p.reserved(), 0); err != nil {
		return err
	}
	fat := p.fat()
	for i := range uint64(fatCount) {
		if _, err := w.WriteAt(fat, int64((fatReserved+i*p.g.fatSectors)*SectorSize)); err != nil {
			return err
		}
	}
	cs := p.g.clusterSize()
	for _, n := range p.ordered {
		if n.clusters == 0 {
			continue
		}
		off := p.g.clusterOffset(n.first)
		if n.dir {
			if _, err := w.WriteAt(p.directory(n), off); err != nil {
				return err
			}
			continue
		}
		if _, err := w.WriteAt(n.data, off); err != nil {
			return err
		}
		if pad := n.clusters*cs - uint64(len(n.data)); pad > 0 {
			if _, err := w.WriteAt(make([]byte, pad), off+int64(len(n.data))); err != nil {
				return err
			}
		}
	}
	return nil
}

// FAT32 returns a FAT32 file system of size bytes (a whole number of
// 512-byte sectors, about 33 MiB to 2 TiB) with the volume label given (up
// to 11 upper-case characters; "" for none) holding files, the directories
// on their paths made as needed. Names must be upper-case 8.3 names. The
// same arguments give the same bytes.
func FAT32(size int64, label string, files []File) ([]byte, error) {
	p, err := planFAT32(size, label, files)
	if err != nil {
		return nil, fmt.Errorf("diskimage: %w", err)
	}
	b := make([]byte, size)
	if err := p.write(memWriter(b)); err != nil {
		return nil, fmt.Errorf("diskimage: %w", err)
	}
	return b, nil
}

// memWriter writes into a byte slice that does not grow.
type memWriter []byte

func (m memWriter) WriteAt(p []byte, off int64) (int, error) {
	if off < 0 || off > int64(len(m)) || int64(len(p)) > int64(len(m))-off {
		return 0, fmt.Errorf("write of %d bytes at %d beyond %d bytes", len(p), off, len(m))
	}
	return copy(m[off:], p), nil
}
