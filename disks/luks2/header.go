// Package luks2 writes and reads LUKS2 volumes in pure Go: the formatter the
// appliance uses to turn a blank disk into an encrypted volume (AES-XTS,
// PBKDF2 keyslot, anti-forensic split, both binary headers and the JSON
// area), a strict header parser, the policy that says which headers the
// appliance unlocks at all (policy.go), key recovery, and unlocking through
// device-mapper with a table built from that policy, never from the header.
//
// On-disk format: the LUKS2 On-Disk Format Specification (version 1.1) as
// implemented by cryptsetup 2.x.
package luks2

import (
	"bytes"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"
)

// Binary header layout.
const (
	binHeaderSize = 4096
	offMagic      = 0
	offVersion    = 6
	offHdrSize    = 8
	offSeqID      = 16
	offLabel      = 24
	offCsumAlg    = 72
	offSalt       = 104
	offUUID       = 168
	offSubsystem  = 208
	offHdrOffset  = 256
	offCsum       = 448
	labelLen      = 48
	csumAlgLen    = 32
	saltLen       = 64
	uuidLen       = 40
	subsystemLen  = 48
	csumLen       = 64

	minHdrSize = 16384
	maxHdrSize = 4 << 20
)

var (
	magicPrimary   = []byte("LUKS\xba\xbe")
	magicSecondary = []byte("SKUL\xba\xbe")
)

// ErrNotLUKS2 is returned when a device carries no LUKS2 header.
var ErrNotLUKS2 = errors.New("no LUKS2 header")

// ErrUnsupported is returned for valid LUKS2 features this package does not
// implement (for example another cipher).
var ErrUnsupported = errors.New("unsupported LUKS2 feature")

// ErrWrongKey is returned when a passphrase opens no keyslot.
var ErrWrongKey = errors.New("key does not open any keyslot")

// Header is a parsed, checksum-verified LUKS2 header.
type Header struct {
	HdrSize   uint64
	SeqID     uint64
	Label     string
	Subsystem string
	UUID      string
	Meta      Metadata
	// metaJSON is the JSON area as read, for the strict policy check.
	metaJSON []byte
}

// Metadata is the JSON area. Unknown fields are ignored by the parser but
// every field used is validated.
type Metadata struct {
	Keyslots map[string]Keyslot `json:"keyslots"`
	Tokens   map[string]any     `json:"tokens"`
	Segments map[string]Segment `json:"segments"`
	Digests  map[string]Digest  `json:"digests"`
	Config   Config             `json:"config"`
}

// Keyslot is one keyslot object.
type Keyslot struct {
	Type     string `json:"type"`
	KeySize  int    `json:"key_size"`
	AF       AF     `json:"af"`
	Area     Area   `json:"area"`
	KDF      KDF    `json:"kdf"`
	Priority *int   `json:"priority,omitempty"`
}

// AF describes the anti-forensic split.
type AF struct {
	Type    string `json:"type"`
	Stripes int    `json:"stripes"`
	Hash    string `json:"hash"`
}

// Area is where a keyslot's material lives.
type Area struct {
	Type       string `json:"type"`
	Offset     string `json:"offset"`
	Size       string `json:"size"`
	Encryption string `json:"encryption"`
	KeySize    int    `json:"key_size"`
}

// KDF derives a keyslot key from a passphrase.
type KDF struct {
	Type       string `json:"type"`
	Hash       string `json:"hash,omitempty"`
	Iterations int    `json:"iterations,omitempty"`
	Time       int    `json:"time,omitempty"`
	Memory     int    `json:"memory,omitempty"`
	CPUs       int    `json:"cpus,omitempty"`
	Salt       string `json:"salt"`
}

// Segment is an encrypted data segment.
type Segment struct {
	Type       string `json:"type"`
	Offset     string `json:"offset"`
	Size       string `json:"size"`
	IVTweak    string `json:"iv_tweak"`
	Encryption string `json:"encryption"`
	SectorSize int    `json:"sector_size"`
}

