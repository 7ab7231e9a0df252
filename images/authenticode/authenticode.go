// Package authenticode computes the PE/COFF Authenticode digest of an EFI
// application: the digest UEFI firmware measures into PCR4 when it loads the
// image (EV_EFI_BOOT_SERVICES_APPLICATION). The checksum field, the
// certificate-table directory entry and the attached signatures are excluded,
// so a signed and an unsigned copy of the same image hash alike.
package authenticode

import (
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"sort"
)

// ErrNotPE is returned (wrapped) when the input is not a well-formed PE image.
var ErrNotPE = errors.New("not a valid PE image")

const (
	peMagic32     = 0x10b
	peMagic32Plus = 0x20b
	securityDir   = 4 // index of the certificate table in the data directories
)

type section struct {
	offset, size uint32
}

// SHA256 returns the Authenticode SHA-256 digest of a PE image.
func SHA256(image []byte) ([32]byte, error) {
	var out [32]byte
	h := sha256.New()
	if err := Hash(h, image); err != nil {
		return out, err
	}
	copy(out[:], h.Sum(nil))
	return out, nil
}

func notPE(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrNotPE, fmt.Sprintf(format, args...))
}

// Hash writes the Authenticode-covered bytes of image into h.
func Hash(h hash.Hash, image []byte) error {
	size := uint64(len(image))
	if size < 0x40 || image[0] != 'M' || image[1] != 'Z' {
		return notPE("missing MZ header")
	}
	peOff := uint64(binary.LittleEndian.Uint32(image[0x3c:]))
	if peOff+24 > size || string(image[peOff:peOff+4]) != "PE\x00\x00" {
		return notPE("missing PE signature")
	}
	coff := peOff + 4
	numSections := uint64(binary.LittleEndian.Uint16(image[coff+2:]))
	optSize := uint64(binary.LittleEndian.Uint16(image[coff+16:]))
	opt := coff + 20
	if opt+optSize > size || optSize < 2 {
		return notPE("optional header out of bounds")
	}
	var numDirsOff, dirsOff uint64
	switch magic := binary.LittleEndian.Uint16(image[opt:]); magic {
	case peMagic32:
		numDirsOff, dirsOff = 92, 96
	case peMagic32Plus:
		numDirsOff, dirsOff = 108, 112
	default:
		return notPE("unknown optional header magic %#x", magic)
	}
	if optSize < dirsOff {
		return notPE("optional header too short (%d bytes)", optSize)
	}
	checksumOff := opt + 64
	sizeOfHeaders := uint64(binary.LittleEndian.Uint32(image[opt+60:]))
	numDirs := uint64(binary.LittleEndian.Uint32(image[opt+numDirsOff:]))
	if dirsOff+numDirs*8 > optSize {
		return notPE("%d data directories do not fit the optional header", numDirs)
	}
	if sizeOfHeaders > size || sizeOfHeaders < opt+optSize {
		return notPE("SizeOfHeaders %d out of bounds", sizeOfHeaders)
	}

	var certDirOff, certSize uint64
	if numDirs > securityDir {
		certDirOff = opt + dirsOff + securityDir*8
		certAddr := uint64(binary.LittleEndian.Uint32(image[certDirOff:]))
		certSize = uint64(binary.LittleEndian.Uint32(image[certDirOff+4:]))
		if certSize > 0 && (certAddr+certSize > size || certAddr < sizeOfHeaders) {
			return notPE("certificate table [%d,+%d) out of bounds", certAddr, certSize)
		}
		h.Write(image[:checksumOff])
		h.Write(image[checksumOff+4 : certDirOff])
		h.Write(image[certDirOff+8 : sizeOfHeaders])
	} else {
		h.Write(image[:checksumOff])
		h.Write(image[checksumOff+4 : sizeOfHeaders])
	}

	secTable := opt + optSize
	if secTable+numSections*40 > size {
		return notPE("section table out of bounds")
	}
	sections := make([]section, 0, numSections)
	for i := uint64(0); i < numSections; i++ {
		s := image[secTable+i*40:]
		rawSize := binary.LittleEndian.Uint32(s[16:])
		rawPtr := binary.LittleEndian.Uint32(s[20:])
		if rawSize == 0 {
			continue
		}
		if uint64(rawPtr)+uint64(rawSize) > size {
			return notPE("section %d data out of bounds", i)
		}
		sections = append(sections, section{offset: rawPtr, size: rawSize})
	}
	sort.SliceStable(sections, func(i, j int) bool { return sections[i].offset < sections[j].offset })

	hashed := sizeOfHeaders
	for _, s := range sections {
		h.Write(image[s.offset : s.offset+s.size])
		hashed += uint64(s.size)
	}
	if size > hashed+certSize {
		trailing := size - hashed - certSize
		if hashed+trailing > size {
			return notPE("trailing data out of bounds")
		}
		h.Write(image[hashed : hashed+trailing])
	}
	return nil
}
