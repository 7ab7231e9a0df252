// Package efiboot lets the appliance boot a newly written image once: it
// encodes and decodes UEFI boot options (EFI_LOAD_OPTION), reads and writes
// UEFI variables through efivarfs, and offers the few operations an upgrade
// needs: a Boot#### entry for the inactive slot of the boot disk
// (BootEntryFor, EnsureBootEntry) and the one-shot BootNext that points at
// it (SetBootNext, ClearBootNext, BootCurrent).
//
// The measured-boot design depends on what this package never does: it
// never writes BootOrder and never writes or deletes a Boot#### entry that
// BootOrder lists, because the firmware measures exactly those into PCR1.
// BootNext and Boot#### entries outside BootOrder are not measured, so an
// upgrade changes no PCR but those the new image itself predicts. If the
// new image fails, the firmware's next boot follows BootOrder again, that
// is, the old slot.
//
// References are to the UEFI Specification 2.10: §3.1.3 (Load Options),
// §3.3 (Globally Defined Variables), §8.2 (Variable Services) and §10.2-10.3
// (Device Path Protocol and nodes).
package efiboot

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"unicode/utf16"
	"unicode/utf8"

	"github.com/dataembassy/embassy/images/diskimage"
)

// GUID is an EFI GUID in its in-memory byte order: the first three fields
// little-endian (mixed-endian), as GPT and UEFI variables store it.
type GUID = diskimage.GUID

// ErrLoadOption is wrapped by every error about a malformed EFI_LOAD_OPTION
// or device path, whether decoded or about to be encoded.
var ErrLoadOption = errors.New("invalid EFI load option")

// Load option attributes (UEFI 2.10 §3.1.3).
const (
	LoadOptionActive         uint32 = 0x00000001
	LoadOptionForceReconnect uint32 = 0x00000002
	LoadOptionHidden         uint32 = 0x00000008
	LoadOptionCategoryMask   uint32 = 0x00001F00
	LoadOptionCategoryBoot   uint32 = 0x00000000
	LoadOptionCategoryApp    uint32 = 0x00000100
)

// Device path node types and subtypes used here (UEFI 2.10 §10.3).
const (
	TypeHardware  uint8 = 0x01
	TypeACPI      uint8 = 0x02
	TypeMessaging uint8 = 0x03
	TypeMedia     uint8 = 0x04
	TypeEnd       uint8 = 0x7F

	SubTypeHardDrive uint8 = 0x01 // Media: Hard Drive (§10.3.5.1)
	SubTypeFilePath  uint8 = 0x04 // Media: File Path (§10.3.5.4)

	SubTypeEndInstance uint8 = 0x01 // End This Instance of a Device Path
	SubTypeEndEntire   uint8 = 0xFF // End Entire Device Path
)

// Hard Drive media device path fields (§10.3.5.1).
const (
	hardDriveLen       = 42   // node length including the 4-byte header
	PartitionFormatMBR = 0x01 // Partition Format: PC-AT MBR
	PartitionFormatGPT = 0x02 // Partition Format: GUID Partition Table
	SignatureTypeMBR   = 0x01 // Signature Type: 32-bit MBR signature
	SignatureTypeGUID  = 0x02 // Signature Type: GUID
	nodeHeaderLen      = 4
	loadOptionFixedLen = 6 // Attributes (4) + FilePathListLength (2)
	maxNodeDataLen     = 0xFFFF - nodeHeaderLen
	maxFilePathListLen = 0xFFFF
	maxUCS2            = 0xFFFF
)

// Node is one device path node (§10.2): its type, subtype and the data
// after the 4-byte header. Nodes this package does not interpret are kept
// as they are, so that decoding and encoding a load option is lossless.
type Node struct {
	Type    uint8
	SubType uint8
	Data    []byte
}

