package luks2

import (
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"hash"
)

// diffuse is the LUKS anti-forensic diffusion: each digest-sized block i of
// buf is replaced by H(be32(i) || block); a short last block by the truncated
// hash.
func diffuse(buf []byte, h hash.Hash) {
	ds := h.Size()
	var idx [4]byte
	for i, off := 0, 0; off < len(buf); i, off = i+1, off+ds {
		end := min(off+ds, len(buf))
		h.Reset()
		binary.BigEndian.PutUint32(idx[:], uint32(i))
		h.Write(idx[:])
		h.Write(buf[off:end])
		sum := h.Sum(nil)
		copy(buf[off:end], sum)
	}
}

func xorInto(dst, src []byte) {
	for i := range dst {
		dst[i] ^= src[i]
	}
}

// afSplit spreads key over stripes blocks so that losing any one block of
// the stored material loses the key.
func afSplit(key []byte, stripes int, h hash.Hash) ([]byte, error) {
	if stripes < 1 {
		return nil, fmt.Errorf("AF stripes %d", stripes)
	}
	n := len(key)
	out := make([]byte, n*stripes)
	if _, err := rand.Read(out[:n*(stripes-1)]); err != nil {
		return nil, fmt.Errorf("AF random stripes: %w", err)
	}
	acc := make([]byte, n)
	defer clear(acc)
	for i := 0; i < stripes-1; i++ {
		xorInto(acc, out[i*n:(i+1)*n])
		diffuse(acc, h)
	}
	last := out[(stripes-1)*n:]
	copy(last, acc)
	xorInto(last, key)
	return out, nil
}

// afMerge recovers the key from split material.
func afMerge(material []byte, keySize, stripes int, h hash.Hash) ([]byte, error) {
	if keySize <= 0 || stripes < 1 || len(material) < keySize*stripes {
		return nil, fmt.Errorf("AF material of %d bytes is too short for %d stripes of %d bytes", len(material), stripes, keySize)
	}
	acc := make([]byte, keySize)
	for i := 0; i < stripes-1; i++ {
		xorInto(acc, material[i*keySize:(i+1)*keySize])
		diffuse(acc, h)
	}
	xorInto(acc, material[(stripes-1)*keySize:stripes*keySize])
	return acc, nil
}
