package diskimage

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"io/fs"
	"strings"
	"testing"
)

// treeImage writes treeFiles into a sparse FAT32 of size bytes and returns
// it with its plan (for the clusters of its files).
func treeImage(t *testing.T, size int64) (*sparse, *fatPlan) {
	t.Helper()
	p, err := planFAT32(size, "TREE", treeFiles())
	if err != nil {
		t.Fatal(err)
	}
	s := newSparse(size)
	if err := p.write(s); err != nil {
		t.Fatal(err)
	}
	return s, p
}

// node returns the node at path in p.
func (p *fatPlan) node(t *testing.T, path string) *fatNode {
	names, err := splitPath(path)
	if err != nil {
		t.Fatal(err)
	}
	n := p.root
next:
	for _, name := range names {
		for _, c := range n.children {
			if c.name == name {
				n = c
				continue next
			}
		}
		t.Fatalf("%s not in the tree", path)
	}
	return n
}

// TestReadFileRejects damages a FAT32 in the ways ReadFile checks for.
func TestReadFileRejects(t *testing.T) {
	const size = 40 << 20
	le := binary.LittleEndian
	u16 := func(off int64, v uint16) func(s *sparse, p *fatPlan) {
		return func(s *sparse, p *fatPlan) { s.WriteAt(le.AppendUint16(nil, v), off) }
	}
	u32 := func(off int64, v uint32) func(s *sparse, p *fatPlan) {
		return func(s *sparse, p *fatPlan) { s.WriteAt(le.AppendUint32(nil, v), off) }
	}
	b8 := func(off int64, v byte) func(s *sparse, p *fatPlan) {
		return func(s *sparse, p *fatPlan) { s.WriteAt([]byte{v}, off) }
	}
	// link sets the FAT entry (in both FATs) of the i-th cluster of the
	// node at path to the value v returns.
	link := func(path string, i uint32, v func(n *fatNode, p *fatPlan) uint32) func(s *sparse, p *fatPlan) {
		return func(s *sparse, p *fatPlan) {
			n := p.node(t, path)
			for f := range uint64(fatCount) {
				s.WriteAt(le.AppendUint32(nil, v(n, p)), int64((fatReserved+f*p.g.fatSectors)*SectorSize)+4*int64(n.first+i))
			}
		}
	}
	// entry rewrites the directory entry of path, found by name in its
	// parent's first cluster.
	entry := func(path string, f func(e []byte)) func(s *sparse, p *fatPlan) {
		return func(s *sparse, p *fatPlan) {
			n := p.node(t, path)
			cl := make([]byte, p.g.clusterSize())
			off := p.g.clusterOffset(n.parent.first)
			s.ReadAt(cl, off)
			i := bytes.Index(cl, n.name[:])
			if i < 0 || i%dirEntrySize != 0 {
				t.Fatalf("no entry for %s", path)
			}
			f(cl[i:][:dirEntrySize])
			s.WriteAt(cl, off)
		}
	}
	const bootLen = 5000 // BootPath's size in treeFiles: 10 clusters
	for _, tc := range []struct {
		name   string
		damage func(s *sparse, p *fatPlan)
		path   string
		text   string
	}{
		{"control", func(*sparse, *fatPlan) {}, BootPath, ""},
		{"active FAT 1", u16(40, 0x81), BootPath, ""},
		{"no boot signature", b8(510, 0), BootPath, "no boot sector"},
		{"no jump", b8(0, 0), BootPath, "no boot sector"},
		{"4096-byte sectors", u16(11, 4096), BootPath, "bytes per sector"},
		{"3 sectors per cluster", b8(13, 3), BootPath, "sectors per cluster"},
		{"no sectors per cluster", b8(13, 0), BootPath, "sectors per cluster"},
		{"64 KiB clusters", b8(13, 128), BootPath, "sectors per cluster"},
		{"no reserved sectors", u16(14, 0), BootPath, "reserved"},
		{"no FATs", b8(16, 0), BootPath, "FATs"},
		{"3 FATs", b8(16, 3), BootPath, "FATs"},
		{"FAT16 root entries", u16(17, 512), BootPath, "not FAT32"},
		{"16-bit sector count", u16(19, 1000), BootPath, "not FAT32"},
		{"16-bit FAT size", u16(22, 100), BootPath, "not FAT32"},
		{"no FAT size", u32(36, 0), BootPath, "not FAT32"},
		{"version", u16(42, 1), BootPath, "not FAT32"},
		{"no sectors", u32(32, 0), BootPath, "sectors in"},
		{"more sectors than the slot", u32(32, size/SectorSize+1), BootPath, "sectors in"},
		{"FAT past the end", u32(36, 0xFFFFFFFF), BootPath, "data region"},
		{"FAT too small", u32(36, 100), BootPath, "cannot map"},
		{"too few clusters", u32(32, 60000), BootPath, "not FAT32"},
		{"active FAT missing", u16(40, 0x82), BootPath, "active FAT 2 of 2"},
		{"root cluster 0", u32(44, 0), BootPath, "root directory cluster 0"},
		{"root cluster past the end", u32(44, 0x0FFFFFFF), BootPath, "root directory cluster"},
		{"file chain loops to its start", link(BootPath, 9, func(n *fatNode, _ *fatPlan) uint32 { return n.first }), BootPath, "loops"},
		{"file chain loops on itself", link(BootPath, 0, func(n *fatNode, _ *fatPlan) uint32 { return n.first }), BootPath, "loops"},
		{"file chain short", link(BootPath, 3, func(*fatNode, *fatPlan) uint32 { return fatEOC }), BootPath, "chain of 4 clusters, needs 10"},
		{"file chain to a free cluster", link(BootPath, 3, func(*fatNode, *fatPlan) uint32 { return 0 }), BootPath, "links to 0"},
		{"file chain to a bad cluster", link(BootPath, 3, func(*fatNode, *fatPlan) uint32 { return fatBad }), BootPath, "bad cluster"},
		{"file chain out of range", link(BootPath, 3, func(_ *fatNode, p *fatPlan) uint32 { return uint32(p.g.clusters + 2) }), BootPath, "out of range"},
		{"file chain upper bits ignored", link(BootPath, 9, func(*fatNode, *fatPlan) uint32 { return 0xF0000000 | fatEOC }), BootPath, ""},
		{"file larger than its chain", entry(BootPath, func(e []byte) { le.PutUint32(e[28:], bootLen+512) }), BootPath, "needs 11"},
		{"file smaller than its chain", entry(BootPath, func(e []byte) { le.PutUint32(e[28:], bootLen-512) }), BootPath, "longer than 9"},
		{"file larger than the volume", entry(BootPath, func(e []byte) { le.PutUint32(e[28:], 0xFFFFFFFF) }), BootPath, "larger than the file system"},
		{"file without a cluster", entry(BootPath, func(e []byte) { le.PutUint16(e[26:], 0); le.PutUint16(e[20:], 0) }), BootPath, "cluster 0 out of range"},
		{"directory without a cluster", entry("/EFI/BOOT", func(e []byte) { le.PutUint16(e[26:], 0) }), BootPath, "has no cluster"},
		{"directory out of range", entry("/EFI/BOOT", func(e []byte) { le.PutUint16(e[20:], 0x0FFF) }), BootPath, "out of range"},
		{"directory chain to a free cluster", link("/MANY", 0, func(*fatNode, *fatPlan) uint32 { return 0 }), "/MANY/NONE", "links to 0"},
		{"deleted entry", entry(BootPath, func(e []byte) { e[0] = 0xE5 }), BootPath, "file does not exist"},
		{"end of directory before it", entry("/EFI/BOOT", func(e []byte) { e[0] = 0 }), BootPath, "file does not exist"},
		{"long-name entry skipped", entry(BootPath, func(e []byte) { e[11] = attrLongName }), BootPath, "file does not exist"},
		{"directory chain loops", func(s *sparse, p *fatPlan) {
			// /MANY (42 entries, 3 clusters) filled with deleted entries
			// after its last, so that no end mark stops the walk, and its
			// last cluster linked back to its first.
			n := p.node(t, "/MANY")
			cs := p.g.clusterSize()
			tail := make([]byte, 3*cs-42*dirEntrySize)
			for i := 0; i < len(tail); i += dirEntrySize {
				tail[i] = 0xE5
			}
			s.WriteAt(tail, p.g.clusterOffset(n.first)+42*dirEntrySize)
			link("/MANY", 2, func(n *fatNode, _ *fatPlan) uint32 { return n.first })(s, p)
		}, "/MANY/NONE", "longer than 2097152 bytes, or its chain loops"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, p := treeImage(t, size)
			tc.damage(s, p)
			got, err := ReadFile(io.NewSectionReader(s, 0, size), tc.path)
			if tc.text == "" {
				if err != nil || len(got) != bootLen {
					t.Fatalf("%d bytes, %v", len(got), err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.text) {
				t.Fatalf("got %v, want an error with %q", err, tc.text)
			}
			if strings.Contains(tc.text, "does not exist") != errors.Is(err, fs.ErrNotExist) {
				t.Fatalf("%v: errors.Is(fs.ErrNotExist) wrong", err)
			}
			if !errors.Is(err, fs.ErrNotExist) && !errors.Is(err, ErrFAT) {
				t.Fatalf("%v does not wrap ErrFAT", err)
			}
		})
	}
}

// TestReadFileShortReader: a slot shorter than its boot sector claims, or
// than a sector, fails cleanly.
func TestReadFileShortReader(t *testing.T) {
	img, err := FAT32(SlotSize, "", []File{{Path: "/A", Data: []byte("a")}})
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range []int64{0, 100, SectorSize, SlotSize - SectorSize} {
		if _, err := ReadFile(io.NewSectionReader(bytes.NewReader(img), 0, n), "/A"); err == nil {
			t.Errorf("%d bytes: no error", n)
		}
	}
	if got, err := ReadFile(io.NewSectionReader(bytes.NewReader(img), 0, SlotSize), "/a"); err != nil || string(got) != "a" {
		t.Errorf("%q, %v", got, err)
	}
}

// TestReadFragmented moves one cluster of a file to the end of the volume
// and relinks its chain: ReadFile follows the three runs.
func TestReadFragmented(t *testing.T) {
	const size = 40 << 20
	s, p := treeImage(t, size)
	n := p.node(t, BootPath)
	moved, far := n.first+5, uint32(p.g.clusters+1)
	buf := make([]byte, p.g.clusterSize())
	s.ReadAt(buf, p.g.clusterOffset(moved))
	s.WriteAt(buf, p.g.clusterOffset(far))
	s.WriteAt(make([]byte, len(buf)), p.g.clusterOffset(moved))
	le := binary.LittleEndian
	for f := range uint64(fatCount) {
		fat := int64((fatReserved + f*p.g.fatSectors) * SectorSize)
		s.WriteAt(le.AppendUint32(nil, far), fat+4*int64(moved-1))
		s.WriteAt(le.AppendUint32(nil, 0), fat+4*int64(moved))
		s.WriteAt(le.AppendUint32(nil, moved+1), fat+4*int64(far))
	}
	got, err := ReadFile(io.NewSectionReader(s, 0, size), BootPath)
	if err != nil || !bytes.Equal(got, n.data) {
		t.Fatalf("%d bytes, %v", len(got), err)
	}
}
