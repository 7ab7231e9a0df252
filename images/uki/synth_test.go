package uki

import "encoding/binary"

// synth describes a synthetic PE image for tests: a minimal EFI application
// with one .text section, with knobs to make it wrong in one way at a time.
type synth struct {
	magic        uint16
	machine      uint16
	subsystem    uint16
	headers      uint32 // SizeOfHeaders
	sections     int    // number of (dummy) sections
	signed       bool   // non-empty certificate table
	symbols      bool   // COFF symbol and string table at the end
	firstSection string // name of the first section
}

func defaultSynth() synth {
	return synth{magic: magicPE32Plus, machine: 0x8664, subsystem: subsystemEFIApp, headers: 0x400, sections: 1, firstSection: ".text"}
}

// build lays the image out: DOS header, PE header at 0x40, optional header
// (PE32+: 240 bytes, PE32: 224), section table, data at SizeOfHeaders, one
// 0x200-byte raw block per section, sections 0x1000 apart in memory.
func (s synth) build() []byte {
	le := binary.LittleEndian
	optSize := 240
	if s.magic == 0x10b {
		optSize = 224
	}
	const fa, sa = 0x200, 0x1000
	size := int(s.headers) + s.sections*fa
	symOff := size
	if s.symbols {
		size += 3*coffSymbolSize + 4 + 12
	}
	b := make([]byte, size)
	copy(b, "MZ")
	le.PutUint32(b[dosLfanew:], 0x40)
	copy(b[0x40:], "PE\x00\x00")
	coff := b[0x44:]
	le.PutUint16(coff[0:], s.machine)
	le.PutUint16(coff[coffNumSections:], uint16(s.sections))
	le.PutUint16(coff[coffOptionalSize:], uint16(optSize))
	le.PutUint16(coff[coffFlags:], 0x206)
	if s.symbols {
		le.PutUint32(coff[coffSymbolTable:], uint32(symOff))
		le.PutUint32(coff[coffNumSymbols:], 3)
		le.PutUint32(b[symOff+3*coffSymbolSize:], 4+12)
		copy(b[symOff+3*coffSymbolSize+4:], "efi_main\x00ab\x00")
	}
	opt := b[0x44+coffSize:]
	le.PutUint16(opt[0:], s.magic)
	le.PutUint32(opt[optSizeOfCode:], fa)
	le.PutUint32(opt[16:], sa) // AddressOfEntryPoint
	le.PutUint32(opt[20:], sa) // BaseOfCode
	dirs := optDirs
	if s.magic == 0x10b {
		le.PutUint32(opt[32:], sa)
		le.PutUint32(opt[36:], fa)
		le.PutUint32(opt[56:], uint32(sa*(s.sections+1)))
		le.PutUint32(opt[60:], s.headers)
		le.PutUint16(opt[68:], s.subsystem)
		le.PutUint32(opt[92:], 16)
		dirs = 96
	} else {
		le.PutUint32(opt[optSectionAlign:], sa)
		le.PutUint32(opt[optFileAlign:], fa)
		le.PutUint32(opt[optSizeOfImage:], uint32(sa*(s.sections+1)))
		le.PutUint32(opt[optSizeOfHeaders:], s.headers)
		le.PutUint16(opt[optSubsystem:], s.subsystem)
		le.PutUint32(opt[optNumDirs:], 16)
	}
	if s.signed {
		le.PutUint32(opt[dirs+8*dirSecurity:], uint32(size))
		le.PutUint32(opt[dirs+8*dirSecurity+4:], 8)
	}
	sec := b[0x44+coffSize+optSize:]
	for i := 0; i < s.sections; i++ {
		h := sec[i*sectionHeaderSize:]
		name := ".data"
		if i == 0 {
			name = s.firstSection
		}
		copy(h[0:8], name)
		le.PutUint32(h[8:], 0x10+uint32(i))
		le.PutUint32(h[12:], uint32(sa*(i+1)))
		le.PutUint32(h[16:], fa)
		le.PutUint32(h[20:], s.headers+uint32(i*fa))
		le.PutUint32(h[36:], 0x60000020)
		for j := 0; j < 0x10+i; j++ {
			b[int(s.headers)+i*fa+j] = byte(0xc3 - i)
		}
	}
	return b
}