// String shows the node as type/subtype and, for the nodes this package
// interprets, their fields.
func (n Node) String() string {
	if hd, err := n.HardDrive(); err == nil {
		return hd.String()
	}
	if p, err := n.FilePath(); err == nil {
		return fmt.Sprintf("File(%s)", p)
	}
	return fmt.Sprintf("Node(%#02x,%#02x,%x)", n.Type, n.SubType, n.Data)
}

// HardDrive is a Hard Drive media device path node (§10.3.5.1) of a GPT
// partition: the firmware finds the partition by its unique GUID.
type HardDrive struct {
	PartitionNumber uint32 // 1-based GPT entry index
	PartitionStart  uint64 // first LBA
	PartitionSize   uint64 // length in LBAs
	PartitionGUID   GUID   // the partition's unique GUID
}

// String is the UEFI text form HD(n,GPT,guid,start,size) (§10.6.1.6).
func (h HardDrive) String() string {
	return fmt.Sprintf("HD(%d,GPT,%s,%#x,%#x)", h.PartitionNumber, h.PartitionGUID, h.PartitionStart, h.PartitionSize)
}

// Node encodes h: PartitionNumber (u32), PartitionStart (u64),
// PartitionSize (u64), PartitionSignature (16 bytes, the GUID in EFI byte
// order), PartitionFormat 0x02 (GPT), SignatureType 0x02 (GUID), all
// little-endian, 42 bytes with the header.
func (h HardDrive) Node() Node {
	d := make([]byte, hardDriveLen-nodeHeaderLen)
	binary.LittleEndian.PutUint32(d[0:4], h.PartitionNumber)
	binary.LittleEndian.PutUint64(d[4:12], h.PartitionStart)
	binary.LittleEndian.PutUint64(d[12:20], h.PartitionSize)
	copy(d[20:36], h.PartitionGUID[:])
	d[36] = PartitionFormatGPT
	d[37] = SignatureTypeGUID
	return Node{Type: TypeMedia, SubType: SubTypeHardDrive, Data: d}
}

// HardDrive decodes n as a GPT Hard Drive node; MBR partitions and other
// nodes are refused.
func (n Node) HardDrive() (HardDrive, error) {
	var h HardDrive
	if n.Type != TypeMedia || n.SubType != SubTypeHardDrive {
		return h, fmt.Errorf("%w: node %#02x/%#02x is not a Hard Drive node", ErrLoadOption, n.Type, n.SubType)
	}
	if len(n.Data) != hardDriveLen-nodeHeaderLen {
		return h, fmt.Errorf("%w: Hard Drive node of %d bytes, want %d", ErrLoadOption, len(n.Data)+nodeHeaderLen, hardDriveLen)
	}
	if n.Data[36] != PartitionFormatGPT || n.Data[37] != SignatureTypeGUID {
		return h, fmt.Errorf("%w: Hard Drive node with partition format %#02x, signature type %#02x; want GPT (2) and GUID (2)",
			ErrLoadOption, n.Data[36], n.Data[37])
	}
	h.PartitionNumber = binary.LittleEndian.Uint32(n.Data[0:4])
	h.PartitionStart = binary.LittleEndian.Uint64(n.Data[4:12])
	h.PartitionSize = binary.LittleEndian.Uint64(n.Data[12:20])
	copy(h.PartitionGUID[:], n.Data[20:36])
	return h, nil
}

// FileNode returns a File Path media node (§10.3.5.4) for path, a
// backslash-separated path on the partition such as \EFI\BOOT\BOOTX64.EFI:
// the UCS-2 path with a terminating NUL.
func FileNode(path string) (Node, error) {
	b, err := encodeUCS2(path)
	if err != nil {
		return Node{}, fmt.Errorf("file path %q: %w", path, err)
	}
	if len(b) > maxNodeDataLen {
		return Node{}, fmt.Errorf("%w: file path %q too long for a device path node", ErrLoadOption, path)
	}
	return Node{Type: TypeMedia, SubType: SubTypeFilePath, Data: b}, nil
}

