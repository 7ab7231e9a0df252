package luks2

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"reflect"
	"strconv"
)

// ErrPolicy is returned for a LUKS2 header that is well formed but is not
// a volume the appliance provisions: another cipher, key size, sector
// size, data offset, keyslot layout, KDF, a token, a flag or any field this
// package does not know. The header's checksum is plain SHA-256 that
// anyone can recompute, so a person with the disk in hand can write any
// such header; a disk that carries one is foreign and is never unlocked
// or written.
var ErrPolicy = errors.New("LUKS2 header outside the appliance's policy")

// Keyslot area of the one keyslot Format writes: right after both headers,
// the anti-forensic split of the volume key rounded up to 4 KiB.
const (
	keyslotAreaOffset = 2 * DefaultHdrSize
	keyslotAreaSize   = (VolumeKeySize*Stripes + 4095) / 4096 * 4096
	saltSize          = 32
)

// provisionedMetadata is the JSON area of every volume the appliance makes,
// with its salts and digest. Format writes it; CheckPolicy accepts only
// headers equal to it.
func provisionedMetadata(iterations int, kdfSalt, digestSalt, digest string) Metadata {
	return Metadata{
		Keyslots: map[string]Keyslot{"0": {
			Type: "luks2", KeySize: VolumeKeySize,
			AF: AF{Type: "luks1", Stripes: Stripes, Hash: "sha256"},
			Area: Area{Type: "raw", Offset: strconv.Itoa(keyslotAreaOffset), Size: strconv.Itoa(keyslotAreaSize),
				Encryption: Cipher, KeySize: VolumeKeySize},
			KDF: KDF{Type: "pbkdf2", Hash: "sha256", Iterations: iterations, Salt: kdfSalt},
		}},
		Tokens: map[string]any{},
		Segments: map[string]Segment{"0": {
			Type: "crypt", Offset: strconv.Itoa(DefaultDataOffset), Size: "dynamic", IVTweak: "0",
			Encryption: Cipher, SectorSize: SectorSize,
		}},
		Digests: map[string]Digest{"0": {
			Type: "pbkdf2", Keyslots: []string{"0"}, Segments: []string{"0"}, Hash: "sha256",
			Iterations: iterations, Salt: digestSalt, Digest: digest,
		}},
		Config: Config{
			JSONSize:     strconv.Itoa(DefaultHdrSize - binHeaderSize),
			KeyslotsSize: strconv.Itoa(DefaultDataOffset - 2*DefaultHdrSize),
		},
	}
}

// ForgeHeaders rewrites the JSON area of both binary headers of the LUKS2
// volume at offset in rw with edit and recomputes their checksums: what a
// person with the disk in hand can do, since the checksum is unkeyed. The
// tests use it to show that such a header is refused; the appliance never
// calls it.
func ForgeHeaders(rw interface {
	io.ReaderAt
	io.WriterAt
}, offset int64, edit func(m map[string]any)) error {
	h, err := ReadHeader(io.NewSectionReader(rw, offset, 1<<40))
	if err != nil {
		return err
	}
	var m map[string]any
	if err := json.Unmarshal(h.metaJSON, &m); err != nil {
		return err
	}
	edit(m)
	js, err := json.Marshal(m)
	if err != nil {
		return err
	}
	for i, magic := range [][]byte{magicPrimary, magicSecondary} {
		at := uint64(i) * h.HdrSize
		b, err := marshalHeader(h.HdrSize, h.SeqID+1, h.Label, h.Subsystem, h.UUID, make([]byte, saltLen), at, magic, js)
		if err != nil {
			return err
		}
		if _, err := rw.WriteAt(b, offset+int64(at)); err != nil {
			return err
		}
	}
	return nil
}

