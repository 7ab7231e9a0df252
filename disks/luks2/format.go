package luks2

import (
	"crypto/aes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"

	"golang.org/x/crypto/xts"
)

// Defaults of the appliance's volumes.
const (
	DefaultLabel      = "embassy-data"
	DefaultSubsystem  = "embassy"
	DefaultIterations = 1000 // cryptsetup's minimum for PBKDF2
	DefaultHdrSize    = 16384
	DefaultDataOffset = 16 << 20
	VolumeKeySize     = 64 // AES-256-XTS: two 256-bit keys
	Stripes           = 4000
	SectorSize        = 512
	Cipher            = "aes-xts-plain64"
)

// Options tunes Format. The zero value gives the appliance defaults.
type Options struct {
	Label      string
	Subsystem  string
	Iterations int
	// volumeKey, when set (tests only), is used instead of a random key.
	volumeKey []byte
}

func (o *Options) defaults() {
	if o.Label == "" {
		o.Label = DefaultLabel
	}
	if o.Subsystem == "" {
		o.Subsystem = DefaultSubsystem
	}
	if o.Iterations == 0 {
		o.Iterations = DefaultIterations
	}
}

func randomBytes(n int) ([]byte, error) {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		return nil, fmt.Errorf("random: %w", err)
	}
	return b, nil
}

func newUUID() (string, error) {
	b, err := randomBytes(16)
	if err != nil {
		return "", err
	}
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16]), nil
}

func roundUp(n, to uint64) uint64 { return (n + to - 1) / to * to }

// FormatFile writes a new LUKS2 volume to the device or file at path, whose
// single keyslot is opened by passphrase. It returns the volume's UUID.
// Everything before the data segment (both headers and the keyslots area) is
// overwritten; the data area is left as it is.
func FormatFile(path string, passphrase []byte, o Options) (string, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return "", fmt.Errorf("open %s for formatting: %w", path, err)
	}
	defer f.Close()
	size, err := f.Seek(0, 2)
	if err != nil {
		return "", fmt.Errorf("size of %s: %w", path, err)
	}
	uuid, err := Format(f, uint64(size), passphrase, o)
	if err != nil {
		return "", fmt.Errorf("format %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		return "", fmt.Errorf("sync %s: %w", path, err)
	}
	return uuid, nil
}

// WriterAt is what Format writes to.
type WriterAt interface {
	WriteAt(p []byte, off int64) (int, error)
}

// Format writes a LUKS2 volume of size bytes to w.
func Format(w WriterAt, size uint64, passphrase []byte, o Options) (string, error) {
	o.defaults()
	if len(passphrase) == 0 {
		return "", fmt.Errorf("empty passphrase")
	}
	if o.Iterations < 1000 {
		return "", fmt.Errorf("PBKDF2 iterations %d below cryptsetup's minimum of 1000", o.Iterations)
	}
	if size < DefaultDataOffset+(1<<20) {
		return "", fmt.Errorf("device of %d bytes is too small (need at least %d)", size, DefaultDataOffset+(1<<20))
	}
	volumeKey := o.volumeKey
	if volumeKey == nil {
		var err error
		if volumeKey, err = randomBytes(VolumeKeySize); err != nil {
			return "", err
		}
		defer clear(volumeKey)
	}
	if len(volumeKey) != VolumeKeySize {
		return "", fmt.Errorf("volume key must be %d bytes", VolumeKeySize)
	}

	// Keyslot: derive the slot key, split the volume key, encrypt the split.
	kdfSalt, err := randomBytes(saltSize)
	if err != nil {
		return "", err
	}
	slotKey, err := pbkdf2Key(sha256.New, passphrase, kdfSalt, o.Iterations, VolumeKeySize)
	if err != nil {
		return "", err
	}
	defer clear(slotKey)
	material, err := afSplit(volumeKey, Stripes, sha256.New())
	if err != nil {
		return "", err
	}
	defer clear(material)
	area := make([]byte, keyslotAreaSize)
	copy(area, material)
	if err := xtsEncrypt(slotKey, area[:len(material)]); err != nil {
		return "", err
	}

	digestSalt, err := randomBytes(saltSize)
	if err != nil {
		return "", err
	}
	digest, err := pbkdf2Key(sha256.New, volumeKey, digestSalt, o.Iterations, sha256.Size)
	if err != nil {
		return "", err
	}

	meta := provisionedMetadata(o.Iterations, base64.StdEncoding.EncodeToString(kdfSalt),
		base64.StdEncoding.EncodeToString(digestSalt), base64.StdEncoding.EncodeToString(digest))
	jsonData, err := json.Marshal(meta)
	if err != nil {
		return "", err
	}
	uuid, err := newUUID()
	if err != nil {
		return "", err
	}
	var hdrs [][]byte
	for i, magic := range [][]byte{magicPrimary, magicSecondary} {
		salt, err := randomBytes(saltLen)
		if err != nil {
			return "", err
		}
		h, err := marshalHeader(DefaultHdrSize, 1, o.Label, o.Subsystem, uuid, salt, uint64(i*DefaultHdrSize), magic, jsonData)
		if err != nil {
			return "", err
		}
		hdrs = append(hdrs, h)
	}

	// Lay out the whole metadata region in one buffer: headers, keyslot,
	// zeros over the rest of the keyslots area (old keys must not survive).
	region := make([]byte, DefaultDataOffset)
	copy(region[0:], hdrs[0])
	copy(region[DefaultHdrSize:], hdrs[1])
	copy(region[keyslotAreaOffset:], area)
	if _, err := w.WriteAt(region, 0); err != nil {
		return "", fmt.Errorf("write LUKS2 metadata: %w", err)
	}
	return uuid, nil
}

func xtsCipher(key []byte) (*xts.Cipher, error) {
	c, err := xts.NewCipher(aes.NewCipher, key)
	if err != nil {
		return nil, fmt.Errorf("AES-XTS: %w", err)
	}
	return c, nil
}

// xtsEncrypt encrypts buf in place as aes-xts-plain64 with 512-byte sectors
// numbered from 0.
func xtsEncrypt(key, buf []byte) error {
	c, err := xtsCipher(key)
	if err != nil {
		return err
	}
	if len(buf)%SectorSize != 0 {
		return fmt.Errorf("XTS buffer of %d bytes is not whole sectors", len(buf))
	}
	for s := 0; s*SectorSize < len(buf); s++ {
		blk := buf[s*SectorSize : (s+1)*SectorSize]
		c.Encrypt(blk, blk, uint64(s))
	}
	return nil
}
