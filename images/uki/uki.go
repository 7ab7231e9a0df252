// Package uki assembles a Unified Kernel Image: systemd's EFI stub with the
// kernel, initramfs, command line and os-release appended as PE sections, the
// way ukify lays them out, and byte-identical for the same inputs. It also
// predicts the PCR 11 value systemd-stub (systemd 252) measures from those
// sections. It does not sign; the UKI is Authenticode-signed afterwards.
package uki

import (
	"encoding/binary"
	"fmt"
)

// Section names systemd-stub looks for.
const (
	SectionLinux   = ".linux"
	SectionOSRel   = ".osrel"
	SectionCmdline = ".cmdline"
	SectionInitrd  = ".initrd"
)

// Sections are the payloads of a UKI. Linux is required; an empty payload
// gets no section (systemd-stub treats a missing and an empty section alike).
type Sections struct {
	Linux   []byte // the kernel's EFI-stub image (vmlinuz)
	OSRel   []byte // os-release(5) text
	Cmdline []byte // kernel command line, as the kernel gets it
	Initrd  []byte // initramfs
}

// Section is one payload of a UKI, by section name.
type Section struct {
	Name string
	Data []byte
}

// layoutOrder is the order the sections are written in: small text first,
// the kernel last, as ukify does. It does not affect the measurements, which
// follow measureOrder.
var layoutOrder = [...]string{SectionOSRel, SectionCmdline, SectionInitrd, SectionLinux}

// measureOrder is systemd 252's UnifiedSection enum (src/fundamental/
// tpm-pcr.h): the order systemd-stub measures the sections it knows into PCR
// 11. .pcrsig (between .dtb and .pcrpkey) is never measured; .uname is not
// known to 252.
var measureOrder = [...]string{".linux", ".osrel", ".cmdline", ".initrd", ".splash", ".dtb", ".pcrpkey"}

func sectionIndex(name string) int {
	for i, n := range measureOrder {
		if n == name {
			return i
		}
	}
	if name == ".pcrsig" {
		return len(measureOrder)
	}
	return -1
}

// List returns the non-empty sections in layout order.
func (s *Sections) List() []Section {
	by := map[string][]byte{
		SectionLinux: s.Linux, SectionOSRel: s.OSRel, SectionCmdline: s.Cmdline, SectionInitrd: s.Initrd,
	}
	var out []Section
	for _, n := range layoutOrder {
		if len(by[n]) > 0 {
			out = append(out, Section{Name: n, Data: by[n]})
		}
	}
	return out
}

