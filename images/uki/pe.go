package uki

import (
	"bytes"
	"debug/pe"
	"encoding/binary"
	"errors"
	"fmt"
)

// Errors for stubs that cannot take UKI sections. Each is returned wrapped,
// with the detail.
var (
	// ErrNotPE: the bytes are not a well-formed PE/COFF image.
	ErrNotPE = errors.New("stub is not a valid PE image")
	// ErrUnsupportedStub: a valid PE image, but not a PE32+ x86-64 EFI
	// application.
	ErrUnsupportedStub = errors.New("stub is not a PE32+ x86-64 EFI application")
	// ErrSignedStub: the stub carries an Authenticode signature, which
	// appending sections would invalidate.
	ErrSignedStub = errors.New("stub is signed")
	// ErrAlreadyUKI: the stub already has one of the UKI sections.
	ErrAlreadyUKI = errors.New("stub already has UKI sections")
	// ErrNoHeaderRoom: the headers have no room for the new section headers
	// before the first section's data.
	ErrNoHeaderRoom = errors.New("no room in the stub's headers for more section headers")
	// ErrTooLarge: the image would not fit PE's 32-bit sizes and addresses.
	ErrTooLarge = errors.New("image too large for PE")
)

// PE/COFF layout (Microsoft PE format specification).
const (
	dosLfanew         = 0x3c
	coffSize          = 20
	sectionHeaderSize = 40

	coffNumSections  = 2
	coffSymbolTable  = 8
	coffNumSymbols   = 12
	coffOptionalSize = 16
	coffFlags        = 18

	// offsets in the PE32+ optional header
	optSizeOfCode     = 4
	optSizeOfInitData = 8
	optSectionAlign   = 32
	optFileAlign      = 36
	optSizeOfImage    = 56
	optSizeOfHeaders  = 60
	optCheckSum       = 64
	optSubsystem      = 68
	optNumDirs        = 108
	optDirs           = 112
	dirSecurity       = 4 // index of the certificate table

	magicPE32Plus          = 0x20b
	subsystemEFIApp        = 10
	flagLocalSymsStripped  = 0x0008
	scnCntCode             = 0x00000020
	scnCntInitializedData  = 0x00000040
	scnMemRead             = 0x40000000
	maxSections            = 96 // what systemd-stub itself accepts
	coffSymbolSize         = 18
	minAlign, maxFileAlign = 512, 64 << 10
)

// stubLayout is what Assemble needs to know about a validated stub: where
// its headers are and where new sections may go.
type stubLayout struct {
	peOff       uint32 // offset of "PE\0\0"
	optOff      uint32 // offset of the optional header
	sectionsOff uint32 // offset of the section table
	numSections uint16
	fileAlign   uint32
	sectAlign   uint32
	headersSize uint32 // SizeOfHeaders rounded up to FileAlignment
	firstRaw    uint32 // lowest PointerToRawData of a section with data
	nextVA      uint32 // first free virtual address, SectionAlignment-aligned
	dataEnd     uint32 // end of the stub's bytes once a trailing symbol table is dropped
	dropSymbols bool   // the COFF symbol table sits at the end and is dropped
}

func notPE(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrNotPE, fmt.Sprintf(format, args...))
}

func unsupported(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrUnsupportedStub, fmt.Sprintf(format, args...))
}

func alignUp(v, a uint64) uint64 { return (v + a - 1) &^ (a - 1) }

func isPow2(v uint32) bool { return v != 0 && v&(v-1) == 0 }