// CheckPolicy reports whether h is exactly a header Format writes: one
// keyslot (PBKDF2-SHA-256 with DefaultIterations, AES-XTS area of the
// standard size and place), one AES-XTS-plain64 segment of 512-byte
// sectors at DefaultDataOffset, one digest, no token, no flag, no unknown
// field. Only the salts, the digest and the UUID may differ. Anything else
// is ErrPolicy, naming the first difference.
func (h *Header) CheckPolicy() error {
	if h.HdrSize != DefaultHdrSize {
		return fmt.Errorf("%w: header size %d, not %d", ErrPolicy, h.HdrSize, DefaultHdrSize)
	}
	if len(h.metaJSON) > 0 {
		dec := json.NewDecoder(bytes.NewReader(h.metaJSON))
		dec.DisallowUnknownFields()
		var strict Metadata
		if err := dec.Decode(&strict); err != nil {
			return fmt.Errorf("%w: %v", ErrPolicy, err)
		}
	}
	m := h.Meta
	ks, ok := m.Keyslots["0"]
	seg, okSeg := m.Segments["0"]
	dg, okDg := m.Digests["0"]
	switch {
	case len(m.Keyslots) != 1 || !ok:
		return fmt.Errorf("%w: %d keyslots, want only keyslot 0", ErrPolicy, len(m.Keyslots))
	case len(m.Segments) != 1 || !okSeg:
		return fmt.Errorf("%w: %d segments, want only segment 0", ErrPolicy, len(m.Segments))
	case len(m.Digests) != 1 || !okDg:
		return fmt.Errorf("%w: %d digests, want only digest 0", ErrPolicy, len(m.Digests))
	case len(m.Tokens) != 0:
		return fmt.Errorf("%w: %d tokens, want none", ErrPolicy, len(m.Tokens))
	case seg.Encryption != Cipher || seg.Type != "crypt":
		return fmt.Errorf("%w: data segment %s encrypted with %q, want %s", ErrPolicy, seg.Type, seg.Encryption, Cipher)
	case seg.SectorSize != SectorSize:
		return fmt.Errorf("%w: data segment sector size %d, want %d", ErrPolicy, seg.SectorSize, SectorSize)
	case seg.Offset != strconv.Itoa(DefaultDataOffset) || seg.Size != "dynamic" || seg.IVTweak != "0":
		return fmt.Errorf("%w: data segment at %s size %s IV tweak %s, want %d, dynamic, 0", ErrPolicy, seg.Offset, seg.Size, seg.IVTweak, DefaultDataOffset)
	case ks.KDF.Type != "pbkdf2" || ks.KDF.Hash != "sha256" || ks.KDF.Iterations != DefaultIterations:
		return fmt.Errorf("%w: keyslot KDF %s-%s with %d iterations, want pbkdf2-sha256 with %d", ErrPolicy, ks.KDF.Type, ks.KDF.Hash, ks.KDF.Iterations, DefaultIterations)
	case ks.Area.Encryption != Cipher || ks.Area.KeySize != VolumeKeySize || ks.KeySize != VolumeKeySize:
		return fmt.Errorf("%w: keyslot area %q with a %d-byte key for a %d-byte volume key, want %s, %d, %d", ErrPolicy, ks.Area.Encryption, ks.Area.KeySize, ks.KeySize, Cipher, VolumeKeySize, VolumeKeySize)
	case ks.Area.Offset != strconv.Itoa(keyslotAreaOffset) || ks.Area.Size != strconv.Itoa(keyslotAreaSize):
		return fmt.Errorf("%w: keyslot area at %s size %s, want %d size %d", ErrPolicy, ks.Area.Offset, ks.Area.Size, keyslotAreaOffset, keyslotAreaSize)
	}
	for what, b64 := range map[string]string{"keyslot salt": ks.KDF.Salt, "digest salt": dg.Salt, "digest": dg.Digest} {
		if b, err := base64.StdEncoding.DecodeString(b64); err != nil || len(b) != saltSize {
			return fmt.Errorf("%w: %s is not %d bytes of base64", ErrPolicy, what, saltSize)
		}
	}
	want := provisionedMetadata(DefaultIterations, ks.KDF.Salt, dg.Salt, dg.Digest)
	if !reflect.DeepEqual(m, want) {
		return fmt.Errorf("%w: metadata differs from what the appliance provisions (AF, digest or config)", ErrPolicy)
	}
	return nil
}
