package diskimage

import (
	"encoding/binary"
	"hash/crc32"
	"io"
	"math/rand/v2"
)

// sparse is an in-memory disk of a fixed size that keeps only what was
// written to it (in order; later writes win) and reads as zero elsewhere,
// so that tests can build and damage whole images without holding them.
type sparse struct {
	size  int64
	parts []part
}

type part struct {
	off  int64
	data []byte
}

func newSparse(size int64) *sparse { return &sparse{size: size} }

func (s *sparse) WriteAt(p []byte, off int64) (int, error) {
	if off < 0 || off+int64(len(p)) > s.size {
		return 0, io.ErrShortWrite
	}
	s.parts = append(s.parts, part{off, append([]byte(nil), p...)})
	return len(p), nil
}

func (s *sparse) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 || off >= s.size {
		return 0, io.EOF
	}
	n := len(p)
	if rest := s.size - off; int64(n) > rest {
		n = int(rest)
	}
	clear(p[:n])
	end := off + int64(n)
	for _, q := range s.parts {
		qend := q.off + int64(len(q.data))
		if qend <= off || q.off >= end {
			continue
		}
		from, to := max(off, q.off), min(end, qend)
		copy(p[from-off:to-off], q.data[from-q.off:to-q.off])
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// bytes returns the whole disk.
func (s *sparse) bytes() []byte {
	b := make([]byte, s.size)
	s.ReadAt(b, 0)
	return b
}

// pseudoRandom returns n reproducible bytes that do not compress.
func pseudoRandom(n int, seed uint64) []byte {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	b := make([]byte, n)
	for i := 0; i+8 <= n; i += 8 {
		binary.LittleEndian.PutUint64(b[i:], r.Uint64())
	}
	for i := n &^ 7; i < n; i++ {
		b[i] = byte(r.Uint32())
	}
	return b
}

// fixGPTCRCs recomputes the entry array CRC and the header CRC of the GPT
// header at lba in disk, as far as the header's fields let it: this lets
// mutated headers reach the checks behind the CRCs.
func fixGPTCRCs(disk []byte, lba uint64) {
	n := uint64(len(disk) / SectorSize)
	if lba >= n {
		return
	}
	h := disk[lba*SectorSize:][:SectorSize]
	le := binary.LittleEndian
	if string(h[:8]) != gptSignature {
		return
	}
	entriesLBA, num, size := le.Uint64(h[72:]), uint64(le.Uint32(h[80:])), uint64(le.Uint32(h[84:]))
	if entriesLBA < n && num*size <= maxEntryArray && entriesLBA*SectorSize+num*size <= uint64(len(disk)) {
		le.PutUint32(h[88:], crc32.ChecksumIEEE(disk[entriesLBA*SectorSize:][:num*size]))
	}
	hsize := min(uint64(le.Uint32(h[12:])), SectorSize)
	le.PutUint32(h[16:], 0)
	le.PutUint32(h[16:], crc32.ChecksumIEEE(h[:hsize]))
}