// parseStub validates a stub and works out its layout. It reads the headers
// with debug/pe and cross-checks them against the raw bytes it will patch;
// every offset is checked against the length, so hostile input gets an error,
// never a panic.
func parseStub(b []byte) (*stubLayout, error) {
	if len(b) < 0x40 || b[0] != 'M' || b[1] != 'Z' {
		return nil, notPE("no MZ header")
	}
	size := uint64(len(b))
	if size > 1<<32-1 {
		return nil, fmt.Errorf("%w: stub is %d bytes", ErrTooLarge, size)
	}
	peOff := uint64(binary.LittleEndian.Uint32(b[dosLfanew:]))
	if peOff+4+coffSize > size || string(b[peOff:peOff+4]) != "PE\x00\x00" {
		return nil, notPE("no PE signature at offset %#x", peOff)
	}
	coff := b[peOff+4:]
	optSize := uint64(binary.LittleEndian.Uint16(coff[coffOptionalSize:]))
	optOff := peOff + 4 + coffSize
	if optOff+2 > size {
		return nil, notPE("optional header out of bounds")
	}
	if m := binary.LittleEndian.Uint16(b[optOff:]); optSize < 2 || m != magicPE32Plus {
		if m == 0x10b {
			return nil, unsupported("PE32 (32-bit) image, want PE32+")
		}
		return nil, unsupported("optional header magic %#x, want PE32+ (%#x)", m, magicPE32Plus)
	}
	if optSize < optDirs || optOff+optSize > size {
		return nil, notPE("PE32+ optional header of %d bytes (file %d bytes)", optSize, size)
	}
	opt := b[optOff : optOff+optSize]
	nsec := binary.LittleEndian.Uint16(coff[coffNumSections:])
	secOff := optOff + optSize
	if nsec == 0 || nsec > maxSections {
		return nil, notPE("%d sections", nsec)
	}
	if secOff+uint64(nsec)*sectionHeaderSize > size {
		return nil, notPE("section table out of bounds")
	}

	f, err := pe.NewFile(bytes.NewReader(b))
	if err != nil {
		return nil, notPE("%v", err)
	}
	defer f.Close()
	if f.Machine != pe.IMAGE_FILE_MACHINE_AMD64 {
		return nil, unsupported("machine %#x, want x86-64 (%#x)", f.Machine, pe.IMAGE_FILE_MACHINE_AMD64)
	}
	oh, ok := f.OptionalHeader.(*pe.OptionalHeader64)
	if !ok {
		return nil, unsupported("no PE32+ optional header")
	}
	if oh.Subsystem != subsystemEFIApp {
		return nil, unsupported("subsystem %d, want EFI application (%d)", oh.Subsystem, subsystemEFIApp)
	}
	if len(f.Sections) != int(nsec) {
		return nil, notPE("debug/pe read %d sections, header says %d", len(f.Sections), nsec)
	}
	if oh.NumberOfRvaAndSizes > dirSecurity && optSize >= optDirs+8*(dirSecurity+1) {
		d := opt[optDirs+8*dirSecurity:]
		if binary.LittleEndian.Uint32(d) != 0 || binary.LittleEndian.Uint32(d[4:]) != 0 {
			return nil, fmt.Errorf("%w: certificate table present; assemble from an unsigned stub and sign the UKI", ErrSignedStub)
		}
	}
	if binary.LittleEndian.Uint32(opt[optNumDirs:]) != oh.NumberOfRvaAndSizes {
		return nil, notPE("data directory count disagrees with debug/pe")
	}

	l := &stubLayout{
		peOff:       uint32(peOff),
		optOff:      uint32(optOff),
		sectionsOff: uint32(secOff),
		numSections: nsec,
		fileAlign:   oh.FileAlignment,
		sectAlign:   oh.SectionAlignment,
		dataEnd:     uint32(size),
	}
	if !isPow2(l.fileAlign) || l.fileAlign < minAlign || l.fileAlign > maxFileAlign {
		return nil, notPE("FileAlignment %#x is not a power of two from 512 to 64 KiB", l.fileAlign)
	}
	if !isPow2(l.sectAlign) || l.sectAlign < l.fileAlign {
		return nil, notPE("SectionAlignment %#x is not a power of two at least FileAlignment", l.sectAlign)
	}
	hdrs := alignUp(uint64(oh.SizeOfHeaders), uint64(l.fileAlign))
	if uint64(oh.SizeOfHeaders) < secOff+uint64(nsec)*sectionHeaderSize || hdrs > size {
		return nil, notPE("SizeOfHeaders %#x does not cover the section table or exceeds the file", oh.SizeOfHeaders)
	}
	l.headersSize = uint32(hdrs)
	l.firstRaw = uint32(size)
	end := uint64(oh.SizeOfImage)
	for i, s := range f.Sections {
		h := s.SectionHeader
		if uki := sectionIndex(h.Name); uki >= 0 {
			return nil, fmt.Errorf("%w: section %d is %s", ErrAlreadyUKI, i, h.Name)
		}
		if h.Size > 0 {
			if uint64(h.Offset)+uint64(h.Size) > size {
				return nil, notPE("section %d (%q) data %#x+%#x beyond the file's %d bytes", i, h.Name, h.Offset, h.Size, size)
			}
			if uint64(h.Offset) < hdrs {
				return nil, notPE("section %d (%q) data at %#x overlaps the headers", i, h.Name, h.Offset)
			}
			l.firstRaw = min(l.firstRaw, h.Offset)
		}
		vsize := uint64(h.VirtualSize)
		if vsize == 0 {
			vsize = uint64(h.Size)
		}
		end = max(end, uint64(h.VirtualAddress)+vsize)
	}
	if end = alignUp(end, uint64(l.sectAlign)); end > 1<<32-1 {
		return nil, fmt.Errorf("%w: stub ends at virtual address %#x", ErrTooLarge, end)
	}
	l.nextVA = uint32(end)

	// Like ukify, drop a COFF symbol table (and its string table) left at the
	// very end of the stub: image files should not carry one, and new section
	// data goes where it was.
	symOff := uint64(binary.LittleEndian.Uint32(coff[coffSymbolTable:]))
	nsym := uint64(binary.LittleEndian.Uint32(coff[coffNumSymbols:]))
	if symOff != 0 {
		symEnd := symOff + nsym*coffSymbolSize
		if symEnd+4 <= size {
			symEnd += uint64(binary.LittleEndian.Uint32(b[symEnd:]))
		}
		var lastRaw uint64
		for _, s := range f.Sections {
			lastRaw = max(lastRaw, uint64(s.Offset)+uint64(s.Size))
		}
		if symEnd == size && symOff >= lastRaw && symOff >= hdrs {
			l.dropSymbols = true
			l.dataEnd = uint32(symOff)
		}
	}
	return l, nil
}

// checksum computes the PE optional-header CheckSum of image, whose
// CheckSum field must already be zero: the sum of the file's little-endian
// 16-bit words with the carries folded back in, plus the file's length.
func checksum(image []byte) uint32 {
	var sum uint64
	for i := 0; i+1 < len(image); i += 2 {
		sum += uint64(binary.LittleEndian.Uint16(image[i:]))
		sum = (sum & 0xffff) + (sum >> 16)
	}
	if len(image)%2 == 1 {
		sum += uint64(image[len(image)-1])
		sum = (sum & 0xffff) + (sum >> 16)
	}
	sum = (sum & 0xffff) + (sum >> 16)
	return uint32(sum) + uint32(len(image))
}
