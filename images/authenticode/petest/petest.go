// Package petest builds small PE32+ images for tests that need a file
// whose Authenticode digest can be computed (a stand-in UKI).
package petest

import "encoding/binary"

// MinimalPE builds a PE32+ image with one section of 0x100 bytes (its
// content varied by seed), numDirs data directories and optional trailing
// bytes.
func MinimalPE(numDirs uint32, seed byte, trailing []byte) []byte {
	const peOff = 0x40
	const optSize = 112 + 16*8
	img := make([]byte, 0x200)
	img[0], img[1] = 'M', 'Z'
	binary.LittleEndian.PutUint32(img[0x3c:], peOff)
	copy(img[peOff:], "PE\x00\x00")
	coff := peOff + 4
	binary.LittleEndian.PutUint16(img[coff:], 0x8664)
	binary.LittleEndian.PutUint16(img[coff+2:], 1)
	binary.LittleEndian.PutUint16(img[coff+16:], optSize)
	opt := coff + 20
	binary.LittleEndian.PutUint16(img[opt:], 0x20b)    // PE32+
	binary.LittleEndian.PutUint32(img[opt+60:], 0x200) // SizeOfHeaders
	binary.LittleEndian.PutUint32(img[opt+108:], numDirs)
	sec := opt + optSize
	copy(img[sec:], ".text")
	binary.LittleEndian.PutUint32(img[sec+16:], 0x100) // SizeOfRawData
	binary.LittleEndian.PutUint32(img[sec+20:], 0x200) // PointerToRawData
	body := make([]byte, 0x100)
	for i := range body {
		body[i] = byte(i) + seed
	}
	img = append(img, body...)
	return append(img, trailing...)
}