// Digest verifies a recovered volume key.
type Digest struct {
	Type       string   `json:"type"`
	Keyslots   []string `json:"keyslots"`
	Segments   []string `json:"segments"`
	Hash       string   `json:"hash"`
	Iterations int      `json:"iterations"`
	Salt       string   `json:"salt"`
	Digest     string   `json:"digest"`
}

// Config holds area sizes.
type Config struct {
	JSONSize     string   `json:"json_size"`
	KeyslotsSize string   `json:"keyslots_size"`
	Flags        []string `json:"flags,omitempty"`
}

func cString(b []byte) string {
	if i := bytes.IndexByte(b, 0); i >= 0 {
		b = b[:i]
	}
	return string(b)
}

func parseU64(name, s string) (uint64, error) {
	v, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%s %q is not an unsigned integer", name, s)
	}
	return v, nil
}

// ReadHeader reads and verifies the LUKS2 header of a device. It tries the
// primary header first and falls back to the secondary one if the primary is
// damaged.
func ReadHeader(r io.ReaderAt) (*Header, error) {
	h, err := readOne(r, 0, magicPrimary)
	if err == nil {
		return h, nil
	}
	if errors.Is(err, ErrNotLUKS2) {
		return nil, err
	}
	// The secondary header sits at the primary's declared size; probe the
	// standard offsets when that is unreadable.
	for off := uint64(minHdrSize); off <= maxHdrSize; off *= 2 {
		if h2, err2 := readOne(r, off, magicSecondary); err2 == nil {
			return h2, nil
		}
	}
	return nil, fmt.Errorf("primary LUKS2 header: %w (no valid secondary header either)", err)
}

func readOne(r io.ReaderAt, at uint64, magic []byte) (*Header, error) {
	bin := make([]byte, binHeaderSize)
	if _, err := r.ReadAt(bin, int64(at)); err != nil {
		return nil, fmt.Errorf("read LUKS header at %d: %w", at, err)
	}
	if !bytes.Equal(bin[:6], magic) {
		if at == 0 {
			return nil, ErrNotLUKS2
		}
		return nil, fmt.Errorf("no LUKS2 header magic at %d", at)
	}
	if v := binary.BigEndian.Uint16(bin[offVersion:]); v != 2 {
		return nil, fmt.Errorf("%w: LUKS version %d", ErrUnsupported, v)
	}
	hdrSize := binary.BigEndian.Uint64(bin[offHdrSize:])
	if hdrSize < minHdrSize || hdrSize > maxHdrSize || hdrSize&(hdrSize-1) != 0 {
		return nil, fmt.Errorf("LUKS2 header size %d is not a power of two in [%d, %d]", hdrSize, minHdrSize, maxHdrSize)
	}
	if off := binary.BigEndian.Uint64(bin[offHdrOffset:]); off != at {
		return nil, fmt.Errorf("LUKS2 header at %d says it is at %d", at, off)
	}
	if alg := cString(bin[offCsumAlg : offCsumAlg+csumAlgLen]); alg != "sha256" {
		return nil, fmt.Errorf("%w: header checksum algorithm %q", ErrUnsupported, alg)
	}
	full := make([]byte, hdrSize)
	if _, err := r.ReadAt(full, int64(at)); err != nil {
		return nil, fmt.Errorf("read LUKS2 header area: %w", err)
	}
	want := append([]byte(nil), full[offCsum:offCsum+sha256.Size]...)
	for i := offCsum; i < offCsum+csumLen; i++ {
		full[i] = 0
	}
	got := sha256.Sum256(full)
	if subtle.ConstantTimeCompare(got[:], want) != 1 {
		return nil, fmt.Errorf("LUKS2 header at %d: checksum mismatch", at)
	}
	jsonArea := full[binHeaderSize:]
	end := bytes.IndexByte(jsonArea, 0)
	if end < 0 {
		return nil, errors.New("LUKS2 JSON area is not NUL-terminated")
	}
	h := &Header{
		HdrSize:   hdrSize,
		SeqID:     binary.BigEndian.Uint64(bin[offSeqID:]),
		Label:     cString(bin[offLabel : offLabel+labelLen]),
		Subsystem: cString(bin[offSubsystem : offSubsystem+subsystemLen]),
		UUID:      cString(bin[offUUID : offUUID+uuidLen]),
	}
	if err := json.Unmarshal(jsonArea[:end], &h.Meta); err != nil {
		return nil, fmt.Errorf("LUKS2 JSON metadata: %w", err)
	}
	h.metaJSON = append([]byte(nil), jsonArea[:end]...)
	if err := h.validate(); err != nil {
		return nil, err
	}
	return h, nil
}