// Assemble appends the sections to stub and returns the UKI. The stub must be
// an unsigned PE32+ x86-64 EFI application with room in its headers for the
// new section headers. Each section's raw data starts at the next
// FileAlignment boundary after the previous one and is zero-padded to
// FileAlignment; its VirtualAddress is the next SectionAlignment boundary
// after the previous section; VirtualSize is the payload's exact length (the
// stub measures and uses VirtualSize bytes). A COFF symbol table at the end of
// the stub is dropped, SizeOfHeaders is rounded up to FileAlignment, and
// NumberOfSections, SizeOfCode/SizeOfInitializedData, SizeOfImage and
// CheckSum are updated. Nothing else (timestamps included) changes, so the
// same inputs give the same bytes.
func Assemble(stub []byte, s Sections) ([]byte, error) {
	if len(s.Linux) == 0 {
		return nil, fmt.Errorf("uki: no kernel (.linux)")
	}
	l, err := parseStub(stub)
	if err != nil {
		return nil, err
	}
	secs := s.List()
	newHdrEnd := uint64(l.sectionsOff) + uint64(int(l.numSections)+len(secs))*sectionHeaderSize
	if room := uint64(min(l.headersSize, l.firstRaw)); newHdrEnd > room {
		free := (room - (uint64(l.sectionsOff) + uint64(l.numSections)*sectionHeaderSize)) / sectionHeaderSize
		return nil, fmt.Errorf("%w: %d sections to add, room for %d (headers end at %#x)", ErrNoHeaderRoom, len(secs), free, room)
	}
	for i := uint64(l.sectionsOff) + uint64(l.numSections)*sectionHeaderSize; i < newHdrEnd; i++ {
		if stub[i] != 0 {
			return nil, fmt.Errorf("%w: header byte %#x after the section table is in use", ErrNoHeaderRoom, i)
		}
	}
	if int(l.numSections)+len(secs) > maxSections {
		return nil, fmt.Errorf("%w: %d sections would exceed systemd-stub's limit of %d", ErrNoHeaderRoom, int(l.numSections)+len(secs), maxSections)
	}

	// Lay out the new sections.
	fa, sa := uint64(l.fileAlign), uint64(l.sectAlign)
	type placed struct {
		Section
		raw, rawSize, va uint64
	}
	var (
		out      []placed
		fileEnd  = alignUp(uint64(l.dataEnd), fa)
		va       = uint64(l.nextVA)
		code     = uint64(0)
		initData = uint64(0)
	)
	for _, sec := range secs {
		p := placed{Section: sec, raw: fileEnd, rawSize: alignUp(uint64(len(sec.Data)), fa), va: va}
		out = append(out, p)
		fileEnd = p.raw + p.rawSize
		va = alignUp(p.va+uint64(len(sec.Data)), sa)
		if sec.Name == SectionLinux {
			code += p.rawSize
		} else {
			initData += p.rawSize
		}
	}
	if fileEnd > 1<<32-1 || va > 1<<32-1 {
		return nil, fmt.Errorf("%w: UKI would be %d bytes, %d in memory", ErrTooLarge, fileEnd, va)
	}

	img := make([]byte, fileEnd)
	copy(img, stub[:l.dataEnd])
	le := binary.LittleEndian
	coff := img[l.peOff+4:]
	opt := img[l.optOff:]
	for i, p := range out {
		h := img[uint64(l.sectionsOff)+uint64(int(l.numSections)+i)*sectionHeaderSize:][:sectionHeaderSize]
		copy(h[0:8], p.Name) // names are at most 8 bytes; shorter ones NUL-padded
		le.PutUint32(h[8:], uint32(len(p.Data)))
		le.PutUint32(h[12:], uint32(p.va))
		le.PutUint32(h[16:], uint32(p.rawSize))
		le.PutUint32(h[20:], uint32(p.raw))
		flags := uint32(scnMemRead | scnCntInitializedData)
		if p.Name == SectionLinux {
			// Kernels booted through the EFI handover protocol run in place.
			flags = scnMemRead | scnCntCode
		}
		le.PutUint32(h[36:], flags)
		copy(img[p.raw:], p.Data)
	}
	le.PutUint16(coff[coffNumSections:], l.numSections+uint16(len(out)))
	if l.dropSymbols {
		le.PutUint32(coff[coffSymbolTable:], 0)
		le.PutUint32(coff[coffNumSymbols:], 0)
		le.PutUint16(coff[coffFlags:], le.Uint16(coff[coffFlags:])|flagLocalSymsStripped)
	}
	add := func(off int, n uint64) error {
		v := uint64(le.Uint32(opt[off:])) + n
		if v > 1<<32-1 {
			return fmt.Errorf("%w: optional header size field at %#x overflows", ErrTooLarge, off)
		}
		le.PutUint32(opt[off:], uint32(v))
		return nil
	}
	if err := add(optSizeOfCode, code); err != nil {
		return nil, err
	}
	if err := add(optSizeOfInitData, initData); err != nil {
		return nil, err
	}
	le.PutUint32(opt[optSizeOfImage:], uint32(va))
	le.PutUint32(opt[optSizeOfHeaders:], l.headersSize)
	le.PutUint32(opt[optCheckSum:], 0)
	le.PutUint32(opt[optCheckSum:], checksum(img))
	return img, nil
}

// OSRelease is the .osrel section of an appliance image of the given
// version.
func OSRelease(version uint64) []byte {
	return []byte(fmt.Sprintf("NAME=\"Data Embassy\"\nID=embassy\nVERSION_ID=%d\n", version))
}
