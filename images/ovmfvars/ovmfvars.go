// Package ovmfvars reads and writes the variable store of an OVMF VARS
// flash image: edk2's authenticated variable store inside a firmware
// volume. mkimage uses it to produce a VARS file with the home state's
// Secure Boot keys (PK, KEK, db) enrolled and Secure Boot on, written
// directly into the store as edk2 itself keeps them, without booting the
// firmware to enroll them (virt-fw-vars is not in this Debian release).
//
// Layout (edk2 MdeModulePkg/Include/Guid/VariableFormat.h and
// PiFirmwareVolume.h): a firmware volume header with the NV-data
// filesystem GUID and a 16-bit checksum; at its end the variable store
// header (the authenticated-variable GUID, its size, "formatted" and
// "healthy"); then the variables, each a 60-byte authenticated header
// (start id 0x55AA, state, attributes, monotonic count, timestamp, public
// key index, name and data sizes, vendor GUID), its UTF-16 name with a
// terminating NUL and its data, each header aligned to 4 bytes; free
// space is 0xFF.
package ovmfvars

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"time"
	"unicode/utf16"
)

// ErrFormat is returned for a flash image that is not an OVMF variable
// store this package understands.
var ErrFormat = errors.New("not an OVMF authenticated variable store")

// GUID is an EFI GUID in its in-memory (mixed-endian) byte order.
type GUID [16]byte

// MustGUID parses the textual form 8-4-4-4-12.
func MustGUID(s string) GUID {
	g, err := ParseGUID(s)
	if err != nil {
		panic(err)
	}
	return g
}

// ParseGUID parses the textual form 8-4-4-4-12 into EFI byte order.
func ParseGUID(s string) (GUID, error) {
	var g GUID
	if len(s) != 36 || s[8] != '-' || s[13] != '-' || s[18] != '-' || s[23] != '-' {
		return g, fmt.Errorf("GUID %q: want 8-4-4-4-12 hex digits", s)
	}
	raw, err := hex.DecodeString(s[0:8] + s[9:13] + s[14:18] + s[19:23] + s[24:36])
	if err != nil {
		return g, fmt.Errorf("GUID %q: %w", s, err)
	}
	// The first three fields are little-endian in memory.
	g = GUID{raw[3], raw[2], raw[1], raw[0], raw[5], raw[4], raw[7], raw[6]}
	copy(g[8:], raw[8:])
	return g, nil
}

func (g GUID) String() string {
	return fmt.Sprintf("%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x",
		g[3], g[2], g[1], g[0], g[5], g[4], g[7], g[6], g[8], g[9], g[10], g[11], g[12], g[13], g[14], g[15])
}

// Well-known GUIDs.
var (
	nvDataFV              = MustGUID("fff12b8d-7696-4c8b-a985-2747075b4f50")
	authenticatedVarsGUID = MustGUID("aaf32c78-947b-439a-a180-2e144ec37792")

	// GlobalVariable is EFI_GLOBAL_VARIABLE (PK, KEK, SecureBoot, Boot####).
	GlobalVariable = MustGUID("8be4df61-93ca-11d2-aa0d-00e098032b8c")
	// ImageSecurityDatabase is EFI_IMAGE_SECURITY_DATABASE_GUID (db, dbx).
	ImageSecurityDatabase = MustGUID("d719b2cb-3d3a-4596-a3bc-dad00e67656f")
	// SecureBootEnableDisable is edk2's SecureBootEnable variable's GUID.
	SecureBootEnableDisable = MustGUID("f0a30bc7-af08-4556-99c4-001009c93a44")
	// CustomModeEnable is edk2's CustomMode variable's GUID.
	CustomModeEnable = MustGUID("c076ec0c-7028-4399-a072-71ee5c448b9f")
)

// Variable attributes (UEFI 2.10, 8.2).
const (
	NonVolatile                       uint32 = 0x01
	BootserviceAccess                 uint32 = 0x02
	RuntimeAccess                     uint32 = 0x04
	TimeBasedAuthenticatedWriteAccess uint32 = 0x20
)

const (
	fvHeaderMinLen  = 0x48
	storeHeaderLen  = 28
	varHeaderLen    = 60
	startID         = 0x55AA
	storeFormatted  = 0x5A
	storeHealthy    = 0xFE
	varAdded        = 0x3F
	varInDeletedTrn = 0x3E // VAR_ADDED & VAR_IN_DELETED_TRANSITION: still live
	maxNameBytes    = 1024
)

// Variable is one variable of the store.
type Variable struct {
	Name       string
	Vendor     GUID
	Attributes uint32
	// Timestamp of a time-based authenticated variable (zero otherwise).
	Timestamp      time.Time
	MonotonicCount uint64
	PubKeyIndex    uint32
	Data           []byte
}

