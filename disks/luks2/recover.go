package luks2

import (
	"crypto/sha1"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/subtle"
	"encoding/base64"
	"fmt"
	"hash"
	"io"
	"slices"
	"sort"

	"golang.org/x/crypto/argon2"
)

func hashByName(name string) (func() hash.Hash, error) {
	switch name {
	case "sha256":
		return sha256.New, nil
	case "sha512":
		return sha512.New, nil
	case "sha1":
		return sha1.New, nil
	}
	return nil, fmt.Errorf("%w: hash %q", ErrUnsupported, name)
}

// maxKDFMemoryKiB bounds what an argon2 keyslot may make us allocate.
const maxKDFMemoryKiB = 1 << 20

func deriveSlotKey(kdf KDF, passphrase []byte, keySize int) ([]byte, error) {
	salt, err := base64.StdEncoding.DecodeString(kdf.Salt)
	if err != nil || len(salt) == 0 {
		return nil, fmt.Errorf("KDF salt is not base64")
	}
	switch kdf.Type {
	case "pbkdf2":
		h, err := hashByName(kdf.Hash)
		if err != nil {
			return nil, err
		}
		if kdf.Iterations < 1 || kdf.Iterations > 1<<30 {
			return nil, fmt.Errorf("PBKDF2 iterations %d out of range", kdf.Iterations)
		}
		return pbkdf2Key(h, passphrase, salt, kdf.Iterations, keySize)
	case "argon2i", "argon2id":
		if kdf.Time < 1 || kdf.Time > 1000 || kdf.Memory < 8 || kdf.Memory > maxKDFMemoryKiB || kdf.CPUs < 1 || kdf.CPUs > 255 {
			return nil, fmt.Errorf("%w: argon2 parameters time=%d memory=%d cpus=%d out of the accepted range", ErrUnsupported, kdf.Time, kdf.Memory, kdf.CPUs)
		}
		if kdf.Type == "argon2i" {
			return argon2.Key(passphrase, salt, uint32(kdf.Time), uint32(kdf.Memory), uint8(kdf.CPUs), uint32(keySize)), nil
		}
		return argon2.IDKey(passphrase, salt, uint32(kdf.Time), uint32(kdf.Memory), uint8(kdf.CPUs), uint32(keySize)), nil
	}
	return nil, fmt.Errorf("%w: KDF %q", ErrUnsupported, kdf.Type)
}

// checkSupported names the first feature of a keyslot this package cannot
// open.
func checkSupported(id string, ks Keyslot) error {
	switch {
	case ks.Type != "luks2":
		return fmt.Errorf("%w: keyslot %s type %q", ErrUnsupported, id, ks.Type)
	case ks.AF.Type != "luks1" || ks.AF.Stripes != Stripes:
		return fmt.Errorf("%w: keyslot %s anti-forensic split %s/%d", ErrUnsupported, id, ks.AF.Type, ks.AF.Stripes)
	case ks.Area.Type != "raw" || ks.Area.Encryption != Cipher:
		return fmt.Errorf("%w: keyslot %s area %s encrypted with %q (only %s)", ErrUnsupported, id, ks.Area.Type, ks.Area.Encryption, Cipher)
	case ks.Area.KeySize != 32 && ks.Area.KeySize != 64:
		return fmt.Errorf("%w: keyslot %s area key size %d", ErrUnsupported, id, ks.Area.KeySize)
	}
	if _, err := hashByName(ks.AF.Hash); err != nil {
		return err
	}
	return nil
}

// RecoverKey finds the keyslot that passphrase opens and returns the volume
// key, verified against the header's digest in constant time. The caller
// must wipe the key when done.
func RecoverKey(r io.ReaderAt, passphrase []byte) ([]byte, error) {
	h, err := ReadHeader(r)
	if err != nil {
		return nil, err
	}
	return h.RecoverKey(r, passphrase)
}

// RecoverKey is RecoverKey for an already parsed header.
func (h *Header) RecoverKey(r io.ReaderAt, passphrase []byte) ([]byte, error) {
	if seg, ok := h.Meta.Segments["0"]; !ok || seg.Type != "crypt" || seg.Encryption != Cipher {
		return nil, fmt.Errorf("%w: data segment is not %s", ErrUnsupported, Cipher)
	}
	ids := make([]string, 0, len(h.Meta.Keyslots))
	for id := range h.Meta.Keyslots {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	var firstErr error
	for _, id := range ids {
		key, err := h.openSlot(r, id, passphrase)
		if err == nil {
			return key, nil
		}
		if firstErr == nil && err != ErrWrongKey {
			firstErr = err
		}
	}
	if firstErr != nil {
		return nil, firstErr
	}
	return nil, ErrWrongKey
}

func (h *Header) openSlot(r io.ReaderAt, id string, passphrase []byte) ([]byte, error) {
	ks := h.Meta.Keyslots[id]
	if err := checkSupported(id, ks); err != nil {
		return nil, err
	}
	slotKey, err := deriveSlotKey(ks.KDF, passphrase, ks.Area.KeySize)
	if err != nil {
		return nil, fmt.Errorf("keyslot %s: %w", id, err)
	}
	defer clear(slotKey)
	off, _ := parseU64("offset", ks.Area.Offset)
	n := roundUp(uint64(ks.KeySize*ks.AF.Stripes), SectorSize)
	material := make([]byte, n)
	defer clear(material)
	if _, err := r.ReadAt(material, int64(off)); err != nil {
		return nil, fmt.Errorf("read keyslot %s: %w", id, err)
	}
	c, err := xtsCipher(slotKey)
	if err != nil {
		return nil, err
	}
	for s := 0; s*SectorSize < len(material); s++ {
		blk := material[s*SectorSize : (s+1)*SectorSize]
		c.Decrypt(blk, blk, uint64(s))
	}
	afHash, _ := hashByName(ks.AF.Hash)
	key, err := afMerge(material, ks.KeySize, ks.AF.Stripes, afHash())
	if err != nil {
		return nil, err
	}
	for _, d := range h.Meta.Digests {
		if !slices.Contains(d.Keyslots, id) {
			continue
		}
		if d.Type != "pbkdf2" {
			clear(key)
			return nil, fmt.Errorf("%w: digest type %q", ErrUnsupported, d.Type)
		}
		dh, err := hashByName(d.Hash)
		if err != nil {
			clear(key)
			return nil, err
		}
		salt, err1 := base64.StdEncoding.DecodeString(d.Salt)
		want, err2 := base64.StdEncoding.DecodeString(d.Digest)
		if err1 != nil || err2 != nil || len(want) == 0 || len(want) > 64 || d.Iterations < 1 || d.Iterations > 1<<30 {
			clear(key)
			return nil, fmt.Errorf("digest of keyslot %s is malformed", id)
		}
		got, err := pbkdf2Key(dh, key, salt, d.Iterations, len(want))
		if err != nil {
			clear(key)
			return nil, err
		}
		if subtle.ConstantTimeCompare(got, want) == 1 {
			return key, nil
		}
		clear(key)
		return nil, ErrWrongKey
	}
	clear(key)
	return nil, fmt.Errorf("keyslot %s has no digest", id)
}