// FilePath decodes n as a File Path node.
func (n Node) FilePath() (string, error) {
	if n.Type != TypeMedia || n.SubType != SubTypeFilePath {
		return "", fmt.Errorf("%w: node %#02x/%#02x is not a File Path node", ErrLoadOption, n.Type, n.SubType)
	}
	s, rest, err := decodeUCS2(n.Data)
	if err != nil {
		return "", fmt.Errorf("file path node: %w", err)
	}
	if len(rest) != 0 {
		return "", fmt.Errorf("%w: file path node has %d bytes after the NUL", ErrLoadOption, len(rest))
	}
	return s, nil
}

// LoadOption is an EFI_LOAD_OPTION (§3.1.3), the contents of a Boot####
// variable.
type LoadOption struct {
	Attributes  uint32
	Description string // UCS-2 in the variable, NUL-terminated
	// FilePath is the FilePathList without its final End Entire node,
	// which Encode appends and Decode requires; End This Instance nodes
	// between instances are kept.
	FilePath     []Node
	OptionalData []byte
}

// Encode returns the variable's bytes: Attributes (u32), FilePathListLength
// (u16), Description (UCS-2, NUL-terminated), FilePathList (the nodes and an
// End Entire node), OptionalData; integers little-endian.
func (o LoadOption) Encode() ([]byte, error) {
	desc, err := encodeUCS2(o.Description)
	if err != nil {
		return nil, fmt.Errorf("description %q: %w", o.Description, err)
	}
	var fp []byte
	for i, n := range o.FilePath {
		if n.Type == TypeEnd && n.SubType != SubTypeEndInstance {
			return nil, fmt.Errorf("%w: node %d is an End node of subtype %#02x (only End This Instance may appear inside the list)", ErrLoadOption, i, n.SubType)
		}
		if len(n.Data) > maxNodeDataLen {
			return nil, fmt.Errorf("%w: node %d has %d bytes of data, at most %d fit", ErrLoadOption, i, len(n.Data), maxNodeDataLen)
		}
		fp = appendNode(fp, n)
	}
	fp = appendNode(fp, Node{Type: TypeEnd, SubType: SubTypeEndEntire})
	if len(fp) > maxFilePathListLen {
		return nil, fmt.Errorf("%w: file path list of %d bytes exceeds FilePathListLength's 16 bits", ErrLoadOption, len(fp))
	}
	b := make([]byte, loadOptionFixedLen, loadOptionFixedLen+len(desc)+len(fp)+len(o.OptionalData))
	binary.LittleEndian.PutUint32(b[0:4], o.Attributes)
	binary.LittleEndian.PutUint16(b[4:6], uint16(len(fp)))
	b = append(b, desc...)
	b = append(b, fp...)
	b = append(b, o.OptionalData...)
	return b, nil
}

func appendNode(b []byte, n Node) []byte {
	b = append(b, n.Type, n.SubType)
	b = binary.LittleEndian.AppendUint16(b, uint16(nodeHeaderLen+len(n.Data)))
	return append(b, n.Data...)
}

// DecodeLoadOption parses the bytes of a Boot#### variable. Every length is
// checked before it is used: the description must end in a NUL inside the
// data, the file path list must fit, each node must be at least 4 bytes and
// inside the list, and the list must end with exactly one End Entire node at
// FilePathListLength.
func DecodeLoadOption(b []byte) (LoadOption, error) {
	var o LoadOption
	if len(b) < loadOptionFixedLen {
		return o, fmt.Errorf("%w: %d bytes, shorter than the %d-byte header", ErrLoadOption, len(b), loadOptionFixedLen)
	}
	o.Attributes = binary.LittleEndian.Uint32(b[0:4])
	fpLen := int(binary.LittleEndian.Uint16(b[4:6]))
	desc, rest, err := decodeUCS2(b[loadOptionFixedLen:])
	if err != nil {
		return o, fmt.Errorf("description: %w", err)
	}
	o.Description = desc
	if fpLen > len(rest) {
		return o, fmt.Errorf("%w: FilePathListLength %d but only %d bytes follow the description", ErrLoadOption, fpLen, len(rest))
	}
	o.FilePath, err = decodeDevicePath(rest[:fpLen])
	if err != nil {
		return o, err
	}
	if opt := rest[fpLen:]; len(opt) > 0 {
		o.OptionalData = bytes.Clone(opt)
	}
	return o, nil
}