// Store is a parsed VARS image: where the variable store lies in it and
// its live variables (deleted ones are skipped).
type Store struct {
	Variables []Variable
	// storeStart and storeEnd bound the variable store in the image;
	// free is where the first unused byte of it is.
	storeStart, storeEnd, free int
}

// Parse reads a VARS flash image. Every length is checked against the
// image before it is used; anything unexpected is ErrFormat with the
// offset.
func Parse(img []byte) (*Store, error) {
	if len(img) < fvHeaderMinLen+storeHeaderLen {
		return nil, fmt.Errorf("%w: %d bytes", ErrFormat, len(img))
	}
	if GUID(img[16:32]) != nvDataFV {
		return nil, fmt.Errorf("%w: firmware volume GUID %s", ErrFormat, GUID(img[16:32]))
	}
	if string(img[40:44]) != "_FVH" {
		return nil, fmt.Errorf("%w: no _FVH signature", ErrFormat)
	}
	fvLen := binary.LittleEndian.Uint64(img[32:40])
	hdrLen := int(binary.LittleEndian.Uint16(img[48:50]))
	if fvLen != uint64(len(img)) {
		return nil, fmt.Errorf("%w: volume length %d, image %d bytes", ErrFormat, fvLen, len(img))
	}
	if hdrLen < fvHeaderMinLen || hdrLen%2 != 0 || hdrLen+storeHeaderLen > len(img) {
		return nil, fmt.Errorf("%w: volume header length %d", ErrFormat, hdrLen)
	}
	if checksum16(img[:hdrLen]) != 0 {
		return nil, fmt.Errorf("%w: volume header checksum", ErrFormat)
	}
	sh := img[hdrLen:]
	if GUID(sh[0:16]) != authenticatedVarsGUID {
		return nil, fmt.Errorf("%w: variable store GUID %s (only authenticated stores)", ErrFormat, GUID(sh[0:16]))
	}
	size := int(binary.LittleEndian.Uint32(sh[16:20]))
	if size < storeHeaderLen || size > len(img)-hdrLen {
		return nil, fmt.Errorf("%w: variable store size %d", ErrFormat, size)
	}
	if sh[20] != storeFormatted || sh[21] != storeHealthy {
		return nil, fmt.Errorf("%w: variable store format %#x state %#x", ErrFormat, sh[20], sh[21])
	}
	s := &Store{storeStart: hdrLen, storeEnd: hdrLen + size}
	off := hdrLen + storeHeaderLen
	for {
		if off+varHeaderLen > s.storeEnd || binary.LittleEndian.Uint16(img[off:]) != startID {
			break
		}
		v, state, next, err := parseVariable(img[:s.storeEnd], off)
		if err != nil {
			return nil, err
		}
		if state == varAdded || state == varInDeletedTrn {
			s.Variables = append(s.Variables, v)
		}
		off = next
	}
	s.free = off
	for i := off; i < s.storeEnd; i++ {
		if img[i] != 0xFF {
			return nil, fmt.Errorf("%w: byte %#x after the last variable (%#x) is %#x, not free space", ErrFormat, i, off, img[i])
		}
	}
	return s, nil
}

func parseVariable(img []byte, off int) (Variable, byte, int, error) {
	h := img[off : off+varHeaderLen]
	state := h[2]
	nameSize := int(binary.LittleEndian.Uint32(h[36:40]))
	dataSize := int(binary.LittleEndian.Uint32(h[40:44]))
	if nameSize < 2 || nameSize%2 != 0 || nameSize > maxNameBytes {
		return Variable{}, 0, 0, fmt.Errorf("%w: variable at %#x has a name of %d bytes", ErrFormat, off, nameSize)
	}
	end := off + varHeaderLen + nameSize
	if dataSize < 0 || end > len(img) || dataSize > len(img)-end {
		return Variable{}, 0, 0, fmt.Errorf("%w: variable at %#x runs past the store", ErrFormat, off)
	}
	name, err := decodeName(img[off+varHeaderLen : end])
	if err != nil {
		return Variable{}, 0, 0, fmt.Errorf("%w: variable at %#x: %v", ErrFormat, off, err)
	}
	v := Variable{
		Name:           name,
		Attributes:     binary.LittleEndian.Uint32(h[4:8]),
		MonotonicCount: binary.LittleEndian.Uint64(h[8:16]),
		PubKeyIndex:    binary.LittleEndian.Uint32(h[32:36]),
		Vendor:         GUID(h[44:60]),
		Data:           bytes.Clone(img[end : end+dataSize]),
	}
	if v.Timestamp, err = decodeTime(h[16:32]); err != nil {
		return Variable{}, 0, 0, fmt.Errorf("%w: variable %s at %#x: %v", ErrFormat, name, off, err)
	}
	next := align4(end + dataSize)
	return v, state, next, nil
}

