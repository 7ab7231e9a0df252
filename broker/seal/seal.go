// Package seal is the at-rest format of a broker's key shares and the
// master key kept in a file. A sealed share is
//
//	"esh1" | backend | nonce (12 random bytes) | AES-256-GCM ciphertext and tag
//
// where backend says which master key sealed it (File: a key in the
// broker's state folder; PKCS11: a non-extractable key in a PKCS#11 token,
// see package broker/hsm). The 5-byte header is authenticated with the
// caller's additional data, so a record sealed under one backend and opened
// under the other fails with a *WrongBackendError, never by silently
// decrypting to something else. Records written before the header existed
// (nonce | ciphertext, always under the file key) still open with the file
// key.
package seal

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"errors"
	"fmt"
)

// Backend is the kind of master key a share is sealed under.
type Backend byte

// Backends.
const (
	File   Backend = 'f' // AES-256 key in a file, used in memory
	PKCS11 Backend = 'p' // AES-256 key inside a PKCS#11 token
	// Legacy marks records without a header (file key, before version 1).
	Legacy Backend = 0
)

func (b Backend) String() string {
	switch b {
	case File:
		return "file master key"
	case PKCS11:
		return "PKCS#11 master key"
	case Legacy:
		return "file master key (unversioned record)"
	}
	return fmt.Sprintf("unknown backend %q", byte(b))
}

const (
	magic = "esh1"
	// HeaderSize is the length of a sealed record's header.
	HeaderSize = len(magic) + 1
	// NonceSize is the length of the random GCM nonce after the header.
	NonceSize = 12
	// TagSize is the length of the GCM tag ending the ciphertext.
	TagSize = 16
)

// Errors of opening a sealed share.
var (
	// ErrMalformed: the record is too short to be a sealed share.
	ErrMalformed = errors.New("sealed share malformed")
	// ErrNotAuthentic: the record does not authenticate under this master
	// key (another key of the same backend, or it was altered).
	ErrNotAuthentic = errors.New("share at rest does not authenticate under the master key")
)

// WrongBackendError is the refusal to open a record sealed under another
// kind of master key.
type WrongBackendError struct{ Sealed, Opener Backend }

func (e *WrongBackendError) Error() string {
	return fmt.Sprintf("share at rest was sealed under a %s, this broker uses a %s", e.Sealed, e.Opener)
}

// Header returns the header of a record sealed under backend b.
func Header(b Backend) []byte { return append([]byte(magic), byte(b)) }

// Split parses a record for the opener backend want: the header, the nonce
// and the ciphertext with its tag. A record of another backend (or an
// unversioned one) is a *WrongBackendError; a truncated one ErrMalformed.
func Split(sealed []byte, want Backend) (header, nonce, body []byte, err error) {
	got := Legacy
	if len(sealed) >= HeaderSize && bytes.HasPrefix(sealed, []byte(magic)) {
		got = Backend(sealed[len(magic)])
	}
	if got != want {
		return nil, nil, nil, &WrongBackendError{Sealed: got, Opener: want}
	}
	if len(sealed) < HeaderSize+NonceSize+TagSize {
		return nil, nil, nil, ErrMalformed
	}
	return sealed[:HeaderSize], sealed[HeaderSize : HeaderSize+NonceSize], sealed[HeaderSize+NonceSize:], nil
}

// AAD is the additional data a backend authenticates: the header, then the
// caller's.
func AAD(header, aad []byte) []byte {
	return append(append(make([]byte, 0, len(header)+len(aad)), header...), aad...)
}

// Nonce returns a fresh random GCM nonce.
func Nonce() ([]byte, error) {
	n := make([]byte, NonceSize)
	if _, err := rand.Read(n); err != nil {
		return nil, fmt.Errorf("nonce: %w", err)
	}
	return n, nil
}

// FileKey seals shares with a 32-byte master key held in memory (read from
// the broker's state folder).
type FileKey struct{ aead cipher.AEAD }

// NewFileKey makes a FileKey; the caller may clear key afterwards.
func NewFileKey(key []byte) (*FileKey, error) {
	if len(key) != 32 {
		return nil, errors.New("broker master key must be 32 bytes")
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, err
	}
	return &FileKey{aead}, nil
}

// Seal encrypts plain, authenticating aad.
func (k *FileKey) Seal(plain, aad []byte) ([]byte, error) {
	nonce, err := Nonce()
	if err != nil {
		return nil, err
	}
	h := Header(File)
	out := append(h, nonce...)
	return k.aead.Seal(out, nonce, plain, AAD(h, aad)), nil
}

// Open decrypts a record sealed by Seal with the same key and aad (or an
// unversioned record of the same key).
func (k *FileKey) Open(sealed, aad []byte) ([]byte, error) {
	h, nonce, body, err := Split(sealed, File)
	var wb *WrongBackendError
	if errors.As(err, &wb) && wb.Sealed == Legacy {
		return k.openLegacy(sealed, aad)
	}
	if err != nil {
		return nil, err
	}
	out, err := k.aead.Open(nil, nonce, body, AAD(h, aad))
	if err != nil {
		return nil, ErrNotAuthentic
	}
	return out, nil
}

// openLegacy opens nonce | ciphertext, the format before the header.
func (k *FileKey) openLegacy(sealed, aad []byte) ([]byte, error) {
	if len(sealed) < NonceSize+TagSize {
		return nil, ErrMalformed
	}
	out, err := k.aead.Open(nil, sealed[:NonceSize], sealed[NonceSize:], aad)
	if err != nil {
		return nil, ErrNotAuthentic
	}
	return out, nil
}