// decodeDevicePath parses a FilePathList and returns its nodes without the
// final End Entire node.
func decodeDevicePath(b []byte) ([]Node, error) {
	var nodes []Node
	for off := 0; ; {
		if len(b)-off < nodeHeaderLen {
			return nil, fmt.Errorf("%w: file path list ends at byte %d without an End Entire node", ErrLoadOption, off)
		}
		n := Node{Type: b[off], SubType: b[off+1]}
		l := int(binary.LittleEndian.Uint16(b[off+2 : off+4]))
		if l < nodeHeaderLen || l > len(b)-off {
			return nil, fmt.Errorf("%w: device path node at byte %d has length %d, %d bytes left", ErrLoadOption, off, l, len(b)-off)
		}
		if n.Type == TypeEnd {
			switch n.SubType {
			case SubTypeEndEntire:
				if l != nodeHeaderLen {
					return nil, fmt.Errorf("%w: End Entire node at byte %d has length %d, want 4", ErrLoadOption, off, l)
				}
				if off+l != len(b) {
					return nil, fmt.Errorf("%w: End Entire node at byte %d but FilePathListLength is %d", ErrLoadOption, off, len(b))
				}
				return nodes, nil
			case SubTypeEndInstance:
			default:
				return nil, fmt.Errorf("%w: End node of unknown subtype %#02x at byte %d", ErrLoadOption, n.SubType, off)
			}
		}
		if l > nodeHeaderLen {
			n.Data = bytes.Clone(b[off+nodeHeaderLen : off+l])
		}
		nodes = append(nodes, n)
		off += l
	}
}

// encodeUCS2 returns s as UCS-2 little-endian with a terminating NUL.
// Characters outside the Basic Multilingual Plane and NUL are refused.
func encodeUCS2(s string) ([]byte, error) {
	if !utf8.ValidString(s) {
		return nil, fmt.Errorf("%w: not valid UTF-8", ErrLoadOption)
	}
	b := make([]byte, 0, 2*len(s)+2)
	for i, r := range s {
		switch {
		case r == 0:
			return nil, fmt.Errorf("%w: NUL at byte %d", ErrLoadOption, i)
		case r > maxUCS2 || utf16.IsSurrogate(r):
			return nil, fmt.Errorf("%w: %U at byte %d is not a UCS-2 character", ErrLoadOption, r, i)
		}
		b = binary.LittleEndian.AppendUint16(b, uint16(r))
	}
	return append(b, 0, 0), nil
}

// decodeUCS2 reads a NUL-terminated UCS-2 little-endian string from the
// start of b and returns it and the bytes after the NUL. Surrogate code
// units are refused: UCS-2 has none, and refusing them keeps decoding and
// encoding lossless.
func decodeUCS2(b []byte) (string, []byte, error) {
	var sb strings.Builder
	for off := 0; off+2 <= len(b); off += 2 {
		u := binary.LittleEndian.Uint16(b[off:])
		if u == 0 {
			return sb.String(), b[off+2:], nil
		}
		if utf16.IsSurrogate(rune(u)) {
			return "", nil, fmt.Errorf("%w: surrogate code unit %#04x at byte %d is not UCS-2", ErrLoadOption, u, off)
		}
		sb.WriteRune(rune(u))
	}
	return "", nil, fmt.Errorf("%w: UCS-2 string of %d bytes has no terminating NUL", ErrLoadOption, len(b))
}