func decodeName(b []byte) (string, error) {
	u := make([]uint16, len(b)/2)
	for i := range u {
		u[i] = binary.LittleEndian.Uint16(b[2*i:])
	}
	if u[len(u)-1] != 0 {
		return "", errors.New("name is not NUL-terminated")
	}
	u = u[:len(u)-1]
	for _, c := range u {
		if c == 0 {
			return "", errors.New("NUL inside the name")
		}
	}
	return string(utf16.Decode(u)), nil
}

func encodeName(s string) []byte {
	u := append(utf16.Encode([]rune(s)), 0)
	b := make([]byte, 2*len(u))
	for i, c := range u {
		binary.LittleEndian.PutUint16(b[2*i:], c)
	}
	return b
}

// decodeTime reads an EFI_TIME; all zero is the zero time.
func decodeTime(b []byte) (time.Time, error) {
	if bytes.Equal(b, make([]byte, 16)) {
		return time.Time{}, nil
	}
	year := int(binary.LittleEndian.Uint16(b[0:2]))
	month, day, hour, minute, sec := int(b[2]), int(b[3]), int(b[4]), int(b[5]), int(b[6])
	nsec := int(binary.LittleEndian.Uint32(b[8:12]))
	if year < 1900 || year > 9999 || month < 1 || month > 12 || day < 1 || day > 31 || hour > 23 || minute > 59 || sec > 59 || nsec > 999999999 {
		return time.Time{}, fmt.Errorf("timestamp %x out of range", b)
	}
	return time.Date(year, time.Month(month), day, hour, minute, sec, nsec, time.UTC), nil
}

func encodeTime(t time.Time) []byte {
	b := make([]byte, 16)
	if t.IsZero() {
		return b
	}
	t = t.UTC()
	binary.LittleEndian.PutUint16(b[0:2], uint16(t.Year()))
	b[2], b[3], b[4], b[5], b[6] = byte(t.Month()), byte(t.Day()), byte(t.Hour()), byte(t.Minute()), byte(t.Second())
	binary.LittleEndian.PutUint32(b[8:12], uint32(t.Nanosecond()))
	return b
}

func align4(n int) int { return (n + 3) &^ 3 }

func checksum16(b []byte) uint16 {
	var sum uint16
	for i := 0; i+1 < len(b); i += 2 {
		sum += binary.LittleEndian.Uint16(b[i:])
	}
	return sum
}

// Build writes vars, in order, into a copy of template, which must be a
// VARS image with an empty variable store (Debian's OVMF_VARS_4M.fd). The
// result is the same for the same inputs.
func Build(template []byte, vars []Variable) ([]byte, error) {
	s, err := Parse(template)
	if err != nil {
		return nil, fmt.Errorf("VARS template: %w", err)
	}
	if len(s.Variables) != 0 || s.free != s.storeStart+storeHeaderLen {
		return nil, fmt.Errorf("VARS template: its variable store is not empty (%d variables)", len(s.Variables))
	}
	out := bytes.Clone(template)
	off := s.free
	seen := map[string]bool{}
	for _, v := range vars {
		key := v.Vendor.String() + "/" + v.Name
		if v.Name == "" || seen[key] {
			return nil, fmt.Errorf("variable %q of %s empty or given twice", v.Name, v.Vendor)
		}
		seen[key] = true
		name := encodeName(v.Name)
		if len(name) > maxNameBytes {
			return nil, fmt.Errorf("variable name %q too long", v.Name)
		}
		need := varHeaderLen + len(name) + len(v.Data)
		if off+need > s.storeEnd {
			return nil, fmt.Errorf("variable %s does not fit: %d bytes at %#x, store ends at %#x", v.Name, need, off, s.storeEnd)
		}
		h := out[off : off+varHeaderLen]
		binary.LittleEndian.PutUint16(h[0:2], startID)
		h[2], h[3] = varAdded, 0
		binary.LittleEndian.PutUint32(h[4:8], v.Attributes)
		binary.LittleEndian.PutUint64(h[8:16], v.MonotonicCount)
		copy(h[16:32], encodeTime(v.Timestamp))
		binary.LittleEndian.PutUint32(h[32:36], v.PubKeyIndex)
		binary.LittleEndian.PutUint32(h[36:40], uint32(len(name)))
		binary.LittleEndian.PutUint32(h[40:44], uint32(len(v.Data)))
		copy(h[44:60], v.Vendor[:])
		copy(out[off+varHeaderLen:], name)
		copy(out[off+varHeaderLen+len(name):], v.Data)
		end := off + need
		// The header alignment gap is 0xFF like free space.
		off = align4(end)
	}
	return out, nil
}

// Lookup returns the live variable name of vendor.
func (s *Store) Lookup(vendor GUID, name string) (Variable, bool) {
	for _, v := range s.Variables {
		if v.Vendor == vendor && v.Name == name {
			return v, true
		}
	}
	return Variable{}, false
}