func (h *Header) validate() error {
	js, err := parseU64("config.json_size", h.Meta.Config.JSONSize)
	if err != nil {
		return err
	}
	if js != h.HdrSize-binHeaderSize {
		return fmt.Errorf("config.json_size %d does not match header size %d", js, h.HdrSize)
	}
	ksSize, err := parseU64("config.keyslots_size", h.Meta.Config.KeyslotsSize)
	if err != nil {
		return err
	}
	if len(h.Meta.Segments) == 0 {
		return errors.New("LUKS2 metadata has no segment")
	}
	for id, ks := range h.Meta.Keyslots {
		off, err := parseU64("keyslot "+id+" area offset", ks.Area.Offset)
		if err != nil {
			return err
		}
		size, err := parseU64("keyslot "+id+" area size", ks.Area.Size)
		if err != nil {
			return err
		}
		if off < 2*h.HdrSize || off+size > 2*h.HdrSize+ksSize || off+size < off {
			return fmt.Errorf("keyslot %s area [%d,+%d) lies outside the keyslots area", id, off, size)
		}
		if ks.KeySize <= 0 || ks.KeySize > 512 {
			return fmt.Errorf("keyslot %s key size %d", id, ks.KeySize)
		}
	}
	for id, d := range h.Meta.Digests {
		if len(d.Keyslots) == 0 || len(d.Segments) == 0 {
			return fmt.Errorf("digest %s covers no keyslot or segment", id)
		}
	}
	return nil
}

// DataOffset returns the byte offset of segment 0.
func (h *Header) DataOffset() (uint64, error) {
	s, ok := h.Meta.Segments["0"]
	if !ok {
		return 0, errors.New("no segment 0")
	}
	return parseU64("segment 0 offset", s.Offset)
}

// marshalHeader builds one binary header plus JSON area of hdrSize bytes.
func marshalHeader(hdrSize, seqID uint64, label, subsystem, uuid string, salt []byte, at uint64, magic []byte, jsonData []byte) ([]byte, error) {
	if uint64(len(jsonData)) >= hdrSize-binHeaderSize {
		return nil, fmt.Errorf("LUKS2 JSON metadata of %d bytes does not fit %d", len(jsonData), hdrSize-binHeaderSize)
	}
	if len(label) >= labelLen || len(subsystem) >= subsystemLen || len(uuid) >= uuidLen || len(salt) != saltLen {
		return nil, errors.New("LUKS2 header field too long")
	}
	b := make([]byte, hdrSize)
	copy(b[offMagic:], magic)
	binary.BigEndian.PutUint16(b[offVersion:], 2)
	binary.BigEndian.PutUint64(b[offHdrSize:], hdrSize)
	binary.BigEndian.PutUint64(b[offSeqID:], seqID)
	copy(b[offLabel:], label)
	copy(b[offCsumAlg:], "sha256")
	copy(b[offSalt:], salt)
	copy(b[offUUID:], uuid)
	copy(b[offSubsystem:], subsystem)
	binary.BigEndian.PutUint64(b[offHdrOffset:], at)
	copy(b[binHeaderSize:], jsonData)
	sum := sha256.Sum256(b)
	copy(b[offCsum:], sum[:])
	return b, nil
}
